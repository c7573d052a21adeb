"""Explainer behaviour on tiny models: identity factor, explain spans, conceptual multipliers, chat, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import AtManConfig, Explainer
from pipeline.atman.plan import unit_multipliers
from pipeline.atman.units import Unit

PROMPT = "The cat sat on the mat. The cat was happy."


@pytest.fixture
def llama(tiny_lms):
    return tiny_lms["llama"]


@pytest.mark.parametrize("mode", ["multiplicative", "log_additive", "scale"])
def test_factor_one_gives_zero_scores(llama, mode):
    e = Explainer(llama, AtManConfig(mode=mode, factor=1.0, granularity="word")).explain(PROMPT, " The", chat=False)
    assert len(e.units) == 12  # 10 words, 2 full stops
    assert np.all(e.scores == 0) and np.all(e.per_target == 0)


def test_units_outside_explain_span_never_perturbed(llama):
    span = (24, 41)  # "The cat was happy"
    # kappa = 0: every token with a non-negative embedding cosine is suppressed along with the unit
    ex = Explainer(llama, AtManConfig(granularity="token", conceptual_threshold=0.0))
    planned = ex.plan(PROMPT, " The", explain_span=span, chat=False)
    inside = {p for u in planned.units for p in u.positions}
    assert inside and all(span[0] <= u.start and u.start + u.length <= span[1] for u in planned.units)
    mult = planned.sweep_input.multipliers
    outside = [p for p in range(mult.shape[1]) if p not in inside]
    assert torch.all(mult[:, outside] == 1)  # including the "The cat" before the span and the target
    inside_mult = mult[:, sorted(inside)]
    assert inside_mult.diagonal().tolist() == pytest.approx([0.1] * len(inside))
    assert (inside_mult < 1).sum() > len(inside)  # conceptual suppression is active inside the span


def test_chat_template_tokens_are_never_units(llama):
    ex = Explainer(llama, AtManConfig(granularity="word"))
    planned = ex.plan("Why is the sky blue?", " Rayleigh", chat=True)
    assert [u.text for u in planned.units] == ["Why", "is", "the", "sky", "blue", "?"]
    n_template = len(planned.prepared.prompt_ids)
    assert n_template > 10  # the system prompt and role markers are there ...
    touched = torch.nonzero((planned.sweep_input.multipliers != 1).any(0))[:, 0]
    spans = planned.prepared.token_spans
    assert all(spans[p] is not None for p in touched)  # ... but only user-text tokens are ever suppressed


def test_chat_prompt_matches_reference(llama):
    kw = dict(granularity="word", mode="log_additive")
    fast = Explainer(llama, AtManConfig(**kw)).explain("Why is the sky blue?", " Because", chat=True)
    ref = Explainer(llama, AtManConfig(engine="reference", **kw)).explain("Why is the sky blue?", " Because", chat=True)
    np.testing.assert_allclose(fast.scores, ref.scores, atol=1e-4, rtol=0)


def test_conceptual_multipliers():
    units = [Unit("a", 0, 1, (0,)), Unit("b", 1, 1, (1,)), Unit("c", 2, 1, (2,))]
    cosine = torch.tensor([[1.0, 0.8, 0.1], [0.8, 1.0, 0.75], [0.1, 0.75, 1.0]])
    mult = unit_multipliers(4, units, factor=0.1, cosine=cosine, threshold=0.7)
    expected = torch.tensor(
        [
            [0.1, 1 - 0.9 * 0.8, 1.0, 1.0],
            [1 - 0.9 * 0.8, 0.1, 1 - 0.9 * 0.75, 1.0],
            [1.0, 1 - 0.9 * 0.75, 0.1, 1.0],
        ]
    )
    torch.testing.assert_close(mult, expected)
    assert torch.all(unit_multipliers(4, units, 0.1, cosine, None)[:, 3] == 1)


def test_postprocess_and_normalize(llama):
    base = Explainer(llama, AtManConfig(granularity="word")).explain(PROMPT, " The", chat=False)
    sq = Explainer(llama, AtManConfig(granularity="word", postprocess="square", normalize=True)).explain(
        PROMPT, " The", chat=False
    )
    expected = base.scores**2 / (base.scores**2).max()
    np.testing.assert_allclose(sq.scores, expected, rtol=1e-5)
    assert sq.scores.max() == pytest.approx(1.0)


def test_sum_of_squares_aggregates_each_target_token_squared(llama):
    """The paper's evaluation squares each target token's rise in CE, then sums; ``sum`` squares nothing."""
    plain = Explainer(llama, AtManConfig(granularity="word")).explain(PROMPT, " The cat", chat=False)
    squares = Explainer(llama, AtManConfig(granularity="word", aggregate="sum_of_squares")).explain(
        PROMPT, " The cat", chat=False
    )
    assert plain.per_target.shape[1] == 2 and (np.abs(plain.per_target) > 1e-3).any(axis=0).all()
    np.testing.assert_allclose(squares.per_target, plain.per_target**2, rtol=1e-6)
    np.testing.assert_allclose(squares.scores, (plain.per_target**2).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(plain.scores, plain.per_target.sum(axis=1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(squares.scores, plain.scores**2, atol=1e-4), "squaring the sum is another aggregation"


def test_explain_batch_matches_single(llama):
    ex = Explainer(llama, AtManConfig(granularity="word"))
    prompts, targets = [PROMPT, "One two three."], [" The", " Four"]
    batch = ex.explain_batch(prompts, targets, chat=False)
    for p, t, b in zip(prompts, targets, batch, strict=True):
        np.testing.assert_allclose(ex.explain(p, t, chat=False).scores, b.scores, atol=1e-5, rtol=0)


def test_a_request_object_explains_as_the_keyword_arguments_do(llama):
    """``ExplainRequest`` holds what explain/plan/explain_batch take as arguments (the CLI and the worker build one):
    the same inputs give the same explanation either way, and a request does not take the arguments besides."""
    from pipeline import ExplainRequest

    ex = Explainer(llama, AtManConfig(granularity="word"))
    request = ExplainRequest(PROMPT, " The", explain_span=(24, 41), chat=False)
    by_keywords = ex.explain(PROMPT, " The", explain_span=(24, 41), chat=False)
    assert ex.explain(request) == by_keywords
    assert ex.explain_batch([request, ExplainRequest("One two three.", " Four", chat=False)])[0] == by_keywords
    assert ex.plan(request).units == ex.plan(PROMPT, " The", explain_span=(24, 41), chat=False).units
    with pytest.raises(TypeError, match="chat: given next to an ExplainRequest"):
        ex.explain(request, chat=True)
    with pytest.raises(TypeError, match="target: given next to an ExplainRequest"):
        ex.explain_batch([request], [" x"])
    with pytest.raises(ValueError, match="image_grid: given without images"):
        ex.explain(ExplainRequest(PROMPT, " The", image_grid="2x2"))


def _greedy(llama, n: int) -> list[int]:
    """The tiny model's greedy continuation of PROMPT (distinct tokens, none of them EOS, for these weights)."""
    ids = Explainer(llama).plan(PROMPT, generate=n, chat=False).target_ids.tolist()
    assert len(ids) == n and len(set(ids)) == n, ids
    return ids


def test_generated_target_stops_at_eos_and_is_explained(llama, monkeypatch):
    """The model's EOS is made the third token the model predicts: generation stops there, EOS not included."""
    greedy = _greedy(llama, 5)
    monkeypatch.setattr(llama.model.generation_config, "eos_token_id", [llama.tokenizer.eos_token_id, greedy[2]])
    e = Explainer(llama, AtManConfig(granularity="word")).explain(PROMPT, generate=5, chat=False)
    assert e.target_tokens == [llama.tokenizer.decode([t]) for t in greedy[:2]]
    assert e.per_target.shape == (len(e.units), 2)


def test_eos_as_the_first_generated_token_is_a_clear_error(llama, monkeypatch):
    """Nothing to explain: a ValueError naming the target (a job marks the row skipped with it), not a crash."""
    monkeypatch.setattr(llama.model.generation_config, "eos_token_id", _greedy(llama, 1))
    with pytest.raises(ValueError, match=r"^target: the model generated EOS first, so there is no target to explain"):
        Explainer(llama).explain(PROMPT, generate=5, chat=False)


def test_chat_without_a_chat_template_is_a_clear_error(llama, monkeypatch):
    monkeypatch.setattr(llama.tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match=r"^chat: this tokenizer has no chat template; pass chat=False"):
        Explainer(llama).explain("Why is the sky blue?", " Rayleigh", chat=True)
    assert Explainer(llama).explain("Why is the sky blue?", " Rayleigh").chat is False, "auto: raw text without one"


def test_postprocess_abs(llama):
    base = Explainer(llama, AtManConfig(granularity="word")).explain(PROMPT, " The cat", chat=False)
    absolute = Explainer(llama, AtManConfig(granularity="word", postprocess="abs")).explain(
        PROMPT, " The cat", chat=False
    )
    assert (base.scores < -1e-3).any() and (base.per_target < -1e-3).any(), "signed scores to take the size of"
    np.testing.assert_allclose(absolute.scores, np.abs(base.scores), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(absolute.per_target, np.abs(base.per_target), rtol=1e-5, atol=1e-6)
    assert not np.allclose(absolute.scores, np.abs(base.per_target).sum(axis=1), atol=1e-4), "abs of the sum"


def test_keep_per_target_false_drops_only_the_matrix(llama):
    kept = Explainer(llama, AtManConfig(granularity="word")).explain(PROMPT, " The cat", chat=False)
    dropped = Explainer(llama, AtManConfig(granularity="word", keep_per_target=False)).explain(
        PROMPT, " The cat", chat=False
    )
    assert kept.per_target is not None and dropped.per_target is None and dropped.to_dict()["per_target"] is None
    np.testing.assert_allclose(dropped.scores, kept.scores, rtol=1e-6)
    assert dropped.units == kept.units and dropped.target_tokens == kept.target_tokens


def test_to_dict_shape(llama):
    d = Explainer(llama, AtManConfig(granularity="word")).explain(PROMPT, " The", chat=False).to_dict()
    assert {
        "prompt",
        "target",
        "target_tokens",
        "base_target_ce",
        "mode",
        "factor",
        "granularity",
        "units",
        "per_target",
    } <= set(d)
    assert set(d["units"][0]) == {"text", "start", "length", "score"}
    assert all(PROMPT[u["start"] : u["start"] + u["length"]] == u["text"] for u in d["units"])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt="", target=" x"), "prompt"),
        (dict(prompt="   ", target=" x"), "prompt"),
        (dict(prompt="abc", target=""), "target"),
        (dict(prompt="word " * 600, target=" x"), "prompt"),  # 600+ tokens > the tiny model's 512 context
        (dict(prompt="abc", target=" x", explain_span=(2, 9)), "explain_span"),
        (dict(prompt="abc", target=" x", explain_span=(2, 2)), "explain_span"),
        (dict(prompt="abc", target=" x", generate=2), "generate"),
    ],
)
def test_bad_input_names_the_parameter(llama, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: |\n{field}\n"):
        Explainer(llama).explain(chat=False, **kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(mode="subtractive"), "mode"),
        (dict(granularity="clause"), "granularity"),
        (dict(factor=-0.1), "factor"),
        (dict(conceptual_threshold=1.5), "conceptual_threshold"),
        (dict(granularity="custom"), "delimiter"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AtManConfig(**kwargs)


@pytest.mark.parametrize("mode", ["log_additive", "multiplicative", "scale"])
def test_conceptual_at_factor_zero_stays_finite(llama, mode):
    """Repeated tokens have cosine 1 (or 1 + rounding) to the unit: their multiplier must be 0, never below."""
    same = torch.full((3, 3), 1.0000001)  # positions 0 and 1 hold the same token; cosine rounds above 1
    same[2, :2] = same[:2, 2] = 0.9
    units = [Unit("a", 0, 1, (0,)), Unit("a", 2, 1, (1,)), Unit("b", 4, 1, (2,))]
    mult = unit_multipliers(3, units, 0.0, same, 0.7)
    assert mult.min() >= 0.0 and mult[0, 1] == 0.0 and mult[0, 2] == pytest.approx(0.1)
    prompt = "the cat and the dog and the bird and the fish saw the"
    e = Explainer(llama, AtManConfig(mode=mode, factor=0.0, conceptual_threshold=0.7)).explain(prompt, " end")
    assert np.isfinite(e.scores).all()
