"""The data plane of a job (issue 13): shards and their parts, the progress record, damaged parts, the run lease,
input faults. Jobs run ``inline`` on the tiny model (the Ray path is covered by test_job.py / test_job_faults.py)."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.job import run_job
from pipeline.jobspec import JobSpec
from pipeline.layout import RunPaths
from pipeline.lease import Lease, RunLocked
from pipeline.query import DamagedPart, connect, run_query

ATMAN = str(Path(sys.executable).parent / "atman")


def _spec(model_dir, path, root, **resources) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "plane",
            "model": {"id": model_dir},
            "input": {"path": str(path)},
            "method": {"granularity": "word", "generate_max_tokens": 2},
            "output": {"root": str(root)},
            "resources": {"batch_rows": 3, "shard_rows": 4, **resources},
        }
    )


def _rows(n: int, prefix: str = "p") -> list[dict]:
    return [{"id": f"{prefix}{i}", "prompt": f"Prompt {i} talks about", "target": " cats"} for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _ids(location: str) -> list[str]:
    return ds.dataset(location, format="parquet").to_table(columns=["prompt_id"]).column("prompt_id").to_pylist()


def test_one_part_per_shard_with_size_and_checksum_in_the_manifest(tmp_path, tiny_model_dir):
    spec = _spec(tiny_model_dir, _jsonl(tmp_path / "in.jsonl", _rows(18)), tmp_path / "out")
    summary = run_job(spec, "s1", address="inline")
    run_dir = Path(summary.location)
    parts = sorted(p.name for p in run_dir.glob("part-*.parquet"))
    assert summary.shards == 5 and parts == [f"part-s{i:06d}.parquet" for i in range(5)], "4+4+4+4+2 rows"
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert [f["name"] for f in manifest["files"]] == parts and sum(f["rows"] for f in manifest["files"]) == 18
    for f in manifest["files"]:
        data = (run_dir / f["name"]).read_bytes()
        assert f["bytes"] == len(data) and len(f["sha256"]) == 64
    assert not (run_dir / "_staging").exists(), "the staged input is removed once the run is complete"
    assert sorted(_ids(summary.location)) == sorted(r["id"] for r in _rows(18))


def test_a_small_input_is_cut_into_about_four_shards_per_actor(tmp_path, tiny_model_dir):
    """Shards may cut a staging block (1,000 rows): 40 rows on 2 actors are 8 shards of 5, so both actors work."""
    spec = _spec(tiny_model_dir, _jsonl(tmp_path / "in.jsonl", _rows(40)), tmp_path / "out", actors=2, shard_rows=100)
    summary = run_job(spec, "small", address="inline")
    manifest = json.loads((Path(summary.location) / "_manifest.json").read_text())
    assert summary.shards == 8 and [f["rows"] for f in manifest["files"]] == [5] * 8
    assert sorted(_ids(summary.location)) == sorted(r["id"] for r in _rows(40))


def test_a_rerun_reads_the_progress_record_not_the_parts(tmp_path, tiny_model_dir, monkeypatch):
    spec = _spec(tiny_model_dir, _jsonl(tmp_path / "in.jsonl", _rows(10)), tmp_path / "out")
    run_job(spec, "s2", address="inline")
    opened = []
    real_read_table, real_file = pq.read_table, pq.ParquetFile
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: opened.append(a[0]) or real_read_table(*a, **k))
    monkeypatch.setattr(pq, "ParquetFile", lambda *a, **k: opened.append(a[0]) or real_file(*a, **k))
    again = run_job(spec, "s2", address="inline")
    assert again.processed == 0 and again.rows == 10
    assert opened == [], "no part (and no footer) is opened to learn what is written"


def test_markers_left_by_a_killed_driver_count_as_done(tmp_path, tiny_model_dir):
    """The driver folds markers into _progress.json; a driver killed before folding leaves them, and the rerun
    trusts them (after checking each part) instead of explaining the shard again."""
    spec = _spec(tiny_model_dir, _jsonl(tmp_path / "in.jsonl", _rows(8)), tmp_path / "out")
    first = run_job(spec, "s3", address="inline")
    paths = RunPaths.locate(str(tmp_path / "out"), tiny_model_dir, "s3")
    record = json.loads(Path(paths.progress).read_text())
    Path(paths.markers).mkdir(exist_ok=True)
    for shard in record["shards"]:  # as if none was folded, and the run had not completed
        Path(paths.marker(shard["shard"])).write_text(json.dumps(shard))
    Path(paths.progress).unlink()
    Path(paths.success).unlink()
    again = run_job(spec, "s3", address="inline")
    assert again.processed == 0 and again.counts == first.counts
    assert Path(paths.success).exists() and not list(Path(paths.markers).glob("*.json")), "markers folded"


@pytest.mark.parametrize("damage", ["truncate", "zero", "flip"])
def test_a_damaged_part_is_redone_on_resume_and_skipped_by_queries(tmp_path, tiny_model_dir, damage):
    spec = _spec(tiny_model_dir, _jsonl(tmp_path / "in.jsonl", _rows(10)), tmp_path / "out")
    summary = run_job(spec, "d1", address="inline")
    part = Path(summary.location) / "part-s000001.parquet"
    shard_rows = json.loads((Path(summary.location) / "_manifest.json").read_text())["files"][1]["rows"]
    data = bytearray(part.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "zero":
        data = bytearray(len(data))
    else:  # one byte inside a column chunk: only the checksum notices
        data[len(data) // 3] ^= 0xFF
    part.write_bytes(bytes(data))

    if damage != "flip":  # a query names the damaged part and answers from the others; it never crashes
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DamagedPart)
            con = connect(str(tmp_path / "out"))
        assert any("part-s000001.parquet" in str(w.message) for w in caught), [str(w.message) for w in caught]
        n = run_query(con, "SELECT count(*) AS n FROM explanations").column("n")[0].as_py()
        assert 0 < n < 10
        out = subprocess.run(
            [ATMAN, "query", str(tmp_path / "out"), "SELECT count(*) FROM explanations"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0 and "part-s000001.parquet" in out.stderr and "Traceback" not in out.stderr

    notes = []
    again = run_job(spec, "d1", address="inline", on_notice=notes.append)
    assert again.processed == shard_rows == 3, "the damaged shard (10 rows in shards of 3) is explained again"
    assert any("shard 1: part-s000001.parquet" in n for n in notes), notes
    assert sorted(_ids(again.location)) == sorted(r["id"] for r in _rows(10))
    manifest = json.loads((Path(again.location) / "_manifest.json").read_text())
    assert manifest["files"][1]["bytes"] == part.stat().st_size


def test_duplicate_ids_are_found_across_files_and_shards(tmp_path, tiny_model_dir):
    (tmp_path / "in").mkdir()
    _jsonl(tmp_path / "in" / "a.jsonl", _rows(6))
    _jsonl(tmp_path / "in" / "b.jsonl", [*_rows(3, "q"), {"id": "p1", "prompt": "again", "target": " x"}])
    summary = run_job(_spec(tiny_model_dir, tmp_path / "in", tmp_path / "out"), "dups", address="inline")
    table = ds.dataset(summary.location, format="parquet").to_table().to_pylist()
    rows = {r["prompt_id"]: r for r in table}
    assert len(table) == 10 and summary.counts == {"ok": 9, "skipped": 1, "error": 0}
    (dup,) = [r for k, r in rows.items() if k.startswith("p1#dup@")]
    assert dup["status"] == "skipped" and "duplicate id 'p1' (first at " in dup["error"] and "a.jsonl:2" in dup["error"]
    assert rows["p1"]["status"] == "ok", "the first occurrence (in input order, over all files) keeps the id"


def test_input_faults_become_rows_or_notices(tmp_path, tiny_model_dir):
    """A lone surrogate is a skipped row naming the field; compressed files are read, hidden and unknown files are
    named as not read; a byte-order mark does not cost the first row."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "bom", "prompt": "first row"}).encode() + b"\n")
    (d / "b.jsonl").write_text(
        '{"id": "sur", "prompt": "bad \\ud800 text"}\n{"id": "ok", "prompt": "fine text"}\n', encoding="utf-8"
    )
    with gzip.open(d / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "gz", "prompt": "compressed row"}) + "\n")
    (d / "_name.jsonl").write_text(json.dumps({"id": "hidden", "prompt": "x"}) + "\n")
    (d / "notes.txt").write_text("not an input\n")
    notes = []
    summary = run_job(_spec(tiny_model_dir, d, tmp_path / "out"), "faults", address="inline", on_notice=notes.append)
    rows = {r["prompt_id"]: r for r in ds.dataset(summary.location, format="parquet").to_table().to_pylist()}
    assert sorted(rows) == ["bom", "gz", "ok", "sur"]
    assert rows["sur"]["status"] == "skipped" and "prompt: not valid Unicode: a lone surrogate" in rows["sur"]["error"]
    assert rows["bom"]["status"] == rows["gz"]["status"] == "ok"
    assert sorted(summary.ignored) == sorted([str(d / "_name.jsonl"), str(d / "notes.txt")])
    assert sum("not read" in n for n in notes) == 2


def test_a_second_driver_on_a_run_exits_2_naming_the_holder(tmp_path, tiny_model_dir):
    spec = _spec(tiny_model_dir, _jsonl(tmp_path / "in.jsonl", _rows(4)), tmp_path / "out")
    paths = RunPaths.locate(str(tmp_path / "out"), tiny_model_dir, "l1")
    with Lease(paths) as holder:
        with pytest.raises(RunLocked, match=rf"^run_id: run l1 is being written by another driver \({holder.owner}"):
            run_job(spec, "l1", address="inline")
        (tmp_path / "job.yaml").write_text(spec.model_dump_json())
        out = subprocess.run(
            [ATMAN, "run", str(tmp_path / "job.yaml"), "--run-id", "l1", "--address", "inline"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 2 and "being written by another driver" in out.stderr, out.stderr
        assert not list(Path(paths.dir).glob("part-*")), "the second driver wrote nothing"
    assert run_job(spec, "l1", address="inline").counts["ok"] == 4, "once given back, the lease is free"


def test_a_lease_of_a_gone_driver_or_past_its_expiry_is_taken_over(tmp_path, tiny_model_dir):
    spec = _spec(tiny_model_dir, _jsonl(tmp_path / "in.jsonl", _rows(2)), tmp_path / "out")
    paths = RunPaths.locate(str(tmp_path / "out"), tiny_model_dir, "l2")
    os.makedirs(paths.dir, exist_ok=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    future = "2999-01-01T00:00:00+00:00"
    host = socket.gethostname()
    Path(paths.lease).write_text(
        json.dumps({"owner": "x", "host": host, "pid": gone.pid, "since": "?", "expires_at": future})
    )
    assert run_job(spec, "l2", address="inline").counts["ok"] == 2, "a SIGKILLed driver of this machine"
    Path(paths.lease).write_text(
        json.dumps(
            {"owner": "y", "host": "elsewhere", "pid": 1, "since": "?", "expires_at": "2000-01-01T00:00:00+00:00"}
        )
    )
    assert run_job(spec, "l2", address="inline").rows == 2, "an expired lease of another machine"
    assert not Path(paths.lease).exists()


@pytest.mark.parametrize("moment", ["staged, no plan", "planned, no part", "parts, no manifest"])
def test_a_driver_stopped_at_any_moment_leaves_a_run_its_rerun_completes(tmp_path, tiny_model_dir, moment, monkeypatch):
    """What a killed driver leaves on disk at three moments (the state is made by stopping the driver there; a
    SIGKILLed driver mid-explain is tests/test_job_faults.py): the rerun completes with every id exactly once."""
    import pipeline.job as job

    spec = _spec(tiny_model_dir, _jsonl(tmp_path / "in.jsonl", _rows(10)), tmp_path / "out")

    class Killed(BaseException):
        pass

    def die(*_a, **_k):
        raise Killed(moment)

    phases = {"staged, no plan": "make_plan", "planned, no part": "explain_phase", "parts, no manifest": "finalize"}
    target = phases[moment]
    with monkeypatch.context() as m:
        m.setattr(job, target, die)
        with pytest.raises(Killed):
            run_job(spec, "k1", address="inline")
    paths = RunPaths.locate(str(tmp_path / "out"), tiny_model_dir, "k1")
    assert not Path(paths.success).exists() and not Path(paths.lease).exists()
    again = run_job(spec, "k1", address="inline")
    assert again.counts["ok"] == 10 and sorted(_ids(again.location)) == sorted(r["id"] for r in _rows(10))
    assert again.processed == (0 if moment == "parts, no manifest" else 10)
