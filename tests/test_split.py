"""One large input file scanned in pieces by separate tasks (pipeline/pieces.py): byte ranges of JSONL and CSV,
row groups of Parquet. Every test compares the staged rows (ids after resolution, ordinals, sources, messages, in
input order) of a split scan with those of a whole-file scan of the same file, with boundaries placed on the cases
that break a naive split."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from seaweed import s3_bucket, s3_server  # noqa: F401 - fixtures

from pipeline import job
from pipeline.executors import RayExecutor
from pipeline.jobspec import JobSpec, JobSpecError, load_job
from pipeline.layout import RunPaths
from pipeline.plan import PLAN_VERSION, Plan
from pipeline.reader import list_input
from pipeline.staging import read_shard, remove_staging

WHOLE = 1 << 40
DEMO = str(Path(__file__).parents[1] / "jobs/examples/demo.yaml")
SPLIT = 1024  # the least split_bytes: pieces of 1 KiB


def _spec(path: Path, root: Path, split_bytes: int, model: str = "unused", **input_keys) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "split",
            "model": {"id": model},
            "input": {"path": str(path), "split_bytes": split_bytes, **input_keys},
            "method": {"granularity": "word", "generate_max_tokens": 2},
            "output": {"root": str(root)},
            "resources": {"batch_rows": 4, "shard_rows": 50},
        }
    )


def _staged(tmp_path: Path, path: Path, split_bytes: int, address: str = "inline", **input_keys):
    """(rows with their final ids, in plan order; notices; plan) of staging ``path`` as a run does."""
    spec = _spec(path, tmp_path / f"out-{split_bytes}-{address}", split_bytes, **input_keys)
    notes: list[str] = []
    attempt = job.open_run(spec, "r", address, False, notes.append)
    with attempt.executor:
        plan = job._stage(attempt, list_input(spec.input), split_bytes)
    paths = attempt.paths
    rows = [r for s in range(len(plan.shards)) for r in read_shard(paths, plan.segments(s)).to_pylist()]
    return rows, notes, plan


def _pieces(plan: Plan) -> int:
    return len({b.name.rsplit("-b", 1)[0] for b in plan.blocks})


def _same_as_whole(tmp_path: Path, path: Path, split_bytes: int = SPLIT, **input_keys):
    whole, whole_notes, _ = _staged(tmp_path, path, WHOLE, **input_keys)
    rows, notes, plan = _staged(tmp_path, path, split_bytes, **input_keys)
    assert [r["ordinal"] for r in rows] == sorted(r["ordinal"] for r in rows), "input order"
    for i, (got, want) in enumerate(zip(rows, whole, strict=True)):
        assert got == want, f"row {i}"
    assert whole_notes == []
    return rows, notes, plan


def _fill(out: bytearray, offset: int, line) -> None:
    """Append one line (``line(n)`` is n bytes long) so that the content ends exactly at ``offset``."""
    n = offset - len(out)
    assert n >= 40, "room for a filler line"
    out += line(n)
    assert len(out) == offset


def _jsonl_line(n: int) -> bytes:
    head = b'{"id": "fill%06d", "prompt": "' % n
    return head + b"x" * (n - len(head) - 3) + b'"}\n'


def _row(i: int, *, id_: str | None = None) -> bytes:
    row = {"prompt": f"Prompt {i} talks about", "target": " cats"}
    if id_ is not None:
        row["id"] = id_
    return json.dumps(row).encode() + b"\n"


def test_jsonl_in_pieces_reads_as_whole_with_boundary_cases(tmp_path):
    out = bytearray(b"\xef\xbb\xbf")  # a byte-order mark: part of no row
    out += b"".join(_row(i, id_=f"r{i}") for i in range(8))
    _fill(out, SPLIT, _jsonl_line)
    out += b"\n" + _row(100, id_="blank-before")  # a blank line starting exactly at a piece start
    _fill(out, 2 * SPLIT, _jsonl_line)
    out += b"{not json\n" + b'"a string"\n'  # a bad line starting exactly at a piece start
    _fill(out, 3 * SPLIT - 1, _jsonl_line)  # its newline is at b - 2: the next line starts at b - 1
    out += _row(200, id_="twice") + _row(201, id_="twice")  # a repeated id: the repeat gets its own id and a message
    _fill(out, 4 * SPLIT, _jsonl_line)  # a line ends at b - 1: the next one starts the piece
    out += _row(300, id_="r300").rstrip(b"\n") + b"\r\n"  # CRLF
    out += b'{"id": "long", "prompt": "' + b"y" * (2 * SPLIT + 7) + b'"}\n'  # over two boundaries: an empty piece
    out += _row(400)  # no id: a hash of prompt + target
    out += b'{"id": "bad-utf8", "prompt": "\xff"}\n' + b'{"id": "no-prompt"}\n' + b'{"prompt": 7}\n'
    out += b"".join(_row(i, id_="r0" if i == 500 else f"r{i}").replace(b"\n", b"\r\n") for i in range(500, 520))
    out += _row(999, id_="last").rstrip(b"\n")  # no newline at the end
    path = tmp_path / "in.jsonl"
    path.write_bytes(bytes(out))
    rows, notes, plan = _same_as_whole(tmp_path, path)
    assert _pieces(plan) >= 6 and notes == []
    by_id = {r["prompt_id"]: r for r in rows}
    assert by_id["blank-before"]["source"] == f"{path}:11", "line numbers count the blank line"
    assert [r["input_error"] for r in rows if r["source"] in (f"{path}:13", f"{path}:14")] == [
        "line 13: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "line 14: a JSON object is expected, got str",
    ]
    dup = [r for r in rows if r["prompt_id"].startswith("twice#dup@")]
    assert len(dup) == 1 and "first at" in dup[0]["input_error"] and dup[0]["input_error"].endswith("not explained")
    assert rows[0]["prompt_id"] == "r0" and rows[-1]["prompt_id"] == "last"


def test_jsonl_split_sizes_that_do_not_divide_the_lines_evenly(tmp_path):
    """Boundaries at many offsets of a file with blank, bad and id-less lines every few lines."""
    lines = []
    for i in range(240):
        kind = i % 7
        lines.append(
            b""
            if kind == 0
            else b"[1, 2]"
            if kind == 3
            else json.dumps({"prompt": f"Line {i} " + "z" * (i % 13)}).encode()
            if kind == 5
            else json.dumps({"id": f"k{i % 90}", "prompt": f"Line {i}", "target": " t"}).encode()
        )
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    for split_bytes in (SPLIT, 1031, 1500, 4099):
        _, _, plan = _same_as_whole(tmp_path / str(split_bytes), path, split_bytes)
        assert _pieces(plan) == -(-path.stat().st_size // split_bytes), split_bytes


def test_a_piece_without_the_prompt_key_is_fine_a_file_without_it_is_not(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(_row(i, id_=f"a{i}") for i in range(5)) + b'{"text": "t"}\n' * 200)
    _, _, plan = _same_as_whole(tmp_path, path)
    assert _pieces(plan) >= 3, "the later pieces have rows, none with the prompt key"
    path.write_bytes(b'{"text": "t"}\n' * 300)
    for split_bytes in (WHOLE, SPLIT):
        with pytest.raises(JobSpecError, match="input.prompt_column: no line of .* has a 'prompt' key"):
            _staged(tmp_path / str(split_bytes), path, split_bytes)


def _csv_line(n: int) -> bytes:
    head = b"fill%06d," % n
    return head + b"x" * (n - len(head) - 3) + b",t\n"


def test_csv_in_pieces_reads_as_whole_with_boundary_cases(tmp_path):
    out = bytearray(b"id,prompt,target\r\n")
    text = io.StringIO()
    writer = csv.writer(text)  # RFC 4180 quoting, CRLF line ends
    for i in range(10):
        writer.writerow([f"c{i}", f'Prompt {i}, with a comma and a "quote"', " t"])
    out += text.getvalue().encode()
    _fill(out, SPLIT, _csv_line)
    out += b"\r\n" + b"only,two\r\n"  # a blank line, then a row of two fields, at a piece start
    _fill(out, 2 * SPLIT - 20, _csv_line)
    out += b'multi,"a field with' + b"\r\n" * 3 + b'line breaks across a boundary",t\r\n'  # joined pieces
    _fill(out, 3 * SPLIT - 1, _csv_line)
    out += b"c3,dup of an earlier id,t\r\n" + b",,t\r\n"  # a repeat; an empty prompt and no id
    _fill(out, 4 * SPLIT, _csv_line)
    out += b"".join(b"e%d,end %d,t\r\n" % (i, i) for i in range(30)) + b"last,no newline at the end,t"
    path = tmp_path / "in.csv"
    path.write_bytes(bytes(out))
    rows, notes, plan = _same_as_whole(tmp_path, path)
    assert notes == [] and _pieces(plan) == 4, "the piece starting inside the quoted field is joined to its neighbour"
    assert [r["input_error"] for r in rows if r["source"] == f"{path}:14"] == ["line 14: 2 fields, the header has 3"]
    multi = next(r for r in rows if r["prompt_id"] == "multi")
    assert multi["prompt"].count("\n") == 3 and multi["source"].endswith(":19"), "a record's line is its last"


def test_csv_that_fools_the_quote_count_is_scanned_again_whole(tmp_path):
    """A stray quote in an unquoted field (not RFC 4180; the csv module reads it as a character) evens out the
    count before a quoted line break: the piece that reads the record past its end says so, and the file is
    scanned whole, with a notice."""
    out = bytearray(b"id,prompt,target\n" + b'stray,5" screen,t\n')
    _fill(out, SPLIT - 8, _csv_line)
    out += b'multi,"starts here\nand ends past the boundary",t\n'
    out += b"".join(b"e%d,end %d,t\n" % (i, i) for i in range(120))
    path = tmp_path / "in.csv"
    path.write_bytes(bytes(out))
    rows, notes, plan = _same_as_whole(tmp_path, path)
    assert notes == [f"input: {path}: a quoted CSV field holds a line break where a piece starts: scanned by one task"]
    assert _pieces(plan) == 1 and all("-p" not in b.name for b in plan.blocks)
    staged = sorted(p.name for p in Path(tmp_path / f"out-{SPLIT}-inline").rglob("_staging/f*.parquet"))
    assert staged == [b.name for b in plan.blocks], "the pieces' blocks are removed"
    assert next(r for r in rows if r["prompt_id"] == "multi")["prompt"] == "starts here\nand ends past the boundary"


def test_csv_with_bare_carriage_returns_is_scanned_whole(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(b"id,prompt\r" + b"".join(b"m%d,old mac line %d\r" % (i, i) for i in range(200)))
    rows, notes, plan = _same_as_whole(tmp_path, path)
    assert len(rows) == 200 and _pieces(plan) == 1
    assert notes == [f"input: {path} has a carriage return without a newline after it: scanned by one task"]


def test_parquet_in_pieces_of_row_groups(tmp_path):
    ids = [None if i % 11 == 0 else f"q{i % 170}" for i in range(400)]
    prompts = [None if i % 37 == 0 else f"Parquet prompt {i} " + "w" * (i % 23) for i in range(400)]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path, row_group_size=40, compression="none")
    assert pq.ParquetFile(path).metadata.num_row_groups == 10
    rows, notes, plan = _same_as_whole(tmp_path, path, 2 * SPLIT)
    assert notes == [] and 3 <= _pieces(plan) <= 10 and len(rows) == 400
    assert rows[-1]["source"] == f"{path}:399"


def test_a_compressed_file_is_scanned_whole_and_the_run_says_so(tmp_path):
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(_row(i, id_=f"z{i}") for i in range(300)), mtime=0))
    small = tmp_path / "small.jsonl.gz"
    small.write_bytes(gzip.compress(_row(0, id_="s"), mtime=0))
    assert path.stat().st_size > SPLIT
    rows, notes, plan = _same_as_whole(tmp_path, path)
    assert _pieces(plan) == 1 and len(rows) == 300
    assert notes == [
        f"input: {path} is compressed: scanned by one task "
        "(plain files larger than input.split_bytes are scanned in pieces, in parallel)"
    ]
    assert _staged(tmp_path / "small", small, SPLIT)[1] == [], "a small compressed file is no news"


def test_the_first_pass_counts_lines_and_quotes_of_its_range(tmp_path):
    from pipeline.pieces import measure_text

    path = tmp_path / "in.csv"
    path.write_bytes(b'a,"b\nc",d\r\ne\rf\n')
    spec = _spec(path, tmp_path, SPLIT).input.model_dump_json()
    file = {"path": str(path), "kind": "csv", "size": 15}
    whole = measure_text(spec, file, 0, 15)
    assert (whole.newlines, whole.first_newline, whole.quotes, whole.quotes_to_first) == (3, 4, 2, 1)
    assert whole.bare_cr, "the \\r before f"
    assert not measure_text(spec, file, 0, 10).bare_cr, "the \\r at its end is followed by \\n"
    assert measure_text(spec, file, 5, 9).first_newline is None


def test_split_bytes_is_checked_and_a_bad_value_names_it(tmp_path):
    for bad in ("0", "1023", "lots", "1.5"):
        with pytest.raises(JobSpecError, match=r"input\.split_bytes: "):
            load_job(DEMO, [f"input.split_bytes={bad}"])
    assert load_job(DEMO).input.split_bytes == 64 << 20  # a JobSpecError exits 2 (tests/test_cli.py)


def test_a_plan_written_before_pieces_loads_and_its_rerun_stages_files_whole(tmp_path, tiny_model_dir):
    """A run planned by the earlier version (plan version 2, no split_bytes, every file one task) whose staging is
    gone: the rerun stages the input as that plan did, whatever input.split_bytes says now."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(_row(i, id_=f"o{i}") for i in range(20)))
    spec = _spec(path, tmp_path / "out", WHOLE, model=tiny_model_dir)
    first = job.run_job(spec, "old", address="inline")
    paths = RunPaths.locate(spec.output.root, spec.model.id, "old")
    plan = json.loads(Path(paths.plan).read_text())
    assert plan["version"] == PLAN_VERSION == 3
    del plan["split_bytes"]
    plan["version"] = 2
    Path(paths.plan).write_text(json.dumps(plan))
    assert Plan.from_json(Path(paths.plan).read_bytes()).split_bytes == 0
    remove_staging(paths)
    for part in Path(first.location).glob("part-*.parquet"):
        part.unlink()  # every shard is explained again, from a staging made again
    again = job.run_job(_spec(path, tmp_path / "out", SPLIT, model=tiny_model_dir), "old", address="inline")
    assert path.stat().st_size > SPLIT and again.processed == again.rows == first.rows == 20
    with pytest.raises(ValueError, match="version 9 is not 2 or 3"):
        Plan.from_json(json.dumps({**plan, "version": 9}).encode())


def test_the_output_of_a_split_run_is_the_output_of_a_whole_one(tmp_path, tiny_model_dir):
    out = bytearray()
    for i in range(36):
        out += _row(i, id_=f"o{i % 30}") if i % 9 else b"{broken\n"
        if i == 20:
            out += b'{"id": "o99", "prompt": "' + b"pad " * 300 + b'", "target": " t"}\n'
    path = tmp_path / "in.jsonl"
    path.write_bytes(bytes(out))
    cols = ["prompt_id", "status", "error", "source"]
    tables = []
    for split_bytes in (WHOLE, SPLIT):
        spec = _spec(path, tmp_path / f"out-{split_bytes}", split_bytes, model=tiny_model_dir)
        summary = job.run_job(spec, "o", address="inline")
        parts = sorted(Path(summary.location).glob("part-*.parquet"))
        tables.append(pa.concat_tables([pq.read_table(p, columns=cols) for p in parts]).to_pylist())
    assert tables[0] == tables[1] and len(tables[0]) == 37
    assert {r["status"] for r in tables[0]} == {"ok", "skipped"}
    assert ds.dataset(str(tmp_path / f"out-{SPLIT}"), format="parquet").count_rows() >= 37


@pytest.mark.cluster
def test_pieces_are_ray_tasks_and_read_as_whole(tmp_path, ray_cluster, monkeypatch):
    """Each piece is a task of its own (its first pass too): the driver hands Ray one call per piece."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(_row(i, id_=f"y{i % 120}") for i in range(160)) + b"\n{bad\n")
    batches: list[list[str]] = []
    scan = RayExecutor.scan

    def spy(self, calls):
        batches.append([fn.__name__ for fn, *_ in calls])
        return scan(self, calls)

    monkeypatch.setattr(RayExecutor, "scan", spy)
    rows, notes, plan = _staged(tmp_path, path, SPLIT, address="auto")
    whole, _, _ = _staged(tmp_path, path, WHOLE)
    pieces = -(-path.stat().st_size // SPLIT)
    assert batches == [["measure_text"] * pieces, ["scan_file"] * pieces]
    assert _pieces(plan) == pieces and rows == whole and notes == []


def test_small_files_get_no_first_pass(tmp_path):
    from pipeline.pieces import split

    (tmp_path / "small.jsonl").write_bytes(_row(0, id_="a"))
    (tmp_path / "small.csv").write_bytes(b"id,prompt\na,b\n")
    files = list_input(_spec(tmp_path, tmp_path, SPLIT).input).files
    assert len(files) == 2 and split(files, "{}", SPLIT, lambda calls: pytest.fail(f"tasks {calls}"), print) == {}


def _by_pieces(path: Path, kind: str, split_bytes: int) -> tuple[list[dict], list[dict], str | None, bool]:
    """(rows of a whole-file read, rows read piece by piece, the pieces' note, whether a CSV piece overran): the
    reader alone, with any piece size (the job spec's least is 1 KiB)."""
    from pipeline.pieces import cuts, measure_text, text_pieces
    from pipeline.reader import InputFile, PieceOverrun, PromptColumnMissing, iter_requests

    spec = _spec(path, path.parent, SPLIT).input
    file = InputFile(str(path), kind, path.stat().st_size)
    ranges = cuts(file, split_bytes)
    counts = [measure_text(spec.model_dump_json(), dataclasses.asdict(file), lo, hi) for lo, hi in ranges]
    pieces, note = text_pieces(file, ranges, counts) if ranges else ([], None)
    rows, overran = [], False
    for piece in pieces or [None]:
        try:
            for row in iter_requests(spec, file, 0, piece):
                rows.append(row)
        except PromptColumnMissing:  # of one piece: the file's first line has the key
            pass
        except PieceOverrun:
            overran = True
    return list(iter_requests(spec, file, 0)), rows, note, overran


_jsonl_lines = st.one_of(
    st.builds(lambda i, t: json.dumps({"id": f"h{i}", "prompt": t}).encode(), st.integers(0, 5), st.text(max_size=8)),
    st.binary(max_size=12).filter(lambda b: b"\n" not in b),
    st.sampled_from([b"", b"\r", b"   ", b"[]", b'{"prompt": 3}']),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(_jsonl_lines, min_size=1, max_size=25),
    crlf=st.booleans(),
    last_newline=st.booleans(),
    split_bytes=st.integers(1, 70),
)
def test_any_jsonl_read_in_pieces_of_any_size_reads_as_whole(tmp_path, lines, crlf, last_newline, split_bytes):
    end = b"\r\n" if crlf else b"\n"
    path = tmp_path / "p.jsonl"
    path.write_bytes(end.join([b'{"prompt": "first"}', *lines]) + (end if last_newline else b""))
    whole, rows, note, overran = _by_pieces(path, "jsonl", split_bytes)
    assert rows == whole and note is None and not overran


_cells = st.lists(st.sampled_from([*'ab ,"\n', "\r\n", "é"]), max_size=10).map("".join)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(_cells, _cells), min_size=1, max_size=20),
    stray=st.lists(st.sampled_from(['x,5" y', '"', 'a"b,"c', ""]), max_size=3),
    terminator=st.sampled_from(["\r\n", "\n"]),
    split_bytes=st.integers(1, 60),
)
def test_any_csv_read_in_pieces_reads_as_whole_or_says_it_cannot(tmp_path, rows, stray, terminator, split_bytes):
    """RFC 4180 CSV (Python's writer: quoted line breaks, doubled quotes) read in pieces reads as whole; a file
    with stray quotes either does too or a piece says it overran (and the file is scanned whole)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator=terminator)
    writer.writerow(["prompt", "target"])
    writer.writerows(rows)
    path = tmp_path / "p.csv"
    path.write_bytes((text.getvalue() + terminator.join(stray)).encode())
    whole, got, note, overran = _by_pieces(path, "csv", split_bytes)
    if not stray:
        assert not overran, "an RFC 4180 file never overruns: the quote count joins the pieces it would cut"
    if not overran and note is None:
        assert got == whole


def test_pieces_of_files_on_s3_read_as_whole(tmp_path, s3_server, s3_bucket):  # noqa: F811
    """On S3 a piece is read from its offset with exact range reads (no read-ahead past its end)."""
    fs = s3_server.filesystem()
    jsonl = b"".join(_row(i, id_=f"s{i % 40}") for i in range(60)) + b"{bad\n\n" + _row(99, id_="end").rstrip(b"\n")
    fs.pipe_file(f"{s3_bucket}/in.jsonl", jsonl)
    fs.pipe_file(f"{s3_bucket}/in.csv", b"id,prompt\r\n" + b"".join(b'c%d,"p %d\nx"\r\n' % (i, i) for i in range(400)))
    for name, first_line in (("in.jsonl", 1), ("in.csv", 3)):
        rows, notes, plan = _same_as_whole(tmp_path / name, f"s3://{s3_bucket}/{name}")
        assert _pieces(plan) > 1 and notes == []
        assert rows[0]["source"] == f"{s3_bucket}/{name}:{first_line}"
