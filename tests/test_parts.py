"""The part format (pipeline/parts.py): the rows a worker writes, their bytes and checksum, the v1-compatible views
generated from the schema, and the damaged-part guard that every reader of parts goes through. No model: the runs
are written directly."""

from __future__ import annotations

import hashlib
import json
import types
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import parts
from pipeline.layout import MANIFEST, SUCCESS, filesystem, parquet_bytes, part_name, run_glob
from pipeline.query import connect

BY = parts.Provenance("r1", "tiny", "abc", '{"factor": 0.9}', "word")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """The verified-parts cache of this test alone."""
    monkeypatch.setenv("ATMAN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def explained(target: str = " c"):
    """What the engine's Explanation gives a row (read by attribute), for a prompt "a b" of two word units."""
    return types.SimpleNamespace(
        target=target, units=[("a", 0, 1), ("b", 2, 1)], scores=np.array([0.5, -0.25], np.float32), per_target=None,
        target_tokens=[target], base_target_ce=1.5, n_prompt_tokens=2, chat=False, image_units=None,
    )  # fmt: skip


def ok(pid: str, run_id: str = "r1") -> dict:
    """An ok row as the worker writes it."""
    by = parts.Provenance(run_id, "tiny", "abc", "{}", "word")
    return parts.ok_row(by, {"prompt_id": pid, "prompt": "a b", "target": " c"}, explained(), latency_s=0.01)


def write_part(run: Path, shard: int, rows: list[dict], schema: pa.Schema = parts.SCHEMA) -> dict:
    """A part of ``rows`` (uncompressed: a test can change a byte in place) and its manifest entry."""
    run.mkdir(parents=True, exist_ok=True)
    data = parquet_bytes(pa.Table.from_pylist(rows, schema=schema), "none")
    (run / part_name(shard)).write_bytes(data)
    counts = {s: sum(r["status"] == s for r in rows) for s in parts.STATUSES}
    return {"name": part_name(shard), "shard": shard, "rows": len(rows), "bytes": len(data),
            "sha256": parts.sha256(data), "counts": counts}  # fmt: skip


def complete(run: Path, files: list[dict]) -> None:
    manifest = {"run_id": run.name.removeprefix("run_id="), "rows": sum(f["rows"] for f in files),
                "shards": len(files), "files": files}  # fmt: skip
    (run / MANIFEST).write_text(json.dumps(manifest))
    (run / SUCCESS).write_text("")


def flip_a_byte(part: Path) -> None:
    """One byte of the part's data (not its footer) changed: the same size, the file may still read."""
    data = bytearray(part.read_bytes())
    at = data.index(b"a b")  # a prompt's text: still valid Parquet, another value
    data[at] ^= 0x02
    part.write_bytes(bytes(data))


# --- rows, bytes, checksum -------------------------------------------------------------------------------------------


def test_each_row_kind_has_every_column_of_the_schema(tmp_path):
    request = {"prompt_id": "p", "prompt": "a b", "target": " c", "source": "in.jsonl:1", "chat": None,
               "metadata": None, "image_ref": None, "image_bytes": b"png"}  # fmt: skip
    explanation = explained()
    rows = [
        parts.skipped_row(BY, request, "prompt: empty"),
        parts.error_row(BY, request, "RuntimeError: boom"),
        parts.ok_row(BY, request, explanation, latency_s=0.25),
    ]
    for row in rows:
        assert list(row) == parts.SCHEMA.names
        assert (row["run_id"], row["model_revision"], row["granularity"], row["image"]) == (
            "r1",
            "abc",
            "word",
            "<bytes>",
        )
    assert [(r["status"], r["error"]) for r in rows] == [("skipped", "prompt: empty"), ("error", "RuntimeError: boom"),
                                                         ("ok", None)]  # fmt: skip
    assert rows[2]["unit_start"] == [0, 2] and rows[2]["latency_ms"] == 250.0 and rows[0]["scores"] is None
    table, data = parts.encode(rows, "zstd")
    assert table.schema == parts.SCHEMA and parts.sha256(data) == hashlib.sha256(data).hexdigest()
    path = tmp_path / "part.parquet"
    path.write_bytes(data)
    fs = filesystem(str(tmp_path))[0]
    assert parts.file_sha256(fs, str(path)) == parts.sha256(data)
    assert parts.read_part(fs, str(path)).to_pylist() == table.to_pylist()


# --- views over v1 and v2 parts ---------------------------------------------------------------------------------------


def test_image_units_of_v1_parts_have_the_types_of_v2_ones(tmp_path):
    """A root of v1 parts only (no image columns) still has the view image_units, empty, with the column types a
    root of v2 parts gives it: the v1 stand-in is generated from the schema."""
    v1 = pa.schema([f for f in parts.SCHEMA if f.name not in parts.V2_COLUMNS])
    old = Path(run_glob(str(tmp_path / "v1"), "m", "2024-01-02", "a"))
    complete(old, [write_part(old, 0, [ok("p1", "a")], v1)])
    new = Path(run_glob(str(tmp_path / "v2"), "m", "2024-01-02", "b"))
    image = ok("p2", "b") | {"image": "x.png", "image_width": 4, "image_height": 4, "image_box": [[0, 0, 4, 4]],
                             "image_view": ["full"], "image_scores": [0.5]}  # fmt: skip
    complete(new, [write_part(new, 0, [image])])

    def described(root: Path) -> list[tuple]:
        return [row[:2] for row in connect(str(root)).execute("DESCRIBE image_units").fetchall()]

    assert described(tmp_path / "v1") == described(tmp_path / "v2")
    assert connect(str(tmp_path / "v1")).execute("SELECT count(*) FROM image_units").fetchall() == [(0,)]
    assert connect(str(tmp_path / "v2")).execute("SELECT count(*) FROM image_units").fetchall() == [(1,)]


# --- the damaged-part guard on every reader, complete runs and incomplete ones ---------------------------------------


def unfinished_run(root: Path, run_id: str = "r1") -> Path:
    """An incomplete run of two shards (no manifest, no _SUCCESS): shard 0 folded into _progress.json, shard 1's
    marker still in _progress/; each record with its part's size and sha256, as the workers write them."""
    run = Path(run_glob(str(root), "m", "2024-01-02", run_id))
    first = write_part(run, 0, [ok(f"{run_id}-0", run_id)])
    second = write_part(run, 1, [ok(f"{run_id}-1", run_id)])
    records = [{"part": f.pop("name"), **f} for f in (first, second)]
    (run / "_progress.json").write_text(json.dumps({"updated_at": "2024-01-02T00:00:00+00:00", "shards": records[:1]}))
    (run / "_progress").mkdir()
    (run / "_progress" / "s000001.json").write_text(json.dumps(records[1]))
    return run


def test_a_preview_of_an_unfinished_run_does_not_show_a_part_with_a_flipped_byte(tmp_path):
    """``atman run --preview`` (render_preview) of an incomplete run: a part whose bytes are not those its progress
    record names is named in a warning and not drawn (it was drawn silently, its changed prompt as the heatmap)."""
    from rich.console import Console

    from pipeline.render import render_preview

    run = unfinished_run(tmp_path / "out")
    flip_a_byte(run / part_name(1))
    console = Console(record=True, width=400)
    render_preview(str(run), 10, console)
    text = console.export_text()
    assert "part-s000001.parquet does not match its sha256 in its progress record" in text, text
    assert "--run-id r1" in text, "the warning says how to repair it"
    assert "r1-0" in text and "r1-1" not in text and "c b" not in text, "only the part that matches is drawn"


def test_a_report_of_an_unfinished_run_leaves_a_changed_part_out(tmp_path):
    """``atman report --run-id`` reads an incomplete run: the heatmaps are those of verified parts only."""
    from pipeline.parts import DamagedPart
    from pipeline.report import run_report

    run = unfinished_run(tmp_path / "out")
    flip_a_byte(run / part_name(0))  # the record folded into _progress.json
    with pytest.warns(DamagedPart, match="part-s000000.parquet does not match its sha256"):
        html, shown = run_report(str(tmp_path / "out"), "r1")
    assert shown == 1 and "r1-1" in html and "r1-0" not in html


def test_an_unfinished_runs_parts_without_a_record_are_read_as_before(tmp_path):
    """A part no worker has recorded yet (its marker not written) cannot be checked: it is read, unverified, as
    every part of an incomplete run was; the parts with records are checked."""
    run = unfinished_run(tmp_path / "out")
    (run / "_progress" / "s000001.json").unlink()
    flip_a_byte(run / part_name(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left out, nothing is warned about
        con = connect(str(tmp_path / "out"), include_incomplete=True)
    assert con.execute("SELECT count(*) FROM explanations").fetchall() == [(2,)]


def test_a_complete_run_is_checked_against_its_manifest_not_its_progress(tmp_path):
    run = unfinished_run(tmp_path / "out")
    entries = [write_part(run, s, [ok(f"r1-{s}")]) for s in (0, 1)]
    complete(run, entries)
    (run / "_progress.json").write_text(json.dumps({"shards": []}))
    flip_a_byte(run / part_name(1))
    with pytest.warns(parts.DamagedPart, match="part-s000001.parquet does not match its sha256 in the manifest"):
        table = parts.read_run(str(run))
    assert table.column("prompt_id").to_pylist() == ["r1-0"]


def test_read_part_with_a_checksum_refuses_other_bytes(tmp_path):
    run = unfinished_run(tmp_path / "out")
    fs = filesystem(str(run))[0]
    record = parts.recorded_parts(fs, str(run))[part_name(0)]
    assert parts.read_part(fs, str(run / part_name(0)), expected=record["sha256"]).num_rows == 1
    flip_a_byte(run / part_name(0))
    with pytest.raises(parts.PartChanged, match="part-s000000.parquet does not match its sha256"):
        parts.read_part(fs, str(run / part_name(0)), expected=record["sha256"])


def test_a_retried_shard_keeps_nothing_of_a_part_its_record_does_not_vouch_for(tmp_path):
    """``--retry-errors`` keeps the rows a shard's part already has (``ExplainWorker._published``) only where the
    part is the one its progress record names: the rows of a changed part were kept and published again under a
    new checksum. Without a record (a shard found damaged is dropped from the record first) nothing is kept."""
    from pipeline.layout import RunPaths
    from pipeline.worker import ExplainWorker

    run = unfinished_run(tmp_path / "out")
    worker = ExplainWorker.__new__(ExplainWorker)  # no model: only what reads a published part
    worker.run = RunPaths(str(tmp_path / "out"), "m", "2024-01-02", "r1")
    worker.fs = worker.run.fs
    assert [r["prompt_id"] for r in worker._published(0)] == ["r1-0"]
    assert [r["prompt_id"] for r in worker._published(1)] == ["r1-1"], "a marker not yet folded is a record too"
    flip_a_byte(run / part_name(0))
    assert worker._published(0) == []
    (run / "_progress" / "s000001.json").unlink()
    assert worker._published(1) == []
