"""Images as the model sees them (issue 25): every image mode is converted exactly as transformers' image
processors convert it (checked against each family's real processor on the original image), and a bad image is one
line naming it, never Pillow's traceback, warning or an object address."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from bad_images import png_header, thin_png
from PIL import Image
from tiny_vlms import IMAGE_PROCESSORS, llava_model, llava_processor

from pipeline import Explainer
from pipeline.atman.images import MAX_PROCESSED_PIXELS
from pipeline.atman.multimodal import MAX_PIXELS, load_images


def _modes() -> dict[str, Image.Image]:
    """One image per mode a user's file can have, with content in every channel (alpha that varies)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (20, 24), dtype=np.uint8)]))
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 3  # one palette entry transparent (a PNG tRNS chunk)
    return {
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "P+transparency": palette,
        "I;16": Image.fromarray(rng.integers(0, 65536, (20, 24)).astype(np.uint16)),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "L": Image.fromarray(rgb).convert("L"),
        "1": Image.fromarray(rgb).convert("1"),
        "RGB": Image.fromarray(rgb),
    }


def _file(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="TIFF" if image.mode == "CMYK" else "PNG")  # each mode in a format that keeps it
    return buf.getvalue()


def _pixels(image_processor, family: str, image: Image.Image) -> np.ndarray:
    images = [[image]] if family == "idefics3" else [image]
    return image_processor(images=images, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("family", IMAGE_PROCESSORS)
@pytest.mark.parametrize("mode", _modes())
def test_every_mode_is_what_the_processor_makes_of_the_original(family, mode):
    image_processor = IMAGE_PROCESSORS[family]()
    original = _modes()[mode]
    as_file = _file(original)
    assert Image.open(io.BytesIO(as_file)).mode == original.mode, "the file keeps the mode under test"
    for given, reopened in ((original, original), (as_file, Image.open(io.BytesIO(as_file)))):
        loaded = load_images([given])[0]
        assert loaded.mode == "RGB" and loaded.size == original.size
        np.testing.assert_array_equal(
            _pixels(image_processor, family, loaded), _pixels(image_processor, family, reopened)
        )


def test_a_plain_rgb_conversion_would_not_be_what_the_model_sees():
    """The check above can fail: dropping alpha (the old ``convert("RGB")``) gives other pixels than the processor's
    compositing onto white."""
    image_processor = IMAGE_PROCESSORS["llava"]()
    rgba = _modes()["RGBA"]
    dropped = _pixels(image_processor, "llava", rgba.convert("RGB"))
    assert np.abs(dropped - _pixels(image_processor, "llava", rgba)).max() > 0.5


def test_an_rgba_image_is_explained_as_the_model_sees_it(tokenizer):
    """End to end: an RGBA picture and the same picture composited onto white by hand explain identically."""
    processor = llava_processor(tokenizer)
    model = llava_model(
        vocab_size=len(processor.tokenizer), image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>")
    )
    rgba = _modes()["RGBA"].resize((64, 48))
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    composited = Image.alpha_composite(white, rgba).convert("RGB")
    explainer = Explainer(model, processor)
    a, b = (explainer.explain("What is shown?", " a dog", images=[x], chat=False) for x in (rgba, composited))
    assert a.base_target_ce == pytest.approx(b.base_target_ce, abs=1e-6)
    np.testing.assert_allclose(a.image_scores, b.image_scores, atol=1e-6)


BAD = {
    "bomb": (png_header(60_000, 60_000), r"^images\[0\]: 3,600,000,000 pixels is over 50,000,000 pixels$"),
    "100 MP": (png_header(10_000, 10_000), r"^images\[0\]: 10000x10000 is over 50,000,000 pixels$"),
    "junk": (b"\x89PNG broken", r"^images\[0\]: not a readable image \(no image format Pillow knows\)$"),
    "truncated": (_file(_modes()["RGB"])[:60], r"^images\[0\]: not a readable image \(OSError: .*\)$"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_image_is_one_line_naming_it(case):
    data, message = BAD[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not reach the user
        with pytest.raises(ValueError, match=message) as caught:
            load_images([data])
    assert " at 0x" not in str(caught.value) and "\n" not in str(caught.value)
    assert MAX_PIXELS == 50_000_000


def test_a_path_is_named(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(60_000, 60_000))
    with pytest.raises(ValueError, match=rf"^images\[0\]: {tmp_path}/bomb.png: 3,600,000,000 pixels is over"):
        load_images([str(tmp_path / "bomb.png")])


def test_a_thin_image_is_refused_before_the_processor_makes_it_huge(tokenizer):
    """1 x 100,000 is 0.1 MP, but LLaVA's shortest-edge resize (32 px here) would make it 32 x 3,200,000 before
    cropping: refused from the processor's own settings before it allocates anything."""
    processor = llava_processor(tokenizer)
    model = llava_model(
        vocab_size=len(processor.tokenizer), image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>")
    )
    thin = load_images([thin_png()])[0]
    expected = rf"^images\[0\]: 1x100000: the model's processor would make it 32x3200000, over {MAX_PROCESSED_PIXELS:,}"
    with pytest.raises(ValueError, match=expected):
        Explainer(model, processor).explain("What is shown?", " red", images=[thin], chat=False)


@pytest.mark.parametrize("family", IMAGE_PROCESSORS)
def test_the_processed_size_guard_refuses_only_what_the_processor_would_blow_up(family):
    """A 20 MP photograph passes for every family (their processors shrink it); only LLaVA's shortest-edge resize
    blows a thin strip up, and only Qwen2-VL's processor refuses aspect ratios past 200:1."""
    from types import SimpleNamespace

    from pipeline.atman.images import check_processed_size

    model = SimpleNamespace(config=SimpleNamespace(model_type=family))
    ip = IMAGE_PROCESSORS[family]()
    check_processed_size(model, ip, (5_000, 4_000))
    check_processed_size(model, ip, (200, 1))
    if family == "llava":  # 32 px shortest edge: 1 x 15,625 becomes 32 x 500,000, 16,000,000 pixels
        check_processed_size(model, ip, (1, 15_625))
        with pytest.raises(ValueError, match=r"^1x15626: the model's processor would make it 32x500032, over"):
            check_processed_size(model, ip, (1, 15_626))
    elif family == "qwen2_vl":
        with pytest.raises(ValueError, match=r"^201x1: Qwen2-VL's processor takes aspect ratios up to 200:1$"):
            check_processed_size(model, ip, (201, 1))
    else:
        check_processed_size(model, ip, (1, 100_000))
