"""The part format (pipeline/parts.py): the rows a worker writes, their bytes and checksum, the v1-compatible views
generated from the schema, and the damaged-part guard that every reader of parts goes through. No model: the runs
are written directly."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import parts
from pipeline.layout import MANIFEST, SUCCESS, filesystem, parquet_bytes, part_name, run_glob
from pipeline.query import connect

WHEN = dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc)
BY = parts.Provenance("r1", "tiny", "abc", '{"factor": 0.9}', "word")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """The verified-parts cache of this test alone."""
    monkeypatch.setenv("ATMAN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def ok(pid: str, run_id: str = "r1") -> dict:
    return {"prompt_id": pid, "run_id": run_id, "model_id": "tiny", "status": "ok", "prompt": "a b",
            "unit_text": ["a", "b"], "unit_start": [0, 2], "unit_length": [1, 1], "scores": [0.5, -0.25],
            "written_at": WHEN}  # fmt: skip


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
    explanation = types.SimpleNamespace(
        target=" c", units=[("a", 0, 1), ("b", 2, 1)], scores=np.array([0.5, -0.25], np.float32), per_target=None,
        target_tokens=[" c"], base_target_ce=1.5, n_prompt_tokens=2, chat=False, image_units=None,
    )  # fmt: skip
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
