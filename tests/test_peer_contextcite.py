"""ContextCite (pipeline/peers/contextcite.py) through its library: its sources are our units, its response is our
target and its prompt is our planned request's, checked on the forward passes it really makes."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.atman.config import AtManConfig
from pipeline.atman.explainer import Explainer
from pipeline.peers import contextcite

SENTENCES = [
    "The Eiffel Tower is in Paris.",
    "It was finished in 1889.",
    "Gustave Eiffel's company built it.",
    "Millions of people visit it every year.",
]
QUESTION = "When was the Eiffel Tower finished?"
CONTEXT = " ".join(SENTENCES)
PROMPT = f"{CONTEXT}\n\n{QUESTION}"
TARGET = "It was finished in 1889"


def plan(lm, granularity: str = "sentence"):
    """The request as the evaluation plans it: units over the context only, the chat template, a given target."""
    explainer = Explainer(lm, AtManConfig(granularity=granularity))
    return explainer.plan(PROMPT, TARGET, explain_span=(0, len(CONTEXT)), chat=True)


def chat_ids(tokenizer, content: str) -> list[int]:
    messages = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def spied(tiny_lms):
    """One ContextCite run on the tiny Llama: the citer and the input ids of every forward pass it made."""
    lm = tiny_lms["llama"]
    planned = plan(lm)
    seen: list[list[int]] = []

    def record(module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        seen.extend(row.tolist() for row in ids)

    citer = contextcite.build_citer(lm, planned)
    handle = lm.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        masks = citer._masks  # the library's ablation masks and its forward passes
        weight, _ = citer._get_attributions_for_ids_range(0, len(citer._response_ids))
    finally:
        handle.remove()
    return lm, planned, citer, masks, seen, weight


def test_units_are_the_sources(spied):
    lm, planned, citer, masks, seen, weight = spied
    assert [u.text for u in planned.units] == SENTENCES
    assert citer.sources == SENTENCES
    assert masks.shape == (64, len(SENTENCES))  # the library's default number of ablations
    assert len(seen) == 64  # one forward per ablation, batch size 1, nothing generated


def test_every_ablation_drops_exactly_the_masked_units(spied):
    """Each forward's prompt is the chat-wrapped prompt with exactly the mask's dropped sentences removed (built
    here independently of the partitioner), followed by our target's ids."""
    lm, planned, citer, masks, seen, weight = spied
    target = planned.target_ids.tolist()
    expected = {}
    for keep in itertools.product([False, True], repeat=len(SENTENCES)):
        kept = " ".join(s for s, k in zip(SENTENCES, keep, strict=True) if k)
        expected[keep] = chat_ids(lm.tokenizer, f"{kept}\n\n{QUESTION}") + target
    for mask, ids in zip(masks, seen, strict=True):
        assert ids == expected[tuple(bool(k) for k in mask)]
    assert 0 < masks.mean(0).min() and masks.mean(0).max() < 1  # every unit is both kept and dropped somewhere


def test_response_is_our_target(spied):
    """With every unit kept, ContextCite's input is the planned request's ids, and its per-token logit-probs of
    the response are our target's log-prob computed independently with a plain forward."""
    lm, planned, citer, masks, seen, weight = spied
    full = planned.sweep_input.input_ids
    n = planned.sweep_input.n_target
    rows = [i for i, m in enumerate(masks) if m.all()]
    assert rows  # seeds 0..63 draw the all-kept mask
    for i in rows:
        assert seen[i] == full.tolist()
    with torch.no_grad():
        logits = lm.model(input_ids=full[None]).logits[0, -n - 1 : -1].double()
    logp = torch.log_softmax(logits, -1).gather(-1, full[-n:, None])[:, 0].sum().item()
    lib = torch.nn.functional.logsigmoid(torch.tensor(citer._logit_probs[rows[0]], dtype=torch.float64)).sum().item()
    assert lib == pytest.approx(logp, abs=1e-3)


def test_unit_scores_are_the_surrogate_weights(spied):
    lm, planned, citer, masks, seen, weight = spied
    scores = contextcite.unit_scores(lm, planned)
    assert scores.shape == (len(planned.units),) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, weight, rtol=1e-6)  # deterministic masks: the same fit
    assert np.isfinite(scores).all() and np.abs(scores).sum() > 0


def test_partitioner_keeps_text_outside_the_units(tiny_lms):
    """Only units' characters (and the whitespace joining them) are ever removed: a prefix, a non-space gap and
    the question stay."""
    unit_partitioner, _ = contextcite._citer_class()
    text = "  Alpha one. -- Beta two. Gamma.\n\nQ?"
    spans = [(2, 12), (16, 25), (26, 32)]
    part = unit_partitioner(text, spans)
    assert part.sources == ["Alpha one.", "Beta two.", "Gamma."]
    assert part.get_context() == text
    cases = {
        (1, 1, 1): text,
        (0, 1, 1): "   -- Beta two. Gamma.\n\nQ?",
        (1, 0, 1): "  Alpha one. -- Gamma.\n\nQ?",
        (0, 0, 1): "   -- Gamma.\n\nQ?",
        (1, 1, 0): "  Alpha one. -- Beta two.\n\nQ?",
        (0, 0, 0): "   -- \n\nQ?",
    }
    for mask, want in cases.items():
        assert part.get_context(np.array(mask, dtype=bool)) == want


def test_word_units(tiny_lms):
    """Many sources: one score per word unit."""
    lm = tiny_lms["llama"]
    planned = plan(lm, "word")
    scores = contextcite.unit_scores(lm, planned)
    assert len(planned.units) > 20 and scores.shape == (len(planned.units),) and np.isfinite(scores).all()


def test_squad_sentence_eval(tiny_lms):
    """ContextCite through `atman eval squad`'s evaluation at sentence units, on the first bundled SQuAD example.
    Nothing here depends on the weights (units, ranges, the deletion curve), so the tiny Llama with the real
    tokenizer and chat template computes it (the real model's 64 ablations took most of this file's time)."""
    from pipeline.data import SQUAD_DEV
    from pipeline.evaluate import evaluate, load_squad

    result = evaluate(
        tiny_lms["llama"],
        load_squad(str(SQUAD_DEV), limit=1),
        ["contextcite", "random"],
        granularity="sentence",
        lds_masks=0,
    )  # fmt: skip - mAP is what this checks; the LDS is test_eval's
    assert result["n"] == 1 and result["granularity"] == "sentence"  # one example: the suite's budget (issue 25)
    for example in result["examples"]:
        assert example["n_answer_units"] >= 1
        for metrics in example["methods"].values():
            assert 0 <= metrics["AP"] <= 100 and 0 <= metrics["AR"] <= 100 and np.isfinite(metrics["aopc"])
    assert set(result["methods"]) == {"contextcite", "random"}


def test_import_is_quiet_and_offline():
    """context_cite calls nltk.download at import; the peer imports it without that call (no output, no network)."""
    code = (
        "import nltk, sys\n"
        "calls = []\n"
        "nltk.download = lambda *a, **k: calls.append(a)\n"
        "from pipeline.peers import contextcite\n"
        "contextcite._import_context_cite()\n"
        "assert 'context_cite' in sys.modules and calls == [], calls\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "ok\n" and "nltk" not in out.stderr, out.stderr[-2000:]
