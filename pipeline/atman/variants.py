"""AtMan-family estimators that spend fewer suppression passes than exact AtMan (one pass per unit).

Each is a function ``(explainer, planned) -> np.ndarray``: one score per unit of ``planned.units``, higher = more
relevant, on the same scale as exact AtMan's (the rise of the whole target's CE, nats, when a unit is suppressed
under the explainer's mode and factor). They use ``Explainer.suppressed_rise`` (its sets of units suppressed together
in one pass), so they inherit the engine's exactness; what each computes exactly, and what it estimates, is in its
docstring.

- ``coarse`` (coarse to fine): the prompt's sentences are suppressed first, one pass each; then each word (or the
  planned unit) inside the sentences that matter most, one pass each. The refined units' scores are exact AtMan's
  (sum aggregate, no conceptual suppression); every other unit gets an equal share of its sentence's score.
"""

from __future__ import annotations

import math

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


VARIANTS = {"coarse": coarse_to_fine, "grad": grad_scores, "grad-path": grad_path_scores}
"""``atman:<variant>`` -> its estimator."""
