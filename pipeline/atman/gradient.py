"""The suppression gradient (issue 29): AtMan's rises predicted from backward passes instead of one forward pass
per unit. These estimators use gradients: one forward and one backward pass (``atman:grad``) or a few of each
(``atman:grad-path``), and the memory of a backward pass, not AtMan's inference footprint.

AtMan suppresses a unit by changing the pre-softmax score H_qk of the unit's keys k, for every query that sees them,
in every layer and head (paper Eq. 4). Each form is linear in one coordinate s_k per key, zero when untouched:
- ``log_additive``: H_qk + s_k, s = log m (a log-bias on the key's logit; m = 0 is ``attention.LOG_FLOOR``);
- ``scale``: H_qk * (1 + s_k), s = m - 1;
- ``multiplicative`` / ``multiplicative_full_row``: H_qk + s_k (H_qk - min_q), s = m - 1 (the row minimum as the
  engine takes it).
So suppressing unit j at the explainer's factor f is the point s = s(f) 1_j, and the first-order prediction of its
rise in the target's CE (nats, summed over the target tokens: exact AtMan's scale) is s(f) * sum_{k in j} dCE/ds_k
at s = 0. Which keys: the unit's tokens, exactly the engine's multiplier rows (``plan.unit_multipliers``; the BOS,
template and target tokens belong to no unit and are never touched), as columns for every query of the pass (the
key's own row and the target positions included; causal rows before it never see it).

The perturbation runs through the engine's attention route (``attention.activated`` / ``attention.forward``, which
checks every layer was reached) and its suppression formula (``attention.suppress_scores``) on explicit float32
scores (``attention.eager_attend``, as the naive reference), with the coordinates a tensor that requires grad; the
model's parameters do not. torch is imported on first use: ``variants`` registers these estimators and
``pipeline.eval_methods`` reads that registry without torch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PATH_STEPS = 8
"""``grad-path``: the points of the midpoint rule along the straight path from nothing suppressed to every unit
suppressed."""


def coordinate(mode: str, factor: float) -> float:
    """s(m) of the module docstring for the multiplier ``factor``: log m (floored) or m - 1; ValueError naming
    ``mode`` for a form it does not know."""
    from pipeline.atman.attention import LOG_FLOOR

    if mode == "log_additive":
        return max(math.log(factor), LOG_FLOOR) if factor > 0 else LOG_FLOOR
    if mode in ("scale", "multiplicative", "multiplicative_full_row"):
        return factor - 1.0
    raise ValueError(f"mode: {mode!r} is not one of multiplicative, log_additive, scale, multiplicative_full_row")


class GradientAttention:
    """Eager attention of one unpadded sequence with the suppression form ``mode`` at per-key coordinates ``s`` [n]
    (which may require grad): the engine's ``suppress_scores`` at multipliers m(s) (exp s, or 1 + s)."""

    def __init__(self, s: torch.Tensor, mode: str) -> None:
        import torch

        coordinate(mode, 1.0)  # refuses an unknown mode before any pass
        self.mode = mode
        self.mult = torch.exp(s) if mode == "log_additive" else 1.0 + s
        self.calls: Counter = Counter()

    def attend(self, layer, query, key, value, **kwargs):
        from pipeline.atman.attention import eager_attend

        self.calls[layer] += 1
        return eager_attend(query, key, value, suppress=self._suppress, **kwargs)

    def _suppress(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        import torch

        from pipeline.atman.attention import suppress_scores

        mult = self.mult.to(scores.device)[None, None, None, :]
        every_key = torch.ones(1, 1, 1, scores.shape[-1], dtype=torch.bool, device=scores.device)
        return suppress_scores(scores, visible, mult, self.mode, every_key)


@contextmanager
def _frozen(model) -> Iterator[None]:
    """The model's parameters do not require grad inside the block (no weight gradients, no activations kept for
    them); restored as found on exit."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in before:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def suppression_gradient(explainer, planned, s: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The whole target's CE (nats) and its gradient [n - 1] with respect to the per-key coordinates ``s`` [n - 1]
    of ``planned``'s inputs (prompt and target but the last token, which no position reads), under the explainer's
    mode: one forward and one backward pass. Text requests only (ValueError naming ``images`` otherwise)."""
    import torch

    from pipeline.atman import attention, precision

    seq = planned.sweep_input
    if seq.embeds is not None:
        raise ValueError("images: the gradient estimators explain text requests only; use exact AtMan (atman)")
    model, n_target = explainer.model, seq.n_target
    ids = seq.input_ids.to(explainer.device)
    with torch.inference_mode(False), torch.enable_grad(), _frozen(model):
        s = s.detach().clone().float().requires_grad_(True)
        ctx = GradientAttention(s, explainer.config.mode)
        with attention.activated(model), precision.computing(model, explainer.precision):
            out = attention.forward(model, ctx, input_ids=ids[None, :-1], use_cache=False, logits_to_keep=n_target)
            logprobs = torch.log_softmax(out.logits[0, -n_target:].float(), dim=-1)
            ce = -logprobs.gather(-1, ids[-n_target:, None]).sum()
        (grad,) = torch.autograd.grad(ce, s)
    if not (torch.isfinite(ce) and torch.isfinite(grad).all()):
        raise FloatingPointError(f"precision: a non-finite CE or gradient under {explainer.precision!r}; use fp32")
    return float(ce.detach()), grad.detach().cpu().double()


def _unit_sums(values: torch.Tensor, units) -> np.ndarray:
    return np.array([float(values[list(u.positions)].sum()) for u in units], dtype=np.float64)


def grad_scores(explainer, planned) -> np.ndarray:
    """``atman:grad``: each unit's first-order predicted rise, sum_k s(m_k) dCE/ds_k at s = 0 over the keys of the
    unit's exact AtMan pass under the explainer's config (its own tokens at s(factor); with conceptual suppression,
    its neighbours at theirs). One forward and one backward pass for all units; nats, whole target, as exact
    AtMan's ``sum`` aggregate (``aggregate``, ``postprocess`` and ``normalize`` are not applied)."""
    import torch

    n = len(planned.sweep_input.input_ids)
    if not planned.units:
        return np.zeros(0, dtype=np.float64)
    _, grad = suppression_gradient(explainer, planned, torch.zeros(n - 1))
    rows = explainer.passes(planned).sweep_input.multipliers[: len(planned.units), :-1].double()
    mode = explainer.config.mode
    if mode == "log_additive":
        from pipeline.atman.attention import log_multiplier

        coords = log_multiplier(rows)
    else:
        coords = rows - 1.0
    return (coords @ grad).numpy()


def path_scores(explainer, planned, alphas: Sequence[float]) -> np.ndarray:
    """s(factor) * mean over ``alphas`` of sum_{k in unit} dCE/ds_k at s = alpha s(factor) on every unit's tokens
    (all units suppressed together, to the fraction alpha): the path integral's quadrature; alphas (0,) is
    ``grad_scores`` without conceptual suppression."""
    import torch

    cfg = explainer.config
    if cfg.conceptual_threshold is not None:
        raise ValueError(
            "conceptual_threshold: atman:grad-path integrates along every unit suppressed at once, where conceptual "
            "neighbours are not defined; use None (or atman:grad, which takes each unit's neighbours)"
        )
    n = len(planned.sweep_input.input_ids)
    if not planned.units:
        return np.zeros(0, dtype=np.float64)
    s_f = coordinate(cfg.mode, cfg.factor)
    direction = torch.zeros(n - 1, dtype=torch.float64)
    direction[sorted({p for u in planned.units for p in u.positions})] = s_f
    total = torch.zeros(n - 1, dtype=torch.float64)
    for alpha in alphas:
        total += suppression_gradient(explainer, planned, alpha * direction)[1]
    return s_f * _unit_sums(total / len(alphas), planned.units)


def grad_path_scores(explainer, planned, steps: int = PATH_STEPS) -> np.ndarray:
    """``atman:grad-path``: the suppression gradient integrated along the straight path s = alpha s(factor) on every
    unit's tokens, alpha in (0, 1], by the midpoint rule with ``steps`` points (one forward and backward pass each):
    score_j = s(factor) * mean_alpha sum_{k in unit j} dCE/ds_k (integrated gradients in the suppression coordinate).
    Completeness: the scores sum to CE(every unit suppressed) - CE(none), the rise the engine measures with all units
    suppressed in one pass, up to the quadrature error (SmolLM2 on SQuAD, log_additive: within 1.4 %, docs/EVAL.md;
    the tiny test models: tests/test_gradient.py). Nats, whole target."""
    if steps < 1:
        raise ValueError(f"steps: {steps} is not a positive number of path points")
    return path_scores(explainer, planned, [(i + 0.5) / steps for i in range(steps)])
