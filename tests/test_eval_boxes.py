"""`atman eval boxes`: the image protocol on the bundled synthetic squares with a tiny LLaVA (random weights: the
numbers test the plumbing and the metrics, not a model's quality)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_vlms import llava_model, llava_processor

from pipeline import LoadedModel
from pipeline.data import BOXES
from pipeline.eval_boxes import BoxEval, evaluate_boxes, load_boxes, unit_truth

ATMAN = str(Path(sys.executable).parent / "atman")


@pytest.fixture(scope="module")
def vlm(tokenizer):
    processor = llava_processor(tokenizer)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    model = llava_model(vocab_size=len(processor.tokenizer), image_token_id=image_id)
    return LoadedModel(model, processor.tokenizer, "tiny-llava", "random", processor=processor)


def test_the_bundled_set():
    examples = load_boxes(BOXES)
    assert len(examples) == 8 and all(e.image.is_file() for e in examples)
    assert {e.target for e in examples} == {" red", " green", " blue"} and examples[0].boxes == [(4, 4, 20, 20)]


def test_ground_truth_is_the_share_of_each_box_inside(vlm):
    ev = BoxEval(vlm, image_grid="2x2")
    planned, truth = ev.prepare(load_boxes(BOXES)[0])  # a 16 px square at (4, 4) in a 64 x 48 image
    assert [u.patch.box for u in planned.image_units] == [
        (0, 0, 32, 24),
        (32, 0, 64, 24),
        (0, 24, 32, 48),
        (32, 24, 64, 48),
    ]
    np.testing.assert_allclose(truth, [16 * 16 / (32 * 24), 0, 0, 0])
    assert unit_truth(planned, [(0, 0, 64, 48)]).tolist() == [1.0] * 4


def test_ixg_is_the_gradient_of_the_targets_log_probability(vlm):
    """Input x Gradient by hand on the embeddings the language model receives (LLaVA: causal, plain positions)."""
    ev = BoxEval(vlm)
    planned, _ = ev.prepare(load_boxes(BOXES)[1])
    si = planned.sweep_input
    embeds = si.embeds[None].clone().requires_grad_()
    n_prompt = len(si.input_ids) - si.n_target
    logits = vlm.model(inputs_embeds=embeds).logits[0, n_prompt - 1 : -1]
    logp = torch.log_softmax(logits, -1).gather(-1, si.input_ids[n_prompt:, None]).sum()
    (grad,) = torch.autograd.grad(logp, embeds)
    tokens = (grad * embeds).sum(-1)[0].detach().numpy()
    expected = [tokens[list(u.positions)].sum() for u in planned.image_units]
    got = ev.scores("ixg", planned, np.random.default_rng(0))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert len(got) == 16 and np.abs(got).max() > 0


def test_evaluate_shape_and_the_cli(vlm, tmp_path):
    result = evaluate_boxes(vlm, load_boxes(BOXES, limit=2), ["atman", "ixg", "ig", "random"], image_grid="2x2")
    assert result["n"] == 2 and set(result["methods"]) == {"atman", "ixg", "ig", "random"}
    for name, m in result["methods"].items():
        assert 0 <= m["mAP"] <= 100 and 0 <= m["mAR"] <= 100 and m["seconds_per_example"] >= 0, name
    model_dir = tmp_path / "tiny-llava"
    vlm.model.save_pretrained(model_dir)
    vlm.processor.save_pretrained(model_dir)
    out = subprocess.run([ATMAN, "eval", "boxes", "--model", str(model_dir), "--limit", "2", "--methods",
                          "atman,random", "--json"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads(out.stdout)
    assert d["n"] == 2 and len(d["examples"][0]["methods"]) == 2 and d["examples"][0]["n_units"] == 16


def test_bad_input_exits_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "image": "x.png", "question": "q", "target": " t", "boxes": [[5, 5, 1, 1]]}\n')
    out = subprocess.run([ATMAN, "eval", "boxes", "--model", "x", "--data", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "bad.jsonl:1 is not a box example" in out.stderr
    out = subprocess.run(
        [ATMAN, "eval", "boxes", "--model", "x", "--methods", "rollout"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "methods: rollout not available for images" in out.stderr
