"""Sanity checks of the port of the AtMan authors' code (tests/paper_port.py) itself, on the tiny random GPT-J."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers.models.gptj.modeling_gptj as gptj
from paper_port import PAPER_FACTOR, paper_atman, tiny_gptj


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 100, (10,), generator=g)
    prompt[7] = prompt[2]  # a repeated token: a conceptual neighbour at any threshold
    target = torch.tensor([int(prompt[2]), 41, 17])
    return tiny_gptj(), prompt, target


@pytest.mark.parametrize("kappa", [None, 0.7])
def test_identity_factor_changes_nothing(case, kappa):
    model, prompt, target = case
    res = paper_atman(model, prompt, target, factor=1.0, conceptual_threshold=kappa)
    assert res.positions == list(range(12))
    assert np.all(res.delta == 0) and np.all(res.score == 0)


def test_unsuppressed_ce_is_transformers_own(case):
    model, prompt, target = case
    original = gptj.eager_attention_forward
    res = paper_atman(model, prompt, target, factor=PAPER_FACTOR)
    assert gptj.eager_attention_forward is original  # the patch is gone again
    ids = torch.cat([prompt, target])
    labels = ids.clone()
    labels[: len(prompt)] = -100
    with torch.no_grad():
        out = model(input_ids=ids[None], labels=labels[None])
    p = len(prompt)
    own = F.cross_entropy(out.logits[0, p - 1 : -1].float(), target, reduction="none").numpy()
    np.testing.assert_allclose(res.base_ce, own, atol=1e-5, rtol=0)
    assert abs(float(res.base_ce.mean()) - out.loss.item()) < 1e-5


def test_suppression_moves_ce_and_scores_as_their_eval(case):
    model, prompt, target = case
    res = paper_atman(model, prompt, target, factor=PAPER_FACTOR)
    assert np.abs(res.delta).max() > 0.1
    np.testing.assert_allclose(res.delta, res.base_ce[None] - res.suppressed_ce, atol=1e-6)
    # a target input cannot reach itself or earlier targets (plain suppression): exactly zero, and not listed
    assert np.all(res.delta[~res.explained] == 0)
    assert res.explained[10].tolist() == [False, True, True] and res.explained[11].tolist() == [False, False, True]
    np.testing.assert_allclose(res.score, (np.where(res.explained, res.delta, 0).astype(np.float64) ** 2).sum(1))
    # conceptual: the repeated token's passes suppress each other, and the unlisted entries need not be zero
    con = paper_atman(model, prompt, target, factor=PAPER_FACTOR, conceptual_threshold=0.7)
    assert set(con.factors[2]) == {2, 7, 10} and con.factors[2][2] == PAPER_FACTOR
    np.testing.assert_allclose(con.delta[2], con.delta[7], atol=1e-5)  # neighbour m is 0.1 to ~1e-7
    assert con.delta[10, 0] != 0 and not con.explained[10, 0]
