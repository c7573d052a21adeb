"""`atman explain --image`: a vision-language model from a local directory (a tiny LLaVA with a real LlavaProcessor,
saved as a user's download would be), the text and image tables, the JSON, the overlay PNG, and refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_vlms import save_tiny_llava

from pipeline import AtManConfig, Explainer, load_model

ATMAN = str(Path(sys.executable).parent / "atman")
PROMPT = "What is shown in the picture?"
TARGET = " a red square"


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), tokenizer)


@pytest.fixture(scope="module")
def picture_file(tmp_path_factory) -> Path:
    pixels = np.full((48, 64, 3), 200, dtype=np.uint8)
    pixels[:24, :32] = (255, 0, 0)
    path = tmp_path_factory.mktemp("pictures") / "picture.png"
    Image.fromarray(pixels).save(path)
    return path


def atman(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ATMAN, "explain", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_json_overlay_and_the_python_api_agree(vlm_dir, picture_file, tmp_path):
    png = tmp_path / "heat.png"
    out = atman("--model", str(vlm_dir), "--image", str(picture_file), "--prompt", PROMPT, "--target", TARGET,
                "--no-chat", "--image-grid", "2x2", "--overlay", str(png), "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads(out.stdout)
    assert d["images"] == [{"width": 64, "height": 48}] and len(d["image_units"]) == 4
    assert [u["box"] for u in d["image_units"]] == [[0, 0, 32, 24], [32, 0, 64, 24], [0, 24, 32, 48], [32, 24, 64, 48]]
    assert f"wrote {png}" in out.stderr
    lm = load_model(str(vlm_dir), device="cpu")
    assert lm.processor is not None and type(lm.model).__name__ == "LlavaForConditionalGeneration"
    e = Explainer(lm, AtManConfig()).explain(PROMPT, TARGET, images=[picture_file], chat=False, image_grid="2x2")
    np.testing.assert_allclose([u["score"] for u in d["image_units"]], e.image_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([u["score"] for u in d["units"]], e.scores, rtol=1e-5, atol=1e-6)

    heat = np.asarray(Image.open(png).convert("RGB"), dtype=float)
    original = np.asarray(Image.open(picture_file).convert("RGB"), dtype=float)
    assert heat.shape == original.shape
    strongest = int(np.argmax(np.abs(e.image_scores)))
    x0, y0, x1, y1 = (int(v) for v in d["image_units"][strongest]["box"])
    cell = heat[y0:y1, x0:x1] - original[y0:y1, x0:x1]
    sign = np.sign(e.image_scores[strongest])
    towards = cell[..., 0] - cell[..., 2] if sign > 0 else cell[..., 2] - cell[..., 0]  # red up / blue up
    assert (towards >= 0).all() and np.abs(cell).max() > 20, "the strongest cell is tinted in its score's colour"


def test_tables_in_the_terminal(vlm_dir, picture_file, tmp_path):
    out = atman("--model", str(vlm_dir), "--image", str(picture_file), "--prompt", PROMPT, "--target", TARGET,
                "--no-chat", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "image units" in out.stdout and "box (x0, y0, x1, y1)" in out.stdout
    assert "wrote atman-overlay.png" in out.stdout and (tmp_path / "atman-overlay.png").is_file()


def test_refusals(vlm_dir, picture_file, tmp_path):
    out = atman("--prompt", PROMPT, "--target", TARGET, "--image-grid", "8x8")
    assert out.returncode == 2 and "--image-grid: needs --image" in out.stderr
    out = atman("--model", str(vlm_dir), "--image", str(tmp_path / "nope.png"), "--prompt", PROMPT, "--target", TARGET)
    assert out.returncode == 2 and "images[0]: " in out.stderr and "nope.png does not exist" in out.stderr
    out = atman("--model", str(vlm_dir), "--image", str(picture_file), "--prompt", PROMPT, "--target", TARGET,
                "--image-grid", "0x3")  # fmt: skip
    assert out.returncode == 2 and "image_grid: '0x3' needs at least one row and one column" in out.stderr


def test_bad_images_and_text_models_are_one_line(vlm_dir, tmp_path):
    """Issue 25: a decompression bomb, an extreme shape and a text-only model each exit 2 with one line that names
    the problem (no traceback, no Pillow warning); a text-only model says which models take images."""
    from bad_images import png_header, thin_png

    (tmp_path / "bomb.png").write_bytes(png_header(60_000, 60_000))
    (tmp_path / "thin.png").write_bytes(thin_png())
    expected = {
        "bomb.png": f"images[0]: {tmp_path}/bomb.png: 3,600,000,000 pixels is over 50,000,000 pixels",
        "thin.png": "images[0]: 1x100000: the model's processor would make it 32x3200000, over 16,000,000 pixels",
    }
    for name, message in expected.items():
        out = atman("--model", str(vlm_dir), "--image", str(tmp_path / name), "--prompt", PROMPT, "--target", TARGET)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr and "Warning" not in out.stderr
    out = atman("--image", str(tmp_path / "thin.png"), "--prompt", PROMPT, "--target", TARGET)  # the default model
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    assert "--image: 'smollm2-135m-instruct' is a text-only model" in out.stderr and "llava, qwen2_vl" in out.stderr
