"""Poison rows: one bad row is one skipped row whose message names its line (its ``source``, file and line), never
the end of the job; a row past the size limit is dropped as it is read, not carried through staging, the worker's
tokenizer and the output. Ids a row without one gets (a hash of prompt and target) never take an id the input gives.
"""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.job import run_job
from pipeline.jobspec import InputSpec, JobSpec
from pipeline.reader import MAX_ROW_BYTES, _lines, read_input, stable_id

DEEP = "[" * 5000 + "]" * 5000  # past Python's recursion limit: json.loads raised RecursionError


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _rows(path: Path, **spec) -> dict[str, dict]:
    return {r["source"]: r for r in read_input(InputSpec(path=str(path), **spec)).to_pylist()}


def test_a_deeply_nested_line_is_one_skipped_row(tmp_path):
    path = _write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, '{"id": "deep", "prompt": ' + DEEP + "}"])
    rows = _rows(path)
    assert rows[f"{path}:2"]["input_error"] == "line 2: JSON nested too deeply to read"
    assert rows[f"{path}:1"]["input_error"] is None and len(rows) == 2


def test_a_deeply_nested_value_inside_a_row_is_one_skipped_row(tmp_path):
    """The line parses; a column's own JSON (a span written as a string) does not."""
    path = _write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x y", "span": DEEP}, {"id": "b", "prompt": "z"}])
    rows = _rows(path, explain_span_column="span")
    assert rows[f"{path}:1"]["input_error"] == f"{path}:1: a value nested too deeply to read"
    assert rows[f"{path}:2"]["input_error"] is None


def test_lines_past_the_limit_come_as_their_length_across_chunks():
    data = b"ab\n" + b"x" * 50 + b"\ncd\n" + b"y" * 10 + b"\n" + b"z" * 30
    for chunk in (7, 11, 1000):  # a long line across many chunks, one ending a chunk, all in one chunk
        assert list(_lines(io.BytesIO(data), chunk=chunk, limit=10)) == [b"ab\n", 50, b"cd\n", b"y" * 10 + b"\n", 30]


def test_a_50_mb_line_is_skipped_without_being_held(tmp_path):
    """Was: the line copied several times by the reader (+166 MB for 50 MB), staged, tokenised by the worker and
    written back as the output's prompt (an inline job: 299 s, 8.0 GB)."""
    big = {"id": "big", "prompt": "word " * (10 << 20)}
    path = _write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, big, {"id": "b", "prompt": "y"}])
    del big
    tracemalloc.start()
    try:
        rows = _rows(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    row = rows[f"{path}:2"]
    assert (
        row["input_error"].startswith("line 2: 52,428,8")
        and f"longer than a row may be ({MAX_ROW_BYTES:,})" in (row["input_error"])
    )
    assert row["prompt"] is None and row["prompt_id"] == f"row@{path}:2"
    assert peak < 3 * (8 << 20) < size / 2, f"peak {peak:,} bytes of Python memory for a {size:,}-byte file"
    assert [rows[f"{path}:{n}"]["prompt"] for n in (1, 3)] == ["x", "y"]


def test_a_prompt_past_the_limit_in_parquet_is_skipped_and_not_kept(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["x" * (MAX_ROW_BYTES + 1), "fine"]}), path)
    rows = _rows(path)
    assert rows[f"{path}:0"]["input_error"] == (
        f"prompt: {MAX_ROW_BYTES + 1:,} characters, longer than a prompt may be ({MAX_ROW_BYTES:,})"
    )
    assert rows[f"{path}:0"]["prompt"] is None and rows[f"{path}:1"]["input_error"] is None


def test_a_generated_id_never_takes_an_id_the_input_gives(tmp_path):
    """A row without an id gets the hash of its prompt and target; a real id equal to it was called a duplicate
    (of the generated one, or the generated one of it) and one of the two rows was not explained."""
    taken = stable_id("Hello", " world")
    for order in ("generated first", "given first"):
        lines = [{"prompt": "Hello", "target": " world"}, {"id": taken, "prompt": "Another prompt"}]
        path = _write(tmp_path / f"{order}.jsonl", lines if order == "generated first" else lines[::-1])
        rows = {r["prompt"]: r for r in _rows(path).values()}
        assert rows["Another prompt"]["prompt_id"] == taken, order
        assert rows["Hello"]["prompt_id"] == f"{taken}#2", order
        assert rows["Hello"]["input_error"] is None and rows["Another prompt"]["input_error"] is None, order


def test_rows_without_ids_with_the_same_prompt_and_target_say_so(tmp_path):
    same = {"prompt": "Hello", "target": " world"}
    path = _write(tmp_path / "in.jsonl", [same, {"id": "x", "prompt": "y"}, same])
    error = _rows(path)[f"{path}:3"]["input_error"]
    assert error.startswith(f"the same prompt and target as the row at {path}:1 (neither has an id"), error
    assert "duplicate id" not in error


def test_a_job_with_poison_rows_finishes_with_each_one_skipped(tmp_path, tiny_model_dir):
    taken = stable_id("Prompt 0 talks about", " cats")
    lines = [{"prompt": "Prompt 0 talks about", "target": " cats"}, '{"id": "deep", "prompt": ' + DEEP + "}"]
    lines += [{"id": taken, "prompt": "Prompt 1 talks about"}, {"id": "long", "prompt": "x" * (MAX_ROW_BYTES + 8)}]
    path = _write(tmp_path / "in.jsonl", lines)
    spec = JobSpec.model_validate(
        {
            "name": "poison",
            "model": {"id": tiny_model_dir},
            "input": {"path": str(path)},
            "method": {"granularity": "word", "generate_max_tokens": 2},
            "output": {"root": str(tmp_path / "out")},
            "resources": {"batch_rows": 2, "shard_rows": 2},
        }
    )
    summary = run_job(spec, "p1", address="inline")
    assert summary.counts == {"ok": 2, "skipped": 2, "error": 0}
    out = {r["source"]: r for r in pq.read_table(summary.location).to_pylist()}
    assert out[f"{path}:2"]["error"] == "line 2: JSON nested too deeply to read"
    assert out[f"{path}:4"]["error"].startswith("line 4: 4,194,3") and out[f"{path}:4"]["prompt"] is None
    assert {out[f"{path}:1"]["prompt_id"], out[f"{path}:3"]["prompt_id"]} == {f"{taken}#2", taken}
