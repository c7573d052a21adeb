"""``attention_kernel="flex"`` (pipeline/atman/flex.py) equals the naive method (``engine="reference"``) to 1e-4 in
every suppression form, on tiny models with sliding windows, soft-capping, ALiBi and grouped-query attention, with
prompts of different lengths batched together (either padding side), with and without prefix reuse; and it still
refuses a model whose attention AtMan does not reach in every layer.

On a CPU flex_attention runs its eager (unfused) implementation, which ignores the block mask's tiles: the block mask
the compiled kernel reads is checked against PyTorch's own ``create_block_mask`` separately. That implementation
first traces the score_mod and mask_mod with dynamo (~0.5 s per new shape or closure), as the compiled kernel does;
most tests here skip the tracing (``unfused``: the same arithmetic, run directly) and a few keep it, so that what
the compiled kernel has to trace is traced."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.attention.flex_attention as flex_attention_module
from test_engine_equivalence import PROMPTS as ALL_PROMPTS
from test_engine_equivalence import TARGETS as ALL_TARGETS
from test_engine_equivalence import TOL
from test_refusal import _OwnEagerAttention
from tiny_models import tiny_model
from torch.nn.attention.flex_attention import create_block_mask

from pipeline import AtManConfig, Explainer, LoadedModel, UnsupportedModelError
from pipeline.atman import flex

PROMPTS, TARGETS = ALL_PROMPTS[1:], ALL_TARGETS[1:]  # two lengths: rows of both share padded passes
BF16_TOL = 1e-2
"""flex against sdpa under mixed_bf16: both on bfloat16 inputs, one accumulating in another order than the other."""
MODES = ("log_additive", "multiplicative", "scale", "multiplicative_full_row")
FAMILIES = {
    "llama": "grouped-query attention",
    "qwen2": "a sliding-window layer",
    "gemma2": "soft-capping, sliding + global layers",
    "bloom": "ALiBi (adapter)",
}


@pytest.fixture
def unfused(monkeypatch):
    """flex_attention's eager implementation without dynamo's tracing in front of it (the same math_attention)."""
    monkeypatch.setattr(flex_attention_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


@pytest.fixture(scope="module")
def lms(tokenizer):
    @functools.cache
    def get(family):
        return LoadedModel(tiny_model(family, len(tokenizer)), tokenizer, f"tiny-{family}", "random")

    return get


@pytest.fixture(scope="module")
def reference(lms):
    """The naive method's explanations of PROMPTS, once per (family, mode)."""

    @functools.cache
    def get(family, mode):
        return Explainer(lms(family), AtManConfig(mode=mode, engine="reference")).explain_batch(
            PROMPTS, TARGETS, chat=False
        )

    return get


def assert_flex_equals_reference(lms, reference, family, mode, **config) -> None:
    cfg = AtManConfig(mode=mode, attention_kernel="flex", batch_size=7, **config)
    got = Explainer(lms(family), cfg).explain_batch(PROMPTS, TARGETS, chat=False)
    for r, f in zip(reference(family, mode), got, strict=True):
        assert f.units == r.units
        assert np.abs(r.scores).max() > 1e-2, "suppression must move the target CE for the check to mean anything"
        np.testing.assert_allclose(f.per_target, r.per_target, rtol=0, atol=TOL, err_msg=f"{family} {mode} {config}")
        assert f.base_target_ce == pytest.approx(r.base_target_ce, abs=TOL)


LAYOUTS = ({}, {"padding_side": "right", "prefix_reuse": False})
"""Left padding with prefix reuse, right padding without: each family and each mode runs both (alternating)."""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_flex_equals_the_naive_method(lms, reference, family, mode, unfused):
    layout = LAYOUTS[(list(FAMILIES).index(family) + MODES.index(mode)) % 2]
    assert_flex_equals_reference(lms, reference, family, mode, **layout)


@pytest.mark.parametrize(("family", "mode"), [("gemma2", "multiplicative_full_row"), ("bloom", "log_additive")])
def test_flex_traced_by_dynamo_equals_the_naive_method(lms, reference, family, mode):
    """score_mod and mask_mod with soft-capping, windows, GQA, ALiBi and a row minimum traced as the compiled
    kernel traces them (fullgraph: any graph break is an error)."""
    assert_flex_equals_reference(lms, reference, family, mode)


def test_flex_under_a_precision_policy(lms):
    """A precision policy's torch-function mode (which dynamo cannot trace) is kept out of the kernel, and the
    kernel's numbers stay those of the sdpa path under the same policy."""
    scores = {}
    for kernel in ("sdpa", "flex"):
        cfg = AtManConfig(attention_kernel=kernel, precision="mixed_bf16", batch_size=7)
        scores[kernel] = [e.scores for e in Explainer(lms("llama"), cfg).explain_batch(PROMPTS, TARGETS, chat=False)]
    for s, f in zip(scores["sdpa"], scores["flex"], strict=True):
        np.testing.assert_allclose(f, s, rtol=0, atol=BF16_TOL)


@pytest.mark.parametrize("mode", MODES)
def test_padding_to_buckets_and_chunked_row_minimum_change_nothing(lms, reference, mode, monkeypatch, unfused):
    """What the compiled kernel does differently on CUDA, forced on the eager one: lengths padded up to a bucket
    (padded query slots see only themselves, padded keys nobody), and the row minimum computed in small blocks."""
    monkeypatch.setattr(flex, "_bucket", lambda device: 16)
    monkeypatch.setattr(flex, "ROW_MIN_BLOCK", 1024)  # batch 7 x 4 heads: blocks of 4 queries x 8 keys
    monkeypatch.setattr(flex, "KEY_CHUNK", 8)
    family = "qwen2" if MODES.index(mode) % 2 else "gemma2"  # a sliding window; soft-capping too
    assert_flex_equals_reference(lms, reference, family, mode, **LAYOUTS[MODES.index(mode) // 2])


def test_bidirectional_image_blocks(unfused):
    """Gemma 3's image tokens see each other both ways: flex equals the sdpa engine (itself checked against the
    model's own forward per unit in tests/test_vision_engine.py), batched and one pass per batch."""
    from test_vision_engine import N_TARGET, engine_scores, multipliers, units
    from tiny_vlms import VLMS

    model, inputs = VLMS["gemma3"]()
    ids = inputs["input_ids"][0]
    mult = multipliers(len(ids), units(ids, N_TARGET), 0.1)
    expected = engine_scores(model, inputs, mult, "multiplicative")
    assert np.abs(expected).max() > 1e-2
    for batch_size in (4, 1):
        got = engine_scores(model, inputs, mult, "multiplicative", attention_kernel="flex", batch_size=batch_size)
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOL, err_msg=f"batch_size {batch_size}")


def test_a_model_that_bypasses_atman_is_still_refused(lms, tokenizer):
    """The layer proof runs on every flex call too: a broken layer is refused, at construction and afterwards."""
    mpt = LoadedModel(tiny_model("mpt", len(tokenizer)), tokenizer, "tiny-mpt", "random")
    with pytest.raises(UnsupportedModelError, match=r"^model: MptForCausalLM: suppression reached .*\[none\] of 2"):
        Explainer(mpt, AtManConfig(attention_kernel="flex"))
    lm = LoadedModel(tiny_model("llama", len(tokenizer)), tokenizer, "tiny-llama", "random")
    ex = Explainer(lm, AtManConfig(attention_kernel="flex"))
    lm.model.model.layers[0].self_attn = _OwnEagerAttention(lm.model.model.layers[0].self_attn)
    with pytest.raises(UnsupportedModelError, match=r"layers \[1x1\] of 2"):
        ex.explain(PROMPTS[1], TARGETS[1], chat=False)


def test_an_unknown_kernel_is_refused_naming_the_field():
    from pipeline.atman.sweep import SweepAttention

    with pytest.raises(ValueError, match=r"^attention_kernel: 'triton' is not one of sdpa, flex"):
        SweepAttention([], [], None, "log_additive", "left", torch.device("cpu"), "triton")


def test_a_kernel_that_fails_to_compile_is_refused_naming_the_field(lms, monkeypatch):
    """A failure to trace or compile the kernel is an error that names the field, never a fall-back to other
    numbers."""
    from torch._dynamo.exc import TorchDynamoException

    def broken(*args, **kwargs):
        raise TorchDynamoException("no kernel for this")

    monkeypatch.setattr(flex, "flex_attention", broken)
    with pytest.raises(ValueError, match=r"^attention_kernel: 'flex' could not .*no kernel for this\); use attention"):
        Explainer(lms("llama"), AtManConfig(attention_kernel="flex"))


def test_a_device_flex_cannot_run_on_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"^attention_kernel: 'flex' runs on .*not on meta; use attention_kernel"):
        flex.check(torch.device("meta"))


class _Batch:
    """The fields of a SweepAttention that flex.layout reads: 3 rows, prefix 5, suffix 19, left padding, a
    bidirectional block (positions 7..10 of row 0), one hidden prefix key (row 2 starts at 4)."""

    def __init__(self) -> None:
        self.prefix, length = 5, 19
        starts, lengths = [5, 5, 4], [19, 12, 9]
        self.q_pos = torch.full((3, length), -1)
        self.q_blk = torch.full((3, length), -1)
        for i, (start, n) in enumerate(zip(starts, lengths, strict=True)):
            self.q_pos[i, length - n :] = torch.arange(start, start + n)
        self.q_blk[0, 2:6] = 0  # positions 7..10
        prefix_pos = torch.arange(self.prefix).expand(3, -1)
        hidden = prefix_pos >= torch.tensor(starts)[:, None]
        self.k_pos = torch.cat([prefix_pos.masked_fill(hidden, -1), self.q_pos], dim=1)
        self.k_blk = torch.cat([torch.full((3, self.prefix), -1), self.q_blk], dim=1)
        self.k_mult = torch.ones(3, self.prefix + length)
        self.blocks = True
        self.flex_cache: dict = {}
        self._visible: dict = {}


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("tile", [4, 8])
def test_block_mask_equals_create_block_mask(window, tile, monkeypatch):
    """The tiles the compiled kernel skips (empty) or runs without the mask_mod (full) are PyTorch's own."""
    monkeypatch.setattr(flex, "MASK_BLOCK", tile)
    monkeypatch.setattr(flex, "ROW_MIN_BLOCK", 2 * tile * 32)  # two rows of the batch per band
    lay = flex.layout(_Batch(), torch.device("cpu"))
    mask_mod = flex.visibility(lay, window)
    ours = flex.block_mask(mask_mod, 3, lay.lq, lay.lk, torch.device("cpu"))
    theirs = create_block_mask(mask_mod, 3, 1, lay.lq, lay.lk, device="cpu", BLOCK_SIZE=tile)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(_full_tiles(ours), _full_tiles(theirs))


def _full_tiles(mask) -> torch.Tensor:
    """bool [B, 1, nq, nk]: the tiles a BlockMask marks full."""
    count, order = mask.full_kv_num_blocks, mask.full_kv_indices.long()
    listed = torch.arange(order.shape[-1]) < count[..., None]
    return torch.zeros_like(listed).scatter(-1, order, listed)


@pytest.mark.parametrize("window", [None, 3])
def test_mask_mod_equals_the_sweeps_visibility(window):
    """Causal, window, bidirectional block, padding (a padded query sees only itself), hidden prefix keys."""
    from pipeline.atman.sweep import SweepAttention

    batch = _Batch()
    lay = flex.layout(batch, torch.device("cpu"))
    rows, q, k = torch.arange(3)[:, None, None], torch.arange(lay.lq)[None, :, None], torch.arange(lay.lk)[None, None]
    ours = flex.visibility(lay, window)(rows, 0, q, k)
    assert torch.equal(ours, SweepAttention.visible(batch, window)[:, 0])
