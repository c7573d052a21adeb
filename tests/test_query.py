"""`atman query` / `pipeline.query.connect` / `atman show` over real pipeline output (local and S3 roots)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
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


def _cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ATMAN, *args], capture_output=True, text=True, timeout=120, env=env)


def _said(out: subprocess.CompletedProcess) -> str:
    """stderr with the terminal's line wrapping undone."""
    return " ".join(out.stderr.split())


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


def test_s3_queries_read_only_the_roots_prefix(tiny_model_dir, s3_server, s3_bucket, tmp_path):  # noqa: F811
    root = f"s3://{s3_bucket}/out"
    make_run(tiny_model_dir, root, "s3run", PROMPTS[:1], input_dir=tmp_path)
    fs = s3_server.filesystem()
    other = f"{s3_bucket}-other"
    fs.mkdir(other)
    for key in (f"{other}/secret.txt", f"{s3_bucket}/secret.txt", f"{s3_bucket}/out-x/secret.txt"):
        fs.pipe_file(key, b"not yours")
    con = connect(root)
    inside = run_query(con, f"SELECT count(*) AS n FROM glob('{root}/model=*/run_date=*/run_id=*/_SUCCESS')")
    assert inside.to_pylist() == [{"n": 1}], "files under the root stay readable"
    assert run_query(con, "SELECT count(*) AS n FROM explanations").to_pylist() == [{"n": 1}]
    for path in (f"s3://{other}/secret.txt", f"s3://{s3_bucket}/secret.txt", f"s3://{s3_bucket}/out-x/secret.txt",
                 f"{root}/../secret.txt", f"s3a://{other}/secret.txt"):  # fmt: skip
        with pytest.raises(QueryError, match="^sql: reads outside the output root are not allowed"):
            run_query(con, f"SELECT content FROM read_text('{path}')")
    out = _cli("query", root, f"SELECT content FROM read_text('s3://{other}/secret.txt')")
    assert out.returncode == 2 and "reads outside the output root are not allowed" in _said(out), out.stderr
    assert "Traceback" not in out.stderr and "not yours" not in out.stdout


@pytest.fixture(scope="module")
def elsewhere(root, tmp_path_factory) -> Path:
    """A directory beside the root with a copy of one of its parts: readable by the process, not by a query."""
    path = tmp_path_factory.mktemp("elsewhere")
    part = next(Path(root).glob("model=*/run_date=*/run_id=a/part-*.parquet"))
    (path / "copy.parquet").write_bytes(part.read_bytes())
    return path


PROBES = {
    "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
    "read_text": "SELECT content FROM read_text('/etc/hostname')",
    "glob": "SELECT * FROM glob('/root/*')",
    "other_dir": "SELECT count(*) FROM read_parquet('{elsewhere}/*.parquet')",
    "parent": "SELECT count(*) FROM read_parquet('{root}/../*/*.parquet')",
    "sibling": "SELECT count(*) FROM read_text('{root}-x/secret')",
    "file_url": "SELECT content FROM read_text('file:///etc/hostname')",
}


@pytest.mark.parametrize("probe", PROBES)
def test_queries_read_nothing_outside_the_root(root, elsewhere, probe):
    sql = PROBES[probe].format(root=root, elsewhere=elsewhere)
    with pytest.raises(QueryError, match=r"^sql: reads outside the output root are not allowed \(.+\)"):
        run_query(connect(root), sql)


def test_the_connection_itself_is_confined_and_locked(root):
    """Not only run_query: ``show``, ``report`` and ``diff`` use connect() directly."""
    con = connect(root)
    with pytest.raises(duckdb.PermissionException):
        con.execute("SELECT * FROM read_text('/etc/hostname')").fetchall()
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET allowed_directories = ['/']")
    manifest = run_query(
        con, f"SELECT count(*) AS n FROM read_text('{root}/model=*/run_date=*/run_id=*/_manifest.json')"
    )
    assert manifest.to_pylist() == [{"n": 3}], "the root's own files remain readable (c lost only _SUCCESS)"


def test_cli_refuses_reads_outside_the_root(root, elsewhere):
    for probe in ("read_csv", "read_text", "glob", "other_dir"):
        out = _cli("query", root, PROBES[probe].format(root=root, elsewhere=elsewhere))
        assert out.returncode == 2, (probe, out.stdout, out.stderr)
        assert "error: sql: reads outside the output root are not allowed" in _said(out), out.stderr
        assert "Traceback" not in out.stderr and "root:x:0:0" not in out.stdout


def test_cli_https_installs_and_fetches_nothing(root, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    for sql in (
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
        "SELECT * FROM 'https://example.com/x.csv'",
    ):
        out = _cli("query", root, sql, env=env)
        assert out.returncode == 2 and "reads outside the output root are not allowed" in _said(out), out.stderr
        assert "https://example.com" in _said(out) and "extension" not in out.stderr.lower()
    assert list(home.iterdir()) == [], "no extension directory (~/.duckdb) or anything else written under HOME"


def test_legitimate_queries_still_work(root):
    sql = "SELECT r.run_id, count(*) AS n FROM explanations e JOIN runs r USING (run_id) GROUP BY 1 ORDER BY 1"
    out = _cli("query", root, sql, "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"run_id": "a", "n": 4}, {"run_id": "b", "n": 2}]
    out = _cli("query", root, "SELECT max(rank) AS r FROM units", "--include-incomplete", "--format", "json")
    assert out.returncode == 0 and json.loads(out.stdout)[0]["r"] >= 1, out.stderr


def test_cli_query_needs_runs(tmp_path):
    missing = _cli("query", str(tmp_path / "nope"), "SELECT count(*) FROM explanations")
    assert missing.returncode == 2 and f"root: {tmp_path / 'nope'} does not exist" in _said(missing), missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _cli("query", str(empty), "SELECT count(*) FROM explanations")
    assert out.returncode == 2 and f"root: no runs under {empty}" in _said(out), out.stderr
    unfinished = tmp_path / "unfinished"
    (unfinished / "model=m" / "run_date=2024-01-01" / "run_id=x").mkdir(parents=True)
    out = _cli("query", str(unfinished), "SELECT count(*) FROM explanations")
    said = _said(out)
    assert out.returncode == 2 and f"root: no complete runs under {unfinished}" in said, out.stderr
    assert "1 incomplete" in said and "--include-incomplete" in said
    out = _cli("query", str(unfinished), "SELECT count(*) AS n FROM runs", "--include-incomplete", "--format", "json")
    assert out.returncode == 0 and json.loads(out.stdout) == [{"n": 1}], out.stderr


def test_a_flipped_byte_in_a_part_a_job_wrote_is_left_out(root, tmp_path):
    """A part of a real run with one byte changed (same size): the query names it and answers without its rows."""
    import shutil
    import warnings

    from pipeline.query import DamagedPart

    copy = tmp_path / "out"
    shutil.copytree(root, copy)
    part = next(copy.glob("model=*/run_date=*/run_id=a/part-*.parquet"))
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0xFF
    part.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DamagedPart)
        con = connect(str(copy))
    assert [f"{part} does not match its sha256" in str(w.message) for w in caught] == [True]
    rows = con.execute("SELECT run_id, count(*) FROM explanations GROUP BY 1 ORDER BY 1").fetchall()
    assert rows == [("b", 2)], "run a had one part: none of its rows are read"
