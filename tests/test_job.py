"""`atman run` end to end on a local 2-CPU Ray: output layout and schema, bad rows, resume, readers."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_CONTEXT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import RunIncomplete
from pipeline.job import run_job
from pipeline.jobspec import JobSpec, JobSpecError
from pipeline.layout import MANIFEST, SUCCESS
from pipeline.parts import SCHEMA
from pipeline.worker import ExplainWorker

ATMAN = str(Path(sys.executable).parent / "atman")

GOOD = [
    {"id": "fr", "prompt": "The capital of France is Paris. The capital of Germany is", "target": " Berlin"},
    {"id": "qa", "prompt": "What is the capital of France?", "target": "Paris.", "chat": True},
    {"id": "gen", "prompt": "Water freezes at a temperature of"},  # no target: generated
    {"id": "span", "prompt": "Review: cold food, rude waiter. Sentiment:", "target": " bad", "span": [0, 31]},
    {"id": 5, "prompt": "Alice is taller than Bob. Bob is taller than Carol. The shortest is", "target": " Carol"},
    {"id": "code", "prompt": "def add(a, b):\n    return", "target": " a + b", "topic": "code"},
]
BAD = [
    (json.dumps({"id": "nokey", "text": "no prompt"}).encode(), "nokey", "prompt: the row has no 'prompt' value"),
    (json.dumps({"id": "int", "prompt": 42}).encode(), "int", "must be a string, got int"),
    (json.dumps({"id": "empty", "prompt": ""}).encode(), "empty", "prompt: empty"),
    (b'{"id": "utf8", "prompt": "caf\xe9"}', None, "invalid UTF-8"),
    (json.dumps({"id": "fr", "prompt": "again"}).encode(), None, "duplicate id 'fr'"),
    (json.dumps({"id": "long", "prompt": "word " * 120}).encode(), "long", f"context of {TINY_CONTEXT}"),
]


def _spec(model_dir, input_path, root, **resources) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "test",
            "model": {"id": model_dir},
            "input": {
                "path": str(input_path),
                "explain_span_column": "span",
                "chat_column": "chat",
                "metadata_columns": ["topic"],
            },
            "method": {"granularity": "word", "generate_max_tokens": 3},
            "output": {"root": str(root)},
            "resources": {"actors": 1, "batch_rows": 2, **resources},
        }
    )


def _write(path: Path, rows: list[dict], extra: list[bytes] = ()) -> None:
    lines = [json.dumps({"topic": "t", **r}).encode() for r in rows] + list(extra)
    path.write_bytes(b"\n".join(lines) + b"\n")


def _read(location: str) -> pa.Table:
    return ds.dataset(location, format="parquet").to_table()


@pytest.fixture(scope="module")
def bad_rows_run(tmp_path_factory, tiny_model_dir, ray_cluster):
    tmp = tmp_path_factory.mktemp("job")
    _write(tmp / "in.jsonl", GOOD, [line for line, _, _ in BAD])
    spec = _spec(tiny_model_dir, tmp / "in.jsonl", tmp / "out", actors=2)
    summary = run_job(spec, "r1")
    return spec, summary


@pytest.mark.cluster
def test_every_row_is_written_once_with_a_status(bad_rows_run):
    _, summary = bad_rows_run
    assert summary.counts == {"ok": len(GOOD), "skipped": len(BAD), "error": 0}
    assert summary.processed == summary.rows == len(GOOD) + len(BAD)
    table = _read(summary.location)
    ids = table.column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(GOOD) + len(BAD)
    rows = {r["prompt_id"]: r for r in table.to_pylist()}
    for _, pid, message in BAD:
        matches = [r for k, r in rows.items() if (k == pid if pid else r["error"] and message in r["error"])]
        assert len(matches) == 1, message
        assert matches[0]["status"] == "skipped" and message in matches[0]["error"]
    for good in GOOD:
        row = rows[str(good["id"])]
        assert row["status"] == "ok" and row["error"] is None, row["error"]
        n = len(row["unit_text"])
        assert n > 0 and len(row["scores"]) == len(row["unit_start"]) == len(row["unit_length"]) == n
        assert len(row["per_target"]) == n and all(len(p) == len(row["target_tokens"]) for p in row["per_target"])
        for text, start, length in zip(row["unit_text"], row["unit_start"], row["unit_length"], strict=True):
            assert row["prompt"][start : start + length] == text
        assert row["base_target_ce"] > 0 and row["n_prompt_tokens"] > 0 and row["latency_ms"] >= 0
    assert rows["gen"]["target"] and rows["gen"]["target_tokens"], "a generated target is written"
    assert max(s + n for s, n in zip(rows["span"]["unit_start"], rows["span"]["unit_length"], strict=True)) <= 31
    assert rows["qa"]["chat"] is True and rows["fr"]["chat"] is False
    assert json.loads(rows["code"]["metadata"]) == {"topic": "code"}


@pytest.mark.cluster
def test_layout_schema_and_manifest(bad_rows_run, tiny_model_dir):
    spec, summary = bad_rows_run
    run_dir = Path(summary.location)
    assert run_dir.parent.name == "run_id=r1" or run_dir.name == "run_id=r1"
    assert run_dir.parent.name.startswith("run_date=") and run_dir.parent.parent.name.startswith("model=")
    parts = sorted(run_dir.glob("part-*.parquet"))
    assert parts and not list(run_dir.glob(".tmp-*")), "only whole parts are published"
    for part in parts:
        f = pq.ParquetFile(part)
        assert f.schema_arrow.remove_metadata() == SCHEMA.remove_metadata()
        assert {f.metadata.row_group(0).column(i).compression for i in range(f.metadata.num_columns)} == {"ZSTD"}
    table = _read(summary.location)
    for name in ("unit_text", "scores", "per_target", "target_tokens"):
        assert pa.types.is_list(table.schema.field(name).type), "plain Arrow lists, no extension types"
    assert set(table.column("run_id").to_pylist()) == {"r1"}
    assert set(table.column("model_id").to_pylist()) == {tiny_model_dir}
    params = {json.dumps(json.loads(p), sort_keys=True) for p in table.column("method_params").to_pylist()}
    assert len(params) == 1 and json.loads(params.pop())["factor"] == 0.1
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert manifest["counts"] == summary.counts and manifest["rows"] == table.num_rows
    assert manifest["config_hash"] == spec.config_hash() and manifest["config"]["name"] == "test"
    assert {"torch", "transformers", "ray", "pyarrow", "atman-pipeline"} <= set(manifest["libraries"])
    assert sorted(f["name"] for f in manifest["files"]) == [p.name for p in parts]
    # how every actor computed: float32 weights on a CPU resolve precision auto to fp32
    assert manifest["compute"] == [
        {"device": "cpu", "dtype": "float32", "precision": "fp32", "attention_kernel": "sdpa"}
    ], manifest["compute"]
    assert {json.loads(p)["precision"] for p in table.column("method_params").to_pylist()} == {"fp32"}
    assert (run_dir / SUCCESS).exists()


@pytest.mark.cluster
def test_duckdb_reads_the_output(bad_rows_run):
    import duckdb

    _, summary = bad_rows_run
    n, distinct, ok, top = (
        duckdb.connect()
        .execute(
            f"SELECT count(*), count(DISTINCT prompt_id), count(*) FILTER (status = 'ok'), "
            f"max(list_max(scores)) FROM read_parquet('{summary.location}/*.parquet')"
        )
        .fetchone()
    )
    assert n == distinct == summary.rows and ok == summary.counts["ok"] and top > 0


@pytest.mark.cluster
def test_pandas_reads_the_output(bad_rows_run):
    import pandas as pd

    _, summary = bad_rows_run
    df = pd.read_parquet(summary.location)
    assert len(df) == summary.rows and df["prompt_id"].is_unique
    assert (df["status"] == "skipped").sum() == summary.counts["skipped"]
    assert len(df.loc[df["prompt_id"] == "fr", "scores"].iloc[0]) > 0


@pytest.mark.cluster
def test_polars_reads_the_output(bad_rows_run):
    import polars as pl

    _, summary = bad_rows_run
    df = pl.read_parquet(f"{summary.location}/*.parquet")
    assert df.height == summary.rows and df["prompt_id"].n_unique() == summary.rows
    assert df.schema["scores"] == pl.List(pl.Float32)
    assert df.filter(pl.col("status") == "ok")["scores"].list.len().min() > 0


@pytest.mark.cluster
def test_resume_processes_only_what_is_missing(tmp_path, tiny_model_dir, ray_cluster, monkeypatch):
    _write(tmp_path / "in.jsonl", GOOD)
    spec = _spec(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "out", batch_rows=2, shard_rows=2)
    real = ExplainWorker.explain_rows

    def failing(self, requests):  # an earlier failure: the row of id 'fr' ends in error, as a crash would leave it
        rows = real(self, requests)
        for row in rows:
            if row["prompt_id"] == "fr":
                row.update(status="error", error="RuntimeError: injected", scores=None, unit_text=None)
        return rows

    monkeypatch.setattr(ExplainWorker, "explain_rows", failing)
    first = run_job(spec, "r2", address="inline")
    monkeypatch.setattr(ExplainWorker, "explain_rows", real)
    assert first.processed == len(GOOD) and first.counts["error"] == 1 and first.shards == 3
    run_dir = Path(first.location)
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("part-*.parquet")}
    assert sorted(before) == [f"part-s00000{i}.parquet" for i in range(3)], "one part per shard, named by it"

    again = run_job(spec, "r2")
    assert again.processed == 0 and again.rows == len(GOOD) and again.counts["error"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.glob("part-*.parquet")} == before, "nothing rewritten"

    retried = run_job(spec, "r2", retry_errors=True)
    assert retried.processed == 1, "only the row that ended in error is explained again"
    assert retried.counts == {"ok": len(GOOD), "skipped": 0, "error": 0}
    after = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("part-*.parquet")}
    assert sum(after[n] != before[n] for n in before) == 1, "only the shard holding it is rewritten"
    ids = _read(retried.location).column("prompt_id").to_pylist()
    assert sorted(ids) == sorted(str(r["id"]) for r in GOOD), "each id exactly once after the retry"

    _write(tmp_path / "in.jsonl", GOOD + [{"id": "new", "prompt": "One more prompt", "target": " here"}])
    with pytest.raises(JobSpecError, match=r"^input.path: the input changed since run r2 started .*in.jsonl changed"):
        run_job(spec, "r2")


def _spy_publish(monkeypatch) -> list[str]:
    """Every file the pipeline publishes, in order (``layout.publish``, wherever a module imported it)."""
    import pipeline.layout

    real, order = pipeline.layout.publish, []

    def spy(fs, path, data):
        order.append(path)
        return real(fs, path, data)

    for name, module in list(sys.modules.items()):
        if (name == "pipeline" or name.startswith("pipeline.")) and getattr(module, "publish", None) is real:
            monkeypatch.setattr(module, "publish", spy)
    return order


def test_success_is_published_last(tmp_path, tiny_model_dir, monkeypatch):
    """Parts, then the manifest, then _SUCCESS, and nothing after it (a reader that sees _SUCCESS sees it all)."""
    _write(tmp_path / "in.jsonl", GOOD)
    order = _spy_publish(monkeypatch)
    spec = _spec(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "out", shard_rows=2)
    summary = run_job(spec, "last", address="inline")
    names = [p.rsplit("/", 1)[-1] for p in order]
    assert SUCCESS in names, "_SUCCESS goes through publish (a whole file), so a reader never sees half of it"
    after = [n for n in names[names.index(SUCCESS) + 1 :] if n != "_lease.json"]
    assert names.count(SUCCESS) == 1 and after == [], f"published after _SUCCESS: {after}"
    assert names[names.index(SUCCESS) - 1] == MANIFEST
    parts = [i for i, n in enumerate(names) if n.startswith("part-")]
    assert len(parts) == summary.shards == 3 and max(parts) < names.index(MANIFEST)


def test_finalize_refuses_a_run_with_shards_missing(tmp_path, tiny_model_dir, monkeypatch):
    """A dispatch that ends with shards unexplained: RunIncomplete (exit 1) naming what is missing and how to
    resume, no manifest, no _SUCCESS; the rerun it names explains only those shards."""
    import pipeline.job

    _write(tmp_path / "in.jsonl", GOOD)
    spec = _spec(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "out", shard_rows=2)
    real = pipeline.job.explain_phase

    def drops_the_last(attempt, plan, work, *args, **kwargs):
        return real(attempt, plan, dataclasses.replace(work, pending=work.pending[:-1]), *args, **kwargs)

    monkeypatch.setattr(pipeline.job, "explain_phase", drops_the_last)
    with pytest.raises(RunIncomplete) as stopped:
        run_job(spec, "miss", address="inline")
    assert str(stopped.value) == (
        "1 of 3 shards (2 of 6 input rows) have no output yet; rerun with --run-id miss to finish it"
    )
    assert stopped.value.exit_code == 1
    (run_dir,) = (tmp_path / "out").glob("model=*/run_date=*/run_id=miss")
    assert not (run_dir / SUCCESS).exists() and not (run_dir / MANIFEST).exists()
    monkeypatch.setattr(pipeline.job, "explain_phase", real)
    again = run_job(spec, "miss", address="inline")
    assert again.processed == 2 and again.counts["ok"] == len(GOOD) and (run_dir / SUCCESS).exists()


def test_finalize_refuses_a_shard_with_rows_lost(tmp_path, tiny_model_dir, monkeypatch):
    """A shard recorded with another number of rows than its input is not published as complete, and the rerun
    the message names redoes that shard (it does not refuse the same record again)."""

    _write(tmp_path / "in.jsonl", GOOD)
    spec = _spec(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "out", shard_rows=2)
    real = ExplainWorker.explain_shard

    def loses_a_row(self, shard, segments, retry_errors=False):  # a broken worker's record of shard 1
        record = real(self, shard, segments, retry_errors)
        return {**record, "rows": record["rows"] - 1} if shard == 1 else record

    monkeypatch.setattr(ExplainWorker, "explain_shard", loses_a_row)
    with pytest.raises(RunIncomplete) as stopped:
        run_job(spec, "lost", address="inline")
    assert str(stopped.value) == "shards [1] hold another number of rows than their input; rerun with --run-id lost"
    (run_dir,) = (tmp_path / "out").glob("model=*/run_date=*/run_id=lost")
    assert not (run_dir / SUCCESS).exists() and not (run_dir / MANIFEST).exists()
    monkeypatch.setattr(ExplainWorker, "explain_shard", real)
    again = run_job(spec, "lost", address="inline")
    said = "shard 1: its entry in _progress.json says rows: 1, the plan gives the shard 2; it is explained again"
    assert again.redone == [said]
    assert again.processed == 2 and again.counts["ok"] == len(GOOD) and (run_dir / SUCCESS).exists()
    assert sorted(_read(again.location).column("prompt_id").to_pylist()) == sorted(str(r["id"]) for r in GOOD)


# --- the worker in-process: failures are isolated per row, CUDA OOM halves the batch -------------------------------


@pytest.fixture
def worker(tmp_path, tiny_model_dir):
    (tmp_path / "in.jsonl").write_text("")
    spec = _spec(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "out")
    run = {"root": str(tmp_path / "out"), "model": "tiny", "run_date": "2026-01-01", "run_id": "w"}
    return ExplainWorker(spec.model_dump_json(), run)


def _requests(n: int) -> list[dict]:
    return [
        {"prompt_id": f"p{i}", "prompt": f"Prompt number {i} is about", "target": " cats", "source": f"x:{i}"}
        for i in range(n)
    ]


def test_a_failing_row_does_not_take_the_batch_down(worker, monkeypatch):
    run = worker.explainer.run
    bad = worker.explainer.plan("Prompt number 2 is about", " cats").sweep_input.input_ids

    def flaky(inputs, batch_size=None):
        if any(torch.equal(i.input_ids, bad) for i in inputs):
            raise RuntimeError("simulated kernel failure")
        return run(inputs, batch_size=batch_size)

    monkeypatch.setattr(worker.explainer, "run", flaky)
    rows = {r["prompt_id"]: r for r in worker.explain_rows(_requests(4))}
    assert rows["p2"]["status"] == "error" and rows["p2"]["error"] == "RuntimeError: simulated kernel failure"
    assert all(rows[f"p{i}"]["status"] == "ok" for i in (0, 1, 3))


def test_cuda_oom_halves_the_batch_then_marks_the_row(worker, monkeypatch):
    run = worker.explainer.run
    calls = []
    hopeless = worker.explainer.plan("Prompt number 3 is about", " cats").sweep_input.input_ids

    def small_memory(inputs, batch_size=None):
        calls.append((len(inputs), batch_size))
        if len(inputs) > 1 or any(torch.equal(i.input_ids, hopeless) for i in inputs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run(inputs, batch_size=batch_size)

    monkeypatch.setattr(worker.explainer, "run", small_memory)
    rows = {r["prompt_id"]: r for r in worker.explain_rows(_requests(4))}
    assert calls[0] == (4, 16) and (2, 16) in calls, "the group of prompts is halved first"
    assert [c for c in calls if c[0] == 1 and c[1] < 16], "then the forward batch of one prompt"
    assert (1, 1) in calls, "down to one row per forward pass"
    assert rows["p3"]["status"] == "error" and rows["p3"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert all(rows[f"p{i}"]["status"] == "ok" for i in (0, 1, 2))


def test_cuda_oom_while_generating_a_target_marks_only_that_row(worker, monkeypatch):
    """Out of memory inside ``model.generate`` (a row without a target): that row ends in error naming it."""

    def small_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(worker.explainer.model, "generate", small_memory)
    requests = _requests(3)
    requests[1]["target"] = None
    rows = {r["prompt_id"]: r for r in worker.explain_rows(requests)}
    assert rows["p1"]["status"] == "error" and rows["p1"]["scores"] is None
    assert rows["p1"]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows["p0"]["status"] == rows["p2"]["status"] == "ok"


def test_eos_as_the_first_generated_token_skips_the_row(worker, monkeypatch):
    """Nothing to explain is a property of the request: the row is skipped with the reason, the others explained."""
    requests = _requests(2)
    requests[0]["target"] = None
    first = worker.explainer.plan(requests[0]["prompt"], generate=1).target_ids.tolist()
    monkeypatch.setattr(worker.explainer.model.generation_config, "eos_token_id", first)
    rows = {r["prompt_id"]: r for r in worker.explain_rows(requests)}
    assert rows["p0"]["status"] == "skipped"
    assert rows["p0"]["error"].startswith("target: the model generated EOS first, so there is no target to explain")
    assert rows["p1"]["status"] == "ok"


_cells = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.text(max_size=30), st.lists(st.integers(0, 9)))
_row = st.fixed_dictionaries({}, optional={k: _cells for k in ("id", "prompt", "target", "span", "chat", "topic")})


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row, min_size=1, max_size=6), junk=st.lists(st.binary(min_size=1, max_size=8), max_size=2))
def test_random_rows_never_crash_the_job(tmp_path_factory, tiny_model_dir, rows, junk):
    """Random rows (and undecodable lines) through the whole job in-process: it finishes, and every non-blank
    line of the input is exactly one output row with a status."""
    tmp = tmp_path_factory.mktemp("random")
    lines = [json.dumps({"prompt": "anchor", "id": "anchor"}).encode()]
    lines += [json.dumps(r).encode() for r in rows] + [j.replace(b"\n", b" ") for j in junk]
    (tmp / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    summary = run_job(_spec(tiny_model_dir, tmp / "in.jsonl", tmp / "out"), "h", address="inline")
    expected = sum(1 for line in lines if line.strip())
    assert summary.rows == sum(summary.counts.values()) == expected
    assert len(set(_read(summary.location).column("prompt_id").to_pylist())) == expected


# --- the CLI -------------------------------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([ATMAN, *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


@pytest.mark.parametrize(
    ("yaml_text", "sets", "field"),
    [
        ("name: x\ninput: {path: in.jsonl}\nmethod: {factr: 0.1}\n", [], "method.factr: unknown key"),
        ("name: x\ninput: {path: in.jsonl}\nresources: {actors: two}\n", [], "resources.actors:"),
        ("name: x\ninput: {path: in.jsonl}\n", ["method.mode=sideways"], "method.mode:"),
        ("name: x\ninput: {path: in.jsonl}\n", ["method.factor"], "--set:"),
        ("name: x\ninput: {path: nowhere.jsonl}\n", [], "input.path:"),
        ("name: x\n", [], "input: Field required"),
        ("name: 'bad name'\ninput: {path: in.jsonl}\n", [], "name:"),
        ("name: x\ninput: {path: in.jsonl, prompt_column: text}\n", [], "input.prompt_column:"),
        ("name: x\nmodel: {id: ./no-such-model}\ninput: {path: in.jsonl}\n", [], "model.id: cannot load"),
    ],
)
def test_bad_job_spec_exits_2_naming_the_field(tmp_path, yaml_text, sets, field):
    (tmp_path / "in.jsonl").write_text('{"prompt": "hello"}\n')
    (tmp_path / "job.yaml").write_text(yaml_text)
    out = _cli("run", "job.yaml", *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert field in out.stderr


@pytest.mark.cluster
def test_cli_run_leaves_nothing_in_home(tmp_path, tiny_model_dir):
    """The CLI path a user runs: embedded Ray started and stopped for the run, summary printed, HOME untouched."""
    _write(tmp_path / "in.jsonl", GOOD[:3])
    (tmp_path / "job.yaml").write_text(
        f"name: cli\nmodel: {{id: {tiny_model_dir}}}\ninput: {{path: in.jsonl}}\noutput: {{root: out}}\n"
        "method: {granularity: word, generate_max_tokens: 2}\n"
    )
    home = tmp_path / "home"
    home.mkdir()
    out = _cli("run", "job.yaml", "--run-id", "c1", "--preview", "1", cwd=tmp_path, env={"HOME": str(home)})
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and "prompts/s" in out.stdout and "run_id=c1" in out.stdout
    assert "top units:" in out.stdout
    ray_lines = [line for line in out.stderr.splitlines() if re.match(r"[EWF]\d{4} \d\d:\d\d:\d\d|.*core_worker", line)]
    assert ray_lines == [], "the user sees our progress and summary, not Ray's internal log lines"
    assert list(home.iterdir()) == [], f"left in HOME: {list(home.rglob('*'))[:5]}"
    assert not (tmp_path / "out" / "_scratch" / "c1").exists(), "Ray's scratch dir is removed after the run"


def test_ids_that_join_to_another_batch_all_complete(tmp_path, tiny_model_dir):
    """Batches of 2: ids `a`, `b` and `a\nb`; before the fix their parts collided and the run never completed."""
    _write(tmp_path / "in.jsonl", [{"id": i, "prompt": "hello there", "target": " friend"} for i in ("a", "b", "a\nb")])
    summary = run_job(_spec(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "out"), "forge", address="inline")
    ids = _read(summary.location).column("prompt_id").to_pylist()
    assert sorted(ids) == ["a", "a\nb", "b"] and summary.counts["ok"] == 3


def test_an_id_equal_to_a_duplicate_marker_loses_no_row(tmp_path, tiny_model_dir):
    """Before the fix the end-of-run cleanup rewrote a part under its own name and then deleted it, every row of it
    gone, and reruns repeated it."""
    marker = f"x#dup@{tmp_path / 'in.jsonl'}:3"  # what the repeat on line 3 is called
    rows = [
        {"id": "x", "prompt": "hello there"},
        {"id": marker, "prompt": "hi"},
        {"id": "x", "prompt": "yo"},
    ]
    _write(tmp_path / "in.jsonl", [dict(r, target=" friend") for r in rows])
    summary = run_job(_spec(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "out"), "marker", address="inline")
    table = _read(summary.location)
    assert table.num_rows == 3 and summary.counts["ok"] == 2 and summary.counts["skipped"] == 1
    assert sorted(table.column("prompt_id").to_pylist()) == ["x", marker, f"{marker}#2"]


def test_a_stopped_run_names_the_cause_inside_rays_error():
    from pipeline.messages import first_line as _first_line

    ray_error = RuntimeError(
        "\x1b[36mray::MapWorker(MapBatches(ExplainWorker)).submit()\x1b[39m (pid=1, ip=1.2.3.4)\n"
        "  File \"worker.py\", line 3, in __call__\n    raise ValueError('model: cannot load x')\n"
        "ray.exceptions.RayTaskError: wrapped\nValueError: model: cannot load x"
    )
    assert _first_line(ray_error) == "ValueError: model: cannot load x"
    assert _first_line(OSError("disk full")) == "disk full"
