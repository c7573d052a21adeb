"""The suppression gradient (pipeline/atman/gradient.py): ``atman:grad`` equals a central finite difference of the
target CE computed by the oracle (tests/oracle.py: an untouched model copy, its own eager attention, nothing of the
engine), on three families and in every mode; ``atman:grad-path`` is complete (its scores sum to the measured rise
with every unit suppressed) and with one point differs from ``atman:grad`` only by where it is evaluated."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from oracle import oracle_scores, unit_multipliers
from tiny_models import tiny_model

from pipeline import AtManConfig, Explainer, LoadedModel
from pipeline.atman.gradient import (
    PATH_STEPS,
    coordinate,
    grad_path_scores,
    grad_scores,
    path_scores,
    suppression_gradient,
)

PROMPT = "The Eiffel Tower is in Paris. Mount Fuji is in Japan. The tower was finished in 1889, in Paris"
TARGET = " France"
EPS = 1e-4
"""The central difference's step in the suppression coordinate s (log m, or m - 1)."""
FD_TOL = 1e-4
"""|gradient - central difference| <= FD_TOL * max |central difference| per family and mode. The oracle runs a
float64 copy of the model (the engine computes in float32), so the difference's rounding is ~1e-15 / eps and its
truncation eps^2 / 6 * d3CE/ds3; measured worst relative gap 7e-6 (bloom, multiplicative). Llama- and Gemma-style
RMSNorm compute in float32 even in a float64 model, which puts ~1e-7 of noise on each CE and so 1e-3 on the
difference: those families are checked through stablelm (GQA, RoPE, the attention interface) instead."""
FAMILIES = ("stablelm", "bloom", "gpt2")
"""Grouped-query attention with RoPE through transformers' attention interface; ALiBi through an AtMan adapter;
learned absolute positions, multi-head."""
MODES = ("log_additive", "scale", "multiplicative")


def _fd(oracle_model, tokenizer, planned, mode: str, eps: float = EPS) -> np.ndarray:
    """Per unit: (CE(s = +eps on the unit's tokens) - CE(s = -eps)) / (2 eps), from the oracle (float64 multipliers:
    float32's rounding of exp(eps) would be a relative error of 1e-7 / eps in the step)."""
    units = [(u.text, u.start, u.length) for u in planned.units]
    n_target = planned.sweep_input.n_target
    ids, pattern = unit_multipliers(tokenizer, planned.prepared.prompt, units, n_target, 0.0)
    ids = torch.cat([ids, planned.target_ids])
    assert torch.equal(ids, planned.sweep_input.input_ids), "the oracle tokenizes the request as the engine did"
    rises = []
    for step in (eps, -eps):
        m = math.exp(step) if mode == "log_additive" else 1.0 + step
        mult = torch.ones(pattern.shape, dtype=torch.float64).masked_fill(pattern == 0, m)
        rises.append(oracle_scores(oracle_model, ids, mult, n_target, mode))
    return (rises[0] - rises[1]) / (2 * eps)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_equals_oracle_finite_difference(family, tokenizer):
    lm = LoadedModel(tiny_model(family, len(tokenizer)), tokenizer, f"tiny-{family}", "random")
    oracle_model = tiny_model(family, len(tokenizer), attn_implementation="eager").double()
    for mode in MODES:
        explainer = Explainer(lm, AtManConfig(mode=mode, granularity="word"))
        planned = explainer.plan(PROMPT, TARGET, chat=False)
        per_unit = grad_scores(explainer, planned) / coordinate(mode, explainer.config.factor)
        fd = _fd(oracle_model, tokenizer, planned, mode)
        assert np.abs(fd).max() > 1e-2, "the CE must move with the bias for the check to mean anything"
        worst = float(np.abs(per_unit - fd).max())
        print(f"{family} {mode}: max |grad - fd| = {worst:.1e} (max |fd| {np.abs(fd).max():.2f})")
        np.testing.assert_allclose(per_unit, fd, rtol=0, atol=FD_TOL * np.abs(fd).max(), err_msg=f"{family} {mode}")


def test_grad_is_the_first_order_prediction_of_exact_atman(tiny_lms):
    """Scale check: at a factor near 1 the prediction meets exact AtMan's rise (the linear term dominates)."""
    explainer = Explainer(tiny_lms["llama"], AtManConfig(granularity="word", factor=0.98))
    planned = explainer.plan(PROMPT, TARGET, chat=False)
    exact = explainer.score(planned).scores.astype(np.float64)
    predicted = grad_scores(explainer, planned)
    assert np.abs(exact).max() > 1e-3
    np.testing.assert_allclose(predicted, exact, rtol=0, atol=0.05 * np.abs(exact).max())


PATH_ERROR = {"log_additive": 0.01, "scale": 0.1, "multiplicative": 0.2}
"""|sum of grad-path scores - rise| / |rise| at PATH_STEPS points on the tiny Llama: measured 0.003, 0.055 and 0.12
(32 points: 2e-4, 4e-3, 0.04). The tiny models' attention is peaked (init 0.25), so scale and multiplicative, which
multiply the scores, bend the path more than on trained weights (SmolLM2: docs/EVAL.md)."""


@pytest.mark.parametrize("mode", MODES)
def test_grad_path_is_complete(tiny_lms, mode):
    """Integrated gradients' completeness: the scores sum to CE(every unit suppressed) - CE(none), the rise the
    engine's sweep measures in one pass, up to the midpoint rule's error, which shrinks with more points."""
    explainer = Explainer(tiny_lms["llama"], AtManConfig(mode=mode, granularity="word"))
    planned = explainer.plan(PROMPT, TARGET, chat=False)
    rise = float(explainer.suppressed_rise(planned, [list(range(len(planned.units)))])[0])
    errors = {s: abs(float(grad_path_scores(explainer, planned, steps=s).sum()) - rise) for s in (PATH_STEPS, 32)}
    print(f"{mode}: rise {rise:.3f}, |sum - rise| at 8 / 32 steps: {errors[PATH_STEPS]:.1e} / {errors[32]:.1e}")
    assert abs(rise) > 0.1
    assert errors[PATH_STEPS] <= PATH_ERROR[mode] * abs(rise)
    assert errors[32] <= errors[PATH_STEPS] / 2, "the midpoint rule converges"


def test_one_point_path_differs_from_grad_only_by_where_it_is_evaluated(tiny_lms):
    explainer = Explainer(tiny_lms["llama"], AtManConfig(granularity="word"))
    planned = explainer.plan(PROMPT, TARGET, chat=False)
    grad = grad_scores(explainer, planned)
    np.testing.assert_allclose(path_scores(explainer, planned, [0.0]), grad, rtol=0, atol=1e-6)
    one = grad_path_scores(explainer, planned, steps=1)
    np.testing.assert_allclose(one, path_scores(explainer, planned, [0.5]), rtol=0, atol=1e-12)
    assert np.abs(one - grad).max() > 1e-3, "alpha 1/2 is another point than alpha 0"


def test_gradient_leaves_the_model_as_found(tiny_lms):
    lm = tiny_lms["llama"]
    explainer = Explainer(lm, AtManConfig(granularity="word"))
    planned = explainer.plan(PROMPT, TARGET, chat=False)
    before = [p.requires_grad for p in lm.model.parameters()]
    with torch.inference_mode():  # e.g. a job's worker: the estimator still differentiates
        ce, grad = suppression_gradient(explainer, planned, torch.zeros(len(planned.sweep_input.input_ids) - 1))
    assert [p.requires_grad for p in lm.model.parameters()] == before
    assert all(p.grad is None for p in lm.model.parameters())
    assert grad.shape == (len(planned.sweep_input.input_ids) - 1,) and math.isfinite(ce)
    base = float(explainer.score(planned).base_target_ce)
    assert ce == pytest.approx(base, abs=1e-4), "the unperturbed pass is the engine's"


def test_refusals_name_the_field(tiny_lms):
    explainer = Explainer(tiny_lms["llama"], AtManConfig(granularity="word", conceptual_threshold=0.7))
    planned = explainer.plan(PROMPT, TARGET, chat=False)
    with pytest.raises(ValueError, match="conceptual_threshold"):
        grad_path_scores(explainer, planned)
    assert grad_scores(explainer, planned).shape == (len(planned.units),), "grad takes each unit's neighbours"
    with pytest.raises(ValueError, match="steps"):
        grad_path_scores(Explainer(tiny_lms["llama"]), planned, steps=0)
    with pytest.raises(ValueError, match="mode"):
        coordinate("additive", 0.1)


def test_eval_knows_the_gradient_estimators_by_name():
    from pipeline.eval_methods import GRAMMAR, parse_methods

    assert parse_methods("atman:grad,atman:grad-path") == ["atman:grad", "atman:grad-path"]
    assert "atman:grad, atman:grad-path" in GRAMMAR
