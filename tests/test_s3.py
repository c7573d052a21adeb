"""Jobs with input and output on S3 (a real SeaweedFS server on 127.0.0.1, reached through plain s3:// URLs and
the AWS_* environment, as in production), and S3 credentials never written to outputs or messages."""

from __future__ import annotations

import csv
import io
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
from fsspec.core import url_to_fs
from s3_server import s3_env, s3_server  # noqa: F401 - fixtures

from pipeline.job import run_job
from pipeline.jobspec import InputSpec, JobSpec
from pipeline.layout import MANIFEST, SUCCESS, model_slug
from pipeline.reader import read_input

ATMAN = str(Path(sys.executable).parent / "atman")
ROWS = [
    {"id": "fr", "prompt": "The capital of France is Paris. The capital of Germany is", "target": " Berlin"},
    {"id": "qa", "prompt": "What is the capital of France?", "target": "Paris."},
    {"id": "gen", "prompt": "Water freezes at a temperature of", "target": None},
    {"id": "code", "prompt": "def add(a, b):\n    return", "target": " a + b"},
]
BAD = {"id": "bad", "prompt": 42}
IDS = [r["id"] for r in ROWS] + [BAD["id"]]


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _plain_types(t: pa.DataType) -> bool:
    """No extension types (Ray's tensor types) anywhere: lists are plain ``pa.list_`` all the way down."""
    if isinstance(t, pa.ExtensionType) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        return False
    return _plain_types(t.value_type) if pa.types.is_list(t) else True


def test_plain_s3_urls_reach_the_test_server(s3_server, s3_env, monkeypatch):  # noqa: F811
    """The pipeline calls ``url_to_fs(url)`` with no options: AWS_ENDPOINT_URL alone must route it here."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    fs, path = url_to_fs(f"s3://{s3_env}/probe.txt")
    fs.pipe_file(path, b"through the environment")
    assert s3_server.filesystem().cat_file(f"{s3_env}/probe.txt") == b"through the environment"


@pytest.mark.cluster
def test_job_reads_and_writes_s3(s3_server, s3_env, tiny_model_dir, ray_cluster):  # noqa: F811
    bucket, fs = s3_env, s3_server.filesystem()
    fs.pipe_file(f"{bucket}/in/prompts.jsonl", _jsonl([*ROWS, BAD]))
    spec = JobSpec.model_validate(
        {
            "name": "s3job",
            "model": {"id": tiny_model_dir},
            "input": {"path": f"s3://{bucket}/in/prompts.jsonl"},
            "method": {"granularity": "word", "conceptual_threshold": None, "generate_max_tokens": 4},
            "output": {"root": f"s3://{bucket}/out"},
            "resources": {"actors": 1, "batch_rows": 2},
        }
    )
    summary = run_job(spec, "r1")  # reuses the test's Ray (ray_cluster)

    assert summary.counts == {"ok": 4, "skipped": 1, "error": 0}
    slug = re.escape(model_slug(tiny_model_dir))
    assert re.fullmatch(rf"s3://{bucket}/out/model={slug}/run_date=\d{{4}}-\d{{2}}-\d{{2}}/run_id=r1", summary.location)
    run_dir = summary.location.removeprefix("s3://")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(run_dir, refresh=True))
    parts = [n for n in names if n.startswith("part-") and n.endswith(".parquet")]
    assert parts and set(names) == {*parts, MANIFEST, SUCCESS}, names

    table = ds.dataset([f"{run_dir}/{p}" for p in parts], filesystem=fs, format="parquet").to_table()
    rows = {r["prompt_id"]: r for r in table.to_pylist()}
    assert table.num_rows == 5 and sorted(rows) == sorted(IDS), "every input id exactly once"
    assert rows["bad"]["status"] == "skipped" and "prompt" in rows["bad"]["error"]
    assert all(rows[r["id"]]["status"] == "ok" and rows[r["id"]]["unit_text"] for r in ROWS)
    for part in parts:
        schema = pq.read_schema(f"{run_dir}/{part}", filesystem=fs)
        assert all(_plain_types(f.type) for f in schema), schema
        assert not any(b"ARROW:extension" in k for f in schema for k in (f.metadata or {})), schema

    manifest = fs.cat_file(f"{run_dir}/{MANIFEST}").decode()
    assert json.loads(manifest)["counts"] == summary.counts
    texts = [manifest, json.dumps(table.to_pylist(), default=str)]
    texts += [fs.cat_file(f"{run_dir}/{n}").decode("latin-1") for n in names]  # raw bytes too
    for text in texts:
        assert s3_server.key not in text and s3_server.secret not in text, "credentials written to the output"


def test_reader_formats_on_s3_agree(s3_server, s3_env):  # noqa: F811
    """JSONL, Parquet and CSV of the same rows give the same prompt ids, the bad row flagged in each format
    (Parquet and CSV cannot hold an integer in a string column: there the bad prompt is null / empty)."""
    bucket, fs = s3_env, s3_server.filesystem()
    fs.pipe_file(f"{bucket}/in/prompts.jsonl", _jsonl([*ROWS, BAD]))
    flat = [*ROWS, {"id": "bad", "prompt": None, "target": None}]
    with fs.open(f"{bucket}/in/prompts.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(flat), f)
    text = io.StringIO()
    csv.writer(text).writerows([["id", "prompt", "target"], *([r["id"], r["prompt"], r["target"]] for r in flat)])
    fs.pipe_file(f"{bucket}/in/prompts.csv", text.getvalue().encode())

    for name in ("prompts.jsonl", "prompts.parquet", "prompts.csv"):
        table = read_input(InputSpec(path=f"s3://{bucket}/in/{name}"))
        assert table.column("prompt_id").to_pylist() == IDS, name
        assert table.column("prompt").to_pylist()[:-1] == [r["prompt"] for r in ROWS], name
        errors = table.column("input_error").to_pylist()
        assert errors[:-1] == [None] * len(ROWS) and "prompt" in errors[-1], (name, errors)


def test_missing_s3_input_exits_2_without_leaking_credentials(tmp_path, s3_server, s3_env):  # noqa: F811
    """The CLI, configured only through the environment, names the field and never echoes the credentials."""
    (tmp_path / "job.yaml").write_text(
        f"name: s3missing\ninput: {{path: 's3://{s3_env}/nothing/here.jsonl'}}\noutput: {{root: 's3://{s3_env}/out'}}\n"
    )
    env = {**os.environ, **s3_server.env(), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [ATMAN, "run", "job.yaml", "--run-id", "r2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "input.path" in out.stderr
    for text in (out.stdout, out.stderr):
        assert s3_server.key not in text and s3_server.secret not in text, "credentials in the CLI's output"
