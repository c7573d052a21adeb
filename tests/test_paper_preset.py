"""``AtManConfig.paper()`` reproduces the AtMan authors' research code: checked against an independent port of it
(tests/paper_port.py: their suppression, conceptual suppression and scoring, one naive pass per position) on a tiny
GPT-J, the authors' model family, to 1e-5 — through the fast engine, batched, with prefix reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from paper_port import PAPER_FACTOR, paper_atman, tiny_gptj

from pipeline import AtManConfig, Explainer, LoadedModel

TOL = 1e-5
PROMPTS = ["The cat sat on the mat. The cat was happy, and the dog was not.", "Alice gave Bob a book. Bob thanked"]
TARGETS = [" The cat sat", " Alice for it"]  # target tokens repeat prompt tokens: conceptual neighbours across


@pytest.fixture(scope="module")
def gptj(tokenizer):
    return tiny_gptj(vocab_size=len(tokenizer))


def _port(tokenizer, model, prompt, target, **kwargs):
    ids = [torch.tensor(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in (prompt, target)]
    return paper_atman(model, *ids, factor=PAPER_FACTOR, **kwargs)


@pytest.mark.parametrize("kappa", [0.7, None], ids=["conceptual", "plain"])
def test_paper_preset_equals_the_authors_code(tokenizer, gptj, kappa):
    cfg = AtManConfig.paper(conceptual_threshold=kappa, batch_size=5)
    explanations = Explainer(LoadedModel(gptj, tokenizer, "tiny-gptj", "random"), cfg).explain_batch(
        PROMPTS, TARGETS, chat=False
    )
    for prompt, target, e in zip(PROMPTS, TARGETS, explanations, strict=True):
        theirs = _port(tokenizer, gptj, prompt, target, conceptual_threshold=kappa)
        p = theirs.prompt_len
        assert len(e.units) == p and len(e.target_units) == len(theirs.target_ids) - 1
        assert theirs.score.max() > 1e-2, "suppression must move the target CE for the check to mean anything"
        if kappa is not None:
            assert any(len(f) > 1 for f in theirs.factors), "conceptual suppression must find neighbours here"
        np.testing.assert_allclose(e.scores, theirs.score[:p], rtol=0, atol=TOL)
        np.testing.assert_allclose(e.target_scores, theirs.score[p:], rtol=0, atol=TOL)
        listed = np.where(theirs.explained, theirs.delta, 0.0) ** 2
        np.testing.assert_allclose(e.per_target, listed[:p], rtol=0, atol=TOL)
        np.testing.assert_allclose(e.target_per_target, listed[p:], rtol=0, atol=TOL)


def test_sign_is_ours_and_the_full_row_minimum_is_the_only_suppression_difference(tokenizer, gptj):
    """Unsquared, the preset's per-target ΔCE is the negative of theirs (we: suppressed - base). Their suppression
    with the minimum over visible keys only is exactly our `multiplicative` mode; with the whole row it is not."""
    lm = LoadedModel(gptj, tokenizer, "tiny-gptj", "random")
    prompt, target = PROMPTS[0], TARGETS[0]
    signed = Explainer(lm, AtManConfig.paper(aggregate="sum")).explain(prompt, target, chat=False)
    theirs = _port(tokenizer, gptj, prompt, target, conceptual_threshold=0.7)
    p = theirs.prompt_len
    np.testing.assert_allclose(signed.per_target, -np.where(theirs.explained, theirs.delta, 0)[:p], atol=TOL)
    ours = Explainer(lm, AtManConfig.paper(mode="multiplicative")).explain(prompt, target, chat=False)
    visible = _port(tokenizer, gptj, prompt, target, conceptual_threshold=0.7, row_min="visible")
    np.testing.assert_allclose(ours.scores, visible.score[:p], rtol=0, atol=TOL)
    assert np.abs(visible.score - theirs.score).max() > 1e-3, "the two minima must differ for this to test anything"
    # and their conceptual candidates include the target's input tokens: prompt-only candidates give other numbers
    prompt_only = Explainer(lm, AtManConfig.paper(conceptual_candidates="prompt")).explain(prompt, target, chat=False)
    assert np.abs(prompt_only.scores - theirs.score[:p]).max() > 1e-3


def test_paper_preset_reference_engine_agrees(tokenizer, gptj):
    lm = LoadedModel(gptj, tokenizer, "tiny-gptj", "random")
    fast = Explainer(lm, AtManConfig.paper()).explain(PROMPTS[1], TARGETS[1], chat=False)
    ref = Explainer(lm, AtManConfig.paper(engine="reference")).explain(PROMPTS[1], TARGETS[1], chat=False)
    np.testing.assert_allclose(fast.scores, ref.scores, rtol=0, atol=TOL)
    np.testing.assert_allclose(fast.target_scores, ref.target_scores, rtol=0, atol=TOL)
