"""The occlusion peer (pipeline/peers/occlusion.py, Captum FeatureAblation) against an ablation done by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import first_sentence

from pipeline.data import SQUAD_DEV
from pipeline.evaluate import Example, SquadEval, evaluate, load_squad
from pipeline.peers import occlusion, peer_scores

EXAMPLE = Example(
    "e1",
    "The Eiffel Tower is in Paris. It was finished in 1889 and is made of iron.",
    "When was the Eiffel Tower finished?",
    [{"text": "1889", "answer_start": 49}],
)


@pytest.fixture(scope="module")
def case(tiny_lms):
    lm = tiny_lms["llama"]
    planned, _ = SquadEval(lm).prepare(EXAMPLE)
    return lm, planned


def target_logprob(model, ids: torch.Tensor, n_target: int) -> float:
    """log p(target | prompt), summed over the target tokens: one plain forward."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, -n_target - 1 : -1].double()
    return float(torch.log_softmax(logits, -1).gather(-1, ids[-n_target:, None]).sum())


def by_hand(lm, planned, baseline: int) -> np.ndarray:
    """Each unit's tokens replaced by ``baseline``, one forward per unit."""
    ids, n_target = planned.sweep_input.input_ids, planned.sweep_input.n_target
    base = target_logprob(lm.model, ids, n_target)
    scores = []
    for unit in planned.units:
        ablated = ids.clone()
        ablated[list(unit.positions)] = baseline
        scores.append(base - target_logprob(lm.model, ablated, n_target))
    return np.array(scores)


def test_shape_through_the_peer_registry(case):
    lm, planned = case
    scores = peer_scores("occlusion", lm, planned)
    assert scores.shape == (len(planned.units),) and scores.dtype == np.float64 and np.isfinite(scores).all()
    assert len(planned.units) > 5  # word units of the context only


def test_baseline_is_a_space_token(tokenizer):
    space = occlusion.baseline_token(tokenizer)
    assert tokenizer.decode([space]) == " " and space != occlusion.CAPTUM_DEFAULT_BASELINE
    assert space not in tokenizer.all_special_ids


@pytest.mark.parametrize(
    ("batch", "baseline"),
    [(1, None), (3, None), (occlusion.BATCH, None), (occlusion.BATCH, occlusion.CAPTUM_DEFAULT_BASELINE)],
    ids=["llm-attribution", "ragged-batches", "default", "captum-default-id"],
)
def test_equals_ablation_by_hand(case, batch, baseline):
    """Positive = ablating the unit lowers the target's log-probability; only the unit's own tokens are replaced.
    A wrong sign, a unit mapped to another's tokens or a template token ablated each break the equality."""
    lm, planned = case
    expected = by_hand(lm, planned, occlusion.baseline_token(lm.tokenizer) if baseline is None else baseline)
    assert np.abs(expected).max() > 0.05 and (expected > 0).any() and (expected < 0).any()  # a sign test bites
    got = occlusion.unit_scores(lm, planned, perturbations_per_eval=batch, baseline=baseline)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_features_are_exactly_the_units(case):
    lm, planned = case
    prompt = planned.sweep_input.input_ids[: -planned.sweep_input.n_target]
    space = occlusion.baseline_token(lm.tokenizer)
    inp = occlusion.UnitTokenInput(prompt, planned.units, lm.tokenizer, baselines=space)
    positions = sorted(p for u in planned.units for p in u.positions)
    assert inp.itp_mask[0].nonzero()[:, 0].tolist() == positions and inp.n_itp_features == len(positions)
    assert sorted(set(inp.feature_mask[0].tolist())) == list(range(len(planned.units)))
    # one unit ablated: its tokens become the baseline id, nothing else moves
    indicator = inp.to_tensor().clone()
    indicator[inp.feature_mask == 2] = 0
    ablated = inp.to_model_input(indicator)[0]
    changed = (ablated != prompt).nonzero()[:, 0].tolist()
    assert changed == [p for p in planned.units[2].positions if prompt[p] != space]
    assert (ablated[list(planned.units[2].positions)] == space).all()


def test_overlapping_units_are_refused(case):
    lm, planned = case
    prompt = planned.sweep_input.input_ids[: -planned.sweep_input.n_target]
    with pytest.raises(ValueError, match="two units"):
        occlusion.UnitTokenInput(prompt, [planned.units[0], planned.units[0]], lm.tokenizer)


@pytest.mark.slow
def test_eval_on_the_real_model(real_lm):
    """`atman eval squad --methods occlusion,random` on the real model: occlusion beats random on mAP. The first
    bundled example cut to its first sentence (26 word units, the answer among them: a quarter of the whole
    example's passes, for the suite's budget); the baseline id, whose Captum default (0, <|endoftext|>) once sank
    occlusion below random on whole examples, is pinned by the two tests above on every run."""
    result = evaluate(real_lm, [first_sentence(load_squad(str(SQUAD_DEV), limit=1)[0])], ["occlusion", "random"],
                      lds_masks=0)  # fmt: skip
    assert result["n"] == 1 and set(result["methods"]) == {"occlusion", "random"}
    for example in result["examples"]:
        m = example["methods"]["occlusion"]
        assert 0 <= m["AP"] <= 100 and 0 <= m["AR"] <= 100 and m["seconds"] > 0
    summary = result["methods"]["occlusion"]
    assert summary["mAP"] > result["methods"]["random"]["mAP"]
