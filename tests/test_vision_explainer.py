"""`Explainer(model, processor).explain(prompt, target, images=[...])` on tiny VLMs with their real processors
(LLaVA, Gemma 3, Idefics3, Qwen2-VL / Qwen2.5-VL): text and image units, scores equal to the naive full-forward
oracle, boxes, grids, round trip and refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from oracle import oracle_vlm_scores
from PIL import Image
from tiny_vlms import (
    gemma3,
    gemma3_processor,
    idefics3_model,
    idefics3_processor,
    llava_model,
    llava_processor,
    qwen2_5_vl,
    qwen2_vl,
    qwen_processor,
)

from pipeline import AtManConfig, Explainer
from pipeline.atman.explanation import Explanation

PROMPT = "What is shown in the picture?"
TARGET = " a red square"
TOL = 1e-4


@pytest.fixture(scope="module")
def vlm(tokenizer):
    processor = llava_processor(tokenizer)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    model = llava_model(vocab_size=len(processor.tokenizer), image_token_id=image_id)
    return model, processor


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)  # 64 wide, 48 high: CLIP resizes to 42 x 32, crops 32 x 32
    pixels[:24, :32] = (255, 0, 0)
    pixels[24:, 32:] = (0, 0, 255)
    return Image.fromarray(pixels)


def oracle_inputs(model, processor, picture, placeholder="<image>"):
    """The model's inputs built by hand: the processor on the image placeholder, a newline and the prompt, then the
    target's tokens (per-token processor outputs extended over them as text)."""
    images = [[picture]] if model.config.model_type == "idefics3" else [picture]
    enc = processor(text=[placeholder + "\n" + PROMPT], images=images, return_tensors="pt")
    target = processor.tokenizer(TARGET, add_special_tokens=False, return_tensors="pt")["input_ids"]
    inputs = {k: v for k, v in enc.items() if k != "attention_mask"}
    inputs["input_ids"] = torch.cat([enc["input_ids"], target], dim=1)
    for key in ("token_type_ids", "mm_token_type_ids"):  # per token: the target's are text
        if key in inputs:
            inputs[key] = torch.cat([enc[key], torch.zeros_like(target).to(enc[key].dtype)], dim=1)
    return inputs, target.shape[1]


def family(name, tokenizer, workdir):
    """(model, processor, placeholder text) of one family, the model's vocabulary and image tokens the processor's."""
    if name == "llava":
        processor = llava_processor(tokenizer)
        image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        return llava_model(vocab_size=len(processor.tokenizer), image_token_id=image_id), processor, "<image>"
    if name == "gemma3":
        processor = gemma3_processor(tokenizer, workdir)
        tok = processor.tokenizer
        tokens = (tok.image_token_id, tok.boi_token_id, tok.eoi_token_id)
        return gemma3(vocab_size=len(tok), tokens=tokens)[0], processor, "<start_of_image>"
    if name.startswith("qwen"):
        processor = qwen_processor(tokenizer, workdir)
        tok = processor.tokenizer
        ids = tuple(tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
        build = qwen2_vl if name == "qwen2_vl" else qwen2_5_vl
        return build(vocab_size=len(tok), tokens=ids)[0], processor, "<|vision_start|><|image_pad|><|vision_end|>"
    processor = idefics3_processor(tokenizer)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    return idefics3_model(vocab_size=len(processor.tokenizer), image_token_id=image_id), processor, "<image>"


@pytest.mark.parametrize("name", ["llava", "gemma3", "idefics3", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("mode", ["log_additive", "multiplicative"])
def test_image_and_text_scores_equal_the_oracle(name, mode, tokenizer, picture, tmp_path):
    model, processor, placeholder = family(name, tokenizer, tmp_path)
    e = Explainer(model, processor, AtManConfig(mode=mode, granularity="token")).explain(
        PROMPT, TARGET, images=[picture], chat=False
    )
    inputs, n_target = oracle_inputs(model, processor, picture, placeholder)
    ids = inputs["input_ids"][0]
    image_pos = (ids == model.config.image_token_id).nonzero()[:, 0].tolist()
    prompt_ids = processor.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    n = len(ids)
    text_pos = list(range(n - n_target - len(prompt_ids), n - n_target))
    assert ids[text_pos].tolist() == prompt_ids, "the prompt's tokens end the prompt"
    groups = [[p] for p in text_pos] + [[p] for p in image_pos]
    mult = torch.ones(len(groups), n)
    for u, group in enumerate(groups):
        mult[u, group] = 0.1
    expected = oracle_vlm_scores(model, inputs, mult, n_target, mode)
    assert len(e.units) == len(text_pos) and len(e.image_units) == len(image_pos) > 0
    np.testing.assert_allclose(e.scores, expected[: len(text_pos)], atol=TOL)
    np.testing.assert_allclose(e.image_scores, expected[len(text_pos) :], atol=TOL)
    assert "".join(u.text for u in e.units) == PROMPT and all(PROMPT[u.start : u.end] == u.text for u in e.units)
    assert e.images == [(64, 48)]


def test_boxes_and_grid(vlm, picture):
    model, processor = vlm
    e = Explainer(model, processor).explain(PROMPT, TARGET, images=[picture], chat=False)
    # CLIP: shorter edge 48 -> 32 (y scale 1.5), longer 64 -> int(42.7) = 42 (x scale 64 / 42), centre crop 32 of 42
    # from x = 5: 4 x 4 patches of 8 px
    sx = 64 / 42
    assert e.image_units[0].box == pytest.approx((5 * sx, 0.0, 13 * sx, 12.0))
    assert e.image_units[-1].box == pytest.approx((29 * sx, 36.0, 37 * sx, 48.0))
    grid = Explainer(model, processor).explain(PROMPT, TARGET, images=[picture], chat=False, image_grid="2x2")
    cells = [(0, 0, 32, 24), (32, 0, 64, 24), (0, 24, 32, 48), (32, 24, 64, 48)]  # 2 x 2 over the whole image
    assert [u.box for u in grid.image_units] == [pytest.approx(c) for c in cells]
    # patch centres: x = (9, 17, 25, 33) * sx = 13.7, 25.9, 38.1, 50.3; y = 6, 18, 30, 42 -> 2 x 2 patches per cell
    inputs, n_target = oracle_inputs(model, processor, picture)
    ids = inputs["input_ids"][0]
    image_pos = (ids == model.config.image_token_id).nonzero()[:, 0]
    mult = torch.ones(4, len(ids))
    for u, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        mult[u, image_pos[[4 * (2 * r + i) + 2 * c + j for i in range(2) for j in range(2)]]] = 0.1
    expected = oracle_vlm_scores(model, inputs, mult, n_target, "log_additive")
    np.testing.assert_allclose(grid.image_scores, expected, atol=TOL)
    assert len(grid.image_scores) == 4 and np.isfinite(grid.image_scores).all()
    assert Explanation.from_dict(e.to_dict()) == e
    first = e.to_dict()["image_units"][0]
    assert first == {"image": 0, "box": pytest.approx([5 * sx, 0, 13 * sx, 12]), "view": "",
                     "score": pytest.approx(float(e.image_scores[0]))}  # fmt: skip


def test_refusals(vlm, picture, tmp_path, tokenizer):
    model, processor = vlm
    explainer = Explainer(model, processor)
    with pytest.raises(ValueError, match=r"^images\[0\]: .*missing.png does not exist"):
        explainer.explain(PROMPT, TARGET, images=[tmp_path / "missing.png"])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"^images\[0\]: .*bad.png: not a readable image"):
        explainer.explain(PROMPT, TARGET, images=[str(tmp_path / "bad.png")])
    with pytest.raises(ValueError, match=r"^image_grid: 'eight' is not ROWSxCOLS"):
        explainer.explain(PROMPT, TARGET, images=[picture], image_grid="eight")
    with pytest.raises(ValueError, match=r"^generate: give either a target or generate=N"):
        explainer.explain(PROMPT, TARGET, images=[picture], generate=3)
    with pytest.raises(ValueError, match=r"^conceptual_threshold: .* image tokens"):
        Explainer(model, processor, AtManConfig(conceptual_threshold=0.7)).explain(PROMPT, TARGET, images=[picture])
    text_only = copy.copy(processor)
    text_only.chat_template = tokenizer.chat_template  # SmolLM2's: it joins string contents, not image parts
    with pytest.raises(ValueError, match=r"^chat: the processor's chat template cannot lay out images"):
        Explainer(model, text_only).explain(PROMPT, TARGET, images=[picture], chat=True)
    with pytest.raises(ValueError, match=r"^images: LlavaForConditionalGeneration came with a tokenizer, not an image"):
        Explainer(model, processor.tokenizer).explain(PROMPT, TARGET, images=[picture])


@pytest.mark.parametrize("name", ["llava", "gemma3", "qwen2_vl"])
def test_a_generated_target_is_the_models_own_greedy_answer(name, tokenizer, picture, tmp_path):
    """Without a target the model answers from the prompt and the image (greedy), and that answer is explained:
    the same tokens as the model's own generate on the processor's inputs, the same scores as explaining it given."""
    model, processor, placeholder = family(name, tokenizer, tmp_path)
    model.generation_config.eos_token_id = None  # random weights: never stop early, so 4 tokens are generated
    explainer = Explainer(model, processor)
    e = explainer.explain(PROMPT, images=[picture], generate=4, chat=False)
    images = [[picture]] if model.config.model_type == "idefics3" else [picture]
    enc = processor(text=[placeholder + "\n" + PROMPT], images=images, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)[0, enc["input_ids"].shape[1] :]
    assert e.target_tokens == [processor.tokenizer.decode([t]) for t in out.tolist()] and len(out) == 4
    # the explained target's unperturbed CE is that of these tokens after the prompt, by a plain forward
    inputs = {k: v for k, v in enc.items() if k != "attention_mask"}
    inputs["input_ids"] = torch.cat([enc["input_ids"], out[None]], dim=1)
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in inputs:
            inputs[key] = torch.cat([inputs[key], torch.zeros_like(out)[None].to(inputs[key].dtype)], dim=1)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -len(out) - 1 : -1]
    ce = torch.nn.functional.cross_entropy(logits.float(), out, reduction="sum")
    assert e.base_target_ce == pytest.approx(float(ce), abs=1e-4)
    assert len(e.image_scores) == len(e.image_units) > 0 and np.isfinite(e.image_scores).all()
