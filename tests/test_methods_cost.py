"""What each method runs per row (``pipeline.methods.row_cost``) against what it really runs: the model's forward
and backward passes counted by hooks on the model during a real ``MethodRunner.explain``; ``atman plan`` of a
non-atman job counts without running the method and times what the worker runs; a run's markers count the same."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline import AtManConfig, load_model
from pipeline.atman.request import ExplainRequest
from pipeline.eval_methods import EXPLAIN_METHODS
from pipeline.job import run_job
from pipeline.jobspec import JobSpec
from pipeline.methods import BACKWARD_FORWARDS, COSTS, MethodRunner, row_cost

PROMPT = "Alice is taller than Bob. Bob is taller than Carol. The shortest is"  # 3 sentences, 12 word units
EXACT = ["occlusion", "contextcite", "atman:grad", "atman:grad-path", "ixg", "ig", "rollout", "attnlrp"]
CEILING = ["atman:joint", "atman:joint-knockout", "atman:coarse"]  # part of their passes is decided as they run


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


def _hooked(model) -> tuple[Counter, list]:
    """Sequences, tokens and calls of every forward of ``model`` and of every backward through its logits, counted
    by hooks (the input's batch and length at the forward; a backward through the logits of that forward)."""
    seen: Counter = Counter()

    def before(module, args, kwargs):
        x = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        x = args[0] if x is None else x
        rows, length = x.shape[:2]
        seen.update(forwards=rows, forward_tokens=rows * length, forward_calls=1)
        seen["last"] = rows, length

    def after(module, args, kwargs, output):
        if output.logits.requires_grad:
            rows, length = seen["last"]
            output.logits.register_hook(
                lambda grad: seen.update(backwards=rows, backward_tokens=rows * length, backward_calls=1)
            )

    return seen, [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]


def _counted(lm, name: str, prompt: str = PROMPT, target: str = " Carol"):
    """(row_cost, what the model ran) of one request explained by ``MethodRunner.explain``."""
    runner = MethodRunner(lm, name, AtManConfig(granularity="word"))
    planned = runner.plan(ExplainRequest(prompt, target))
    cost = row_cost(name, planned, runner.explainer.config)
    seen, handles = _hooked(lm.model)
    try:
        runner.explain(planned)
    finally:
        for handle in handles:
            handle.remove()
    seen.pop("last", None)
    return cost, seen, planned


def test_every_method_a_job_runs_has_a_cost_rule():
    assert set(COSTS) == set(EXPLAIN_METHODS)
    with pytest.raises(ValueError, match="method.name: 'random' has no cost rule"):
        row_cost("random", None, AtManConfig())


@pytest.mark.parametrize("name", EXACT)
def test_the_cost_is_what_the_method_runs(lm, name):
    cost, seen, planned = _counted(lm, name)
    assert seen["forwards"] > 1, "the hooks see the method's passes"
    assert (cost.forwards, cost.backwards) == (seen["forwards"], seen["backwards"])
    assert cost.passes == seen["forwards"] + BACKWARD_FORWARDS * seen["backwards"]
    assert cost.calls == seen["forward_calls"] + seen["backward_calls"]
    tokens = seen["forward_tokens"] + BACKWARD_FORWARDS * seen["backward_tokens"]
    if name == "contextcite":  # each ablated prompt tokenized anew: its tokens are a ceiling
        assert not cost.exact and seen["forward_tokens"] < cost.tokens
        assert cost.forwards == 64 + 1, "num_ablations, and the base CE"
    else:
        assert cost.exact and cost.tokens == tokens
    if name == "occlusion":
        assert cost.forwards == len(planned.units) + 2, "each unit ablated, the unablated row, the base CE"


@pytest.mark.parametrize("name", CEILING)
def test_a_method_that_decides_as_it_runs_is_counted_as_a_ceiling(lm, name):
    cost, seen, planned = _counted(lm, name)
    assert seen["backwards"] == cost.backwards == 0 and not cost.exact
    assert cost.tokens >= seen["forward_tokens"] and cost.calls >= seen["forward_calls"]
    if name.startswith("atman:joint"):  # its pass count is fixed: unit count + two unperturbed passes + the base CE
        assert cost.forwards == seen["forwards"] == len(planned.units) + 3
    else:
        assert cost.forwards >= seen["forwards"]


def _job(tmp_path: Path, model_dir: str, method: str) -> JobSpec:
    rows = [
        {"id": "abc", "prompt": PROMPT, "target": " Carol"},
        {"id": "fr", "prompt": "The capital of France is Paris. The capital of Germany is", "target": " Berlin"},
        {"id": "one", "prompt": "Hi", "target": " there"},
        {"id": "many", "prompt": "a " * 70 + "and", "target": " b"},  # 71 units: ContextCite refuses it
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return JobSpec.model_validate(
        {
            "name": "cost",
            "model": {"id": model_dir},
            "input": {"path": str(path)},
            "method": {"name": method, "granularity": "word"},
            "output": {"root": str(tmp_path / "out")},
            "resources": {"batch_rows": 2},
        }
    )


def test_plan_counts_another_method_without_running_it(tmp_path, tiny_model_dir, monkeypatch):
    """Counting never scores a row; the calibration times the worker's own path (each row scored once per timed
    batch), and the method's own seconds are what the rates are fitted from."""
    from pipeline import estimate

    monkeypatch.setattr(estimate, "startup_seconds", lambda: 2.0)
    explained = Counter()
    explain = MethodRunner.explain

    def counted(self, planned):
        explained["time" if timing["on"] else "count"] += 1
        return explain(self, planned)

    timing = {"on": False}
    time = estimate.Probe.time

    def timed(self, *args):
        timing["on"] = True
        return time(self, *args)

    monkeypatch.setattr(MethodRunner, "explain", counted)
    monkeypatch.setattr(estimate.Probe, "time", timed)
    spec = _job(tmp_path, tiny_model_dir, "contextcite")
    est = estimate.plan_job(spec, address="inline")
    assert explained["count"] == 0, "counting ran the method"
    assert explained["time"] == 4, "the calibration explains every row it times (the refused one is refused there)"
    assert est["method"] == "contextcite" and est["sample"]["skipped"] == 1
    assert est["totals"]["passes"] == 3 * (64 + 1) and not est["counts_exact"]
    fitted = est["calibration"]
    assert fitted["rows"] == 4 and fitted["tokens"] > 0 and fitted["seconds_per_token"] > 0


def test_the_markers_count_what_the_plan_counts(tmp_path, tiny_model_dir):
    """A run's unit_passes (its markers) and the plan's passes are one count, ``row_cost``, for another method."""
    from pipeline import estimate

    spec = _job(tmp_path, tiny_model_dir, "occlusion")
    est = estimate.plan_job(spec, address="inline", calibrate=False)
    summary = run_job(spec, "cost", address="inline")
    assert summary.counts["ok"] == 4 and est["counts_exact"] and est["method"] == "occlusion"
    rows = ds.dataset(summary.location, format="parquet").to_table().to_pylist()
    units = [len(r["unit_text"]) for r in rows]
    assert summary.unit_passes == est["totals"]["passes"] == sum(u + 2 for u in units), "each unit, unablated, base"
