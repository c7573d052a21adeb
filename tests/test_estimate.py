"""`atman plan` (pipeline/estimate.py): counts checked against the model's real forward passes, the printed and
saved estimate, bad job specs, the manifest's comparison with the run, and the pieces of the time model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import estimate
from pipeline.cli import app
from pipeline.job import run_job
from pipeline.jobspec import JobSpec
from pipeline.reader import list_input, read_input
from pipeline.worker import ExplainWorker

ROWS = [
    {"id": "fr", "prompt": "The capital of France is Paris. The capital of Germany is", "target": " Berlin"},
    {"id": "qa", "prompt": "What is the capital of France?", "target": "Paris.", "chat": True},
    {"id": "gen", "prompt": "Water freezes at a temperature of"},  # no target: generated (not a sweep pass)
    {"id": "span", "prompt": "Review: cold food, rude waiter. Sentiment:", "target": " bad", "span": [0, 31]},
    {"id": "abc", "prompt": "Alice is taller than Bob. Bob is taller than Carol. The shortest is", "target": " Carol"},
    {"id": "code", "prompt": "def add(a, b):\n    return", "target": " a + b"},
    {"id": "long", "prompt": "word " * 120, "target": " x"},  # longer than the tiny model's context (96): skipped
    {"id": "one", "prompt": "Hi", "target": " there"},
]
BAD_LINE = b'{"id": "broken", "prompt": '  # not JSON: skipped by the reader


def _job(tmp_path: Path, model_dir: str, **resources) -> JobSpec:
    path = tmp_path / "in.jsonl"
    if not path.exists():
        path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS) + BAD_LINE + b"\n")
    spec = {
        "name": "plan",
        "model": {"id": model_dir},
        "input": {"path": str(path), "explain_span_column": "span", "chat_column": "chat"},
        "method": {"granularity": "word", "generate_max_tokens": 3},
        "output": {"root": str(tmp_path / "out")},
        "resources": {"batch_rows": 3, **resources},
    }
    (tmp_path / "job.yaml").write_text(json.dumps(spec))  # JSON is YAML
    return JobSpec.model_validate(spec)


def _count_forward_passes(monkeypatch) -> dict:
    """Rows and tokens of every forward call the model runs while the worker explains (its sweeps: not the load
    check, not generating targets), counted by a hook on the model: independent of the estimate's arithmetic."""
    import pipeline.models

    seen = {"passes": 0, "tokens": 0, "calls": 0, "on": False}
    load = pipeline.models.load_model

    def hooked(*args, **kwargs):
        lm = load(*args, **kwargs)

        def hook(module, args, kwargs):
            if seen["on"]:
                x = kwargs.get("input_ids")
                shape = x.shape if x is not None else kwargs["inputs_embeds"].shape[:2]
                seen["passes"] += shape[0]
                seen["tokens"] += shape[0] * shape[1]
                seen["calls"] += 1

        lm.model.register_forward_pre_hook(hook, with_kwargs=True)
        return lm

    explain = ExplainWorker._explain

    def counted(self, group, batch_size):
        seen["on"] = True
        try:
            return explain(self, group, batch_size)
        finally:
            seen["on"] = False

    monkeypatch.setattr(pipeline.models, "load_model", hooked)
    monkeypatch.setattr(ExplainWorker, "_explain", counted)
    return seen


def test_counts_equal_the_models_forward_passes(tmp_path, tiny_model_dir, monkeypatch):
    """On a small input (the sample is the whole input) units, passes and forward-pass tokens are exact: the same
    shards, batches and sweep packing as the run, whose model forward calls a hook counts."""
    spec = _job(tmp_path, tiny_model_dir)
    est = estimate.plan_job(spec, address="inline", calibrate=False)
    seen = _count_forward_passes(monkeypatch)
    summary = run_job(spec, "counted", address="inline")
    rows = read_input(spec.input).num_rows
    assert est["rows"] == {"count": rows, "exact": True, "how": "exact: streamed count"} and rows == 9
    assert est["sample"]["whole_input"] and est["sample"]["rows"] == rows
    assert est["shards"] == summary.shards == 3, "9 rows, batch_rows 3: three shards of 3"
    assert est["sample"]["skipped"] == summary.counts["skipped"] == 2, "the broken line and the over-long prompt"
    assert seen["calls"] > 0
    assert est["totals"]["passes"] == seen["passes"] == summary.unit_passes
    assert est["totals"]["tokens"] == seen["tokens"]
    manifest = json.loads((Path(summary.location) / "_manifest.json").read_text())
    assert "estimate" not in manifest, "--no-calibrate estimates no time: nothing to compare"
    import pyarrow.dataset as ds

    out = ds.dataset(summary.location, format="parquet").to_table().to_pylist()
    ok = [r for r in out if r["status"] == "ok"]
    assert est["totals"]["units"] == sum(len(r["unit_text"]) for r in ok)
    assert est["per_row"]["units"]["max"] == max(len(r["unit_text"]) for r in ok)
    assert est["per_row"]["tokens"]["mean"] == pytest.approx(seen["tokens"] / len(ok), abs=0.01)


def test_plan_without_calibration_prints_counts_and_saves_them(tmp_path, tiny_model_dir):
    _job(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "job.yaml"), "--no-calibrate"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    text = result.output
    for line in (
        "rows ", "9 (exact: streamed count)",
        "shards ", " 3 ",
        "sample ", "9 rows (the whole input): 2 skipped, 0 error",
        "per row: forward-pass tokens", "job total",
        "not estimated: --no-calibrate: counts only",
    ):  # fmt: skip
        assert line in text, (line, text)
    saved = list((tmp_path / "out" / estimate.ESTIMATES).glob("*.json"))
    assert len(saved) == 1 and f"estimate saved: {saved[0]}" in text, text
    doc = json.loads(saved[0].read_text())
    assert doc["calibration"] is None and doc["rows"]["count"] == 9 and saved[0].stem == doc["key"]
    again = CliRunner().invoke(app, ["plan", str(tmp_path / "job.yaml"), "--no-calibrate", "--json"])
    assert again.exit_code == 0 and json.loads(again.output)["totals"] == doc["totals"], again.output


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"resources": {"batch_rows": 0}}, "resources.batch_rows"),
        ({"method": {"granularty": "word"}}, "method.granularty: unknown key"),
        ({"input": {"path": "no/such/file.jsonl"}}, "input.path"),
        ({"model": {"id": "./no-such-model"}}, "model.id: cannot load"),
    ],
)
def test_a_bad_job_spec_exits_2_naming_the_field(tmp_path, tiny_model_dir, change, field):
    _job(tmp_path, tiny_model_dir)
    spec = json.loads((tmp_path / "job.yaml").read_text())
    for section, values in change.items():
        spec[section] = {**spec[section], **values}
    (tmp_path / "bad.yaml").write_text(json.dumps(spec))
    for args in (
        ["plan", str(tmp_path / "bad.yaml"), "--no-calibrate"],
        ["run", str(tmp_path / "bad.yaml"), "--dry-run"],
    ):
        result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and field in text and "Traceback" not in text, (args, text)


def test_plan_refuses_an_address_it_cannot_estimate(tmp_path, tiny_model_dir):
    _job(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "job.yaml"), "--address", "auto"])
    assert result.exit_code == 2 and "address: 'auto'" in " ".join(result.output.split()), result.output


def test_the_manifest_compares_the_estimate_with_the_run(tmp_path, tiny_model_dir, monkeypatch):
    """A calibrated estimate (inline: the worker in this process) saved without a run id is found by the run of
    the same job and compared in its manifest; the estimate in a run's own directory is found too; a run with
    other resources has no estimate to compare."""
    monkeypatch.setattr(estimate, "startup_seconds", lambda: 2.0)  # a fresh interpreter: not this test's concern
    spec = _job(tmp_path, tiny_model_dir)
    est = estimate.plan_job(spec, address="inline")
    assert [p["step"] for p in est["seconds"]] == [
        "start", "model check", "staging", "model load", "explaining", "publishing parts",
    ]  # fmt: skip
    assert est["calibration"]["rows"] == 9 and est["wall_s"] > est["until_manifest_s"] > 0
    assert est["seconds"][4]["how"].startswith("measured: every batch of the job timed")
    where = estimate.save(est, spec)
    summary = run_job(spec, "compared", address="inline")
    block = json.loads((Path(summary.location) / "_manifest.json").read_text())["estimate"]
    assert block["file"] == where and block["estimated_s"] == est["until_manifest_s"]
    assert block["actual_s"] > 0 and block["ratio"] == pytest.approx(block["estimated_s"] / block["actual_s"], 0.02)
    assert block["rows"] == block["rows_estimated"] == 9 and block["passes"] == block["passes_estimated"]

    in_run = estimate.save(est | {"until_manifest_s": 1234.5}, spec, run_id="own")
    assert "/run_id=own/" in in_run
    summary = run_job(spec, "own", address="inline")
    block = json.loads((Path(summary.location) / "_manifest.json").read_text())["estimate"]
    assert block["file"] == in_run and block["estimated_s"] == 1234.5, "the run's own estimate comes first"

    other = spec.model_copy(update={"resources": spec.resources.model_copy(update={"batch_rows": 2})})
    summary = run_job(other, "other", address="inline")
    assert "estimate" not in json.loads((Path(summary.location) / "_manifest.json").read_text())


def test_a_damaged_estimate_does_not_fail_the_run(tmp_path, tiny_model_dir):
    spec = _job(tmp_path, tiny_model_dir)
    key = estimate.job_key(spec, list_input(spec.input).fingerprint())
    fs, path = estimate.estimate_path(spec, key, None)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, b'{"key": "' + key.encode() + b'", "until_manifest_s": 3}')  # lacks the rest
    summary = run_job(spec, "damaged", address="inline")
    assert summary.counts["ok"] == 7
    assert "estimate" not in json.loads((Path(summary.location) / "_manifest.json").read_text())


def test_plan_on_ray_times_an_actor_of_the_jobs_resources(tmp_path, tiny_model_dir, ray_cluster):
    """The default (local) plan: the Probe is a Ray actor as the run's workers are (here on the test session's Ray,
    already running, so its start is modelled and it is left running)."""
    spec = _job(tmp_path, tiny_model_dir)
    est = estimate.plan_job(spec, address="local")
    steps = {p["step"]: p for p in est["seconds"]}
    assert steps["Ray start"]["how"].startswith("modelled") and steps["Ray start"]["s"] == estimate.RAY_START_S
    assert steps["first Ray task"]["s"] > 0 and steps["actor start + model load"]["s"] > 0
    assert steps["Ray stop"]["s"] < 1, "a Ray this plan did not start is not stopped"
    assert est["compute"]["device"] == "cpu" and est["calibration"]["rows"] == 9 and est["sample"]["skipped"] == 2
    import ray

    assert ray.is_initialized()


def test_rows_are_counted_as_the_reader_yields_them(tmp_path, monkeypatch):
    """JSONL: blank lines and a byte-order mark are not rows, a broken line is; CSV: a quoted line break is inside
    one record, an empty line is no record. Past COUNT_BYTES the count is an estimate and says so."""
    jsonl = tmp_path / "a.jsonl"
    lines = [json.dumps({"prompt": f"p {i}" * (1 + i % 7)}) for i in range(400)]
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(lines).encode() + b"\n  \n{broken\n")
    with (tmp_path / "b.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt"])
        for i in range(50):
            w.writerow([i, f"line one\nline two {i}" if i % 3 == 0 else f"plain {i}"])
        f.write("\r\n")
    for name in ("a.jsonl", "b.csv"):
        spec = JobSpec.model_validate({"name": "c", "input": {"path": str(tmp_path / name)}}).input
        counted = estimate.count_rows(spec, list_input(spec))
        assert counted.exact and counted.rows == read_input(spec).num_rows, name
    spec = JobSpec.model_validate({"name": "c", "input": {"path": str(jsonl)}}).input
    monkeypatch.setattr(estimate, "COUNT_BYTES", 0)
    monkeypatch.setattr(estimate, "HEAD_BYTES", 4096)
    guess = estimate.count_rows(spec, list_input(spec))
    assert not guess.exact and guess.how.startswith("estimated") and abs(guess.rows - 401) < 0.25 * 401, guess


def test_sample_spreads_over_the_rows_read(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"row {i}"}) + "\n" for i in range(5000)))
    spec = JobSpec.model_validate({"name": "s", "input": {"path": str(path)}}).input
    listing = list_input(spec)
    sample = estimate.read_sample(spec, listing, estimate.count_rows(spec, listing))
    ids = [int(r["prompt_id"]) for r in sample.requests]
    assert len(ids) == estimate.SAMPLE_ROWS and not sample.whole and sample.rows_read == 5000
    assert ids == sorted(ids) and min(ids) < 500 and max(ids) > 4500, "spread, in input order"


def test_time_model_pieces():
    assert sorted(estimate.spread(9)) == list(range(9)) and estimate.spread(9)[:3] == [0, 8, 4]
    assert estimate.makespan([4, 4, 4, 4, 2], 2) == 10 and estimate.makespan([3], 4) == 3
    batches = [{"tokens": t, "calls": c, "sweep_s": 2e-4 * t + 0.01 * c} for t, c in [(100, 2), (900, 3), (400, 9)]]
    per_token, per_call = estimate.sweep_rates(batches)
    assert per_token == pytest.approx(2e-4) and per_call == pytest.approx(0.01)
    proportional = [{"tokens": 10 * c, "calls": c, "sweep_s": 0.5 * c} for c in (1, 2, 4)]
    assert estimate.sweep_rates(proportional) == (pytest.approx(0.05), 0.0), "indistinguishable: all on tokens"
    timed = [{"rows": 2, "seconds": 5.0, "sweep_s": 1.0, "publish_s": 0.1, "tokens": 100, "calls": 2}] + [
        {"rows": 2, "seconds": 1.0 + b["sweep_s"], "sweep_s": b["sweep_s"], "publish_s": 0.1, **b} for b in batches
    ]
    fitted = estimate.fit(timed)
    assert fitted["seconds_per_row"] == pytest.approx(0.5) and fitted["warmup_s"] == pytest.approx(5.0 - 0.04 - 1.0)


def test_shards_follow_the_plans_rule():
    res = JobSpec.model_validate({"name": "s", "input": {"path": "x"}, "resources": {"batch_rows": 3}}).resources
    assert estimate.shard_sizes(9, res) == [3, 3, 3] and estimate.shard_sizes(0, res) == []
    assert sum(estimate.shard_sizes(123_457, res)) == 123_457


def test_help_names_plan_and_dry_run():
    runner = CliRunner()
    plan = runner.invoke(app, ["plan", "--help"], env={"COLUMNS": "250"})
    assert plan.exit_code == 0 and "--no-calibrate" in plan.output and "--run-id" in plan.output
    run = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "250"})
    assert run.exit_code == 0 and "--dry-run" in run.output


def test_a_bad_run_id_is_refused_before_planning(tmp_path, monkeypatch):
    monkeypatch.setattr(estimate, "plan_job", lambda *a, **k: pytest.fail("planned before checking the run id"))
    (tmp_path / "job.yaml").write_text(json.dumps({"name": "x", "input": {"path": str(tmp_path / "in.jsonl")}}))
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "job.yaml"), "--run-id", "bad/id"])
    assert result.exit_code == 2 and "run_id: 'bad/id'" in " ".join(result.output.split()), result.output
