"""What `atman query` (and every reader of parts) trusts when it reads a root: parts verified against the manifest
(sha256, remembered until a file changes), manifests checked for completeness, an invalid manifest costing only its
run, links leaving the root, partitions read from the run directory, time and memory limits.

The runs here are written directly (the real schema, a manifest as the job's ``finalize`` writes it): no model."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pytest
from rich.console import Console

from pipeline.layout import MANIFEST, SUCCESS, parquet_bytes, part_name, run_glob
from pipeline.parts import SCHEMA
from pipeline.query import DamagedPart, QueryError, connect, run_query

ATMAN = str(Path(sys.executable).parent / "atman")
COUNT = "SELECT count(*) AS n, count(DISTINCT prompt_id) AS ids FROM explanations"


def write_run(root: Path, run_id: str, shards: int = 3, rows: int = 4, model: str = "m") -> Path:
    """A complete run of ``shards`` parts of ``rows`` ok rows each (ids ``<run_id>-00000``...), uncompressed so
    that a test can change one value in place."""
    run = Path(run_glob(str(root), model, "2024-01-02", run_id))
    run.mkdir(parents=True)
    files = []
    for s in range(shards):
        ids = [f"{run_id}-{s * rows + i:05d}" for i in range(rows)]
        table = pa.Table.from_pylist(
            [
                {"prompt_id": pid, "run_id": run_id, "model_id": "tiny", "status": "ok", "prompt": "a b",
                 "unit_text": ["a", "b"], "unit_start": [0, 2], "unit_length": [1, 1], "scores": [0.5, -0.25],
                 "written_at": dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc)}
                for pid in ids
            ],
            schema=SCHEMA,
        )  # fmt: skip
        data = parquet_bytes(table, "none")
        (run / part_name(s)).write_bytes(data)
        counts = {"ok": rows, "skipped": 0, "error": 0}
        sha = hashlib.sha256(data).hexdigest()
        files.append(
            {"bytes": len(data), "sha256": sha, "rows": rows, "counts": counts, "shard": s, "name": part_name(s)}
        )
    manifest = {"run_id": run_id, "run_date": "2024-01-02", "rows": shards * rows, "shards": shards, "files": files}
    (run / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (run / SUCCESS).write_text("")
    return run


def change_an_id(part: Path, old: str, new: str) -> None:
    """Turn one prompt id into another in place: the same size, still valid Parquet, other values."""
    data = part.read_bytes()
    assert data.count(old.encode()) >= 1 and len(old) == len(new)
    part.write_bytes(data.replace(old.encode(), new.encode(), 1))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """The verified-parts cache of this test alone."""
    monkeypatch.setenv("ATMAN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ATMAN, *args], capture_output=True, text=True, timeout=120, env=os.environ.copy())


def _said(out: subprocess.CompletedProcess) -> str:
    return " ".join(out.stderr.split())


def _connect(root, **kw) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        con = connect(str(root), **kw)
    return con, [str(w.message) for w in caught if issubclass(w.category, DamagedPart)]


def _count(con) -> tuple[int, int]:
    row = run_query(con, COUNT).to_pylist()[0]
    return row["n"], row["ids"]


# --- 1. integrity: the parts' bytes, the manifest's completeness ---------------------------------------------------


def test_a_part_with_other_bytes_is_left_out_and_named(tmp_path):
    run = write_run(tmp_path / "out", "r1")
    change_an_id(run / part_name(1), "r1-00005", "r1-00004")  # an id of shard 1 twice, same size
    con, said = _connect(tmp_path / "out")
    assert _count(con) == (8, 8), "the changed part's rows are not in the answer"
    assert len(said) == 1 and "part-s000001.parquet does not match its sha256" in said[0], said
    assert "--run-id r1" in said[0], "the warning says how to repair it"

    out = _cli("query", str(tmp_path / "out"), COUNT, "--format", "json")
    assert out.returncode == 0 and json.loads(out.stdout) == [{"n": 8, "ids": 8}], out.stderr
    assert "part-s000001.parquet does not match its sha256" in _said(out) and "partial answer" in _said(out)
    strict = _cli("query", str(tmp_path / "out"), COUNT, "--strict")
    assert strict.returncode == 3 and strict.stdout == "" and "--strict" in _said(strict), strict.stderr


def test_verified_parts_are_not_hashed_again_until_they_change(tmp_path, monkeypatch, cache):
    import pipeline.parts

    run = write_run(tmp_path / "out", "r1")
    hashed = []
    real = pipeline.parts.sha256_of
    monkeypatch.setattr(pipeline.parts, "sha256_of", lambda fs, path: hashed.append(path) or real(fs, path))
    assert _count(_connect(tmp_path / "out")[0]) == (12, 12) and len(hashed) == 3
    assert list((cache / "verified").glob("*.json")), "the checks are kept under $ATMAN_CACHE_DIR/verified"
    hashed.clear()
    assert _count(_connect(tmp_path / "out")[0]) == (12, 12) and hashed == [], "unchanged parts are not read again"

    part = run / part_name(2)
    before = part.stat()
    time.sleep(0.01)
    change_an_id(part, "r1-00009", "r1-00008")
    os.utime(part, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same size and mtime: the ctime still moved
    con, said = _connect(tmp_path / "out")
    assert [Path(p).name for p in hashed] == [part_name(2)] and _count(con) == (8, 8)
    assert said and "part-s000002.parquet does not match its sha256" in said[0]


def test_the_cache_is_this_users_and_never_under_home(monkeypatch, tmp_path):
    from pipeline.integrity import cache_dir

    monkeypatch.delenv("ATMAN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "atman" / "verified"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    mine = tmp_path / "tmp" / f"atman-{os.getuid()}"
    assert cache_dir() == mine / "verified" and mine.stat().st_mode & 0o777 == 0o700
    mine.chmod(0o777)  # open to others: it could vouch for a damaged part
    assert cache_dir() is None


def test_the_manifest_must_name_every_shard_and_every_part(tmp_path):
    run = write_run(tmp_path / "out", "r1")
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["files"] = [f for f in manifest["files"] if f["shard"] != 1]  # an entry removed
    (run / MANIFEST).write_text(json.dumps(manifest))
    (run / "part-s000007.parquet").write_bytes((run / part_name(0)).read_bytes())  # a part no shard names
    con, said = _connect(tmp_path / "out")
    assert _count(con) == (8, 8)
    text = "\n".join(said)
    assert "names no part for 1 of 3 shards: 1 (part-s000001.parquet)" in text, said
    assert "counts 12 rows, its parts 8" in text
    for name in ("part-s000001.parquet", "part-s000007.parquet"):
        assert f"{name} is not in the run's manifest, so it cannot be verified" in text


@pytest.mark.parametrize(
    "manifest, why",
    [
        ("{not json", "is not valid JSON"),
        ("[]", "is not a JSON object"),
        (None, "_manifest.json is missing"),
        ({"files": "x", "shards": 3, "rows": 12}, "needs files (a list), shards and rows"),
        ({"name": "../../r1/part-s000000.parquet"}, "files[0] name '../../r1/part-s000000.parquet' is not a part"),
        ({"sha256": None}, "files[0] sha256 None is not a SHA-256 digest"),
        ({"shard": 1}, "files[1] names part part-s000001.parquet or shard 1 a second time"),
        ({"shard": 5}, "files[0] shard 5 is not one of 0..2"),
    ],
)
def test_an_invalid_manifest_costs_only_its_run(tmp_path, manifest, why):
    write_run(tmp_path / "out", "good")
    bad = write_run(tmp_path / "out", "bad")
    if manifest is None:
        (bad / MANIFEST).unlink()
    elif isinstance(manifest, str):
        (bad / MANIFEST).write_text(manifest)
    else:
        data = json.loads((bad / MANIFEST).read_text())
        data.update({k: v for k, v in manifest.items() if k in ("files", "shards", "rows")})
        if isinstance(data["files"], list):
            data["files"][0].update({k: v for k, v in manifest.items() if k not in ("files", "shards", "rows")})
        (bad / MANIFEST).write_text(json.dumps(data))
    con, said = _connect(tmp_path / "out")
    assert run_query(con, "SELECT DISTINCT run_id FROM explanations").to_pylist() == [{"run_id": "good"}]
    assert len(said) == 1 and f"run bad is left out: {bad}/_manifest.json" in said[0] and why in said[0], said
    assert "--run-id bad" in said[0]
    with pytest.raises(QueryError, match=f"nothing left to read .*{re.escape(why)}"), pytest.warns(DamagedPart):
        connect(str(tmp_path / "out"), run_id="bad")


def test_cli_names_an_invalid_manifest(tmp_path):
    write_run(tmp_path / "out", "good")
    bad = write_run(tmp_path / "out", "bad")
    (bad / MANIFEST).write_text("{not json")
    out = _cli("query", str(tmp_path / "out"), COUNT, "--format", "json")
    assert out.returncode == 0 and json.loads(out.stdout) == [{"n": 12, "ids": 12}], out.stderr
    assert f"{bad}/_manifest.json is not valid JSON" in _said(out) and "Traceback" not in out.stderr
    alone = _cli("query", str(tmp_path / "out"), COUNT, "--run-id", "bad")
    said = _said(alone)
    assert alone.returncode == 2 and "error: root: nothing left to read" in said, alone.stderr
    assert f"{bad}/_manifest.json is not valid JSON" in said and "Traceback" not in said
    unknown = _cli("query", str(tmp_path / "out"), COUNT, "--run-id", "nope")
    assert unknown.returncode == 2 and "run_id: no run 'nope'" in _said(unknown)


def test_run_preview_reads_through_the_same_guard(tmp_path):
    from pipeline.render import render_preview

    run = write_run(tmp_path / "out", "r1", shards=2, rows=2)
    change_an_id(run / part_name(0), "r1-00001", "r1-00000")
    console = Console(record=True, width=400)
    render_preview(str(run), 10, console)
    text = console.export_text()
    assert "part-s000000.parquet does not match its sha256" in text
    assert "r1-00002" in text and "r1-00000" not in text, "only the verified part's rows are shown"


# --- 2. links that leave the root -----------------------------------------------------------------------------------


@pytest.fixture
def linked_root(tmp_path) -> Path:
    """A root with a run, a link at its top and one inside the run to a directory outside, and a part moved outside
    with a link left in its place."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "note-7f3.txt").write_text("secret")
    (outside / "table-7f3.csv").write_text("a,b\n1,2\n")
    root = tmp_path / "out"
    run = write_run(root, "r1")
    (run / part_name(2)).rename(outside / "rows-7f3.parquet")  # the same bytes, now reached through a link
    (run / part_name(2)).symlink_to(outside / "rows-7f3.parquet")
    (root / "evil").symlink_to(outside)
    (run / "evil").symlink_to(outside)
    return root


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM glob('{root}/ev*/*')",
        "SELECT * FROM glob('{run}/e*/*')",
        "SELECT content FROM read_text('{root}/e*/note*')",
        "SELECT count(*) FROM read_parquet('{root}/e*/*.parquet')",
        "SELECT * FROM read_csv('{root}/e*/table*')",
        "SELECT * FROM read_csv('{run}/evil/table-7f3.csv')",
        "SELECT count(*) FROM read_parquet('{run}/part-s000002.parquet')",
    ],
)
def test_links_leaving_the_root_are_not_followed(linked_root, sql):
    run = next(linked_root.glob("model=*/run_date=*/run_id=r1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        con = connect(str(linked_root))
    with pytest.raises(QueryError, match="^sql: reads outside the output root are not allowed") as refused:
        run_query(con, sql.format(root=linked_root, run=run))
    assert "7f3" not in str(refused.value) or "7f3" in sql, "the refusal names no file found outside"
    assert _count(con) == (8, 8), "the views still answer, without the linked part"
    said = [(w.category.__name__, str(w.message)) for w in caught]
    assert [kind for kind, _ in said].count("LinkOutside") == 3, "the two links to the directory, the part's"
    assert ("DamagedPart", f"{run}/part-s000002.parquet is not a plain file (a link?)") in [
        (kind, text.split(", so")[0]) for kind, text in said
    ]


def test_a_link_inside_the_root_changes_nothing(tmp_path):
    root = tmp_path / "out"
    write_run(root, "r1")
    (root / "latest").symlink_to(next(root.glob("model=*")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        con = connect(str(root))
    n = run_query(con, f"SELECT count(*) AS n FROM glob('{root}/model=*/run_date=*/run_id=*/*.json')").to_pylist()
    assert n == [{"n": 1}], "a root without links leading out stays readable as a directory"


def test_cli_says_which_link_is_ignored(linked_root):
    out = _cli("query", str(linked_root), f"SELECT count(*) AS n FROM glob('{linked_root}/ev*/*')")
    said = _said(out)
    assert out.returncode == 2 and "reads outside the output root are not allowed" in said, out.stderr
    assert f"{linked_root}/evil is a link to" in said and "note-7f3" not in out.stdout + said


# --- 5. partitions from the run directory --------------------------------------------------------------------------


def test_model_and_date_come_from_the_run_directory(tmp_path):
    root = tmp_path / "model=wrong" / "run_date=1999-01-01" / "out"
    write_run(root, "r1", model="right")
    rows = run_query(connect(str(root)), "SELECT DISTINCT model, run_date FROM explanations").to_pylist()
    assert rows == [{"model": "right", "run_date": "2024-01-02"}]


# --- 3. time and memory limits ----------------------------------------------------------------------------------------


def test_a_query_stops_at_its_time_limit(tmp_path):
    write_run(tmp_path / "out", "r1")
    con = connect(str(tmp_path / "out"))
    started = time.monotonic()
    with pytest.raises(QueryError, match=r"^sql: stopped after 0.5 s, the time limit \(--timeout"):
        run_query(con, "SELECT count(*) FROM range(100000000) a, range(100000) b", timeout=0.5)
    assert time.monotonic() - started < 10
    assert _count(con) == (12, 12), "the connection answers the next query"
    out = _cli("query", str(tmp_path / "out"), "SELECT count(*) FROM range(100000000) a, range(100000) b",
               "--timeout", "0.5")  # fmt: skip
    assert out.returncode == 2 and "stopped after 0.5 s" in _said(out), out.stderr


def test_memory_and_spill_are_limited(tmp_path):
    write_run(tmp_path / "out", "r1")
    sql = "SELECT current_setting('memory_limit') AS m, current_setting('max_temp_directory_size') AS t"
    assert run_query(connect(str(tmp_path / "out")), sql).to_pylist() == [{"m": "1.8 GiB", "t": "7.4 GiB"}]
    out = _cli(
        "query", str(tmp_path / "out"), sql, "--memory-limit", "100MB", "--spill-limit", "1GB", "--format", "json"
    )
    assert out.returncode == 0 and json.loads(out.stdout) == [{"m": "95.3 MiB", "t": "953.6 MiB"}], out.stderr
    hungry = "SELECT count(DISTINCT i::VARCHAR || 'xxxxxxxxxxxxxxxx') FROM range(20000000) t(i)"
    with pytest.raises(QueryError, match="needs more memory than allowed .*--memory-limit and --spill-limit"):
        run_query(connect(str(tmp_path / "out"), memory_limit="30MB", spill_limit="1MB"), hungry)
    with pytest.raises(QueryError, match="^memory_limit / spill_limit: 'lots'"):
        connect(str(tmp_path / "out"), memory_limit="lots")


def test_bench_script_runs_on_a_small_run(tmp_path):
    out = tmp_path / "bench.json"
    bench = Path(__file__).parent.parent / "bench" / "bench_query_integrity.py"
    cmd = [sys.executable, str(bench), "--rows", "2500", "--repeat", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["rows"] == 2500 and result["parts"] == 1 and result["bytes"] > 0
    for key in ("cli_count_first_s", "cli_count_again_s", "connect_count_first_s", "sha256_all_parts_s"):
        assert result[key] > 0, key


def test_show_of_a_run_with_nothing_readable_says_why(tmp_path):
    bad = write_run(tmp_path / "out", "bad")
    (bad / MANIFEST).write_text("{not json")
    out = _cli("show", str(tmp_path / "out"), "bad-00000", "--run-id", "bad")
    said = _said(out)
    assert out.returncode == 2 and "nothing left to read" in said and "Traceback" not in out.stderr, out.stderr


def test_an_audit_passes_over_an_earlier_run_with_an_invalid_manifest(tmp_path):
    from pipeline.audit import previous_run
    from pipeline.jobspec import JobSpec
    from pipeline.query import list_runs

    root = tmp_path / "out"
    for run_id in ("2024-01-01", "2024-01-02", "2024-01-03"):
        run = write_run(root, run_id, model="tiny")
        manifest = json.loads((run / MANIFEST).read_text()) | {"job": "nightly"}
        (run / MANIFEST).write_text(json.dumps(manifest))
    (Path(run_glob(str(root), "tiny", "2024-01-02", "2024-01-02")) / MANIFEST).write_text("{not json")
    spec = JobSpec.model_validate({"name": "nightly", "model": {"id": "tiny"}, "input": {"path": "x.jsonl"},
                                   "output": {"root": str(root)}})  # fmt: skip
    current = next(r for r in list_runs(str(root)) if r.run_id == "2024-01-03")
    with pytest.warns(DamagedPart, match="2024-01-02/_manifest.json is not valid JSON"):
        before = previous_run(str(root), spec, current)
    assert before is not None and before.run_id == "2024-01-01"
