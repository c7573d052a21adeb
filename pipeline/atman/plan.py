"""Which keys each suppression pass touches, and by how much (paper Eq. 4 and Eq. 6)."""

from __future__ import annotations

import torch

from pipeline.atman.units import Unit


def embedding_cosine(embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[n, n] cosine similarity of the input (layer-0) embeddings of ``ids``, computed once per prompt."""
    vectors = torch.nn.functional.normalize(embeddings[ids].float(), dim=-1)
    return vectors @ vectors.T


def unit_multipliers(
    n: int,
    units: list[Unit],
    factor: float,
    cosine: torch.Tensor | None = None,
    threshold: float | None = None,
    candidates: list[int] | None = None,
) -> torch.Tensor:
    """[U, n] key multipliers, one row per unit's pass (1 = untouched).

    The unit's own tokens get ``factor``. With conceptual suppression (``threshold`` set), every other
    explainable token k whose embedding cosine to a token of the unit is >= threshold is suppressed in the
    same pass with m_k = 1 - (1 - factor) * cos (the largest cosine over the unit's tokens). Only tokens of
    some unit are candidates (unless ``candidates`` lists the positions), so text outside ``explain_span`` and
    template tokens are never perturbed.
    """
    mult = torch.ones(len(units), n, dtype=torch.float32)
    if threshold is not None and units:
        if cosine is None:
            raise ValueError("cosine: conceptual suppression needs the prompt's embedding cosine matrix")
        if candidates is None:
            candidates = sorted({p for u in units for p in u.positions})
        candidates = torch.tensor(candidates, dtype=torch.long)
        strength = 1.0 - factor
        for i, unit in enumerate(units):
            # a token's cosine to itself can round to 1 + 1e-7: clamp, or m = 1 - cos would go negative at factor 0
            cos = cosine[list(unit.positions)][:, candidates].amax(dim=0).clamp(max=1.0)
            hit = cos >= threshold
            mult[i, candidates[hit]] = 1.0 - strength * cos[hit]
    for i, unit in enumerate(units):
        mult[i, list(unit.positions)] = factor
    return mult
