"""The Python API as users of Inseq / Captum expect it: Explainer(model, tokenizer), Explanation save / load / == /
notebook HTML, named units, generation arguments, JSON-shaped spans, the chat-template rule shown, clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from pipeline import AtManConfig, Explainer, Explanation, ScoredUnit, UnitSpan, load_model
from pipeline.atman.units import top_units

PROMPT = "The cat sat on the mat. The cat was happy."
QUESTION = "Why is the sky blue?"
ATMAN = str(Path(sys.executable).parent / "atman")
WORD = AtManConfig(granularity="word")


@pytest.fixture(scope="module")
def llama(tiny_lms):
    return tiny_lms["llama"]


@pytest.fixture(scope="module")
def word(llama):
    return Explainer(llama, WORD)


# --- Explainer(model, tokenizer) ---------------------------------------------------------------------------------


def test_plain_model_and_tokenizer_match_a_loaded_model(llama):
    expected = Explainer(llama, WORD).explain(PROMPT, " The", chat=False)
    for ex in (
        Explainer(llama.model, llama.tokenizer, WORD),
        Explainer(llama.model, llama.tokenizer, config=WORD),
        Explainer(llama, config=WORD),
    ):
        assert ex.explain(PROMPT, " The", chat=False) == expected
    assert Explainer(llama.model, llama.tokenizer).config == AtManConfig()
    assert Explainer(llama).lm is llama and Explainer(llama.model, llama.tokenizer).lm is None


def test_from_pretrained_model_directory(tiny_model_dir):
    """What a Hugging Face user has in hand: AutoModelForCausalLM + AutoTokenizer, no pipeline.load_model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    e = Explainer(model, tokenizer, WORD).explain(PROMPT, " The", chat=False)
    assert [u.text for u in e.units][:3] == ["The", "cat", "sat"] and np.isfinite(e.scores).all()


class _SlowTokenizer:
    is_fast = False

    def __call__(self, *args, **kwargs): ...

    def decode(self, ids): ...


@pytest.mark.parametrize(
    "args, kwargs, error, field",
    [
        (lambda lm: (lm.model,), {}, TypeError, "tokenizer"),
        (lambda lm: ("smollm2-135m-instruct",), {}, TypeError, "model"),
        (lambda lm: (torch.nn.Linear(2, 2), lm.tokenizer), {}, TypeError, "model"),
        (lambda lm: (lm, lm.tokenizer), {}, TypeError, "tokenizer"),
        (lambda lm: (lm.model, lm.tokenizer, "word"), {}, TypeError, "config"),
        (lambda lm: (lm, WORD), {"config": WORD}, TypeError, "config"),
        (lambda lm: (lm.model, _SlowTokenizer()), {}, ValueError, "tokenizer"),
    ],
)
def test_bad_explainer_arguments_name_the_argument(llama, args, kwargs, error, field):
    with pytest.raises(error, match=rf"^{field}: "):
        Explainer(*args(llama), **kwargs)


def test_model_in_training_mode_is_refused(llama):
    llama.model.train()
    try:
        with pytest.raises(ValueError, match=r"^model: .*model\.eval\(\)"):
            Explainer(llama.model, llama.tokenizer)
    finally:
        llama.model.eval()


# --- Explanation: named units, save / load, ==, allclose, one top-k -----------------------------------------------


def test_units_are_named_tuples_that_still_unpack(word):
    e = word.explain(PROMPT, " The", chat=False)
    text, start, length = e.units[1]
    assert isinstance(e.units[1], UnitSpan) and (text, start, length) == ("cat", 4, 3) == e.units[1]
    assert PROMPT[e.units[1].start : e.units[1].end] == "cat"
    best = e.top(1)[0]
    assert isinstance(best, ScoredUnit) and best.score == pytest.approx(float(e.scores.max()))
    text, start, length, score = best  # the 4-tuple callers unpacked before
    assert best[0] == text and best.end == start + length


def test_top_units_one_rule():
    units = [("a", 0, 1), ("b", 2, 1), ("c", 4, 1), ("d", 6, 1)]
    top = top_units(units, [0.5, float("nan"), 0.5, 0.9], k=None)
    assert [u.text for u in top] == ["d", "a", "c", "b"], "highest first, ties in prompt order, NaN last"
    assert top_units(units, [1, 2, 3, 4], k=2) == [("d", 6, 1, 4.0), ("c", 4, 1, 3.0)]
    with pytest.raises(ValueError, match="^scores: "):
        top_units(units, [1.0], k=2)


def _assert_same_fields(a: Explanation, b: Explanation) -> None:
    for f in dataclasses.fields(Explanation):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape, f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y and type(x) is type(y), f.name


@pytest.mark.parametrize(
    "config, target",
    [
        (WORD, " The cat"),
        (AtManConfig.paper(), " The cat sat"),  # target units, target_per_target, conceptual suppression
        (AtManConfig.paper(), " The"),  # one target token: no target units, a [0, 1] matrix
        (AtManConfig(keep_per_target=False), " The"),  # per_target None
    ],
)
def test_save_load_round_trip(llama, tmp_path, config, target):
    e = Explainer(llama, config).explain(PROMPT, target, chat=False)
    loaded = Explanation.load(e.save(tmp_path / "e.json"))
    _assert_same_fields(e, loaded)
    assert loaded == e and Explanation.from_dict(json.loads(json.dumps(e.to_dict()))) == e
    # the method as it ran: float32 weights on a CPU resolve precision auto to fp32
    assert loaded.params == config.model_dump() | {"precision": "fp32"}


def test_equality_and_allclose(word):
    e = word.explain(PROMPT, " The cat", chat=False)
    other = Explanation.from_dict(e.to_dict())
    assert other == e and e.allclose(other)
    other.scores = other.scores + 1e-7
    assert other != e and e.allclose(other), "noise: not ==, but allclose"
    other.scores[0] += 1.0
    assert not e.allclose(other)
    assert e != word.explain(PROMPT, " The", chat=False)
    assert e != "not an explanation"
    with pytest.raises(TypeError):
        hash(e)


def test_from_dict_reads_the_older_json_and_names_missing_keys(word):
    d = word.explain(PROMPT, " The", chat=False).to_dict()
    old = {k: v for k, v in d.items() if k not in ("params", "target_per_target")} | {"chat": False}
    e = Explanation.from_dict(old)
    assert e.chat is False and e.chat_reason is None and e.params == {}
    with pytest.raises(ValueError, match="^explanation: missing key.*prompt"):
        Explanation.from_dict({k: v for k, v in d.items() if k != "prompt"})


def test_notebook_html_is_the_report_heatmap(word):
    from pipeline.report import _prompt_html, heatmap_html, top_html

    e = word.explain(PROMPT, " The", chat=False)
    page = e._repr_html_()
    heat = heatmap_html(e.prompt, e.units, e.scores)
    assert heat in page and page.count("class='u'") == len(e.units)
    row = {
        "prompt_id": "p",
        "status": "ok",
        "prompt": e.prompt,
        "target": e.target,
        "target_tokens": e.target_tokens,
        "base_target_ce": e.base_target_ce,
        "granularity": e.granularity,
        "latency_ms": 1.0,
        "unit_text": [u.text for u in e.units],
        "unit_start": [u.start for u in e.units],
        "unit_length": [u.length for u in e.units],
        "scores": e.scores.tolist(),
    }
    report = _prompt_html(row)
    assert heat in report, "the run report draws the same heatmap"
    assert top_html(e.units, e.scores) in report and top_html(e.units, e.scores) in page


def test_terminal_row_top_units_follow_the_same_rule(word):
    from pipeline.render import render_row

    e = word.explain(PROMPT, " The", chat=False)
    console = Console(record=True, width=400)
    row = {
        "status": "ok",
        "prompt": e.prompt,
        "unit_text": [u.text for u in e.units],
        "unit_start": [u.start for u in e.units],
        "unit_length": [u.length for u in e.units],
        "scores": e.scores.tolist(),
    }
    render_row(row, console, top_k=3, header=False)
    line = next(x for x in console.export_text().splitlines() if x.startswith("top units: "))
    assert line == "top units: " + ", ".join(f"{u.text!r} {u.score:+.3f}" for u in e.top(3))


# --- generation arguments and explain spans ----------------------------------------------------------------------


def test_generation_arguments(word):
    planned = word.plan(PROMPT, generate=6, chat=False)
    ids = planned.target_ids.tolist()
    assert len(ids) == 6 and len(set(ids[:3])) == 3, "the tiny model's greedy continuation has no EOS"
    for generate in ({"max_new_tokens": 2}, {"max_new_tokens": 2, "num_beams": 1}, _gen_config(max_new_tokens=2)):
        e = word.explain(PROMPT, generate=generate, chat=False)
        assert len(e.target_tokens) == 2 and e.per_target.shape == (len(e.units), 2)
    stopped = word.plan(PROMPT, generate={"max_new_tokens": 6, "eos_token_id": ids[2]}, chat=False)
    assert stopped.target_ids.tolist() == ids[:2], "cut before the first EOS the arguments name"
    config_stop = word.plan(PROMPT, generate=_gen_config(max_new_tokens=6, eos_token_id=ids[2]), chat=False)
    assert config_stop.target_ids.tolist() == ids[:2]
    sampled = []
    for _ in range(2):
        torch.manual_seed(0)
        sampled.append(word.plan(PROMPT, generate={"do_sample": True, "max_new_tokens": 3}, chat=False).target_ids)
    assert torch.equal(*sampled), "seeded sampling is repeatable"


def _gen_config(**kwargs):
    from transformers import GenerationConfig

    return GenerationConfig(**kwargs)


@pytest.mark.parametrize(
    "generate",
    [
        "three",
        True,
        0,
        {"max_new_tokens": 0},
        {"max_length": 5},
        {"num_return_sequences": 2, "num_beams": 2},
        {"attention_mask": None},
        {"no_such_argument": 1},
    ],
)
def test_bad_generation_arguments_name_generate(word, generate):
    with pytest.raises(ValueError, match="^generate: "):
        word.explain(PROMPT, generate=generate, chat=False)


def test_explain_span_as_json_gives_it(word):
    as_tuple = word.explain(PROMPT, " The", explain_span=(24, 41), chat=False)
    assert word.explain(PROMPT, " The", explain_span=[24, 41], chat=False) == as_tuple
    assert word.explain(PROMPT, " The", explain_span=json.loads("[[24, 41]]"), chat=False) == as_tuple
    two = word.explain(PROMPT, " The", explain_span=json.loads("[[0, 7], [24, 41]]"), chat=False)
    assert [u.text for u in two.units] == ["The", "cat", "The", "cat", "was", "happy"]
    assert word.explain(PROMPT, " The", explain_span=((0, 7), (24, 41)), chat=False) == two
    merged = word.explain(PROMPT, " The", explain_span=[[24, 33], [30, 41]], chat=False)
    assert merged.units == as_tuple.units, "overlapping spans merge: no token in two units"
    with pytest.raises(ValueError, match="^explain_span: "):
        word.explain(PROMPT, " The", explain_span=[], chat=False)
    with pytest.raises(ValueError, match="^explain_span: "):
        word.explain(PROMPT, " The", explain_span=[[0, 3], [5]], chat=False)


# --- config and device errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_factor_names_factor(factor):
    with pytest.raises(ValueError, match=r"factor\n.*finite"):
        AtManConfig(factor=factor)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "gpu"])
def test_unavailable_device_names_device_and_lists_the_options(tiny_model_dir, device):
    with pytest.raises(ValueError, match=r"^device: .*available here: auto, cpu$"):
        load_model(tiny_model_dir, device=device)


# --- the chat-template rule, shown ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, chat, applied, reason",
    [
        (QUESTION, None, True, "auto: prompt ends in '?'"),
        (QUESTION + "  ", None, True, "auto: prompt ends in '?'"),
        ("The sky is", None, False, "auto: prompt does not end in '?'"),
        (QUESTION, False, False, "explicit: chat=False"),
        ("The sky is", True, True, "explicit: chat=True"),
    ],
)
def test_chat_decision_travels_with_the_explanation(word, prompt, chat, applied, reason):
    e = word.explain(prompt, " Because", chat=chat)
    assert (e.chat, e.chat_reason) == (applied, reason)
    assert e.to_dict()["chat"] == {"applied": applied, "reason": reason}
    console = Console(record=True, width=60)
    e.show(console)
    shown = "chat template: applied automatically (the prompt ends in '?'; chat=False for raw text)"
    assert (shown in console.export_text()) == (reason.startswith("auto") and applied)
    assert (shown in e._repr_html_().replace("&#x27;", "'")) == (reason.startswith("auto") and applied)


def test_no_template_means_no_chat(word):
    class NoTemplate:
        chat_template = None

    from pipeline.atman.prompts import chat_decision

    assert chat_decision(NoTemplate(), QUESTION, None) == (False, "auto: the tokenizer has no chat template")
    with pytest.raises(ValueError, match="^chat: "):
        chat_decision(NoTemplate(), QUESTION, True)


def _atman(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([ATMAN, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_shows_the_automatic_chat_template(tiny_model_dir):
    line = "chat template: applied automatically (the prompt ends in '?'; --no-chat for raw text)"
    args = ("explain", "--model", tiny_model_dir, "--prompt", QUESTION, "--target", " Because", "--granularity", "word")
    table = _atman(*args)
    assert table.returncode == 0, table.stderr
    assert line in table.stdout and "rank" in table.stdout
    as_json = _atman(*args, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["chat"] == {"applied": True, "reason": "auto: prompt ends in '?'"}
    assert line in as_json.stderr, "stdout stays pure JSON; the note goes to stderr"


# --- import cost --------------------------------------------------------------------------------------------------


def test_import_pipeline_does_not_load_torch():
    code = (
        "import sys, pipeline; pipeline.Explanation, pipeline.UnitSpan, pipeline.AtManConfig; "
        "import pipeline.render, pipeline.report; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_raw_prompts_start_with_the_tokenizers_own_leading_special_tokens():
    """Gemma-style tokenizers add <bos> (and some an EOS) around text: raw prompts keep the leading ones only."""
    from pipeline.atman.prompts import leading_special_ids

    class Tok:
        def __init__(self, lead, trail):
            self.lead, self.trail = lead, trail

        def __call__(self, text, add_special_tokens=True, **kwargs):
            ids = [100 + ord(c) for c in text]
            return {"input_ids": (self.lead + ids + self.trail) if add_special_tokens else ids}

    assert leading_special_ids(Tok([2], [])) == [2]
    assert leading_special_ids(Tok([2, 5], [3])) == [2, 5]
    assert leading_special_ids(Tok([], [3])) == []
