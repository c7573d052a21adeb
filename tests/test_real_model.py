"""Behaviour on the real embedded model (SmolLM2-135M-Instruct), where real weights matter."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import AtManConfig, Explainer

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is Paris. The capital of Germany is"


def test_germany_scores_highest_for_berlin(real_lm):
    e = Explainer(real_lm, AtManConfig(granularity="word")).explain(PROMPT, " Berlin", chat=False)
    assert [u[0] for u in e.units][:3] == ["The", "capital", "of"]
    assert e.top(1)[0][0] == "Germany"
    assert e.base_target_ce < 1.0  # the model does predict Berlin


def test_real_model_fast_equals_reference(real_lm):
    kw = dict(granularity="word", mode="multiplicative")
    fast = Explainer(real_lm, AtManConfig(**kw)).explain(PROMPT, " Berlin", chat=False)
    ref = Explainer(real_lm, AtManConfig(engine="reference", **kw)).explain(PROMPT, " Berlin", chat=False)
    np.testing.assert_allclose(fast.scores, ref.scores, atol=1e-4, rtol=0)


def test_question_uses_chat_template_and_generates(real_lm):
    e = Explainer(real_lm, AtManConfig(granularity="word")).explain("What is the capital of Germany?", generate=8)
    assert e.chat
    assert "Berlin" in e.target
    assert e.top(1)[0][0] == "Germany"
