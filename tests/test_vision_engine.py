"""AtMan on vision-language models (issue 16): the engine, fed what each model hands its language model
(pipeline/atman/vision.py), equals an independent naive sweep — the model's own full forward per unit, vision tower
and masks its own, suppression inside its language model (tests/oracle.py) — to 1e-4, per family and mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import oracle_vlm_scores
from tiny_vlms import IMAGE, VLMS

from pipeline.atman import attention
from pipeline.atman.sweep import SweepInput, sweep
from pipeline.atman.vision import blocks_from_mask, lift

TOL = 1e-4
N_TARGET = 3
MODES = ("log_additive", "multiplicative", "scale")


def units(ids: torch.Tensor, n_target: int) -> list[list[int]]:
    """Every image token alone, the whole image, each text token of the prompt alone, and an image token with the
    text token after the image together."""
    n = len(ids)
    image = [p for p in range(n - n_target) if ids[p] == IMAGE]
    text = [p for p in range(n - n_target) if ids[p] != IMAGE]
    return [[p] for p in image] + [image] + [[p] for p in text] + [[image[1], image[-1] + 1]]


def multipliers(n: int, groups: list[list[int]], factor: float) -> torch.Tensor:
    mult = torch.ones(len(groups), n)
    for u, group in enumerate(groups):
        mult[u, group] = factor
    return mult


@pytest.fixture(scope="module", params=sorted(VLMS))
def family(request):
    model, inputs = VLMS[request.param]()
    return request.param, model, inputs


def engine_scores(model, inputs, mult, mode, **kwargs) -> np.ndarray:
    lifted = lift(model, inputs, N_TARGET)
    ids = inputs["input_ids"][0]
    request = SweepInput(ids, N_TARGET, mult, lifted.embeds, lifted.positions, lifted.blocks, lifted.base_ce)
    with attention.activated(model):
        out = sweep(model, [request], mode=mode, **kwargs)[0]
    return (out.ce - out.base_ce[None]).sum(dim=1).double().numpy()


@pytest.mark.parametrize("mode", MODES)
def test_engine_equals_the_naive_sweep(family, mode):
    name, model, inputs = family
    ids = inputs["input_ids"][0]
    factor = 0.0 if mode == "log_additive" else 0.1
    mult = multipliers(len(ids), units(ids, N_TARGET), factor)
    expected = oracle_vlm_scores(model, inputs, mult, N_TARGET, mode)
    assert np.abs(expected).max() > 1e-2, "suppression must move the CE for the check to mean anything"
    got = engine_scores(model, inputs, mult, mode)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL, err_msg=f"{name} {mode}")
    # one row per batch: each pass starts at its own first changed position (in a batch, rows share the earliest)
    alone = engine_scores(model, inputs, mult, mode, batch_size=1)
    np.testing.assert_allclose(alone, expected, rtol=0, atol=TOL, err_msg=f"{name} {mode}, one pass per batch")
    no_reuse = engine_scores(model, inputs, mult, mode, prefix_reuse=False, batch_size=3)
    np.testing.assert_allclose(no_reuse, expected, rtol=0, atol=TOL, err_msg=f"{name} {mode} without prefix reuse")
    worst = max(float(np.abs(x - expected).max()) for x in (got, alone, no_reuse))
    print(f"{name} {mode}: max |engine - naive| = {worst:.1e} over {len(mult)} units")  # pytest -s shows it


def test_what_each_family_hands_its_language_model(family):
    """M-RoPE positions for Qwen (three rows, the image's height / width indices), bidirectional image blocks for
    Gemma 3 only, none for the causal families."""
    name, model, inputs = family
    ids = inputs["input_ids"][0]
    lifted = lift(model, inputs, N_TARGET)
    image = (ids == IMAGE).nonzero()[:, 0]
    assert lifted.embeds.shape[0] == len(ids)
    if name.startswith("qwen"):
        assert lifted.positions.shape == (3, len(ids))
        assert not torch.equal(lifted.positions[1], lifted.positions[2]), "height and width indices differ"
        assert lifted.positions[0, -1] < len(ids) - 1, "text resumes after the image at its largest index"
    else:
        assert lifted.positions is None or torch.equal(lifted.positions, torch.arange(len(ids)))
    if name == "gemma3":
        assert lifted.blocks.tolist() == [0 if t == IMAGE else -1 for t in ids.tolist()]
        assert int(image[0]) == int((lifted.blocks == 0).nonzero()[0])
    else:
        assert lifted.blocks is None


def test_a_suppressed_image_token_changes_earlier_tokens_of_its_block():
    """Gemma 3's image block is bidirectional: suppressing its last token changes the output at its first; the
    engine must start that pass at the block (with prefix reuse) — the oracle agrees only if it does."""
    model, inputs = VLMS["gemma3"]()
    ids = inputs["input_ids"][0]
    image = (ids == IMAGE).nonzero()[:, 0].tolist()
    mult = multipliers(len(ids), [[image[-1]]], 0.0)
    request = SweepInput(ids, N_TARGET, mult, *_lifted_fields(model, inputs))
    assert request.start(image[-1]) == image[0] and request.start(image[-1] + 1) == image[-1] + 1
    expected = oracle_vlm_scores(model, inputs, mult, N_TARGET, "log_additive")
    np.testing.assert_allclose(engine_scores(model, inputs, mult, "log_additive"), expected, atol=TOL)


def _lifted_fields(model, inputs):
    lifted = lift(model, inputs, N_TARGET)
    return lifted.embeds, lifted.positions, lifted.blocks, lifted.base_ce


def test_wrong_positions_are_refused():
    """The sweep's unperturbed pass must reproduce the model's own: Qwen's M-RoPE positions replaced by 0..n-1
    would explain another model, and are refused naming the model."""
    model, inputs = VLMS["qwen2_vl"]()
    ids = inputs["input_ids"][0]
    embeds, _positions, blocks, base_ce = _lifted_fields(model, inputs)
    request = SweepInput(ids, N_TARGET, multipliers(len(ids), [[1]], 0.1), embeds, None, blocks, base_ce)
    with attention.activated(model), pytest.raises(attention.UnsupportedModelError, match="Qwen2VL.*differs from"):
        sweep(model, [request], mode="log_additive")


def test_block_patterns():
    n = 6
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert blocks_from_mask(None, n) is None and blocks_from_mask(causal[None, None], n) is None
    bidir = causal.clone()
    bidir[2:5, 2:5] = True
    float_mask = torch.zeros(n, n).masked_fill(~bidir, torch.finfo(torch.float32).min)
    assert blocks_from_mask({"full": float_mask[None, None], "other": None}, n).tolist() == [-1, -1, 0, 0, 0, -1]
    odd = causal.clone()
    odd[0, 3] = True  # a token sees a later one outside any block
    with pytest.raises(attention.UnsupportedModelError, match="not causal with contiguous bidirectional blocks"):
        blocks_from_mask(odd[None, None], n)
