"""The driver trusts nothing it reads back: a progress marker, an entry of ``_progress.json`` or ``_plan.json`` is a
claim checked against the plan and the parts. A record that does not hold is dropped with a notice naming it and
its shard is explained again; an unreadable progress record is rebuilt from the parts; an unreadable plan is staged
again when no part was written from it, else exit 2 saying what to do. Jobs run ``inline`` on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.job import run_job
from pipeline.jobspec import JobSpec, JobSpecError
from pipeline.layout import RunPaths

N = 12  # 4 shards of 3 rows (shard_rows 4, batch_rows 3: about four shards per actor, at least a batch)


def _spec(model_dir: str, tmp_path: Path) -> JobSpec:
    rows = [{"id": f"p{i}", "prompt": f"Prompt {i} talks about", "target": " cats"} for i in range(N)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return JobSpec.model_validate(
        {
            "name": "trust",
            "model": {"id": model_dir},
            "input": {"path": str(tmp_path / "in.jsonl")},
            "method": {"granularity": "word", "generate_max_tokens": 2},
            "output": {"root": str(tmp_path / "out")},
            "resources": {"batch_rows": 3, "shard_rows": 4},
        }
    )


def _ids(location: str) -> list[str]:
    table = ds.dataset(location, format="parquet").to_table(columns=["prompt_id"])
    return sorted(table.column("prompt_id").to_pylist())


def _as_killed(paths: RunPaths) -> dict[int, dict]:
    """The state a driver killed before folding any marker leaves: markers, no _progress.json, no _SUCCESS."""
    records = {r["shard"]: r for r in json.loads(Path(paths.progress).read_text())["shards"]}
    Path(paths.markers).mkdir(exist_ok=True)
    for shard, record in records.items():
        Path(paths.marker(shard)).write_text(json.dumps(record))
    Path(paths.progress).unlink()
    Path(paths.success).unlink()
    return records


@pytest.fixture
def done(tmp_path, tiny_model_dir):
    """A complete run of N rows and its paths."""
    spec = _spec(tiny_model_dir, tmp_path)
    summary = run_job(spec, "t1", address="inline")
    assert summary.counts == {"ok": N, "skipped": 0, "error": 0} and summary.shards == 4
    return spec, RunPaths.locate(str(tmp_path / "out"), tiny_model_dir, "t1")


def _rerun(spec: JobSpec) -> tuple[object, list[str]]:
    notes: list[str] = []
    summary = run_job(spec, "t1", address="inline", on_notice=notes.append)
    manifest = json.loads((Path(summary.location) / "_manifest.json").read_text())
    assert manifest["rows"] == N and manifest["counts"] == {"ok": N, "skipped": 0, "error": 0}, manifest["counts"]
    assert _ids(summary.location) == sorted(f"p{i}" for i in range(N)), "every input row exactly once"
    assert [f["name"] for f in manifest["files"]] == [f"part-s{s:06d}.parquet" for s in range(4)]
    return summary, notes


def test_a_marker_that_names_another_shard_is_dropped_and_both_shards_are_done(done):
    """Shard 3 is not written yet; the marker of shard 1 says shard 3. Trusted, it made shard 3 count as done
    with shard 1's part: _SUCCESS with 9 of 12 rows."""
    spec, paths = done
    records = _as_killed(paths)
    Path(paths.marker(3)).unlink()
    Path(paths.part("part-s000003.parquet")).unlink()
    Path(paths.marker(1)).write_text(json.dumps(records[1] | {"shard": 3}))
    summary, notes = _rerun(spec)
    assert any("shard 1: _progress/s000001.json says shard 3" in n for n in notes), notes
    assert summary.processed == 6, "shards 1 and 3 (3 rows each) are explained"


def test_marker_counts_are_checked_against_the_parts_status_column(done):
    """Counts that sum to the shard's rows but are not its part's made the manifest say error: 3 for an all-ok run."""
    spec, paths = done
    records = _as_killed(paths)
    wrong = records[2] | {"counts": {"ok": 0, "skipped": 0, "error": 3}}
    wrong.pop("check", None)  # as a marker of an older version, which has no check: only the part can say
    Path(paths.marker(2)).write_text(json.dumps(wrong))
    summary, notes = _rerun(spec)
    assert any(
        "shard 2: _progress/s000002.json has counts ok 0, skipped 0, error 3, its part's status column ok 3" in n
        for n in notes
    ), notes
    assert summary.processed == 3


def test_an_unreadable_marker_is_named_and_its_shard_redone(done):
    spec, paths = done
    _as_killed(paths)
    Path(paths.marker(0)).write_text('{"shard": 0, "part": ')
    summary, notes = _rerun(spec)
    assert any(n.startswith("shard 0: _progress/s000000.json is unreadable (JSONDecodeError: ") for n in notes), notes
    assert summary.processed == 3 and not list(Path(paths.markers).glob("*.json")), "markers folded"


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"part": "part-s000000.parquet"}, "names part 'part-s000000.parquet', not part-s000002.parquet"),
        ({"rows": 2}, "says rows: 2, the plan gives the shard 3"),
        ({"counts": {"ok": 2, "skipped": 0, "error": 0}}, "has counts ok 2, skipped 0, error 0, which sum to 2"),
        ({"counts": {"ok": 0, "skipped": 0, "error": 3}}, "does not match its own check"),
    ],
)
def test_an_entry_of_the_progress_record_that_does_not_hold_is_redone(done, change, said):
    spec, paths = done
    body = json.loads(Path(paths.progress).read_text())
    body["shards"][2].update(change)
    Path(paths.progress).write_text(json.dumps(body))
    summary, notes = _rerun(spec)
    assert any(n.startswith("shard 2: its entry in _progress.json ") and said in n for n in notes), notes
    assert summary.processed == 3, "only shard 2 is explained again"


@pytest.mark.parametrize("content", ["{", '{"shards": 5}', "\xff"])
def test_an_unreadable_progress_record_is_rebuilt_from_the_parts(done, content):
    spec, paths = done
    Path(paths.progress).write_bytes(content.encode("latin-1"))
    Path(paths.success).unlink()
    summary, notes = _rerun(spec)
    assert summary.processed == 0, "every part read back as its shard's"
    assert any("_progress.json of run t1 is unreadable" in n and "rebuilt from the parts" in n for n in notes), notes
    assert len(json.loads(Path(paths.progress).read_text())["shards"]) == 4, "the record is written again"
    assert Path(paths.success).exists()


def test_a_rebuilt_progress_record_redoes_a_part_that_is_not_its_shards(done):
    spec, paths = done
    Path(paths.progress).write_text("{")
    part = Path(paths.part("part-s000001.parquet"))
    part.write_bytes(Path(paths.part("part-s000002.parquet")).read_bytes())  # rows of another shard
    Path(paths.part("part-s000003.parquet")).write_bytes(b"not parquet")
    summary, notes = _rerun(spec)
    assert summary.processed == 6, "shards 1 and 3 are explained again"
    assert any("shard 1: part-s000001.parquet does not hold the shard's rows" in n for n in notes), notes
    assert any("shard 3: part-s000003.parquet is unreadable" in n for n in notes), notes


@pytest.mark.parametrize("content", ["{", '{"version": 3}'])
def test_an_unreadable_plan_with_parts_exits_2_saying_what_to_do(done, content):
    spec, paths = done
    Path(paths.plan).write_bytes(content.encode("latin-1"))
    for _ in range(2):  # the same clear message every time, never a JSONDecodeError
        with pytest.raises(JobSpecError) as caught:
            run_job(spec, "t1", address="inline")
        message = str(caught.value)
        assert message.startswith(f"run_id: the plan of run t1 ({paths.plan}) is unreadable (")
        assert "4 parts were written from it" in message and "Start a new run without --run-id" in message
        assert f"remove {paths.dir} and rerun with --run-id t1" in message


def test_an_unreadable_plan_without_parts_is_staged_again(tmp_path, tiny_model_dir, monkeypatch):
    import pipeline.job as job

    spec = _spec(tiny_model_dir, tmp_path)

    class Killed(BaseException):
        pass

    def die(*_a, **_k):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(job, "explain_phase", die)
        with pytest.raises(Killed):
            run_job(spec, "t1", address="inline")
    paths = RunPaths.locate(str(tmp_path / "out"), tiny_model_dir, "t1")
    Path(paths.plan).write_text('{"version": 3, "blocks": [')
    summary, notes = _rerun(spec)
    assert summary.processed == N
    assert any(f"{paths.plan} is unreadable (JSONDecodeError" in n and "staged again" in n for n in notes), notes


def test_a_plan_whose_shards_name_rows_it_does_not_have_is_not_trusted(done):
    spec, paths = done
    plan = json.loads(Path(paths.plan).read_text())
    plan["shards"][1] = [[0, 3, 7000]]
    Path(paths.plan).write_text(json.dumps(plan))
    with pytest.raises(JobSpecError, match=r"shard 1 names rows 3\.\.7000 of block 0"):
        run_job(spec, "t1", address="inline")
