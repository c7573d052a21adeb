"""One large input file read by several tasks side by side, with the rows, ids and messages of a whole-file read.

JSONL and CSV (plain): cut at b_i = i * ``input.split_bytes``; piece i holds the lines that *start* in
[b_i, b_i+1) (a line starts at byte 0 or after a newline): it begins after the first newline at or after b_i - 1
and ends with the line that crosses b_i+1. A row's source, the id of a row without one and a message name its line,
and its ordinal (``file << ROW_BITS | line``) orders it, so a piece must know the number of its first line. A first
pass (``measure_text``: a task per piece, counting bytes, parsing nothing) counts each piece's newlines; the driver
adds them up (``text_pieces``) and each scan task starts at its first line's number. Staged rows are then exactly
a whole-file read's, and nothing downstream (ids, plan, shards) knows of pieces. The bytes are read twice; the
count costs a small part of the parse (bench/bench_split.py).

CSV: a quoted field may hold a line break, so a line start is not always a record start. The first pass also
counts quote characters: a writer that follows RFC 4180 (Python's csv, pandas) doubles a quote inside a quoted
field, so an odd count before a piece's start means it starts inside a field, and that piece is joined to the one
before it. A file that breaks the rule can still fool the count: a piece that reads a record past its end
(``reader.PieceOverrun``) has the file scanned again whole (``staging.stage_input``), and the run says so. A CSV
with a bare carriage return (a line end for the csv module, not for a newline count) is scanned whole.

Parquet: pieces of whole row groups, up to ``split_bytes`` (compressed) each; the first pass reads the footer.

A compressed file cannot be read from an offset, nor a saved dataset in pieces: one task each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from pipeline.jobspec import InputSpec, JobSpecError
from pipeline.layout import filesystem, storage_error
from pipeline.reader import InputFile, Piece, _compression, _open, open_parquet

CHUNK = 8 << 20


@dataclass(frozen=True)
class Counts:
    """What the first pass finds in one byte range of a JSONL/CSV file."""

    newlines: int
    first_newline: int | None
    """Offset (in the file) of the range's first newline; None when it has none."""
    quotes: int = 0
    """CSV: quote characters in the range."""
    quotes_to_first: int = 0
    """CSV: quote characters up to its first newline (all of them, when it has none)."""
    bare_cr: bool = False
    """CSV: a carriage return not followed by a newline."""


def cuts(file: InputFile, split_bytes: int) -> list[tuple[int, int]]:
    """The byte ranges the first pass reads: [0, b1 - 1), [b1 - 1, b2 - 1), ..., [bk - 1, size) for JSONL/CSV,
    the whole file (its footer) for Parquet; none for a file read whole (``split_bytes`` 0: every file)."""
    size = file.size
    if not split_bytes or size is None or size <= split_bytes or file.kind not in ("jsonl", "csv", "parquet"):
        return []
    if _compression(file.path):
        return []
    if file.kind == "parquet":
        return [(0, size)]
    edges = [0, *(b - 1 for b in range(split_bytes, size, split_bytes)), size]
    return list(zip(edges, edges[1:], strict=False))


def whole_note(file: InputFile, split_bytes: int) -> str | None:
    """What the run says of a file that is larger than a piece but read whole because it is compressed."""
    big = split_bytes and file.size is not None and file.size > split_bytes
    if big and file.kind in ("jsonl", "csv") and _compression(file.path):
        return (
            f"input: {file.name} is compressed: scanned by one task "
            "(plain files larger than input.split_bytes are scanned in pieces, in parallel)"
        )
    return None


def split(
    files: list[InputFile],
    input_json: str,
    split_bytes: int,
    tasks: Callable[[list[tuple]], list],
    notice: Callable[[str], None],
) -> dict[int, list[Piece]]:
    """File index -> its pieces, for the files read in pieces; the first pass runs as ``tasks`` (a call per byte
    range of a JSONL/CSV file, one per Parquet footer). ``notice`` hears which large files are read whole, and why."""
    calls, owners = [], []
    for i, f in enumerate(files):
        if note := whole_note(f, split_bytes):
            notice(note)
        for lo, hi in cuts(f, split_bytes):
            if f.kind == "parquet":
                calls.append((measure_parquet, input_json, asdict(f)))
            else:
                calls.append((measure_text, input_json, asdict(f), lo, hi))
            owners.append(i)
    found: dict[int, list] = {}
    for i, result in zip(owners, tasks(calls) if calls else [], strict=True):
        found.setdefault(i, []).append(result)
    out: dict[int, list[Piece]] = {}
    for i, results in found.items():
        f = files[i]
        if f.kind == "parquet":
            pieces, note = parquet_pieces(results[0], split_bytes), None
        else:
            pieces, note = text_pieces(f, cuts(f, split_bytes), results)
        if note:
            notice(note)
        if len(pieces) > 1:
            out[i] = pieces
    return out


@contextlib.contextmanager
def _reading(file: InputFile) -> Iterator[None]:
    """A store that cannot be read names the file, as the scan does."""
    try:
        yield
    except JobSpecError:
        raise
    except Exception as err:
        if not storage_error(err):
            raise
        raise JobSpecError(f"input.path: {file.name}: cannot read it ({type(err).__name__}: {err})") from None


def measure_text(input_json: str, file: dict, lo: int, hi: int) -> Counts:
    """Count the newlines (and, for a CSV, the quotes) of bytes [lo, hi) of a JSONL/CSV file (a task)."""
    spec, f = InputSpec.model_validate_json(input_json), InputFile(**file)
    fs, _ = filesystem(spec.path)
    newlines = quotes = quotes_to_first = 0
    first: int | None = None
    bare_cr = pending_cr = False
    csv = f.kind == "csv"
    with _reading(f), _open(fs, f, lo) as stream:
        pos = lo
        while pos < hi and (data := stream.read(min(CHUNK, hi - pos))):
            if first is None and (at := data.find(b"\n")) >= 0:
                first = pos + at
                quotes_to_first = quotes + (data.count(b'"', 0, at) if csv else 0)
            newlines += data.count(b"\n")
            if csv:
                quotes += data.count(b'"')
                bare = data.count(b"\r") - data.count(b"\r\n") - data.endswith(b"\r")  # a last one: see the next
                bare_cr |= bare > 0 or (pending_cr and not data.startswith(b"\n"))
                pending_cr = data.endswith(b"\r")
            pos += len(data)
        if pending_cr:
            bare_cr |= stream.read(1) != b"\n"
    return Counts(newlines, first, quotes, quotes if first is None else quotes_to_first, bare_cr)


def text_pieces(file: InputFile, ranges: list[tuple[int, int]], counts: list[Counts]) -> tuple[list[Piece], str | None]:
    """A JSONL/CSV file's pieces from the first pass's ``counts`` of ``ranges`` (``cuts``), and a note when a CSV
    is read whole (no pieces) for a reason the user should know."""
    if file.kind == "csv" and any(c.bare_cr for c in counts):
        return [], f"input: {file.name} has a carriage return without a newline after it: scanned by one task"
    size = ranges[-1][1]
    starts: list[tuple[int, int]] = []  # (offset, number of its line)
    line, quotes = 1, 0
    for i, c in enumerate(counts):
        start = 0 if i == 0 else None if c.first_newline is None else c.first_newline + 1
        inside = file.kind == "csv" and (quotes + c.quotes_to_first) % 2 == 1  # a quoted field's line break
        if start is not None and start < size and not (i and inside):
            starts.append((start, line + (i > 0)))
        line += c.newlines
        quotes += c.quotes
    ends = [*starts[1:], (size, None)]
    pieces = [
        Piece(start, stop, row, None if after is None else after - row)
        for (start, row), (stop, after) in zip(starts, ends, strict=True)
    ]
    return pieces, None


def measure_parquet(input_json: str, file: dict) -> list[tuple[int, int]]:
    """(compressed bytes, rows) of each row group of a Parquet file, from its footer (a task)."""
    spec, f = InputSpec.model_validate_json(input_json), InputFile(**file)
    fs, _ = filesystem(spec.path)
    with _reading(f):
        meta = open_parquet(fs, f.path).metadata
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    return [(sum(g.column(c).total_compressed_size for c in range(g.num_columns)), g.num_rows) for g in groups]


def parquet_pieces(groups: list[tuple[int, int]], split_bytes: int) -> list[Piece]:
    """Consecutive row groups, up to ``split_bytes`` each (a larger group is a piece of its own)."""
    pieces: list[Piece] = []
    start = size = row = first = 0
    for g, (nbytes, rows) in enumerate(groups):
        if g > start and size + nbytes > split_bytes:
            pieces.append(Piece(start, g, first))
            start, size, first = g, 0, row
        size += nbytes
        row += rows
    if groups:
        pieces.append(Piece(start, len(groups), first))
    return pieces
