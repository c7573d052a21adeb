"""AtMan-family estimators that spend fewer suppression passes than exact AtMan (one pass per unit).

Each is a function ``(explainer, planned) -> np.ndarray``: one score per unit of ``planned.units``, higher = more
relevant, on the same scale as exact AtMan's (the rise of the whole target's CE, nats, when a unit is suppressed
under the explainer's mode and factor). They use ``Explainer.suppressed_rise`` (its sets of units suppressed together
in one pass), so they inherit the engine's exactness; what each computes exactly, and what it estimates, is in its
docstring.

- ``coarse`` (coarse to fine): the prompt's sentences are suppressed first, one pass each; then each word (or the
  planned unit) inside the sentences that matter most, one pass each. The refined units' scores are exact AtMan's
  (sum aggregate, no conceptual suppression); every other unit gets an equal share of its sentence's score.
- ``joint`` (joint suppression, sparse linear surrogate): random subsets of the units suppressed together, then the
  units the first fit ranks highest one at a time (exact AtMan's passes), within a budget of exact AtMan's pass
  count; a LASSO fit of the target's CE rise on which units were suppressed, over all of those passes; the weights
  are the scores. What one unit does together with the others (a fact stated twice, a redundant sentence) reaches
  the scores, which single-unit suppression alone cannot see.
- ``joint-knockout``: ``joint`` with its passes at factor 0, under log_additive the suppressed units' keys knocked
  out of attention altogether: the operation of the evaluation's deletion AOPC and LDS, and the closest AtMan's
  suppression comes to removing the text. At sentence units it ranks closer to removal than ``joint``; at word units
  it loses mAP to it (docs/EVAL.md).
- ``grad`` and ``grad-path`` (``pipeline.atman.gradient``): the suppression gradient, one backward pass or a path
  integral of a few; not forward-only, as their names say.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from pipeline.atman.gradient import grad_path_scores, grad_scores
from pipeline.atman.units import build_units

REFINE_SHARE = 1 / 3
"""``coarse``: the share of the sentences (by their score, highest first; at least one) whose units are refined."""


def sentence_groups(planned) -> list[list[int]]:
    """The planned units grouped by the prompt's sentence holding each unit's first token (the engine's sentence
    units over the whole prompt), in order; a unit outside every sentence is a group of its own."""
    prepared = planned.prepared
    sentences = build_units(prepared.prompt, prepared.token_spans, [(0, len(prepared.prompt))], "sentence")
    sentence_of = {p: s for s, unit in enumerate(sentences) for p in unit.positions}
    groups: dict[object, list[int]] = {}
    for i, unit in enumerate(planned.units):
        groups.setdefault(sentence_of.get(min(unit.positions), ("alone", i)), []).append(i)
    return list(groups.values())


def coarse_to_fine(explainer, planned, refine_share: float = REFINE_SHARE) -> np.ndarray:
    """Coarse to fine: one pass per sentence, then one per unit of the top ``refine_share`` of the sentences. The
    refined units' scores equal exact AtMan's; an unrefined unit gets its sentence's score over the sentence's unit
    count (a sentence's total is kept, spread evenly), and a sentence that is one unit is exact from its own pass.
    Passes: sentences + the units of the refined sentences of more than one unit."""
    if not 0 < refine_share <= 1:
        raise ValueError(f"refine_share: {refine_share} is not in (0, 1]")
    groups = sentence_groups(planned)
    scores = np.zeros(len(planned.units), dtype=np.float64)
    if not groups:
        return scores
    coarse = explainer.suppressed_rise(planned, groups)
    top = np.argsort(-coarse, kind="stable")[: max(1, math.ceil(refine_share * len(groups)))]
    refined = [i for g in sorted(top) if len(groups[g]) > 1 for i in groups[g]]  # a lone unit is exact already
    for group, value in zip(groups, coarse, strict=True):
        scores[group] = value / len(group)
    if refined:
        scores[refined] = explainer.suppressed_rise(planned, [[i] for i in refined])
    return scores


JOINT_SUPPRESS = 0.5
"""``joint``: the probability that a unit is suppressed in a random pass (ContextCite's keep probability, 1/2)."""
JOINT_SINGLE_SHARE = 0.5
"""``joint``: the share of the budget spent on single-unit passes of the units the joint passes rank highest (tuned
with ``JOINT_ALPHA``: 0 and 1/4 lost 0.1 of LDS, 3/4 gave the same)."""
JOINT_ALPHA = 0.1
"""``joint``: the LASSO penalty, relative to the mean absolute rise of the passes (the fit is scale-free). Tuned on
the evaluation's ``--sample 16`` (SmolLM2, sentence units; bench/tune_joint.py, bench/eval/tune-joint-*): the
largest penalty tried, whose sparser scores gave the highest mAP at the same LDS."""
KNOCKOUT_FACTOR = 0.0
"""``joint-knockout``: the factor of its passes; under log_additive (the default mode) a key at 0 leaves attention."""
_JOINT_STREAM = 0x6A6F696E  # "join": the masks' own random stream, apart from the evaluation's LDS ablations


def joint_surrogate(explainer, planned, budget: int | None = None, single_share: float = JOINT_SINGLE_SHARE,
                    alpha: float = JOINT_ALPHA, factor: float | None = None) -> np.ndarray:  # fmt: skip
    """Joint suppression with a sparse linear surrogate: ``budget`` passes (default: the unit count, exact AtMan's),
    the first ``1 - single_share`` of them with each unit suppressed with probability ``JOINT_SUPPRESS`` (drawn from
    the prompt's tokens: the same request draws the same masks), the rest one unit each, for the units a first fit
    on the joint passes ranks highest. Scores = the weights of a LASSO fit (no intercept: nothing suppressed is a
    rise of 0) of every pass's CE rise on its 0/1 suppression vector, in nats per unit suppressed. ``factor``: the
    passes' suppression factor (None: the explainer's)."""
    n = len(planned.units)
    budget = n if budget is None else budget
    if budget < 1 or not 0 <= single_share <= 1:
        raise ValueError(f"joint: budget {budget} must be >= 1 and single_share {single_share} in [0, 1]")
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    n_single = min(n, round(single_share * budget))
    masks = joint_masks(planned, budget - n_single)
    rises = explainer.suppressed_rise(planned, [np.flatnonzero(m) for m in masks], factor)
    first = sparse_fit(masks, rises, alpha) if len(masks) else np.zeros(n)
    singles = np.sort(np.argsort(-first, kind="stable")[:n_single])
    if n_single:
        masks = np.vstack([masks, np.eye(n, dtype=bool)[singles]])
        rises = np.concatenate([rises, explainer.suppressed_rise(planned, [[i] for i in singles], factor)])
    return sparse_fit(masks, rises, alpha)


def joint_knockout(explainer, planned, budget: int | None = None, single_share: float = JOINT_SINGLE_SHARE,
                   alpha: float = JOINT_ALPHA, factor: float = KNOCKOUT_FACTOR) -> np.ndarray:  # fmt: skip
    """``joint_surrogate`` at ``factor`` 0 (its own setting, whatever the explainer's): under log_additive, the mode
    the evaluation measures, each pass knocks the suppressed units' keys out of attention in every layer and head.
    Tuned on the evaluation's ``--sample 16`` at sentence units (SmolLM2; bench/joint_budget.py --factors 0,0.1):
    +6.3 mAP and +0.43 nats of removal AOPC over ``joint``'s factor 0.1, at the same penalty."""
    return joint_surrogate(explainer, planned, budget, single_share, alpha, factor)


def joint_masks(planned, count: int) -> np.ndarray:
    """[count, units] bool: which units each random pass suppresses (never none: such a pass measures nothing)."""
    ids = planned.sweep_input.input_ids.cpu().numpy().astype(np.int64)
    rng = np.random.default_rng([_JOINT_STREAM, zlib.crc32(ids.tobytes())])
    masks = rng.random((count, len(planned.units))) < JOINT_SUPPRESS
    for row in np.flatnonzero(~masks.any(axis=1)):
        masks[row, rng.integers(len(planned.units))] = True
    return masks


def sparse_fit(masks: np.ndarray, rises: np.ndarray, alpha: float = JOINT_ALPHA) -> np.ndarray:
    """LASSO weights (float64, one per unit) of ``rises`` on ``masks``, without intercept; ``alpha`` relative to the
    mean absolute rise."""
    from sklearn.linear_model import Lasso

    scale = float(np.mean(np.abs(rises)))
    if scale == 0.0:
        return np.zeros(masks.shape[1], dtype=np.float64)
    model = Lasso(alpha=alpha * scale, fit_intercept=False, tol=1e-9, max_iter=100_000)  # converged: a few ms
    return model.fit(masks.astype(np.float64), np.asarray(rises, dtype=np.float64)).coef_.astype(np.float64)


VARIANTS = {
    "coarse": coarse_to_fine,
    "joint": joint_surrogate,
    "joint-knockout": joint_knockout,
    "grad": grad_scores,
    "grad-path": grad_path_scores,
}
"""``atman:<variant>`` -> its estimator."""
