"""Reading a job's input into one Arrow table of requests (INPUT_SCHEMA), every row accounted for.

Files: JSONL, CSV, Parquet (a file, a directory or a glob) or a ``datasets.save_to_disk`` directory, local or
s3://. A broken spec or file (no such path, unknown format, a configured column that the data lacks) raises
``JobSpecError`` naming the file and the field; a broken *row* (invalid UTF-8 or JSON, missing or non-string
prompt, duplicate id, ...) becomes a row with ``input_error`` set, written by the job as ``status='skipped'``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.jobspec import InputSpec, JobSpecError
from pipeline.layout import filesystem, storage_error
from pipeline.schema import INPUT_SCHEMA

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_GLOB_CHARS = "*?["


def stable_id(prompt: str, target: str | None) -> str:
    """The id of a row without an id column: a hash of prompt + target (stable across runs and machines)."""
    return hashlib.sha256(json.dumps([prompt, target], ensure_ascii=False).encode()).hexdigest()[:16]


def read_input(spec: InputSpec) -> pa.Table:
    """All rows of the input, in input order, as INPUT_SCHEMA; ids unique (later duplicates are marked)."""
    records = list(_records(spec))
    return pa.Table.from_pylist(_requests(records, spec), schema=INPUT_SCHEMA)


# --- files -----------------------------------------------------------------------------------------------------


def _records(spec: InputSpec) -> Iterator[tuple[str, dict | None, str | None]]:
    """(source, record, problem): record None when the row itself could not be parsed."""
    try:
        yield from _records_of(spec)
    except JobSpecError:
        raise
    except Exception as err:  # unreachable store, denied access, no credentials: name the path, not a traceback
        if not storage_error(err):
            raise
        raise JobSpecError(f"input.path: {spec.path!r}: cannot read it ({type(err).__name__}: {err})") from None


def _records_of(spec: InputSpec) -> Iterator[tuple[str, dict | None, str | None]]:
    fs, path = filesystem(spec.path)
    fmt = spec.format
    if fmt == "hf" or (fmt == "auto" and fs.isdir(path) and _is_saved_dataset(fs, path)):
        yield from _hf_records(spec)
        return
    files = _files(fs, path, spec)
    for name in files:
        kind = fmt if fmt != "auto" else _format_of(name, spec)
        reader = {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": _parquet_records}[kind]
        yield from reader(fs, name, spec)


def _is_saved_dataset(fs, path: str) -> bool:
    return fs.exists(f"{path.rstrip('/')}/dataset_info.json") or fs.exists(f"{path.rstrip('/')}/state.json")


def _files(fs, path: str, spec: InputSpec) -> list[str]:
    if any(c in path for c in _GLOB_CHARS):
        files = sorted(p for p in fs.glob(path) if fs.isfile(p))
    elif fs.isdir(path):
        files = sorted(
            p
            for p in fs.find(path)
            if not p.rsplit("/", 1)[-1].startswith((".", "_"))
            and (spec.format != "auto" or _extension(p) in EXTENSIONS)
        )
    elif fs.isfile(path):
        files = [path]
    else:
        raise JobSpecError(f"input.path: {spec.path!r} does not exist; give a file, a directory or a glob")
    if not files:
        raise JobSpecError(
            f"input.path: {spec.path!r} matches no input files (looked for {', '.join(sorted(EXTENSIONS))})"
        )
    return files


def _extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _format_of(name: str, spec: InputSpec) -> str:
    kind = EXTENSIONS.get(_extension(name))
    if kind is None:
        raise JobSpecError(
            f"input.format: cannot tell the format of {name!r} from its extension; "
            "set input.format to jsonl, csv, parquet or hf"
        )
    return kind


def _jsonl_records(fs, name: str, spec: InputSpec) -> Iterator[tuple[str, dict | None, str | None]]:
    with fs.open(name, "rb") as f:
        data = f.read()
    seen_prompt_column = False
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        source = f"{name}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            rows.append(
                (source, None, f"line {number}: invalid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})")
            )
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            rows.append((source, None, f"line {number}: not valid JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(record, dict):
            rows.append((source, None, f"line {number}: a JSON object is expected, got {type(record).__name__}"))
            continue
        seen_prompt_column |= spec.prompt_column in record
        rows.append((source, record, None))
    if rows and not seen_prompt_column:
        raise JobSpecError(
            f"input.prompt_column: no line of {name} has a {spec.prompt_column!r} key; "
            "set input.prompt_column to the key that holds the prompt"
        )
    yield from rows


def _csv_records(fs, name: str, spec: InputSpec) -> Iterator[tuple[str, dict | None, str | None]]:
    with fs.open(name, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise JobSpecError(
            f"input.path: {name} is not UTF-8 (byte {data[err.start]:#04x} at offset {err.start}); "
            "re-encode the file as UTF-8"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as err:
        raise JobSpecError(f"input.path: {name}: unreadable CSV header ({err})") from None
    _check_columns(name, header, spec)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            yield f"{name}:{reader.line_num}", None, f"line {reader.line_num}: unreadable CSV ({err})"
            continue
        source = f"{name}:{reader.line_num}"
        if not fields:
            continue
        if len(fields) != len(header):
            yield source, None, f"line {reader.line_num}: {len(fields)} fields, the header has {len(header)}"
            continue
        # CSV has no null: an empty cell of an optional column means "absent"
        yield (
            source,
            {k: (v if v != "" or k == spec.prompt_column else None) for k, v in zip(header, fields, strict=True)},
            None,
        )


def _parquet_records(fs, name: str, spec: InputSpec) -> Iterator[tuple[str, dict | None, str | None]]:
    try:
        table = pq.read_table(name, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise JobSpecError(f"input.path: {name} is not a readable Parquet file ({err})") from None
    _check_columns(name, table.column_names, spec)
    for i, record in enumerate(table.to_pylist()):
        yield f"{name}:{i}", record, None


def _hf_records(spec: InputSpec) -> Iterator[tuple[str, dict | None, str | None]]:
    import datasets

    try:
        ds = datasets.load_from_disk(spec.path)
    except (FileNotFoundError, ValueError) as err:
        raise JobSpecError(f"input.path: {spec.path!r} is not a saved Hugging Face dataset ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.items())
    else:
        splits = [(None, ds)]
    for split, part in splits:
        _check_columns(spec.path if split is None else f"{spec.path}[{split}]", part.column_names, spec)
        for i, record in enumerate(part):
            yield f"{spec.path}:{i}" if split is None else f"{spec.path}[{split}]:{i}", record, None


def _check_columns(name: str, columns: Iterable[str], spec: InputSpec) -> None:
    columns = list(columns)
    wanted = {"prompt_column": spec.prompt_column}
    wanted.update({"explain_span_column": spec.explain_span_column, "chat_column": spec.chat_column})
    for field, column in wanted.items():
        if column is not None and column not in columns:
            raise JobSpecError(
                f"input.{field}: {name} has no column {column!r} (its columns: {', '.join(columns)}); "
                f"set input.{field} to one of them"
            )
    for column in spec.metadata_columns:
        if column not in columns:
            raise JobSpecError(
                f"input.metadata_columns: {name} has no column {column!r} (its columns: {', '.join(columns)})"
            )


# --- rows --------------------------------------------------------------------------------------------------------


def _requests(records: list[tuple[str, dict | None, str | None]], spec: InputSpec) -> list[dict]:
    """One request per record. A row without a usable id, and every repeat of an id, gets an id of its own that no
    row of the input has (``row@<file:line>`` / ``<id>#dup@<file:line>``, suffixed ``#2``, ``#3``... on a clash), so
    an input cannot forge one: a real id equal to a marker once made the run delete a whole part (issue 13)."""
    rows = [_request(source, record, problem, spec) for source, record, problem in records]
    taken = {row["prompt_id"] for row in rows if row["prompt_id"] is not None}
    first_seen: dict[str, str] = {}
    for row in rows:
        pid, source = row["prompt_id"], row["source"]
        if pid is None:
            row["prompt_id"] = _unused(f"row@{source}", taken)
        elif pid in first_seen:
            row["input_error"] = f"duplicate id {pid!r} (first at {first_seen[pid]}); this row is not explained"
            row["prompt_id"] = _unused(f"{pid}#dup@{source}", taken)
        else:
            first_seen[pid] = source
    return rows


def _unused(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}#{n}"
    taken.add(candidate)
    return candidate


def _request(source: str, record: dict | None, problem: str | None, spec: InputSpec) -> dict:
    row: dict[str, Any] = dict.fromkeys(INPUT_SCHEMA.names)
    row["source"] = source
    if record is None:  # its id is chosen by _requests
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
    else:
        row["prompt"] = prompt
    target = record.get(spec.target_column) if spec.target_column else None
    if target is not None and not isinstance(target, str):
        problems.append(f"target: {spec.target_column!r} must be a string or null, got {type(target).__name__}")
    elif target is not None and target == "":
        problems.append(f"target: {spec.target_column!r} is empty; leave it out or null to generate one")
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
        row["metadata"] = json.dumps({c: record.get(c) for c in spec.metadata_columns}, ensure_ascii=False, default=str)
    raw_id = record.get(spec.id_column) if spec.id_column else None
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        row["prompt_id"] = stable_id(prompt, target) if row["prompt"] is not None else None
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        row["prompt_id"] = str(raw_id)
    else:
        row["prompt_id"] = None
        problems.append(f"id: {spec.id_column!r} must be a string or an integer, got {type(raw_id).__name__}")
    if problems:
        row["input_error"] = "; ".join(problems)
    return row


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
