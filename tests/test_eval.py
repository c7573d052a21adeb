"""`atman eval squad`: the paper's metrics, identical units for every method, the JSON `--json` prints."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import SQUAD_DEV
from pipeline.eval_methods import parse_methods
from pipeline.evaluate import (
    SquadEval,
    average_precision,
    average_recall,
    evaluate,
    load_squad,
)
from pipeline.evaluate import evaluate as evaluate_all

ATMAN = str(Path(sys.executable).parent / "atman")
EXAMPLES = [
    {
        "id": "e1",
        "context": "The Eiffel Tower is in Paris. It was finished in 1889 and is made of iron.",
        "question": "When was the Eiffel Tower finished?",
        "answers": [{"text": "1889", "answer_start": 49}],
    },
    {
        "id": "e2",
        "context": "Mount Fuji is the highest mountain in Japan. Its summit is 3,776 metres above the sea.",
        "question": "Which country is Mount Fuji in?",
        "answers": [{"text": "Japan", "answer_start": 38}, {"text": "in Japan", "answer_start": 35}],
    },
]


def eval_cli(*args: str):
    """`atman eval ARGS` in this process (typer's CliRunner: exit code, stdout, stderr), for the checks a bad
    argument decides before a model loads; a fresh process would add only its imports (~5 s each). The real entry
    point's exit codes are checked by subprocess: 0 (test_cli_on_the_bundled_subset, test_cli_sweep_end_to_end,
    the forget test) and 2 (test_cli_bad_arguments_exit_2)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, ["eval", *args])


def no_traceback(result) -> bool:
    """The command ended by its exit code (SystemExit), not by an exception a process would print as a traceback."""
    return result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture
def squad_file(tmp_path) -> Path:
    path = tmp_path / "squad.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path


def test_metrics_by_hand():
    x, y = np.array([3.0, -1.0, 0.0, 4.0]), np.array([0.0, 1.0, 0.0, 1.0])
    assert average_precision(x, y) == pytest.approx((1 + 4) / 8)
    assert average_recall(x, y) == pytest.approx((1 / 4 + 4 / 4) / 2)
    assert average_precision(np.zeros(3), np.ones(3)) == 0.0 and average_recall(np.ones(3), np.zeros(3)) == 0.0


def test_parse_methods():
    assert parse_methods("atman, ixg,atman:scale+conceptual") == ["atman", "ixg", "atman:scale+conceptual"]
    assert parse_methods("atman+squares,atman:scale+conceptual+squares")[1] == "atman:scale+conceptual+squares"
    with pytest.raises(ValueError, match="^methods: 'chefer'"):
        parse_methods("atman,chefer")


def test_every_method_but_atman_and_random_is_in_the_one_registry():
    from importlib import import_module

    from pipeline.eval_methods import BASELINES, PEERS
    from pipeline.peers import METHODS

    assert set(METHODS) == set(PEERS + BASELINES) - {"random"}, "the evaluation scores these names from METHODS"
    for name in ("ixg", "ig", "rollout"):  # the peers' modules load heavy libraries: their tests import them
        module, function = METHODS[name].split(":")
        assert callable(getattr(import_module(module), function)), name


def test_ground_truth_and_identical_units(tiny_lms, squad_file):
    lm = tiny_lms["llama"]
    ev = SquadEval(lm)
    planned, truth = ev.prepare(load_squad(str(squad_file))[1])
    marked = [u.text for u, t in zip(planned.units, truth, strict=True) if t]
    assert marked == ["in", "Japan"], "units overlapping any reference answer"
    assert all(u.start + u.length <= len(EXAMPLES[1]["context"]) for u in planned.units), "context units only"
    rng = np.random.default_rng(0)
    for name in ("atman", "atman:multiplicative+conceptual", "ixg", "ig", "rollout", "random"):
        scores = ev.scores(name, planned, rng)
        assert scores.shape == (len(planned.units),) and np.isfinite(scores).all(), name


def test_ixg_and_ig_are_gradients_of_the_targets_log_probability(tiny_lms, squad_file):
    """IxG and IG against autograd by hand on full-vocabulary logits (the eval asks for the target's rows only). IG
    by hand: the gradient at Captum's Gauss-Legendre points (its default rule) on the straight path from the zeroed
    prompt, weighted and times the input's difference. (Completeness is no check here: RMSNorm makes the path's
    integrand spike near the zero baseline, which no 20-point rule resolves.)"""
    import torch
    from captum.attr._utils.approximation_methods import approximation_parameters

    lm, ev = tiny_lms["llama"], SquadEval(tiny_lms["llama"])
    planned, _ = ev.prepare(load_squad(str(squad_file))[0])
    ids = planned.sweep_input.input_ids
    n_prompt = len(ids) - planned.sweep_input.n_target
    embeds = lm.model.get_input_embeddings()(ids[None]).detach()

    def logp(e: torch.Tensor) -> torch.Tensor:
        logits = lm.model(inputs_embeds=e).logits[0, n_prompt - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[n_prompt:, None]).sum()

    e = embeds.clone().requires_grad_()
    (grad,) = torch.autograd.grad(logp(e), e)
    tokens = (grad * embeds).sum(-1)[0].numpy()
    expected = [tokens[list(u.positions)].sum() for u in planned.units]
    got = ev.scores("ixg", planned, np.random.default_rng(0))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(got).max() > 0

    baseline = embeds.clone()
    baseline[:, :n_prompt] = 0.0
    weights, alphas = (f(20) for f in approximation_parameters("gausslegendre"))
    path_grad = torch.zeros_like(embeds)
    for w, a in zip(weights, alphas, strict=True):
        point = (baseline + a * (embeds - baseline)).requires_grad_()
        path_grad += w * torch.autograd.grad(logp(point), point)[0]
    by_hand = ((embeds - baseline) * path_grad).sum(-1)[0].numpy()
    expected = [by_hand[list(u.positions)].sum() for u in planned.units]
    got = ev.scores("ig", planned, np.random.default_rng(0))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
    assert not np.allclose(by_hand, tokens, rtol=0.05), "IG is not IxG"


def test_evaluate_shape_and_ranges(tiny_lms, squad_file):
    methods = ["atman", "atman:scale", "ixg", "ig", "rollout", "random"]
    result = evaluate(tiny_lms["llama"], load_squad(str(squad_file)), methods)
    assert result["n"] == 2 and set(result["methods"]) == set(methods)
    for name, m in result["methods"].items():
        assert set(m) >= {
            "mAP",
            "mAR",
            "mAP_IQ",
            "mAR_IQ",
            "seconds_per_example",
            "aopc",
            "aopc_removal",
            "lds",
            "lds_removal",
        }, name
        assert -1 <= m["lds"] <= 1 and -1 <= m["lds_removal"] <= 1, name
        assert 0 <= m["mAP"] <= 100 and 0 <= m["mAR"] <= 100 and m["seconds_per_example"] >= 0, name
    assert len(result["examples"]) == 2 and set(result["examples"][0]["methods"]) == set(methods)


def test_random_scores_near_the_answer_share(tiny_lms, tmp_path):
    """The random baseline's mAP is the answer's share of the units (the floor every method must beat)."""
    many = [{**e, "id": f"{e['id']}-{i}"} for i in range(15) for e in EXAMPLES]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in many))
    result = evaluate(tiny_lms["llama"], load_squad(str(path)), ["random"], seed=1, lds_masks=0)  # mAP only
    share = 100 * result["answer_share"]
    assert abs(result["methods"]["random"]["mAP"] - share) < 0.5 * share


@pytest.mark.slow
def test_cli_on_the_bundled_subset():
    """What CI runs on the real model: the bundled SQuAD subset (the default --data), its first example (one, for
    the suite's budget: issue 25), JSON out."""
    out = subprocess.run([ATMAN, "eval", "squad", "--limit", "1", "--methods", "atman,random", "--json",
                          "--lds-masks", "8"], capture_output=True, text=True, timeout=400)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["n"] == 1 and result["model"] and set(result["methods"]) == {"atman", "random"}
    assert [e["id"] for e in result["examples"]] == [e.id for e in load_squad(str(SQUAD_DEV), limit=1)]
    assert result["methods"]["atman"]["mAP"] > result["methods"]["random"]["mAP"]
    assert result["examples"][0]["methods"]["atman"]["lds_masks"] == 8  # the LDS on the real model, 8 ablations
    assert -1 <= result["methods"]["atman"]["lds_removal"] <= 1


def test_cli_bad_arguments_exit_2(squad_file):
    out = subprocess.run([ATMAN, "eval", "squad", "--data", str(squad_file), "--methods", "chefer"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "methods: 'chefer'" in out.stderr
    out = eval_cli("squad", "--data", "/nonexistent.jsonl")
    assert out.exit_code == 2 and no_traceback(out), out.output


def test_sweep_grid(tiny_lms, squad_file):
    from pipeline.evaluate import sweep

    result = sweep(tiny_lms["llama"], load_squad(str(squad_file)), "log_additive", [0.0, 0.1], [None, 0.7], lds_masks=4)
    assert [(g["factor"], g["conceptual_threshold"]) for g in result["grid"]] == [
        (0.0, None), (0.0, 0.7), (0.1, None), (0.1, 0.7)
    ]  # fmt: skip
    for g in result["grid"]:
        assert 0 <= g["mAP"] <= 100 and 0 <= g["mAR"] <= 100 and g["seconds_per_example"] > 0
        assert -1 <= g["lds"] <= 1 and -1 <= g["lds_removal"] <= 1, "the LDS (lds_masks > 0)"
    # factor 0.1 without kappa is the same setting `atman:log_additive` scores
    single = evaluate(tiny_lms["llama"], load_squad(str(squad_file)), ["atman:log_additive"], lds_masks=0)
    assert result["grid"][2]["mAP"] == pytest.approx(single["methods"]["atman:log_additive"]["mAP"], abs=1e-6)


def test_sample_spans_the_file(tmp_path):
    rows = [{**EXAMPLES[0], "id": f"q{i}"} for i in range(76)]
    path = tmp_path / "76.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [e.id for e in load_squad(str(path), sample=16)] == [f"q{i}" for i in range(0, 76, 5)]
    assert [e.id for e in load_squad(str(path), sample=200)] == [f"q{i}" for i in range(76)]
    assert [e.id for e in load_squad(str(path), limit=2)] == ["q0", "q1"]
    with pytest.raises(ValueError, match="^sample: give --limit or --sample"):
        load_squad(str(path), limit=3, sample=3)
    with pytest.raises(ValueError, match="^sample: must be at least 1"):
        load_squad(str(path), sample=0)


def test_cli_sweep_end_to_end(tiny_model_dir, squad_file, tmp_path):
    out_json = tmp_path / "sweep.json"
    cmd = [ATMAN, "eval", "sweep", "--data", str(squad_file), "--model", tiny_model_dir, "--factors", "0,0.3",
           "--kappas", "none,0.9", "--sample", "2", "--lds-masks", "0", "--out", str(out_json)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out_json.read_text())
    assert result["n"] == 2 and len(result["grid"]) == 4
    assert all(g["lds"] is None and g["lds_removal"] is None for g in result["grid"]), "--lds-masks 0: no LDS"
    assert "AtMan log_additive sweep" in out.stdout and "0.9" in out.stdout
    bad = eval_cli(*cmd[2:-2], "--factors", "0,x")
    assert bad.exit_code == 2 and "factors:" in bad.stderr and no_traceback(bad), bad.output
    bad = eval_cli(*cmd[2:-2], "--limit", "1")
    assert bad.exit_code == 2 and "sample: give --limit or --sample" in bad.stderr and no_traceback(bad), bad.output


@pytest.mark.parametrize(
    "args, names",
    [
        (["sweep", "--granularity", "bogus"], ["--granularity", "bogus"]),
        (["sweep", "--kappas", "none,1.5"], ["kappas: '1.5'", "conceptual_threshold"]),
        (["sweep", "--factors", "0.1,-1"], ["factors: '-1'", "factor"]),
        (["sweep", "--mode", "additive"], ["--mode", "additive"]),
        (["squad", "--granularity", "custom"], ["--granularity", "custom"]),
        (["squad", "--methods", " , "], ["methods: no method given"]),
        (["squad", "--lds-masks", "1"], ["lds_masks: 1 ablations rank nothing"]),
        (["sweep", "--lds-masks", "1"], ["lds_masks: 1 ablations rank nothing"]),
    ],
)
def test_eval_bad_options_exit_2_naming_the_option(args, names, monkeypatch):
    """Every bad value is refused before a model loads: exit 2, the option named, no traceback."""
    monkeypatch.setattr("pipeline.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = eval_cli(*args)
    text = " ".join(out.stderr.split())
    assert out.exit_code == 2, out.output
    assert no_traceback(out) and "Traceback" not in out.stderr and all(n in text for n in names), text


def test_removal_deletion_drops_the_top_units_tokens(tiny_lms, squad_file):
    """aopc_removal = mean over k = 1..5 of the target CE rise with the top-k units' tokens dropped from the
    input; checked against transformers' own loss on hand-built inputs."""
    import torch

    lm = tiny_lms["llama"]
    ev = SquadEval(lm)
    examples = load_squad(str(squad_file))

    def ce(kept: torch.Tensor, n_target: int) -> float:
        labels = torch.full_like(kept, -100)
        labels[-n_target:] = kept[-n_target:]
        with torch.no_grad():
            return float(lm.model(input_ids=kept[None], labels=labels[None]).loss) * n_target

    for ex in (examples[0], examples[1], examples[0]):  # each example its own unperturbed CE, however they come
        planned, _ = ev.prepare(ex)
        ids, n_target = planned.sweep_input.input_ids, planned.sweep_input.n_target
        scores = np.arange(len(planned.units), dtype=np.float64)[::-1].copy()  # unit 0 first, then 1, ...
        rises = []
        for k in range(1, 6):
            dropped = {p for u in planned.units[:k] for p in u.positions}
            kept = torch.tensor([t for i, t in enumerate(ids.tolist()) if i not in dropped])
            rises.append(ce(kept, n_target) - ce(ids, n_target))
        assert ev.removal(planned, scores) == pytest.approx(np.mean(rises), abs=1e-4)
        assert ev.removal(planned, scores[::-1].copy()) != pytest.approx(np.mean(rises), abs=1e-4)
        assert any(abs(r) > 1e-3 for r in rises), "dropping tokens changes the target CE"


@pytest.mark.parametrize("factor", [0.0, 0.3])
def test_suppressed_rise_equals_the_oracle(tiny_lms, factor):
    """Explainer.suppressed_rise (the deletion curve's engine call) against the oracle that runs the untouched
    model one pass per set, with the same positions suppressed."""
    from oracle import oracle_scores

    from pipeline import AtManConfig, Explainer

    lm = tiny_lms["llama"]
    explainer = Explainer(lm, AtManConfig(granularity="word", factor=factor))
    planned = explainer.plan("Paris is in France and Rome is in Italy", " Rome", chat=False)
    sets = [[0], [0, 2], [4, 1, 3]]
    got = explainer.suppressed_rise(planned, sets)
    ids = planned.sweep_input.input_ids
    mult = torch.ones(len(sets), len(ids))
    for row, unit_set in enumerate(sets):
        for i in unit_set:
            mult[row, list(planned.units[i].positions)] = factor
    want = oracle_scores(lm.model, ids, mult, planned.sweep_input.n_target, "log_additive")
    assert got.shape == (3,) and np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert explainer.suppressed_rise(planned, []).shape == (0,)


def test_map_differences_are_paired_with_bootstrap_intervals():
    """AtMan minus each method, paired per example; the interval brackets the mean and shrinks to the point when
    every example differs by the same amount; the order of the examples does not matter."""
    from pipeline.evaluate import MethodResult, map_differences

    rng = np.random.default_rng(3)
    atman = MethodResult(ap=list(rng.uniform(0.2, 0.6, 40)))
    other = MethodResult(ap=list(np.asarray(atman.ap) - 0.1 + rng.normal(0, 0.05, 40)))
    same_shift = MethodResult(ap=list(np.asarray(atman.ap) - 0.05))
    d = map_differences({"ixg": other, "atman": atman, "shifted": same_shift})
    assert set(d) == {"atman - ixg", "atman - shifted"}
    diff = d["atman - ixg"]
    assert diff["mAP"] == pytest.approx(100 * (np.mean(atman.ap) - np.mean(other.ap)))
    assert diff["ci95"][0] < diff["mAP"] < diff["ci95"][1] and 7 < diff["ci95"][0] and diff["ci95"][1] < 13
    assert d["atman - shifted"] == {"mAP": pytest.approx(5.0), "ci95": [pytest.approx(5.0), pytest.approx(5.0)]}
    assert map_differences({"ixg": other}) == {} and map_differences({"atman": MethodResult(ap=[0.1])}) == {}


def test_records_let_a_stopped_run_go_on(tiny_lms, squad_file, tmp_path, monkeypatch):
    """--records: each finished example is kept; a rerun computes only what the file lacks and reports what a run
    without records reports. Another model's or units' file is refused naming records. (No LDS here, lds_masks=0:
    records with and without it are the tests below.)"""
    lm, examples, records = tiny_lms["llama"], load_squad(str(squad_file)), tmp_path / "records.jsonl"
    evaluate = functools.partial(evaluate_all, lds_masks=0)
    fresh = evaluate(lm, examples, ["atman", "random", "ixg"])
    first = evaluate(lm, examples[:1], ["atman", "random"], records=str(records))
    assert [json.loads(line)["id"] for line in records.read_text().splitlines()] == ["e1"]

    calls = []
    original = SquadEval.scores
    monkeypatch.setattr(SquadEval, "scores", lambda self, name, *a: calls.append(name) or original(self, name, *a))
    resumed = evaluate(lm, examples, ["atman", "random", "ixg"], records=str(records))
    assert calls == ["ixg", "atman", "random", "ixg"], "e1 only lacked ixg; e2 was not there"
    assert resumed["examples"][0]["methods"]["atman"] == first["examples"][0]["methods"]["atman"]
    for name, m in fresh["methods"].items():
        for key in ("mAP", "mAR", "mAP_IQ", "mAR_IQ", "aopc", "aopc_removal"):
            assert resumed["methods"][name][key] == pytest.approx(m[key], abs=1e-6), (name, key)
    assert resumed["differences"].keys() == fresh["differences"].keys()

    calls.clear()
    again = evaluate(lm, examples, ["atman", "ixg"], records=str(records))
    assert calls == [] and set(again["examples"][1]["methods"]) == {"atman", "ixg"}
    with pytest.raises(ValueError, match=r"^records: .* holds .* with word units, not .* with token units"):
        evaluate(lm, examples, ["atman"], granularity="token", records=str(records))

    # a run killed while writing leaves its last record half written (here cut inside a non-ASCII character); the
    # appender reads back from the end in blocks: small blocks make it cross several before the last newline
    monkeypatch.setattr("pipeline.evaluate._TAIL_BLOCK", 7)
    kept = records.read_bytes().splitlines(keepends=True)
    last = json.loads(kept[-1])
    last["id_note"] = "é" * 8
    cut = json.dumps(last, ensure_ascii=False).encode()
    records.write_bytes(b"".join(kept[:-1]) + cut[: cut.index("é".encode()) + 1])
    calls.clear()
    after_kill = evaluate(lm, examples, ["atman", "ixg"], records=str(records))
    assert calls == ["atman", "ixg"], "only the half-written example is computed again"
    for name in ("atman", "ixg"):
        for key in ("mAP", "mAR", "aopc", "aopc_removal"):
            assert after_kill["methods"][name][key] == pytest.approx(again["methods"][name][key], abs=1e-6)
    lines = records.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == [json.loads(line)["id"] for line in kept], "cut, not kept"
    for text in (b"not json\n", b'{"id": "e1"}\n{"id": "e2", "model"'):
        records.write_bytes(text)  # a line that does not parse, with a newline after it, is refused by number
        with pytest.raises(ValueError, match=r"^records: .*:1 is not an evaluation record"):
            evaluate(lm, examples, ["atman"], records=str(records))


def test_forget_redoes_only_the_methods_it_names(tiny_lms, squad_file, tmp_path, monkeypatch):
    """`atman eval forget RECORDS --methods ...` takes methods out of every record; the next run with the file
    computes them (and nothing else) again. Missing files, bad lines and no names exit 2 naming the field."""
    lm, examples, records = tiny_lms["llama"], load_squad(str(squad_file)), tmp_path / "records.jsonl"
    evaluate = functools.partial(evaluate_all, lds_masks=0)  # mAP is what is compared
    first = evaluate(lm, examples, ["atman", "random", "ixg"], records=str(records))
    out = subprocess.run([ATMAN, "eval", "forget", str(records), "--methods", "ixg,rollout"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "ixg: taken out of 2 examples" in out.stdout and "rollout: taken out of 0 examples" in out.stdout
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [sorted(r["methods"]) for r in lines] == [["atman", "random"]] * 2

    calls = []
    original = SquadEval.scores
    monkeypatch.setattr(SquadEval, "scores", lambda self, name, *a: calls.append(name) or original(self, name, *a))
    again = evaluate(lm, examples, ["atman", "random", "ixg"], records=str(records))
    assert calls == ["ixg", "ixg"]
    for name in ("atman", "random", "ixg"):
        assert again["methods"][name]["mAP"] == pytest.approx(first["methods"][name]["mAP"], abs=1e-6), name

    for args, field in (([str(tmp_path / "none.jsonl"), "--methods", "ixg"], "records"),
                        ([str(records), "--methods", " , "], "methods")):  # fmt: skip
        out = eval_cli("forget", *args)
        assert out.exit_code == 2 and field in out.stderr and no_traceback(out), (args, out.output)
    records.write_text("not json\n" + records.read_text())
    out = eval_cli("forget", str(records), "--methods", "ixg")
    assert out.exit_code == 2 and "records:" in out.stderr and ":1 is not an evaluation record" in out.stderr
    assert no_traceback(out)


def test_sweep_records_go_on_and_extend_the_grid(tiny_lms, squad_file, tmp_path, monkeypatch):
    """A sweep with records keeps each example's settings; a rerun with a larger grid scores only the new settings
    and reports what a sweep without records reports. A squad run's records (or another mode's) are refused. (No
    LDS here, lds_masks=0: test_eval's records tests check records with and without it.)"""
    from pipeline.evaluate import sweep as sweep_all

    sweep = functools.partial(sweep_all, lds_masks=0)
    evaluate = functools.partial(evaluate_all, lds_masks=0)
    lm, examples, records = tiny_lms["llama"], load_squad(str(squad_file)), tmp_path / "sweep.jsonl"
    fresh = sweep(lm, examples, "log_additive", [0.0, 0.1], [0.7])
    sweep(lm, examples[:1], "log_additive", [0.1], [0.7], records=str(records))
    assert [json.loads(line)["id"] for line in records.read_text().splitlines()] == ["e1"]

    calls = []
    original = SquadEval.atman_scores
    monkeypatch.setattr(
        SquadEval, "atman_scores", lambda self, p, cfg: calls.append((cfg.factor, cfg.conceptual_threshold)) or
        original(self, p, cfg)
    )  # fmt: skip
    resumed = sweep(lm, examples, "log_additive", [0.0, 0.1], [0.7], records=str(records))
    assert calls == [(0.0, 0.7)] + [(0.0, 0.7), (0.1, 0.7)], "e1 only lacked factor 0; e2 was not there"
    for got, want in zip(resumed["grid"], fresh["grid"], strict=True):
        assert (got["factor"], got["conceptual_threshold"]) == (want["factor"], want["conceptual_threshold"])
        for key in ("mAP", "mAR", "aopc", "aopc_removal"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["factor"], key)

    with pytest.raises(ValueError, match=r"^records: .* holds .* \(log_additive sweep\), not .* word units; give"):
        evaluate(lm, examples, ["atman"], records=str(records))
    with pytest.raises(ValueError, match=r"^records: .* holds .*, not .* \(scale sweep\)"):
        sweep(lm, examples, "scale", [0.1], [None], records=str(records))
    squad_records = tmp_path / "squad-records.jsonl"
    evaluate(lm, examples[:1], ["random"], records=str(squad_records))
    with pytest.raises(ValueError, match=r"^records: .* holds .* word units, not .* \(log_additive sweep\)"):
        sweep(lm, examples, "log_additive", [0.1], [None], records=str(squad_records))


def test_lds_ablations_are_the_measured_rises_and_the_score_their_rank_correlation(tiny_lms, squad_file):
    """The LDS's ablations: LDS_MASKS masks (about half the units kept), the target CE rise under each measured by
    removal (transformers' own loss on the kept tokens) and by suppression (the oracle, factor 0); the LDS is
    Spearman's correlation of the ablated units' score sums with those rises, 0 for a constant score."""
    from oracle import oracle_scores
    from scipy.stats import spearmanr

    from pipeline.evaluate import LDS_MASKS

    lm = tiny_lms["llama"]
    ev = SquadEval(lm)
    planned, _ = ev.prepare(load_squad(str(squad_file))[0])
    ids, n_target, n = planned.sweep_input.input_ids, planned.sweep_input.n_target, len(planned.units)
    data = ev.ablations(planned)
    assert data.masks.shape == (LDS_MASKS, n) and 0.3 < data.masks.mean() < 0.7

    def ce(kept: torch.Tensor) -> float:
        labels = torch.full_like(kept, -100)
        labels[-n_target:] = kept[-n_target:]
        with torch.no_grad():
            return float(lm.model(input_ids=kept[None], labels=labels[None]).loss) * n_target

    mult = torch.ones(LDS_MASKS, len(ids))
    for row, mask in enumerate(data.masks):
        for unit in np.flatnonzero(mask == 0):
            mult[row, list(planned.units[unit].positions)] = 0.0
    want = oracle_scores(lm.model, ids, mult, n_target, "log_additive")
    np.testing.assert_allclose(data.suppressed, want, atol=1e-4)
    for row in (0, 1, 7):
        kept = ids[mult[row] > 0]
        assert data.removed[row] == pytest.approx(ce(kept) - ce(ids), abs=1e-4)
    assert np.ptp(data.removed) > 1e-3 and np.ptp(data.suppressed) > 1e-3

    scores = np.random.default_rng(0).normal(size=n)
    got = ev.lds(planned, scores)
    predicted = (1 - data.masks) @ scores
    assert got["lds"] == pytest.approx(spearmanr(predicted, data.suppressed).statistic)
    assert got["lds_removal"] == pytest.approx(spearmanr(predicted, data.removed).statistic)
    fitted = np.linalg.lstsq(1 - data.masks, data.removed, rcond=None)[0]  # the linear datamodel itself
    assert ev.lds(planned, fitted)["lds_removal"] > max(0.5, got["lds_removal"])
    assert ev.lds(planned, np.zeros(n)) == {"lds": 0.0, "lds_removal": 0.0}  # predicts every ablation the same
    assert np.array_equal(ev.ablations(planned).masks, data.masks), "drawn again, the same ablations"


def test_records_without_lds_are_measured_again(tiny_lms, squad_file, tmp_path):
    """A records file written before the LDS existed: its methods are computed again, not read as complete."""
    records = tmp_path / "records.jsonl"
    first = evaluate(tiny_lms["llama"], load_squad(str(squad_file)), ["random"], records=str(records), lds_masks=8)
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    for line in lines:
        for numbers in line["methods"].values():
            del numbers["lds"], numbers["lds_removal"], numbers["lds_masks"]
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))
    again = evaluate(tiny_lms["llama"], load_squad(str(squad_file)), ["random"], records=str(records), lds_masks=8)
    assert again["methods"]["random"]["lds_removal"] == pytest.approx(first["methods"]["random"]["lds_removal"])
    assert all("lds" in e["methods"]["random"] for e in again["examples"])


def test_lds_masks_0_leaves_the_lds_out_and_mixed_records_give_no_mean(tiny_lms, squad_file, tmp_path):
    """``lds_masks=0``: no LDS (nor its cost); records holding it for some examples only give no LDS mean (never a
    mean over a subset); records with another number of ablations are measured again."""
    lm, examples = tiny_lms["llama"], load_squad(str(squad_file))
    records = tmp_path / "records.jsonl"
    off = evaluate(lm, examples[:1], ["random"], records=str(records), lds_masks=0)
    assert off["methods"]["random"]["lds"] is None and "lds" not in off["examples"][0]["methods"]["random"]
    mixed = evaluate(lm, examples, ["random"], records=str(records), lds_masks=0)  # example 2 without LDS too
    assert mixed["methods"]["random"]["lds"] is None
    full = evaluate(lm, examples, ["random"], records=str(records), lds_masks=8)
    assert all(e["methods"]["random"]["lds_masks"] == 8 for e in full["examples"])
    assert -1 <= full["methods"]["random"]["lds_removal"] <= 1
    with pytest.raises(ValueError, match="lds_masks: 1 ablations"):
        evaluate(lm, examples, ["random"], lds_masks=1)
