"""Reading a job's input as a stream of requests (INPUT_SCHEMA), every row accounted for.

Files: JSONL, CSV (plain or compressed: .gz, .bz2, .xz, .zst), Parquet (a file, a directory or a glob) or a
``datasets.save_to_disk`` directory, local or s3://. ``list_input`` names the files (the driver's only read of
the input: a listing); ``iter_requests`` streams one file's rows, where the job processes them; ``resolve_ids``
gives every row without a usable id, and every repeat of an id, an id of its own, over all files at once and out
of core (DuckDB), so no process holds every id in memory. ``read_input`` does all three in memory (small inputs).

A broken spec or file (no such path, unknown format, a configured column that the data lacks) raises
``JobSpecError`` naming the file and the field; a broken *row* (invalid UTF-8, JSON or Unicode, missing or
non-string prompt, duplicate id, ...) becomes a row with ``input_error`` set, written by the job as ``skipped``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.jobspec import InputSpec, JobSpecError
from pipeline.layout import filesystem, storage_error, url

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
_GLOB_CHARS = "*?["
ROW_BITS = 40
"""A row's ordinal is ``file_index << ROW_BITS | row``: input order over all files, one integer."""
MAX_ROW_BYTES = 4 << 20
"""A JSONL line (or a prompt, in characters) longer than this is a skipped row, dropped as it is read: 4 MiB of
text is about a million tokens, past the context of the models this explains, and holding it cost the whole job
(a 50 MB line: copied by the reader, staged, tokenised by the worker, written back as the output's prompt)."""

# --- the input side's formats: one place for what the reader hands on and what staging stores ------------------

INPUT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("target", pa.string()),
        pa.field("explain_span", pa.string()),  # JSON [[start, end], ...] or null
        pa.field("chat", pa.bool_()),
        pa.field("metadata", pa.string()),
        pa.field("source", pa.string()),
        pa.field("input_error", pa.string()),  # set: the row is written as 'skipped' with this reason
        pa.field("image_ref", pa.string()),  # input.image_column as a path / URI (relative ones resolved)
        pa.field("image_bytes", pa.binary()),  # input.image_column as the image's bytes
    ]
)
"""What the reader hands to the actors: one row per input row, problems already named."""
STAGED_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string()),  # null until resolve_ids chooses one (a row without a usable id)
        *(f for f in INPUT_SCHEMA if f.name != "prompt_id"),
        pa.field("ordinal", pa.int64(), nullable=False),
        pa.field("id_generated", pa.bool_()),  # the id is stable_id's (the row has none): it yields to given ids
    ]
)
"""A staging block's rows (``_staging/``, ``layout.block_name``): INPUT_SCHEMA before ids are settled, in input
order (``ordinal``)."""
FIXUP_SCHEMA = pa.schema(
    [
        pa.field("ordinal", pa.int64(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("dup_of", pa.string()),  # the repeated id, for a duplicate
        pa.field("first_source", pa.string()),  # where that id is first seen
    ]
)
"""``_staging/`` + ``layout.FIXUPS``: the id ``resolve_ids`` chose for each row that needed one, by ordinal."""


def stable_id(prompt: str, target: str | None) -> str:
    """The id of a row without an id column: a hash of prompt + target (stable across runs and machines)."""
    return hashlib.sha256(json.dumps([prompt, target], ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class InputFile:
    path: str
    """Filesystem path (without protocol); for a saved dataset, its directory."""
    kind: str
    """jsonl, csv, parquet or hf."""
    size: int | None = None
    version: str | None = None
    """What changes when the file does (mtime or ETag)."""
    split: str | None = None
    """The split of a saved DatasetDict."""

    @property
    def name(self) -> str:
        return self.path if self.split is None else f"{self.path}[{self.split}]"


@dataclass
class InputListing:
    files: list[InputFile]
    ignored: list[str] = field(default_factory=list)
    """Files of a directory input that are not read (hidden, or not an input format), said to the user."""

    def fingerprint(self) -> list[dict]:
        return [asdict(f) for f in self.files]


@dataclass(frozen=True)
class Piece:
    """A part of one input file that a task of its own reads (pipeline/pieces.py cuts it). JSONL/CSV: the bytes
    [start, stop), from a line start to a line start; Parquet: the row groups [start, stop)."""

    start: int
    stop: int
    row: int
    """The number its first row has in a whole-file read: its line (from 1; JSONL/CSV) or row (from 0; Parquet)."""
    lines: int | None = None
    """JSONL/CSV: how many lines start in it; None for the file's last piece."""


class PieceOverrun(Exception):
    """A CSV record (a quoted field with a line break) runs past the end of its piece: the file is read whole."""


class PromptColumnMissing(JobSpecError):
    """No line of a JSONL file (or of one piece of it) has the prompt key."""


def read_input(spec: InputSpec) -> pa.Table:
    """All rows of the input, in input order, as INPUT_SCHEMA; ids unique (later duplicates are marked)."""
    listing = list_input(spec)
    rows = [row for i, f in enumerate(listing.files) for row in iter_requests(spec, f, i)]
    staged = pa.Table.from_pylist(rows, schema=STAGED_SCHEMA)
    import duckdb

    con = duckdb.connect(":memory:")
    con.register("staged", staged)
    fixups = resolve_ids(con, "staged")
    return apply_fixups(staged, fixups).drop_columns(["ordinal"]).select(INPUT_SCHEMA.names).cast(INPUT_SCHEMA)


# --- files -----------------------------------------------------------------------------------------------------


def list_input(spec: InputSpec) -> InputListing:
    """The input's files, in the order their rows are numbered; a listing only, no file is opened."""
    try:
        return _list(spec)
    except JobSpecError:
        raise
    except Exception as err:  # unreachable store, denied access, no credentials: name the path, not a traceback
        if not storage_error(err):
            raise
        raise JobSpecError(f"input.path: {spec.path!r}: cannot read it ({type(err).__name__}: {err})") from None


def _list(spec: InputSpec) -> InputListing:
    fs, path = filesystem(spec.path)
    fmt = spec.format
    if fmt == "hf" or (fmt == "auto" and fs.isdir(path) and _is_saved_dataset(fs, path)):
        return InputListing(_hf_files(fs, path, spec))
    ignored: list[str] = []
    if any(c in path for c in _GLOB_CHARS):
        found = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file"}
    elif fs.isdir(path):
        found = {}
        for p, info in fs.find(path, detail=True).items():
            base = p.rsplit("/", 1)[-1]
            if base.startswith((".", "_")) or (fmt == "auto" and _format(p) is None):
                ignored.append(p)
            else:
                found[p] = info
    elif fs.isfile(path):
        found = {path: fs.info(path)}
    else:
        raise JobSpecError(f"input.path: {spec.path!r} does not exist; give a file, a directory or a glob")
    if not found:
        raise JobSpecError(
            f"input.path: {spec.path!r} matches no input files (looked for {', '.join(sorted(EXTENSIONS))}, "
            f"also compressed: {', '.join(sorted(COMPRESSIONS))})"
            + (f"; not read: {', '.join(sorted(ignored)[:5])}" if ignored else "")
        )
    files = [
        InputFile(p, fmt if fmt != "auto" else _format_of(p), info.get("size"), _version(info))
        for p, info in sorted(found.items())
    ]
    return InputListing(files, sorted(ignored))


def _version(info: dict) -> str | None:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return None


def _is_saved_dataset(fs, path: str) -> bool:
    base = path.rstrip("/")
    return any(fs.exists(f"{base}/{n}") for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _hf_files(fs, path: str, spec: InputSpec) -> list[InputFile]:
    base = path.rstrip("/")
    if not _is_saved_dataset(fs, base):
        raise JobSpecError(f"input.path: {spec.path!r} is not a saved Hugging Face dataset (no dataset_info.json)")
    splits: list[str | None] = [None]
    if fs.exists(f"{base}/dataset_dict.json"):
        splits = json.loads(fs.cat_file(f"{base}/dataset_dict.json")).get("splits", [])
    out = []
    for split in splits:
        where = base if split is None else f"{base}/{split}"
        infos = fs.find(where, detail=True)
        size = sum(i.get("size") or 0 for i in infos.values())
        version = json.dumps(sorted((p, i.get("size"), _version(i)) for p, i in infos.items()))
        out.append(InputFile(path, "hf", size, hashlib.sha256(version.encode()).hexdigest()[:16], split))
    return out


def _format(name: str) -> str | None:
    base = name.rsplit("/", 1)[-1].lower()
    for suffix in COMPRESSIONS:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            kind = EXTENSIONS.get(_extension(base))
            return kind if kind in ("jsonl", "csv") else None  # a compressed Parquet file is not a thing we read
    return EXTENSIONS.get(_extension(base))


def _extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _format_of(name: str) -> str:
    kind = _format(name)
    if kind is None:
        raise JobSpecError(
            f"input.format: cannot tell the format of {name!r} from its extension; "
            "set input.format to jsonl, csv, parquet or hf"
        )
    return kind


def _compression(name: str) -> str | None:
    return next((c for s, c in COMPRESSIONS.items() if name.lower().endswith(s)), None)


# --- rows of one file ------------------------------------------------------------------------------------------


def iter_requests(spec: InputSpec, file: InputFile, index: int, piece: Piece | None = None) -> Iterator[dict]:
    """The requests of one file (STAGED_SCHEMA dicts), or of one ``piece`` of it, streamed: rows, ordinals and
    messages are those of a whole-file read. ``prompt_id`` is None where the row has no usable id (``resolve_ids``
    chooses one); repeats of an id are not marked here (they may be in another file)."""
    fs, _ = filesystem(spec.path)
    reader = {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": _parquet_records, "hf": _hf_records}
    folder = url(fs, posixpath.dirname(file.path) if file.kind != "hf" else file.path)  # relative image paths' base
    try:
        for row, source, record, problem in reader[file.kind](fs, file, spec, piece):
            try:
                request = _request(source, record, problem, spec, folder)
            except RecursionError:  # a value nested past Python's limit (a metadata or span column): one row
                request = _request(source, None, f"{source}: a value nested too deeply to read", spec, folder)
            request["ordinal"] = (index << ROW_BITS) | row
            yield request
    except JobSpecError:
        raise
    except Exception as err:
        if not storage_error(err):
            raise
        raise JobSpecError(f"input.path: {file.name}: cannot read it ({type(err).__name__}: {err})") from None


def _open(fs, file: InputFile, at: int | None = None):
    """The file, to read from its start; or (``at``: a piece of a plain file) from that offset, each read
    fetching the bytes it asks for: a store's read-ahead (s3fs: 50 MB) would fetch as much again past a piece."""
    if at is None:
        return fs.open(file.path, "rb", compression=_compression(file.path))
    f = fs.open(file.path, "rb", cache_type="none")
    f.seek(at)
    return f


def _lines(f, chunk: int = 8 << 20, size: int | None = None, limit: int = MAX_ROW_BYTES) -> Iterator[bytes | int]:
    """The lines of a binary file, each with its b"\n", read in large chunks: iterating an S3 file line by line
    (fsspec's readline) took 38 minutes for a 74 MB file that this reads in seconds. ``size``: read no more than
    that many bytes (a piece, which ends at a line start). A line longer than ``limit`` comes as its length (an
    int): its bytes are dropped as they are read, never joined."""
    rest, long = b"", 0  # long: bytes so far of a line past the limit
    while data := f.read(chunk if size is None else min(chunk, size)):
        if size is not None:
            size -= len(data)
        if long:
            end = data.find(b"\n")
            if end < 0:
                long += len(data)
                continue
            yield long + end
            long, data = 0, data[end + 1 :]
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n" if len(line) <= limit else len(line)
        if len(rest) > limit:
            long, rest = len(rest), b""
    if long or rest:
        yield long or rest


def _jsonl_records(
    fs, file: InputFile, spec: InputSpec, piece: Piece | None = None
) -> Iterator[tuple[int, str, dict | None, str | None]]:
    seen_prompt_column = any_rows = False
    name = file.path
    with _open(fs, file, None if piece is None else piece.start) as f:
        lines = _lines(f, size=None if piece is None else piece.stop - piece.start)
        for number, raw in enumerate(lines, start=1 if piece is None else piece.row):
            if isinstance(raw, int):  # too long to read
                any_rows = True
                too_long = f"line {number}: {raw:,} bytes, longer than a row may be ({MAX_ROW_BYTES:,}); not read"
                yield number, f"{name}:{number}", None, too_long
                continue
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not part of the first row
            if not raw.strip():
                continue
            any_rows = True
            raw = raw.rstrip(b"\n")
            source = f"{name}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (
                    number,
                    source,
                    None,
                    f"line {number}: invalid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})",
                )
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                yield number, source, None, f"line {number}: not valid JSON ({err.msg} at column {err.colno})"
                continue
            except RecursionError:  # one poison row (5,000 nested arrays) once stopped the whole job
                yield number, source, None, f"line {number}: JSON nested too deeply to read"
                continue
            if not isinstance(record, dict):
                yield number, source, None, f"line {number}: a JSON object is expected, got {type(record).__name__}"
                continue
            seen_prompt_column |= spec.prompt_column in record
            yield number, source, record, None
    if any_rows and not seen_prompt_column:  # of a piece: the file's other pieces may have it (staging.stage_input)
        raise PromptColumnMissing(
            f"input.prompt_column: no line of {name} has a {spec.prompt_column!r} key; "
            "set input.prompt_column to the key that holds the prompt"
        )


def _csv_records(
    fs, file: InputFile, spec: InputSpec, piece: Piece | None = None
) -> Iterator[tuple[int, str, dict | None, str | None]]:
    name = file.path
    later = piece is not None and piece.start > 0  # a later piece reads only the header here
    with _open(fs, file, 0 if later else None) as raw, contextlib.ExitStack() as stack:
        buffer = 1 << 16 if later else 8 << 20
        text = io.TextIOWrapper(io.BufferedReader(raw, buffer), encoding="utf-8-sig", newline="")
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise JobSpecError(f"input.path: {name}: unreadable CSV header ({err})") from None
        except UnicodeDecodeError as err:
            raise _not_utf8(name, err) from None
        _check_columns(name, header, spec)
        first, end = 0, None  # a row's line is first + reader.line_num; a piece's last line
        if piece is not None:
            end = None if piece.lines is None else piece.row + piece.lines - 1
        if later:
            at = stack.enter_context(_open(fs, file, piece.start))
            reader = csv.reader(io.TextIOWrapper(io.BufferedReader(at, 8 << 20), encoding="utf-8", newline=""))
            first = piece.row - 1
        while not _piece_done(name, first + reader.line_num, end):
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                line = first + reader.line_num
                yield line, f"{name}:{line}", None, f"line {line}: unreadable CSV ({err})"
                continue
            except UnicodeDecodeError as err:
                raise _not_utf8(name, err) from None
            line = first + reader.line_num
            source = f"{name}:{line}"
            if not fields:
                continue
            if len(fields) != len(header):
                yield line, source, None, f"line {line}: {len(fields)} fields, the header has {len(header)}"
                continue
            # CSV has no null: an empty cell of an optional column means "absent"
            record = {
                k: (v if v != "" or k == spec.prompt_column else None) for k, v in zip(header, fields, strict=True)
            }
            yield line, source, record, None


def _piece_done(name: str, line: int, end: int | None) -> bool:
    """Whether a CSV piece has read its last line (``end``; None: the file's). A record that reads past it holds
    a quoted line break across the piece's end: the piece's rows, and the next piece's start, are not those of a
    whole-file read."""
    if end is None or line < end:
        return False
    if line > end:
        raise PieceOverrun(f"{name}: a CSV record runs from line {end} past the end of its piece")
    return True


def _not_utf8(name: str, err: UnicodeDecodeError) -> JobSpecError:
    return JobSpecError(
        f"input.path: {name} is not UTF-8 (byte {err.object[err.start]:#04x} near offset {err.start}); "
        "re-encode the file as UTF-8"
    )


def open_parquet(fs, name: str) -> pq.ParquetFile:
    """A Parquet file, its footer read; one that is not readable is a JobSpecError naming it."""
    try:
        return pq.ParquetFile(name, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise JobSpecError(f"input.path: {name} is not a readable Parquet file ({err})") from None


def _parquet_records(
    fs, file: InputFile, spec: InputSpec, piece: Piece | None = None
) -> Iterator[tuple[int, str, dict | None, str | None]]:
    name = file.path
    pf = open_parquet(fs, name)
    _check_columns(name, pf.schema_arrow.names, spec)
    i = 0 if piece is None else piece.row
    groups = None if piece is None else list(range(piece.start, piece.stop))
    for batch in pf.iter_batches(batch_size=4096, row_groups=groups):
        for record in batch.to_pylist():
            yield i, f"{name}:{i}", record, None
            i += 1


def _hf_records(
    fs, file: InputFile, spec: InputSpec, piece: None = None
) -> Iterator[tuple[int, str, dict | None, str | None]]:
    """A saved dataset is read whole (``piece`` is always None)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_from_disk(file.path)
    except (FileNotFoundError, ValueError) as err:
        raise JobSpecError(f"input.path: {file.path!r} is not a saved Hugging Face dataset ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[file.split]
    _check_columns(file.name, ds.column_names, spec)
    i = 0
    for batch in ds.with_format("arrow").iter(batch_size=4096):
        for record in batch.to_pylist():
            yield i, f"{file.name}:{i}", record, None
            i += 1


def _check_columns(name: str, columns: Iterable[str], spec: InputSpec) -> None:
    columns = list(columns)
    wanted = {"prompt_column": spec.prompt_column}
    wanted.update({"explain_span_column": spec.explain_span_column, "chat_column": spec.chat_column})
    wanted["image_column"] = spec.image_column
    for key, column in wanted.items():
        if column is not None and column not in columns:
            raise JobSpecError(
                f"input.{key}: {name} has no column {column!r} (its columns: {', '.join(columns)}); "
                f"set input.{key} to one of them"
            )
    for column in spec.metadata_columns:
        if column not in columns:
            raise JobSpecError(
                f"input.metadata_columns: {name} has no column {column!r} (its columns: {', '.join(columns)})"
            )


# --- rows --------------------------------------------------------------------------------------------------------


def resolve_ids(con, relation: str) -> pa.Table:
    """FIXUP_SCHEMA rows, by ordinal: the id of every row of ``relation`` (STAGED_SCHEMA columns, any size: DuckDB
    works out of core) that has no usable id (``row@<file:line>``) or repeats an earlier row's id
    (``<id>#dup@<file:line>``, first occurrence in input order keeps the id). A generated id (``id_generated``: a
    hash of prompt and target) yields to an id the input gives: equal to one, it is not a duplicate but a new id
    (``<hash>#2``); two generated ids are equal only for the same prompt and target, a duplicate. A chosen id that
    some row already has (or that an earlier choice took) gets ``#2``, ``#3``...: an input cannot forge one (a real
    id equal to a marker once made the run delete a whole part, issue 13)."""
    _mark_fixes(con, relation)
    renamed = _settle_clashes(con, relation)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _renamed AS "
        "SELECT unnest($1::BIGINT[]) AS ordinal, unnest($2::VARCHAR[]) AS name",
        [list(renamed), list(renamed.values())],
    )
    return (
        con.sql(
            """SELECT f.ordinal, coalesce(r.name, f.base) AS prompt_id, f.dup_of, f.first_source
        FROM _fix f LEFT JOIN _renamed r USING (ordinal) ORDER BY f.ordinal"""
        )
        .to_arrow_table()
        .cast(FIXUP_SCHEMA)
    )


def _mark_fixes(con, relation: str) -> None:
    """Temp table ``_fix``: every row of ``relation`` whose id ``resolve_ids`` chooses, with the id it would get
    before clashes are settled (``base``) and, for a repeat, the id it repeats and where that id was first."""
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _fix AS
        SELECT ordinal, 'row@' || source AS base, NULL::VARCHAR AS dup_of, NULL::VARCHAR AS first_source
        FROM {relation} WHERE prompt_id IS NULL
        UNION ALL
        SELECT ordinal, CASE WHEN n = 1 THEN prompt_id ELSE prompt_id || '#dup@' || source END,
               CASE WHEN n > 1 THEN prompt_id END, CASE WHEN n > 1 THEN first_source END FROM (
            SELECT ordinal, prompt_id, source, gen,
                   first_value(source) OVER (PARTITION BY prompt_id, gen ORDER BY ordinal) AS first_source,
                   row_number() OVER (PARTITION BY prompt_id, gen ORDER BY ordinal) AS n,
                   bool_or(NOT gen) OVER (PARTITION BY prompt_id) AS given
            FROM (SELECT *, coalesce(id_generated, false) AS gen FROM {relation} WHERE prompt_id IS NOT NULL)
        ) WHERE n > 1 OR (gen AND given)"""
    )


def _settle_clashes(con, relation: str) -> dict[int, str]:
    """Ordinal -> id for each ``_fix`` row whose chosen id some row already has or another choice took: the id with
    ``#2``, ``#3``... , the first one free. Rare (an input that spells a marker): settled one by one, in input
    order."""
    clashes = con.execute(
        f"""SELECT ordinal, base FROM _fix
        WHERE base IN (SELECT prompt_id FROM {relation} WHERE prompt_id IS NOT NULL)
           OR base IN (SELECT base FROM _fix GROUP BY base HAVING count(*) > 1)
        ORDER BY ordinal"""
    ).fetchall()
    if not clashes:
        return {}
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _clashing AS SELECT unnest($1::BIGINT[]) AS ordinal", [[o for o, _ in clashes]]
    )
    taken: set[str] = set()

    def is_taken(name: str) -> bool:
        if name in taken:
            return True
        hit = con.execute(
            f"""SELECT EXISTS(SELECT 1 FROM {relation} WHERE prompt_id = $1)
                 OR EXISTS(SELECT 1 FROM _fix
                           WHERE base = $1 AND ordinal NOT IN (SELECT ordinal FROM _clashing))""",
            [name],
        ).fetchall()[0][0]
        return bool(hit)

    renamed: dict[int, str] = {}
    for ordinal, base in clashes:
        candidate, n = base, 1
        while is_taken(candidate):
            n += 1
            candidate = f"{base}#{n}"
        taken.add(candidate)
        renamed[ordinal] = candidate
    return renamed


def apply_fixups(staged: pa.Table, fixups: pa.Table) -> pa.Table:
    """``staged`` (STAGED_SCHEMA) with the ids ``resolve_ids`` chose; a repeat is marked as not explained."""
    if not fixups.num_rows:
        return staged
    fix = {
        o: (pid, dup, first)
        for o, pid, dup, first in zip(
            fixups.column("ordinal").to_pylist(),
            fixups.column("prompt_id").to_pylist(),
            fixups.column("dup_of").to_pylist(),
            fixups.column("first_source").to_pylist(),
            strict=True,
        )
    }
    ids, errors = staged.column("prompt_id").to_pylist(), staged.column("input_error").to_pylist()
    generated = staged.column("id_generated").to_pylist() if "id_generated" in staged.column_names else ids
    for i, ordinal in enumerate(staged.column("ordinal").to_pylist()):
        if ordinal in fix:
            ids[i], dup, first = fix[ordinal]
            if dup is not None and generated[i] is True:
                errors[i] = (
                    f"the same prompt and target as the row at {first} (neither has an id: both get {dup!r}, "
                    "made from them); this row is not explained"
                )
            elif dup is not None:
                errors[i] = f"duplicate id {dup!r} (first at {first}); this row is not explained"
    at, field_of = staged.schema.get_field_index, STAGED_SCHEMA.field
    staged = staged.set_column(at("prompt_id"), field_of("prompt_id"), pa.array(ids, pa.string()))
    return staged.set_column(at("input_error"), field_of("input_error"), pa.array(errors, pa.string()))


def _request(source: str, record: dict | None, problem: str | None, spec: InputSpec, folder: str = "") -> dict:
    """One INPUT_SCHEMA row of ``record``: each field checked on its own, every problem named by its field and joined
    into ``input_error`` in the order prompt, target, explain_span, chat, metadata, image, id (a row is reported
    with all that is wrong with it, not only the first)."""
    row: dict[str, Any] = dict.fromkeys(INPUT_SCHEMA.names)
    row["source"] = source.encode("utf-8", "backslashreplace").decode("utf-8")  # a file name may hold any bytes
    if record is None:  # its id is chosen by resolve_ids
        row["input_error"] = problem
        return row
    row["prompt"], prompt_problem = _prompt(record, spec.prompt_column)
    target, target_problem = _target(record, spec.target_column)
    row["target"] = target if target_problem is None else None
    optional, optional_problems = _optional_fields(record, spec, folder)
    row.update(optional)
    row["prompt_id"], generated, id_problem = _prompt_id(record, spec.id_column, row["prompt"], target)
    if generated is not None:  # not an INPUT_SCHEMA column: present only on rows whose id was made here
        row["id_generated"] = generated
    problems = [prompt_problem, target_problem, *optional_problems, id_problem]
    if any(problems):
        row["input_error"] = "; ".join(p for p in problems if p)
    return row


def _prompt(record: dict, column: str) -> tuple[str | None, str | None]:
    """The row's prompt, or None and why it cannot be one."""
    prompt = record.get(column)
    if column not in record:
        return None, f"prompt: the row has no {column!r} value"
    if prompt is None:
        return None, f"prompt: {column!r} is null"
    if not isinstance(prompt, str):
        return None, f"prompt: {column!r} must be a string, got {type(prompt).__name__} {_short(prompt)}"
    if len(prompt) > MAX_ROW_BYTES:  # past any context: not tokenised, not copied into the output
        return None, f"prompt: {len(prompt):,} characters, longer than a prompt may be ({MAX_ROW_BYTES:,})"
    if not prompt.strip():
        return None, "prompt: empty"
    if (bad := _not_unicode(prompt)) is not None:
        return None, f"prompt: {bad}"
    return prompt, None


def _target(record: dict, column: str | None) -> tuple[Any, str | None]:
    """The row's target (None: generate one) and why it cannot be one. With a problem, the value is still what a
    generated id hashes (the value as read, or None where it cannot be stored), so a bad row keeps the id it had."""
    target = record.get(column) if column else None
    if target is None:
        return None, None
    if not isinstance(target, str):
        return target, f"target: {column!r} must be a string or null, got {type(target).__name__}"
    if target == "":
        return target, f"target: {column!r} is empty; leave it out or null to generate one"
    if (bad := _not_unicode(target)) is not None:
        return None, f"target: {bad}"
    return target, None


def _optional_fields(record: dict, spec: InputSpec, folder: str) -> tuple[dict[str, Any], list[str]]:
    """The fields only some inputs have (``input.explain_span_column``, ``chat_column``, ``metadata_columns``,
    ``image_column``): the row's values of those set, and the problems, each named by its field."""
    row: dict[str, Any] = {}
    problems = []
    if spec.explain_span_column:
        row["explain_span"], bad = _span(record.get(spec.explain_span_column))
        problems.append(bad and f"explain_span: {bad}")
    if spec.chat_column:
        row["chat"], bad = _flag(record.get(spec.chat_column))
        problems.append(bad and f"chat: {bad}")
    if spec.metadata_columns:
        metadata = json.dumps({c: record.get(c) for c in spec.metadata_columns}, ensure_ascii=False, default=str)
        bad = _not_unicode(metadata)
        row["metadata"] = metadata if bad is None else None
        problems.append(bad and f"metadata: {bad}")
    if spec.image_column:
        row["image_ref"], row["image_bytes"], bad = _image(record.get(spec.image_column), folder)
        problems.append(bad and f"image: {bad}")
    return row, [p for p in problems if p]


def _prompt_id(
    record: dict, column: str | None, prompt: str | None, target: Any
) -> tuple[str | None, bool | None, str | None]:
    """(prompt_id, id_generated, problem): the row's own id, or, where it gives none, a hash of prompt and target
    (none without a usable prompt); ``id_generated`` is None where the row gives an id."""
    raw_id = record.get(column) if column else None
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        prompt_id = stable_id(prompt, target) if prompt is not None else None
        return prompt_id, prompt_id is not None, None
    if isinstance(raw_id, str) and (bad := _not_unicode(raw_id)) is not None:
        return None, None, f"id: {bad}"
    if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        return str(raw_id), None, None
    return None, None, f"id: {column!r} must be a string or an integer, got {type(raw_id).__name__}"


def _not_unicode(text: str) -> str | None:
    """Why ``text`` cannot be stored as UTF-8 (a lone surrogate, e.g. JSON's unpaired "\\ud800" escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"not valid Unicode: a lone surrogate {ascii(text[err.start])[1:-1]} at character {err.start + 1} "
            "(an unpaired \\uXXXX escape)"
        )
    return None


def _span(value: Any) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, f"{_short(value)} is not [start, end] or a list of them"
    if not isinstance(value, list):
        return None, f"{_short(value)} is not [start, end] or a list of them"
    spans = [value] if value and all(isinstance(x, int) for x in value) else value
    if not isinstance(spans, list) or not all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in s)
        for s in spans
    ):
        return None, f"{_short(value)} is not [start, end] or a list of them"
    return json.dumps(spans), None


def _image(value: Any, folder: str) -> tuple[str | None, bytes | None, str | None]:
    """(path or URI, bytes, problem) of an image cell: a string is a path or URI (relative to ``folder``), bytes are
    the image itself; null is no image. The image is read and checked by the worker."""
    if value is None:
        return None, None, None
    if isinstance(value, (bytes, bytearray)):
        return None, bytes(value), None if value else "empty bytes"
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):  # a datasets Image cell
        return None, bytes(value["bytes"]), None
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        value = value["path"]
    if isinstance(value, str):
        if not value.strip():
            return None, None, "an empty path"
        if (bad := _not_unicode(value)) is not None:
            return None, None, bad
        if "://" in value or posixpath.isabs(value) or not folder:
            return value, None, None
        return posixpath.join(folder, value), None, None
    return None, None, f"must be a path, an s3:// URI or bytes, got {type(value).__name__} {_short(value)}"


def _flag(value: Any) -> tuple[bool | None, str | None]:
    if value is None or isinstance(value, bool):
        return value, None
    text = str(value).strip().lower()
    if text in {"true", "1", "yes"}:
        return True, None
    if text in {"false", "0", "no"}:
        return False, None
    if text in {"", "auto", "null"}:
        return None, None
    return None, f"{_short(value)} is not true, false or null"


def _short(value: Any, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."
