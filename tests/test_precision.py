"""Precision policies (pipeline/atman/precision.py): how the sweep computes, apart from how the weights are stored.

The exact policy is checked against the naive method on a float32 copy of the same bf16 weights, and against the
independent oracle (tests/oracle.py); the others against what they claim (rounded product inputs, float32
residual) and against each other's distance from float32.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from oracle import oracle_scores, unit_multipliers
from tiny_models import FAMILIES

from pipeline import AtManConfig, Explainer
from pipeline.atman import precision
from pipeline.atman.explainer import LowPrecisionWarning
from pipeline.models import LoadedModel

PROMPTS = ["The cat sat on the mat. The cat was happy, and the dog was not.", "Alice gave Bob a book. Bob thanked!"]
TARGETS = [" The cat", " Alice smiled."]
TOL = 1e-4


def _copy(lm: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    return LoadedModel(copy.deepcopy(lm.model).to(dtype), lm.tokenizer, lm.model_id, lm.revision)


@pytest.fixture(scope="module")
def stored(tiny_lms):
    """family -> (the model stored in bf16, a float32 copy of those bf16 values)."""
    out = {}
    for family in FAMILIES:
        low = _copy(tiny_lms[family], torch.bfloat16)
        out[family] = low, _copy(low, torch.float32)
    return out


def _scores(lm, **cfg) -> list[np.ndarray]:
    explanations = Explainer(lm, AtManConfig(**cfg)).explain_batch(PROMPTS, TARGETS, chat=False)
    return [e.scores for e in explanations]


@pytest.mark.parametrize("mode", ["log_additive", "multiplicative"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_on_bf16_weights_equals_the_naive_method_on_their_float32_copy(stored, family, mode):
    low, wide = stored[family]
    want = _scores(wide, mode=mode, engine="reference")
    assert max(np.abs(w).max() for w in want) > 1e-2  # suppression moves the CE: the comparison means something
    for engine in ("fast", "reference"):
        got = _scores(low, mode=mode, precision="fp32", engine=engine)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=TOL)
    assert all(p.dtype == torch.bfloat16 for p in low.model.parameters())  # the weights stay as stored


def test_fp32_on_bf16_weights_equals_the_independent_oracle(stored):
    """The oracle shares nothing with the engine; it runs an untouched float32 copy of the bf16 weights."""
    low, wide = stored["llama"]
    tok = low.tokenizer
    e = Explainer(low, AtManConfig(precision="fp32")).explain(PROMPTS[0], TARGETS[0], chat=False)
    target_ids = torch.tensor(tok(TARGETS[0], add_special_tokens=False)["input_ids"])
    prompt_ids, mult = unit_multipliers(tok, PROMPTS[0], e.units, len(target_ids), e.factor)
    want = oracle_scores(wide.model, torch.cat([prompt_ids, target_ids]), mult, len(target_ids), "log_additive")
    np.testing.assert_allclose(e.scores, want, rtol=0, atol=TOL)


def precision_input(planned, mult):
    from dataclasses import replace

    return replace(planned.sweep_input, multipliers=mult)


def test_cheaper_policies_sit_between_bf16_and_fp32(stored):
    """Each policy's distance from float32 (same bf16 weights) is what its arithmetic says: 16-bit products with a
    float32 residual move less than bf16 throughout; a 10-bit mantissa (fp16, TF32) less than bf16's 7 bits."""
    low, wide = stored["llama"]
    want = np.concatenate(_scores(wide, precision="fp32"))
    gap = {p: float(np.abs(np.concatenate(_scores(low, precision=p)) - want).max()) for p in precision.POLICIES}
    assert gap["fp32"] <= TOL
    assert gap["tf32"] < gap["mixed_bf16"] < gap["bf16"]
    assert gap["mixed_fp16"] < gap["mixed_bf16"]
    assert gap["tf32"] > gap["fp32"]  # the TF32 rounding is really there on a CPU


def test_a_policy_leaves_the_model_as_it_was_even_when_a_pass_fails(stored):
    low, _ = stored["llama"]
    before = {k: v.clone() for k, v in low.model.state_dict().items()}
    explainer = Explainer(low, AtManConfig(precision="tf32"))
    planned = explainer.plan(PROMPTS[0], TARGETS[0], chat=False)
    broken = precision_input(planned, planned.sweep_input.multipliers[:, :3])  # wrong width: fails mid-pass
    with pytest.raises((RuntimeError, IndexError, ValueError)):
        explainer.run([broken])
    after = low.model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    x = torch.randn(2, 3)
    assert torch.equal(torch.nn.functional.linear(x, torch.eye(3)), x)  # no mode left behind


def test_products_round_their_inputs_and_accumulate_in_float32():
    torch.manual_seed(0)
    x, w = torch.randn(5, 64) * 3, torch.randn(7, 64)
    got = precision.product(x, w, torch.bfloat16)
    want = x.bfloat16().double() @ w.bfloat16().double().T  # exact products of the rounded inputs
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    assert (got.double() - x.double() @ w.double().T).abs().max() > 1e-3  # the rounding is there


def test_tf32_rounding_keeps_ten_mantissa_bits_to_nearest():
    x = torch.tensor([1.0 + 2**-10, 1.0 + 2**-11, 1.0 + 2**-11 + 2**-20, -3.0 - 2**-12, float("inf"), float("nan")])
    r = precision.round_tf32(x)
    assert r[0] == 1.0 + 2**-10  # representable: kept
    assert r[1] == 1.0  # a tie: to even
    assert r[2] == 1.0 + 2**-10  # above the tie: up
    assert r[3] == -3.0  # below half an ulp: down
    assert torch.isinf(r[4]) and torch.isnan(r[5])
    y = torch.randn(1000) * 100
    assert ((precision.round_tf32(y).view(torch.int32) & 0x1FFF) == 0).all()
    assert ((precision.round_tf32(y) - y).abs() <= y.abs() * 2**-11).all()


def test_the_residual_stream_is_float32_under_mixed_policies(stored):
    low, _ = stored["llama"]
    seen = []
    hook = low.model.model.layers[0].register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    try:
        _scores(low, precision="mixed_bf16")
        assert seen and set(seen) == {torch.float32}
        seen.clear()
        _scores(low, precision="bf16")
        assert set(seen) == {torch.bfloat16}
    finally:
        hook.remove()


def test_auto_resolves_the_same_for_bf16_weights_on_cpu_and_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.resolve("auto", torch.bfloat16, cpu) == precision.resolve("auto", torch.bfloat16, cuda)
    assert precision.resolve("auto", torch.bfloat16, cpu) == precision.AUTO
    assert precision.resolve("auto", torch.float32, cpu) == "fp32"
    assert precision.resolve("auto", torch.float32, cuda) == precision.AUTO
    assert precision.resolve("tf32", torch.float32, cpu) == "tf32"
    with pytest.raises(ValueError, match=r"^precision: 'bf16' computes in the weights' own bfloat16"):
        precision.resolve("bf16", torch.float32, cpu)


def test_the_explainer_records_the_resolved_policy_and_warns_only_for_bf16_throughout(tiny_lms, stored):
    low, _ = stored["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowPrecisionWarning)
        assert Explainer(tiny_lms["llama"]).precision == "fp32"
        explainer = Explainer(low)  # bf16 weights, auto: float32-grade, no warning
    assert explainer.precision == precision.AUTO and explainer.config.precision == "auto"
    assert explainer.explain(PROMPTS[0], TARGETS[0], chat=False).params["precision"] == precision.AUTO
    with pytest.warns(LowPrecisionWarning, match=r"^precision: the sweep computes in bfloat16 throughout"):
        Explainer(low, AtManConfig(precision="bf16"))
    with pytest.raises(ValueError, match=r"^precision: 'bf16'"):
        Explainer(tiny_lms["llama"], AtManConfig(precision="bf16"))


def test_float16_products_scale_a_large_row_instead_of_overflowing():
    torch.manual_seed(0)
    x, w = torch.randn(4, 64), torch.randn(8, 64) * 0.1
    x[1] *= 1e6  # far past float16's 65,504
    got = precision.product(x, w, torch.float16).double()
    assert torch.isfinite(got).all()
    bound = (x.double().abs() @ w.double().abs().T) * 2**-9  # two inputs rounded at 2^-11 each, with margin
    assert ((got - x.double() @ w.double().T).abs() <= bound).all()
    scale = 2.0 ** -torch.ceil(torch.log2(x.abs().amax(-1, keepdim=True) / 32768)).clamp_min(0)
    exact = ((x * scale).half().double() @ w.half().double().T) / scale.double()  # a power of two: exact
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-6)
    small = precision.product(x[[0, 2, 3]], w, torch.float16)  # rows in range: not scaled, as before
    assert torch.equal(small, torch.nn.functional.linear(x[[0, 2, 3]].half().float(), w.half().float()))


def test_a_large_activation_under_mixed_fp16_stays_finite_and_close_to_fp32(tiny_lms):
    lm = _copy(tiny_lms["llama"], torch.float32)
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight.mul_(1e4)  # MLP activations past float16's range
    want = _scores(lm, precision="fp32")
    got = _scores(lm, precision="mixed_fp16")
    for g, w in zip(got, want, strict=True):
        assert np.isfinite(g).all()
        assert np.abs(g - w).max() < 0.05 * np.abs(w).max()


def test_a_non_finite_sweep_refuses_instead_of_scoring(tiny_lms):
    lm = _copy(tiny_lms["llama"], torch.float32)
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"^precision: the sweep under 'fp32' produced a non-finite"):
        Explainer(lm, AtManConfig(precision="fp32")).explain(PROMPTS[0], TARGETS[0], chat=False)
