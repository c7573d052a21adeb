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
from pipeline.schema import INPUT_SCHEMA

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
_GLOB_CHARS = "*?["
ROW_BITS = 40
"""A row's ordinal is ``file_index << ROW_BITS | row``: input order over all files, one integer."""

STAGED_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string()),  # null until resolve_ids chooses one (a row without a usable id)
        *(f for f in INPUT_SCHEMA if f.name != "prompt_id"),
        pa.field("ordinal", pa.int64(), nullable=False),
    ]
)
FIXUP_SCHEMA = pa.schema(
    [
        pa.field("ordinal", pa.int64(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("dup_of", pa.string()),  # the repeated id, for a duplicate
        pa.field("first_source", pa.string()),  # where that id is first seen
    ]
)


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


def iter_requests(spec: InputSpec, file: InputFile, index: int) -> Iterator[dict]:
    """The requests of one file (STAGED_SCHEMA dicts), streamed. ``prompt_id`` is None where the row has no usable
    id (``resolve_ids`` chooses one); repeats of an id are not marked here (they may be in another file)."""
    fs, _ = filesystem(spec.path)
    reader = {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": _parquet_records, "hf": _hf_records}
    folder = url(fs, posixpath.dirname(file.path) if file.kind != "hf" else file.path)  # relative image paths' base
    try:
        for row, source, record, problem in reader[file.kind](fs, file, spec):
            request = _request(source, record, problem, spec, folder)
            request["ordinal"] = (index << ROW_BITS) | row
            yield request
    except JobSpecError:
        raise
    except Exception as err:
        if not storage_error(err):
            raise
        raise JobSpecError(f"input.path: {file.name}: cannot read it ({type(err).__name__}: {err})") from None


def _open(fs, file: InputFile):
    return fs.open(file.path, "rb", compression=_compression(file.path))


def _lines(f, chunk: int = 8 << 20) -> Iterator[bytes]:
    """The lines of a binary file, each with its b"\n", read in large chunks: iterating an S3 file line by line
    (fsspec's readline) took 38 minutes for a 74 MB file that this reads in seconds."""
    rest = b""
    while data := f.read(chunk):
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _jsonl_records(fs, file: InputFile, spec: InputSpec) -> Iterator[tuple[int, str, dict | None, str | None]]:
    seen_prompt_column = any_rows = False
    name = file.path
    with _open(fs, file) as f:
        for number, raw in enumerate(_lines(f), start=1):
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
            if not isinstance(record, dict):
                yield number, source, None, f"line {number}: a JSON object is expected, got {type(record).__name__}"
                continue
            seen_prompt_column |= spec.prompt_column in record
            yield number, source, record, None
    if any_rows and not seen_prompt_column:
        raise JobSpecError(
            f"input.prompt_column: no line of {name} has a {spec.prompt_column!r} key; "
            "set input.prompt_column to the key that holds the prompt"
        )


def _csv_records(fs, file: InputFile, spec: InputSpec) -> Iterator[tuple[int, str, dict | None, str | None]]:
    name = file.path
    with _open(fs, file) as raw:
        text = io.TextIOWrapper(io.BufferedReader(raw, 8 << 20), encoding="utf-8-sig", newline="")
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
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                yield (
                    reader.line_num,
                    f"{name}:{reader.line_num}",
                    None,
                    f"line {reader.line_num}: unreadable CSV ({err})",
                )
                continue
            except UnicodeDecodeError as err:
                raise _not_utf8(name, err) from None
            source = f"{name}:{reader.line_num}"
            if not fields:
                continue
            if len(fields) != len(header):
                yield (
                    reader.line_num,
                    source,
                    None,
                    f"line {reader.line_num}: {len(fields)} fields, the header has {len(header)}",
                )
                continue
            # CSV has no null: an empty cell of an optional column means "absent"
            record = {
                k: (v if v != "" or k == spec.prompt_column else None) for k, v in zip(header, fields, strict=True)
            }
            yield reader.line_num, source, record, None


def _not_utf8(name: str, err: UnicodeDecodeError) -> JobSpecError:
    return JobSpecError(
        f"input.path: {name} is not UTF-8 (byte {err.object[err.start]:#04x} near offset {err.start}); "
        "re-encode the file as UTF-8"
    )


def _parquet_records(fs, file: InputFile, spec: InputSpec) -> Iterator[tuple[int, str, dict | None, str | None]]:
    name = file.path
    try:
        pf = pq.ParquetFile(name, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise JobSpecError(f"input.path: {name} is not a readable Parquet file ({err})") from None
    _check_columns(name, pf.schema_arrow.names, spec)
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield i, f"{name}:{i}", record, None
            i += 1


def _hf_records(fs, file: InputFile, spec: InputSpec) -> Iterator[tuple[int, str, dict | None, str | None]]:
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
    (``<id>#dup@<file:line>``, first occurrence in input order keeps the id). A chosen id that some row already has
    (or that an earlier choice took) gets ``#2``, ``#3``...: an input cannot forge one (a real id equal to a marker
    once made the run delete a whole part, issue 13)."""
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _fix AS
        SELECT ordinal, 'row@' || source AS base, NULL::VARCHAR AS dup_of, NULL::VARCHAR AS first_source
        FROM {relation} WHERE prompt_id IS NULL
        UNION ALL
        SELECT ordinal, prompt_id || '#dup@' || source, prompt_id, first_source FROM (
            SELECT ordinal, prompt_id, source,
                   first_value(source) OVER (PARTITION BY prompt_id ORDER BY ordinal) AS first_source,
                   row_number() OVER (PARTITION BY prompt_id ORDER BY ordinal) AS n
            FROM {relation} WHERE prompt_id IS NOT NULL
        ) WHERE n > 1"""
    )
    clashes = con.execute(
        f"""SELECT ordinal, base FROM _fix
        WHERE base IN (SELECT prompt_id FROM {relation} WHERE prompt_id IS NOT NULL)
           OR base IN (SELECT base FROM _fix GROUP BY base HAVING count(*) > 1)
        ORDER BY ordinal"""
    ).fetchall()
    renamed: dict[int, str] = {}
    if clashes:  # rare (an input that spells a marker): settled one by one, in input order
        clashing = [o for o, _ in clashes]
        con.execute("CREATE OR REPLACE TEMP TABLE _clashing AS SELECT unnest($1::BIGINT[]) AS ordinal", [clashing])
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

        for ordinal, base in clashes:
            candidate, n = base, 1
            while is_taken(candidate):
                n += 1
                candidate = f"{base}#{n}"
            taken.add(candidate)
            renamed[ordinal] = candidate
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
    for i, ordinal in enumerate(staged.column("ordinal").to_pylist()):
        if ordinal in fix:
            ids[i], dup, first = fix[ordinal]
            if dup is not None:
                errors[i] = f"duplicate id {dup!r} (first at {first}); this row is not explained"
    at, field_of = staged.schema.get_field_index, STAGED_SCHEMA.field
    staged = staged.set_column(at("prompt_id"), field_of("prompt_id"), pa.array(ids, pa.string()))
    return staged.set_column(at("input_error"), field_of("input_error"), pa.array(errors, pa.string()))


def _request(source: str, record: dict | None, problem: str | None, spec: InputSpec, folder: str = "") -> dict:
    row: dict[str, Any] = dict.fromkeys(INPUT_SCHEMA.names)
    row["source"] = source.encode("utf-8", "backslashreplace").decode("utf-8")  # a file name may hold any bytes
    if record is None:  # its id is chosen by resolve_ids
        row["input_error"] = problem
        return row
    problems = []
    prompt = record.get(spec.prompt_column)
    if spec.prompt_column not in record:
        problems.append(f"prompt: the row has no {spec.prompt_column!r} value")
    elif prompt is None:
        problems.append(f"prompt: {spec.prompt_column!r} is null")
    elif not isinstance(prompt, str):
        problems.append(
            f"prompt: {spec.prompt_column!r} must be a string, got {type(prompt).__name__} {_short(prompt)}"
        )
    elif not prompt.strip():
        problems.append("prompt: empty")
    elif (bad := _not_unicode(prompt)) is not None:
        problems.append(f"prompt: {bad}")
    else:
        row["prompt"] = prompt
    target = record.get(spec.target_column) if spec.target_column else None
    if target is not None and not isinstance(target, str):
        problems.append(f"target: {spec.target_column!r} must be a string or null, got {type(target).__name__}")
    elif target is not None and target == "":
        problems.append(f"target: {spec.target_column!r} is empty; leave it out or null to generate one")
    elif target is not None and (bad := _not_unicode(target)) is not None:
        problems.append(f"target: {bad}")
        target = None
    else:
        row["target"] = target
    if spec.explain_span_column:
        row["explain_span"], bad = _span(record.get(spec.explain_span_column))
        if bad:
            problems.append(f"explain_span: {bad}")
    if spec.chat_column:
        row["chat"], bad = _flag(record.get(spec.chat_column))
        if bad:
            problems.append(f"chat: {bad}")
    if spec.metadata_columns:
        metadata = json.dumps({c: record.get(c) for c in spec.metadata_columns}, ensure_ascii=False, default=str)
        if (bad := _not_unicode(metadata)) is not None:
            problems.append(f"metadata: {bad}")
        else:
            row["metadata"] = metadata
    if spec.image_column:
        row["image_ref"], row["image_bytes"], bad = _image(record.get(spec.image_column), folder)
        if bad:
            problems.append(f"image: {bad}")
    raw_id = record.get(spec.id_column) if spec.id_column else None
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        row["prompt_id"] = stable_id(prompt, target) if row["prompt"] is not None else None
    elif isinstance(raw_id, str) and (bad := _not_unicode(raw_id)) is not None:
        row["prompt_id"] = None
        problems.append(f"id: {bad}")
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        row["prompt_id"] = str(raw_id)
    else:
        row["prompt_id"] = None
        problems.append(f"id: {spec.id_column!r} must be a string or an integer, got {type(raw_id).__name__}")
    if problems:
        row["input_error"] = "; ".join(problems)
    return row


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
