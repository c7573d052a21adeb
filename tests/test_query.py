"""`atman query` / `pipeline.query.connect` / `atman show` over real pipeline output (local and S3 roots)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from seaweed import s3_bucket, s3_server  # noqa: F401 - fixtures

from pipeline.job import run_job
from pipeline.jobspec import JobSpec
from pipeline.layout import SUCCESS
from pipeline.query import QueryError, connect, run_query

ATMAN = str(Path(sys.executable).parent / "atman")
PROMPTS = [
    {"id": "fr", "prompt": "The capital of France is Paris. The capital of Germany is", "target": " Berlin"},
    {"id": "qa", "prompt": "What is the capital of France?", "target": "Paris."},
    {"id": "code", "prompt": "def add(a, b):\n    return", "target": " a + b"},
    {"id": "bad", "prompt": ""},
]


def make_run(model_dir: str, root: str, run_id: str, rows=PROMPTS, input_dir: Path | None = None, **method):
    """One real (inline) pipeline run of ``rows`` under ``root``."""
    path = (input_dir or Path(root)) / f"in-{run_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = JobSpec.model_validate(
        {
            "name": "q",
            "model": {"id": model_dir},
            "input": {"path": str(path)},
            "method": {"granularity": "word", **method},
            "output": {"root": root},
        }
    )
    return run_job(spec, run_id, address="inline")


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir) -> str:
    root = str(tmp_path_factory.mktemp("root") / "out")
    make_run(tiny_model_dir, root, "a")
    make_run(tiny_model_dir, root, "b", PROMPTS[:2])
    unfinished = make_run(tiny_model_dir, root, "c", PROMPTS[:1])
    os.remove(Path(unfinished.location) / SUCCESS)
    return root


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([ATMAN, *args], capture_output=True, text=True, timeout=120)


def test_views_cover_complete_runs_with_partition_columns(root):
    con = connect(root)
    rows = con.execute("SELECT run_id, count(*) FROM explanations GROUP BY 1 ORDER BY 1").fetchall()
    assert rows == [("a", 4), ("b", 2)], "the incomplete run c is not visible"
    model, run_date = con.execute("SELECT DISTINCT model, run_date FROM explanations").fetchall()[0]
    assert model.startswith("tmp") and len(run_date) == 10
    with_c = connect(root, include_incomplete=True)
    assert with_c.execute("SELECT count(DISTINCT run_id) FROM explanations").fetchall()[0][0] == 3
    assert [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY 1").fetchall()] == ["a", "b"]


def test_units_view_ranks_units(root):
    con = connect(root)
    units = con.execute(
        "SELECT prompt_id, unit_text, unit_start, unit_length, score, rank FROM units WHERE run_id = 'a'"
    ).fetchall()
    prompts = {p["id"]: p["prompt"] for p in PROMPTS}
    assert {u[0] for u in units} == {"fr", "qa", "code"}, "one row per unit of the ok prompts only"
    for pid, text, start, length, _, _ in units:
        assert prompts[pid][start : start + length] == text
    for pid in ("fr", "qa", "code"):
        mine = [u for u in units if u[0] == pid]
        best = max(mine, key=lambda u: u[4])
        assert best[5] == 1 and sorted(u[5] for u in mine)[0] == 1
    n_scores = con.execute("SELECT sum(len(scores)) FROM explanations WHERE run_id = 'a' AND status = 'ok'")
    assert n_scores.fetchall()[0][0] == len(units)


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT 1) TO 'leak.csv'",
        "ATTACH 'other.db'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "CREATE TABLE t AS SELECT 1",
        "DROP VIEW units",
        "SET threads = 1",
        "SELECT 1; SELECT 2",
    ],
)
def test_user_sql_is_read_only(root, sql, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QueryError, match="^sql: "):
        run_query(connect(root), sql)
    assert list(tmp_path.iterdir()) == []


def test_cli_query_formats(root):
    sql = "SELECT prompt_id, status FROM explanations WHERE run_id = 'a' ORDER BY prompt_id"
    out = _cli("query", root, sql, "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [
        {"prompt_id": "bad", "status": "skipped"},
        {"prompt_id": "code", "status": "ok"},
        {"prompt_id": "fr", "status": "ok"},
        {"prompt_id": "qa", "status": "ok"},
    ]
    out = _cli("query", root, "SELECT count(*) AS n FROM explanations", "--format", "json")
    assert json.loads(out.stdout) == [{"n": 6}]
    out = _cli("query", root, sql, "--format", "csv")
    assert list(csv.reader(io.StringIO(out.stdout)))[:2] == [["prompt_id", "status"], ["bad", "skipped"]]
    out = _cli("query", root, "SELECT unit_text, rank FROM units WHERE run_id = 'a' AND prompt_id = 'fr' AND rank = 1")
    assert out.returncode == 0 and "unit_text" in out.stdout
    out = _cli("query", root, "COPY (SELECT 1) TO 'x.csv'")
    assert out.returncode == 2 and "sql: only SELECT" in out.stderr


def test_cli_show(root):
    out = _cli("show", root, "fr", "--run-id", "a")
    assert out.returncode == 0, out.stderr
    assert "The capital of France is Paris." in out.stdout and "target: ' Berlin'" in out.stdout
    assert "base CE" in out.stdout and "status ok" in out.stdout and "top units:" in out.stdout
    bad = _cli("show", root, "bad")
    assert bad.returncode == 0 and "skipped: prompt: empty" in bad.stdout
    missing = _cli("show", root, "nope")
    assert missing.returncode == 2 and "prompt_id: 'nope'" in missing.stderr


def test_query_an_s3_root(tiny_model_dir, s3_bucket, tmp_path):  # noqa: F811
    make_run(tiny_model_dir, f"s3://{s3_bucket}/out", "s3run", input_dir=tmp_path)
    con = connect(f"s3://{s3_bucket}/out")
    assert con.execute("SELECT count(*), count(DISTINCT run_id) FROM explanations").fetchall() == [(4, 1)]
    assert con.execute("SELECT count(*) FROM units WHERE rank = 1").fetchall()[0][0] >= 3
