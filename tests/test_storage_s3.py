"""The job with input and output on S3 (a real SeaweedFS server on 127.0.0.1), credentials never written out."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from seaweed import s3_bucket, s3_server  # noqa: F401 - fixtures

from pipeline.jobspec import InputSpec
from pipeline.reader import read_input

ATMAN = str(Path(sys.executable).parent / "atman")
ROWS = [
    {"id": "fr", "prompt": "The capital of France is Paris. The capital of Germany is", "target": " Berlin"},
    {"id": "qa", "prompt": "What is the capital of France?", "target": "Paris."},
    {"id": "gen", "prompt": "Water freezes at a temperature of"},
    {"id": "code", "prompt": "def add(a, b):\n    return", "target": " a + b"},
]
BAD = {"id": "bad", "prompt": 42}


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _cli(args, cwd, server, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **server.env()}
    return subprocess.run([ATMAN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.cluster
def test_job_reads_and_writes_s3(tmp_path, s3_server, s3_bucket, tiny_model_dir):  # noqa: F811
    fs = s3_server.filesystem()
    fs.pipe_file(f"{s3_bucket}/in/prompts.jsonl", _jsonl([*ROWS, BAD]))
    (tmp_path / "job.yaml").write_text(
        f"name: s3job\nmodel: {{id: {tiny_model_dir}}}\n"
        f"input: {{path: 's3://{s3_bucket}/in/prompts.jsonl'}}\n"
        f"output: {{root: 's3://{s3_bucket}/out'}}\n"
        "method: {granularity: word, generate_max_tokens: 3}\nresources: {batch_rows: 2}\n"
    )
    out = _cli(["run", "job.yaml", "--run-id", "s1"], tmp_path, s3_server)
    assert out.returncode == 0, out.stderr
    (run_dir,) = fs.glob(f"{s3_bucket}/out/model=*/run_date=*/run_id=s1")
    assert f"s3://{run_dir}" in out.stdout, "the summary names the S3 location"
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(run_dir) if fs.isfile(p))  # SeaweedFS keeps empty folders
    staged = [p for p in fs.find(f"{run_dir}/_staging") if fs.isfile(p)]
    assert not staged, "the staged input is removed once the run is complete"
    assert {"_plan.json", "_progress.json"} <= set(names) and "_lease.json" not in names
    assert "_SUCCESS" in names and "_manifest.json" in names and any(n.startswith("part-") for n in names)
    assert not any(n.startswith(".tmp") for n in names)

    table = ds.dataset(run_dir, filesystem=fs, format="parquet").to_table()
    rows = {r["prompt_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(["bad", *(r["id"] for r in ROWS)]) and table.num_rows == len(rows)
    assert rows["bad"]["status"] == "skipped" and "must be a string" in rows["bad"]["error"]
    assert all(rows[r["id"]]["status"] == "ok" for r in ROWS)
    assert rows["fr"]["source"].startswith(f"{s3_bucket}/in/prompts.jsonl:")
    for name in ("unit_text", "scores", "per_target"):
        assert pa.types.is_list(table.schema.field(name).type)

    blobs = [out.stdout, out.stderr] + [fs.cat_file(f"{run_dir}/{n}").decode("latin-1") for n in names]
    for blob in blobs:
        assert s3_server.key not in blob and s3_server.secret not in blob, "credentials leaked into the output"

    again = _cli(["run", "job.yaml", "--run-id", "s1"], tmp_path, s3_server)
    assert again.returncode == 0, again.stderr
    assert "explained now: 0" in again.stdout, "resume on S3 finds every row already written"
    manifest = json.loads(fs.cat_file(f"{run_dir}/_manifest.json"))
    assert manifest["counts"] == {"ok": len(ROWS), "skipped": 1, "error": 0} and manifest["attempts"] == 2


def test_reader_formats_on_s3(s3_server, s3_bucket):  # noqa: F811
    fs = s3_server.filesystem()
    fs.pipe_file(f"{s3_bucket}/jsonl/a.jsonl", _jsonl(ROWS[:2]))
    fs.pipe_file(f"{s3_bucket}/jsonl/b.jsonl", _jsonl(ROWS[2:]))
    flat = [{"id": r["id"], "prompt": r["prompt"], "target": r.get("target")} for r in ROWS]
    with fs.open(f"{s3_bucket}/p.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(flat), f)
    csv = "id,prompt,target\n" + "".join(f'{r["id"]},"{r["prompt"]}",{r["target"] or ""}\n' for r in flat)
    fs.pipe_file(f"{s3_bucket}/p.csv", csv.encode())
    expected = [r["id"] for r in ROWS]
    for path in ("jsonl", "jsonl/*.jsonl", "p.parquet", "p.csv"):
        table = read_input(InputSpec(path=f"s3://{s3_bucket}/{path}"))
        assert table.column("prompt_id").to_pylist() == expected, path
        assert table.column("prompt").to_pylist() == [r["prompt"] for r in ROWS], path


def test_missing_s3_input_exits_2_without_leaking_credentials(tmp_path, s3_server, s3_bucket):  # noqa: F811
    (tmp_path / "job.yaml").write_text(
        f"name: s3missing\ninput: {{path: 's3://{s3_bucket}/nothing/here.jsonl'}}\n"
        f"output: {{root: 's3://{s3_bucket}/out'}}\n"
    )
    out = _cli(["run", "job.yaml"], tmp_path, s3_server, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "input.path:" in out.stderr and "does not exist" in out.stderr
    assert s3_server.key not in out.stdout + out.stderr and s3_server.secret not in out.stdout + out.stderr


def test_unreachable_s3_exits_2_naming_the_input(tmp_path):
    """No server at the endpoint: the job names the store it cannot reach, no traceback, no credentials printed."""
    from seaweed import S3Server

    # a port of this test's own, bound and never listening: connections to it are refused, and no one else's server
    # can take it meanwhile (nothing said that nothing listens on a fixed port, even 9, of a shared machine)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        _run_unreachable(S3Server(endpoint=f"http://127.0.0.1:{held.getsockname()[1]}"), tmp_path)


def _run_unreachable(server, tmp_path: Path) -> None:
    from seaweed import KEY, SECRET

    (tmp_path / "job.yaml").write_text(
        "name: s3down\ninput: {path: 's3://bucket/in.jsonl'}\noutput: {root: 's3://bucket/out'}\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **server.env(), "AWS_MAX_ATTEMPTS": "1"}
    out = subprocess.run([ATMAN, "run", "job.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "output.root: 's3://bucket/out' cannot be reached or read" in out.stderr and "Traceback" not in out.stderr
    assert KEY not in out.stdout + out.stderr and SECRET not in out.stdout + out.stderr
    (tmp_path / "job2.yaml").write_text("name: s3down\ninput: {path: 's3://bucket/in.jsonl'}\noutput: {root: out}\n")
    out = subprocess.run(
        [ATMAN, "run", "job2.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr
    assert "input.path: 's3://bucket/in.jsonl': cannot read it" in out.stderr and "Traceback" not in out.stderr


def test_lease_and_damaged_parts_on_s3(tmp_path, s3_server, s3_bucket, tiny_model_dir, monkeypatch):  # noqa: F811
    """On S3: a second driver is refused while the lease is held; a part whose bytes changed (same size) is found
    from its ETag, without reading it, and explained again; a query leaves a truncated part out, naming it."""
    from pipeline.job import run_job
    from pipeline.jobspec import JobSpec
    from pipeline.layout import RunPaths
    from pipeline.lease import Lease, RunLocked
    from pipeline.query import DamagedPart, connect, run_query

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    fs = s3_server.filesystem()
    rows = [{"id": f"p{i}", "prompt": f"Prompt {i} talks about", "target": " cats"} for i in range(8)]
    fs.pipe_file(f"{s3_bucket}/in.jsonl", _jsonl(rows))
    spec = JobSpec.model_validate(
        {
            "name": "s3plane",
            "model": {"id": tiny_model_dir},
            "input": {"path": f"s3://{s3_bucket}/in.jsonl"},
            "method": {"granularity": "word", "generate_max_tokens": 2},
            "output": {"root": f"s3://{s3_bucket}/out"},
            "resources": {"batch_rows": 4, "shard_rows": 4},
        }
    )
    paths = RunPaths.locate(spec.output.root, tiny_model_dir, "l1")
    with Lease(paths):
        with pytest.raises(RunLocked, match="being written by another driver"):
            run_job(spec, "l1", address="inline")
        assert Lease(paths)._create() is False, "the conditional PUT (If-None-Match) refuses a second lease"
    first = run_job(spec, "l1", address="inline")
    assert first.shards == 2 and first.counts["ok"] == 8

    part = paths.part("part-s000001.parquet")
    data = bytearray(fs.cat_file(part))
    data[len(data) // 3] ^= 0xFF
    fs.pipe_file(part, bytes(data))
    opened = []
    monkeypatch.setattr("pipeline.progress.file_sha256", lambda fs, path: opened.append(path) or "")
    notes = []
    again = run_job(spec, "l1", address="inline", on_notice=notes.append)
    assert opened == [], "S3 parts are checked by their ETag, not read"
    assert again.processed == 4 and any("shard 1" in n and "checksum" in n for n in notes), notes

    fs.pipe_file(part, fs.cat_file(part)[:100])
    with pytest.warns(DamagedPart, match="part-s000001.parquet"):
        con = connect(spec.output.root)
    assert run_query(con, "SELECT count(*) AS n FROM explanations").column("n")[0].as_py() == 4
