"""The fast engine equals the naive method as docs/METHOD.md states it (fp32, max |delta score| <= 1e-4)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from tiny_models import FAMILIES

from pipeline import AtManConfig, Explainer

TOL = 1e-4
PROMPTS = [
    "The cat sat on the mat. The cat was happy, and the dog was not happy at all.\n\nThen the dog left the room.",
    "Alice gave Bob a book. Bob thanked Alice!",
    "Is water wet? Some say yes.",
]
TARGETS = [" The cat", " Alice smiled.", " No"]
# low enough that random embeddings give partial cosines, not only identical tokens
KAPPA = 0.25


@pytest.fixture(scope="module")
def reference(tiny_lms):
    """Naive-method explanations, computed once per (family, mode, granularity, conceptual)."""

    @functools.cache
    def get(family, mode, granularity, conceptual):
        cfg = AtManConfig(
            mode=mode, granularity=granularity, conceptual_threshold=KAPPA if conceptual else None, engine="reference"
        )
        return [
            Explainer(tiny_lms[family], cfg).explain(p, t, chat=False) for p, t in zip(PROMPTS, TARGETS, strict=True)
        ]

    return get


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("prefix_reuse", [True, False], ids=["prefix", "noprefix"])
@pytest.mark.parametrize("conceptual", [False, True], ids=["plain", "conceptual"])
@pytest.mark.parametrize("granularity", ["token", "word", "sentence"])
@pytest.mark.parametrize("mode", ["multiplicative", "log_additive", "scale"])
@pytest.mark.parametrize("family", FAMILIES)
def test_against_reference(
    tiny_lms, reference, family, mode, granularity, conceptual, prefix_reuse, batched, padding_side
):
    ref = reference(family, mode, granularity, conceptual)
    cfg = AtManConfig(
        mode=mode,
        granularity=granularity,
        conceptual_threshold=KAPPA if conceptual else None,
        prefix_reuse=prefix_reuse,
        padding_side=padding_side,
        batch_size=7,
    )
    ex = Explainer(tiny_lms[family], cfg)
    if batched:  # rows of different prompts share forward passes, with padding
        fast = ex.explain_batch(PROMPTS, TARGETS, chat=False)
    else:
        fast = [ex.explain(p, t, chat=False) for p, t in zip(PROMPTS, TARGETS, strict=True)]
    for r, f in zip(ref, fast, strict=True):
        assert f.units == r.units
        # the comparison means something only if suppression moves the target CE
        assert np.abs(r.scores).max() > 1e-2
        np.testing.assert_allclose(f.scores, r.scores, rtol=0, atol=TOL)
        np.testing.assert_allclose(f.per_target, r.per_target, rtol=0, atol=TOL)
        assert f.base_target_ce == pytest.approx(r.base_target_ce, abs=TOL)
