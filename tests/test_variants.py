"""AtMan-family estimators with fewer passes (pipeline/atman/variants.py), checked against the oracle (tests/oracle.py,
which shares nothing with the engine) and against exact AtMan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import oracle_scores

from pipeline import AtManConfig, Explainer
from pipeline.atman.variants import coarse_to_fine, sentence_groups

PROMPT = (
    "The Eiffel Tower is in Paris. It was finished in 1889 and is made of iron. Mount Fuji is in Japan. "
    "Its summit is high above the sea. Rome is the capital of Italy. The tower was finished in"
)
TARGET = " 1889"


@pytest.fixture
def planned_word(tiny_lms):
    explainer = Explainer(tiny_lms["llama"], AtManConfig(granularity="word"))
    return explainer, explainer.plan(PROMPT, TARGET, chat=False)


class _Counting:
    """The explainer with every suppressed_rise call's sets recorded (the passes an estimator spends)."""

    def __init__(self, explainer):
        self.explainer, self.sets, self.rises, self.factors = explainer, [], [], set()

    def suppressed_rise(self, planned, unit_sets, factor=None):
        self.sets.extend(list(s) for s in unit_sets)
        self.factors.add(factor)
        rises = self.explainer.suppressed_rise(planned, unit_sets, factor)
        self.rises.extend(rises.tolist())
        return rises


def test_sentence_groups_cover_every_unit_once_in_order(planned_word):
    _, planned = planned_word
    groups = sentence_groups(planned)
    assert [i for g in groups for i in g] == list(range(len(planned.units)))
    units = planned.units
    texts = [PROMPT[units[g[0]].start : units[g[-1]].start + units[g[-1]].length] for g in groups]
    assert len(groups) == 6 and texts[0] == "The Eiffel Tower is in Paris." and texts[2] == "Mount Fuji is in Japan."


def test_refining_every_sentence_is_exact_atman(planned_word):
    explainer, planned = planned_word
    exact = explainer.score(planned).scores.astype(np.float64)
    np.testing.assert_allclose(coarse_to_fine(explainer, planned, refine_share=1.0), exact, atol=1e-4)


def test_coarse_spends_sentence_passes_then_refines_the_top_sentences(tiny_lms, planned_word):
    """The passes: one per sentence (its units suppressed together: the oracle's value), then one per unit of the
    top third of the sentences (exact AtMan's scores there); every other unit holds its sentence's mean."""
    explainer, planned = planned_word
    counting = _Counting(explainer)
    scores = coarse_to_fine(counting, planned)
    groups = sentence_groups(planned)
    assert counting.sets[: len(groups)] == groups
    ids, n_target = planned.sweep_input.input_ids, planned.sweep_input.n_target
    mult = torch.ones(len(groups), len(ids))
    for row, group in enumerate(groups):
        for i in group:
            mult[row, list(planned.units[i].positions)] = explainer.config.factor
    sentence = oracle_scores(tiny_lms["llama"].model, ids, mult, n_target, "log_additive")
    top = sorted(np.argsort(-sentence)[:2])  # ceil(6 / 3)
    refined = [i for g in top for i in groups[g]]
    assert counting.sets[len(groups) :] == [[i] for i in refined], "one pass per unit of the top two sentences"
    exact = explainer.score(planned).scores.astype(np.float64)
    np.testing.assert_allclose(scores[refined], exact[refined], atol=1e-4)
    for g, group in enumerate(groups):
        if g not in top:
            np.testing.assert_allclose(scores[group], sentence[g] / len(group), atol=1e-4)
    assert len(counting.sets) < len(planned.units), "fewer passes than exact AtMan"


def test_sentence_units_are_exact_from_the_sentence_passes_alone(tiny_lms):
    explainer = Explainer(tiny_lms["llama"], AtManConfig(granularity="sentence"))
    planned = explainer.plan(PROMPT, TARGET, chat=False)
    counting = _Counting(explainer)
    scores = coarse_to_fine(counting, planned)
    assert counting.sets == [[i] for i in range(len(planned.units))], "one pass per sentence, nothing refined"
    np.testing.assert_allclose(scores, explainer.score(planned).scores.astype(np.float64), atol=1e-4)


def test_refine_share_outside_0_1_is_refused(planned_word):
    explainer, planned = planned_word
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="refine_share"):
            coarse_to_fine(explainer, planned, refine_share=share)


def test_eval_runs_the_variant_by_name(tiny_lms, tmp_path):
    import json

    from pipeline.eval_methods import parse_methods
    from pipeline.evaluate import evaluate, load_squad

    path = tmp_path / "squad.jsonl"
    context = PROMPT.rsplit(".", 1)[0] + "."
    row = {"id": "v1", "context": context, "question": "When was the tower finished?",
           "answers": [{"text": "1889", "answer_start": context.index("1889")}]}  # fmt: skip
    path.write_text(json.dumps(row) + "\n")
    assert parse_methods("atman:coarse,atman:joint,atman") == ["atman:coarse", "atman:joint", "atman"]
    result = evaluate(tiny_lms["llama"], load_squad(str(path)), ["atman:coarse", "atman:joint", "atman"], lds_masks=4)
    assert all(0 <= result["methods"][m]["mAP"] <= 100 for m in ("atman:coarse", "atman:joint"))


def _oracle_rises(lm, planned, sets, factor):
    """The oracle's CE rise (whole target) with each set of units suppressed together."""
    ids, n_target = planned.sweep_input.input_ids, planned.sweep_input.n_target
    mult = torch.ones(len(sets), len(ids))
    for row, unit_set in enumerate(sets):
        for i in unit_set:
            mult[row, list(planned.units[i].positions)] = factor
    return oracle_scores(lm.model, ids, mult, n_target, "log_additive")


def test_joint_is_a_lasso_fit_of_the_oracles_rises_over_its_passes(tiny_lms, planned_word):
    """The passes: budget = units, the first half random (never empty), then single units; their rises equal the
    oracle's to 1e-4, and the scores equal scikit-learn's LASSO (no intercept, the relative penalty) fitted here to
    the oracle's rises of the same sets (to 1e-3: n passes for n units, the fit amplifies the rises' 1e-5 gaps)."""
    from sklearn.linear_model import Lasso

    from pipeline.atman.variants import JOINT_ALPHA, joint_surrogate

    explainer, planned = planned_word
    n = len(planned.units)
    counting = _Counting(explainer)
    scores = joint_surrogate(counting, planned)
    sets = counting.sets
    n_joint = n - round(n / 2)
    assert len(sets) == n, "exact AtMan's budget"
    assert all(len(s) >= 1 for s in sets[:n_joint]) and max(len(s) for s in sets[:n_joint]) > 1
    assert all(len(s) == 1 for s in sets[n_joint:]) and len({s[0] for s in sets[n_joint:]}) == n - n_joint
    rises = _oracle_rises(tiny_lms["llama"], planned, sets, explainer.config.factor)
    np.testing.assert_allclose(counting.rises, rises, atol=1e-4)
    x = np.zeros((len(sets), n))
    for row, unit_set in enumerate(sets):
        x[row, unit_set] = 1.0
    lasso = Lasso(alpha=JOINT_ALPHA * np.abs(rises).mean(), fit_intercept=False, tol=1e-9, max_iter=100_000)
    np.testing.assert_allclose(scores, lasso.fit(x, rises).coef_, atol=1e-3)
    assert joint_surrogate(explainer, planned).tolist() == scores.tolist(), "the same request draws the same masks"


def test_joint_knockout_is_joint_with_its_passes_knocked_out_of_attention(tiny_lms, planned_word):
    """``joint-knockout`` runs ``joint``'s passes at factor 0 whatever the explainer's factor (0.1 here): its rises
    equal the oracle's with the suppressed units' keys at log m = -inf, and its scores equal ``joint``'s computed by
    an explainer configured at factor 0; the result names factor 0."""
    from pipeline.atman.variants import joint_knockout, joint_surrogate

    explainer, planned = planned_word
    counting = _Counting(explainer)
    scores = joint_knockout(counting, planned)
    assert counting.factors == {0.0} and explainer.config.factor == 0.1
    rises = _oracle_rises(tiny_lms["llama"], planned, counting.sets, 0.0)
    np.testing.assert_allclose(counting.rises, rises, atol=1e-4)
    at_zero = Explainer(tiny_lms["llama"], AtManConfig(granularity="word", factor=0.0))
    np.testing.assert_allclose(scores, joint_surrogate(at_zero, planned), atol=1e-6)
    assert not np.allclose(scores, joint_surrogate(explainer, planned)), "factor 0.1 passes give other scores"
    with pytest.raises(ValueError, match="factor: -1"):
        explainer.suppressed_rise(planned, [[0]], -1.0)


def test_a_variant_names_the_factor_its_passes_ran_at(tiny_lms):
    from pipeline.methods import MethodRunner

    config = AtManConfig(granularity="sentence", factor=0.3)
    cases = (("atman:joint", 0.3, None), ("atman:joint-knockout", 0.0, 0.0), ("atman:coarse", 0.3, "absent"))
    for name, factor, setting in cases:  # the setting None: the run's factor
        runner = MethodRunner(tiny_lms["llama"], name, config)
        explanation = runner.explain(runner.explainer.plan(PROMPT, TARGET, chat=False))
        assert explanation.factor == factor and explanation.params["settings"].get("factor", "absent") == setting
        assert explanation.params["factor"] == 0.3, "the run's config, as asked"


class _Linear:
    """A model whose CE rise is exactly linear in the suppressed units: rise = sum of ``weights`` over the set."""

    def __init__(self, weights):
        self.weights, self.sets = np.asarray(weights, dtype=np.float64), []

    def suppressed_rise(self, planned, unit_sets, factor=None):
        self.sets.extend(list(s) for s in unit_sets)
        return np.array([self.weights[list(s)].sum() for s in unit_sets])


def test_joint_recovers_a_sparse_linear_model_and_refines_its_top_units(planned_word):
    _, planned = planned_word
    n = len(planned.units)
    weights = np.zeros(n)
    weights[[2, 7, 11]] = [3.0, 1.5, -1.0]
    model = _Linear(weights)
    from pipeline.atman.variants import joint_surrogate

    scores = joint_surrogate(model, planned, alpha=0.01)
    np.testing.assert_allclose(scores, weights, atol=0.25)  # the LASSO shrinks each weight by about 0.1-0.15
    assert np.abs(scores[weights == 0]).max() < 0.05 and np.argmax(scores) == 2
    singles = [s[0] for s in model.sets if len(s) == 1][-round(n / 2) :]
    assert {2, 7} <= set(singles), "the single-unit passes go to the units the first fit ranks highest"


def test_joint_with_only_single_passes_ranks_as_exact_atman(planned_word):
    """single_share 1: one pass per unit, every unit (exact AtMan's passes); the LASSO shrinks each score by the
    same amount, so the ranking of the units the penalty leaves non-zero is exact AtMan's."""
    from pipeline.atman.variants import joint_surrogate

    explainer, planned = planned_word
    counting = _Counting(explainer)
    scores = joint_surrogate(counting, planned, single_share=1.0, alpha=0.01)
    assert sorted(counting.sets) == [[i] for i in range(len(planned.units))]
    exact = explainer.score(planned).scores.astype(np.float64)
    kept = scores != 0
    assert kept.sum() >= 3
    assert np.argsort(-scores[kept]).tolist() == np.argsort(-exact[kept]).tolist()


def test_joint_refuses_a_budget_or_share_out_of_range(planned_word):
    from pipeline.atman.variants import joint_surrogate

    explainer, planned = planned_word
    for kwargs in ({"budget": 0}, {"single_share": 1.5}, {"single_share": -0.1}):
        with pytest.raises(ValueError, match="joint"):
            joint_surrogate(explainer, planned, **kwargs)
