"""The part format: the Parquet files ``part-s<shard>.parquet`` a run writes, one row per prompt (README "Output
schema"). Everything that writes or reads a part goes through here, so the format has one definition: its schema,
the rows the worker writes (``ok_row``, ``skipped_row``, ``error_row``), their bytes (``encode``), the checksum a
part is trusted by (``sha256``: of the bytes as stored, written in its progress record and the run's manifest), and
reading parts back through the damaged-part guard (``readable_parts``, ``read_run``, ``read_part``): a part is read
only where its bytes are those its run recorded for it, in the manifest of a complete run or the progress records
of an incomplete one. The staging blocks a run reads its input from are the input side's format (pipeline/reader.py).

Plain Arrow types only. v2 adds the image columns (null on text rows), nothing else: a v1 reader reads v2 parts,
and ``atman query`` reads v1 and v2 parts together (missing columns are null).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import itertools
import json
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from pipeline.integrity import BadManifest, identity, load_checks, manifest_parts, save_checks
from pipeline.layout import (
    MANIFEST,
    MARKERS,
    PART_GLOB,
    PROGRESS,
    SUCCESS,
    filesystem,
    fresh_ls,
    parquet_bytes,
    parse_run_dir,
    part_name,
    run_glob,
    shard_name,
    url,
)

SCHEMA_VERSION = 2
STATUSES = ("ok", "skipped", "error")

SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("model_revision", pa.string()),
        pa.field("method_params", pa.string()),  # JSON of the AtMan config
        pa.field("prompt", pa.string()),
        pa.field("target", pa.string()),
        pa.field("granularity", pa.string()),
        pa.field("unit_text", pa.list_(pa.string())),
        pa.field("unit_start", pa.list_(pa.int32())),
        pa.field("unit_length", pa.list_(pa.int32())),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("per_target", pa.list_(pa.list_(pa.float32()))),
        pa.field("target_tokens", pa.list_(pa.string())),
        pa.field("base_target_ce", pa.float32()),
        pa.field("n_prompt_tokens", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("latency_ms", pa.float32()),
        pa.field("written_at", pa.timestamp("us", tz="UTC"), nullable=False),
        # beyond v1's minimum: where the row came from, and the input's pass-through columns
        pa.field("source", pa.string()),
        pa.field("chat", pa.bool_()),
        pa.field("metadata", pa.string()),  # JSON object of the job's metadata_columns
        # v2: the row's image (input.image_column), its size and image units: box [x0, y0, x1, y1] in its pixels
        pa.field("image", pa.string()),  # the path or URI as the input gave it; "<bytes>" for inline bytes
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("image_box", pa.list_(pa.list_(pa.float32()))),
        pa.field("image_view", pa.list_(pa.string())),
        pa.field("image_scores", pa.list_(pa.float32())),
    ]
)
V2_COLUMNS = ("image", "image_width", "image_height", "image_box", "image_view", "image_scores")
"""The columns v2 added: a v1 part lacks them."""
_SQL_TYPES = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float32(): "FLOAT",
              pa.bool_(): "BOOLEAN"}  # fmt: skip


def sql_type(column: str, element: bool = False) -> str:
    """DuckDB's name for the type of ``column`` of SCHEMA (``element``: of one item of the list it holds), so that
    SQL standing in for a missing column (a v1 part has no image columns) has the types a v2 part has."""
    kind = SCHEMA.field(column).type
    if element:
        kind = kind.value_type
    return _sql(kind)


def _sql(kind: pa.DataType) -> str:
    if pa.types.is_list(kind):
        return f"{_sql(kind.value_type)}[]"
    if pa.types.is_timestamp(kind):
        return "TIMESTAMP WITH TIME ZONE"
    return _SQL_TYPES[kind]


# --- rows: what the worker writes for each request ---------------------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    """What every row of a part repeats: the run, the model as loaded, the method's parameters (JSON, precision
    resolved) and the unit granularity."""

    run_id: str
    model_id: str
    model_revision: str | None
    method_params: str
    granularity: str


def _row(by: Provenance, request: dict, status: str, error: str | None) -> dict:
    """A row of ``status`` for ``request`` (INPUT_SCHEMA), every column of SCHEMA present, nothing explained."""
    row = dict.fromkeys(SCHEMA.names)
    row.update(
        prompt_id=request["prompt_id"],
        run_id=by.run_id,
        model_id=by.model_id,
        model_revision=by.model_revision,
        method_params=by.method_params,
        prompt=request.get("prompt"),
        target=request.get("target"),
        granularity=by.granularity,
        status=status,
        error=error,
        written_at=dt.datetime.now(dt.timezone.utc),
        source=request.get("source"),
        chat=request.get("chat"),
        metadata=request.get("metadata"),
        image=request.get("image_ref") or ("<bytes>" if request.get("image_bytes") is not None else None),
    )
    return row


def skipped_row(by: Provenance, request: dict, reason: str) -> dict:
    """The request cannot be explained (a reader problem, an empty prompt, too long, a bad span or image)."""
    return _row(by, request, "skipped", reason)


def error_row(by: Provenance, request: dict, message: str) -> dict:
    """Explaining failed at run time (``message``: the exception's type and text)."""
    return _row(by, request, "error", message)


def ok_row(by: Provenance, request: dict, explanation, latency_s: float) -> dict:
    """The row of an explained request: its units and scores, and with an image its image units. ``explanation``
    is the engine's ``Explanation`` (read by attribute: this module does not import the engine)."""
    e, row = explanation, _row(by, request, "ok", None)
    row.update(
        target=e.target,
        unit_text=[u[0] for u in e.units],
        unit_start=[u[1] for u in e.units],
        unit_length=[u[2] for u in e.units],
        scores=e.scores.tolist(),
        per_target=None if e.per_target is None else e.per_target.tolist(),
        target_tokens=list(e.target_tokens),
        base_target_ce=e.base_target_ce,
        n_prompt_tokens=e.n_prompt_tokens,
        chat=e.chat,
        latency_ms=1000.0 * latency_s,
    )
    if e.image_units is not None:
        ((width, height),) = e.images
        row.update(
            image_width=width,
            image_height=height,
            image_box=[list(u.box) for u in e.image_units],
            image_view=[u.view for u in e.image_units],
            image_scores=e.image_scores.tolist(),
        )
    return row


# --- bytes and checksum: a part is trusted by the sha256 of its bytes as stored ------------------------------------


def encode(rows: list[dict], compression: str) -> tuple[pa.Table, bytes]:
    """``rows`` (SCHEMA) as a table and as the bytes of its part (``compression``: the job's output.compression)."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return table, parquet_bytes(table, compression)


def sha256(data: bytes) -> str:
    """The checksum of a part's bytes, as its marker and the run's manifest record it."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(fs, path: str) -> str:
    """The checksum of the part at ``path`` as stored (read in chunks; OSError where it cannot be read)."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(fs, path: str) -> str | None:
    """``file_sha256``, None where the part cannot be read."""
    try:
        return file_sha256(fs, path)
    except OSError:
        return None


# --- reading: only what the run recorded, byte for byte (the damaged-part guard) -----------------------------------
# Every reader of a run's parts (the query views, `atman run --preview`, `atman report`, `atman show`, the audit) goes
# through ``readable_parts``: a part is read only where its bytes are those its run recorded.

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MARKER = re.compile(r"s\d+\.json")  # layout.shard_name's, not a temporary file of a write


@dataclass(frozen=True)
class Run:
    """One run directory under a root."""

    model: str
    run_date: str
    run_id: str
    path: str  # without protocol
    url: str  # as a user writes it (s3://... or a local path)
    complete: bool

    def manifest(self, fs) -> dict:
        """The run's manifest, {} where it has none; BadManifest naming the file where it is not a JSON object."""
        try:
            data = json.loads(fs.cat_file(f"{self.path}/{MANIFEST}"))
        except FileNotFoundError:
            return {}
        except ValueError as err:  # not JSON, not UTF-8
            raise BadManifest(f"{self.url}/{MANIFEST} is not valid JSON ({_short(err)}); {self.redo}") from None
        if not isinstance(data, dict):
            raise BadManifest(f"{self.url}/{MANIFEST} is not a JSON object; {self.redo}")
        return data

    @property
    def redo(self) -> str:
        """How to repair the run: its own job, rerun with its id, checks its parts and rewrites the manifest."""
        return f"`atman run JOB --run-id {self.run_id}` redoes it"


class DamagedPart(UserWarning):
    """Something a reader of parts would read that is missing, damaged or cannot be verified (a part, a run's
    manifest): it is left out, and the warning names it and says how to repair it."""


def run_parts(fs, run: Run) -> list[str]:
    """The parts of a run that a query may read, as URLs; whatever is left out is named in a ``DamagedPart``
    warning (see ``readable_parts``)."""
    names, problems = readable_parts(fs, run)
    for problem in problems:
        warnings.warn(problem, DamagedPart, 2)
    return [url(fs, f"{run.path}/{name}") for name in names]


def readable_parts(fs, run: Run) -> tuple[list[str], list[str]]:
    """The names of a run's parts that a query may read, and a line for each thing left out. A complete run: the
    parts its manifest names that have the size and sha256 written there, the manifest checked for completeness (a
    part for every shard, rows that add up, no part on disk it does not name). An incomplete one (--include-incomplete,
    ``atman report --run-id``, a preview): its parts so far, each one a worker has recorded as finished checked the
    same way against that record (``recorded_parts``). One read of the manifest and one listing per run, never a
    listing of the whole root; a part is hashed only when it changed since it was last verified
    (``integrity.cache_dir``)."""
    infos = {info["name"].rsplit("/", 1)[-1]: info for info in fresh_ls(fs, run.path, detail=True)}
    if not run.complete:
        return _unfinished(fs, run, infos)
    try:
        manifest = run.manifest(fs)
        entries = manifest_parts(manifest, f"{run.url}/{MANIFEST}", run.redo)
    except BadManifest as err:
        return [], [f"run {run.run_id} is left out: {err}"]
    verified, problems = _checked(fs, run, entries, infos, "the manifest")
    return verified, _coverage(run, manifest, entries, infos) + problems


def _unfinished(fs, run: Run, infos: dict) -> tuple[list[str], list[str]]:
    """An incomplete run's parts: those with a progress record are checked against it; one without (a shard being
    written, its marker not yet there) is read unverified, as every part of an incomplete run was before records
    were checked."""
    names = sorted(n for n, i in infos.items() if fnmatch.fnmatch(n, PART_GLOB) and not i.get("islink"))
    records = recorded_parts(fs, run.path)
    entries = [{"name": n, "bytes": records[n]["bytes"], "sha256": records[n]["sha256"]} for n in names if n in records]
    verified, problems = _checked(fs, run, entries, infos, "its progress record")
    return sorted(verified + [n for n in names if n not in records]), problems


def recorded_parts(fs, run_dir: str) -> dict[str, dict]:
    """Part name -> the progress record a worker wrote for it (its size and sha256 among them) in the run directory
    ``run_dir``: the consolidated ``_progress.json``, overlaid with the markers written since. A record without a
    valid size and sha256 is no record; {} where the run has none."""
    try:
        markers = sorted(p for p in fresh_ls(fs, f"{run_dir}/{MARKERS}") if _MARKER.fullmatch(p.rsplit("/", 1)[-1]))
    except OSError:
        markers = []
    records = _progress_entries(fs, run_dir) + [_json(fs, path) for path in markers]
    return {r["part"]: r for r in records if _is_record(r)}


def recorded_part(fs, run_dir: str, shard: int) -> dict | None:
    """The progress record of one shard's part (``recorded_parts``, without listing or reading the other markers):
    its marker where one is left, else its entry in ``_progress.json``; None where it has none."""
    record = _json(fs, f"{run_dir}/{MARKERS}/{shard_name(shard)}.json")
    if _is_record(record) and record["part"] == part_name(shard):
        return record
    entries = (r for r in _progress_entries(fs, run_dir) if _is_record(r) and r["part"] == part_name(shard))
    return next(entries, None)


def _progress_entries(fs, run_dir: str) -> list:
    """The entries of the run's ``_progress.json``; [] where it has none (no shard finished yet) or cannot be read
    (the run's next driver rebuilds it)."""
    progress = _json(fs, f"{run_dir}/{PROGRESS}")
    entries = progress.get("shards") if isinstance(progress, dict) else None
    return entries if isinstance(entries, list) else []


def _json(fs, path: str):
    """The JSON value of a small file; None where it is missing or not JSON (a marker being written)."""
    try:
        return json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None


def _is_record(record) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("part"), str)
        and isinstance(record.get("bytes"), int)
        and isinstance(record.get("sha256"), str)
        and _SHA256.fullmatch(record["sha256"]) is not None
    )


def _checked(fs, run: Run, entries: list[dict], infos: dict, where: str) -> tuple[list[str], list[str]]:
    """The names of ``entries`` (name, bytes, sha256 as ``where`` records them) whose files are those, and a line
    for each other."""
    problems, present = [], []
    for f in sorted(entries, key=lambda f: f["name"]):
        why = _mismatch(f, infos.get(f["name"]))
        if why:
            problems.append(f"{run.url}/{f['name']} {why}; its rows are left out ({run.redo})")
        else:
            present.append(f)
    verified, wrong = _verify(fs, run, present, infos, where)
    return verified, problems + wrong


def _coverage(run: Run, manifest: dict, entries: list[dict], infos: dict) -> list[str]:
    """What the manifest lacks: shards without a part, a row total its parts do not add up to, parts on disk it
    does not name (they cannot be verified: left out)."""
    problems, named = [], {f["shard"] for f in entries}
    missing = manifest["shards"] - len(named)  # entries are unique and within 0..shards-1
    if missing:
        first = list(itertools.islice((s for s in range(manifest["shards"]) if s not in named), 5))
        listed = ", ".join(f"{s} ({part_name(s)})" for s in first) + (", ..." if missing > len(first) else "")
        problems.append(
            f"{run.url}/{MANIFEST} names no part for {missing} of {manifest['shards']} shards: {listed}; "
            f"their rows are missing ({run.redo})"
        )
    total = sum(f["rows"] for f in entries)
    if total != manifest["rows"]:
        problems.append(
            f"{run.url}/{MANIFEST} counts {manifest['rows']} rows, its parts {total}: the answer may lack rows "
            f"({run.redo})"
        )
    names = {f["name"] for f in entries}
    for name in sorted(n for n in infos if fnmatch.fnmatch(n, PART_GLOB) and n not in names):
        problems.append(
            f"{run.url}/{name} is not in the run's manifest, so it cannot be verified; its rows are left out "
            f"({run.redo})"
        )
    return problems


def _mismatch(entry: dict, info: dict | None) -> str | None:
    """Why a listed part is not the one the manifest names (without reading it), or None."""
    if info is None:
        return "is missing"
    if info.get("islink") or info.get("type") not in (None, "file"):
        return "is not a plain file (a link?), so not the part the run wrote"
    if info.get("size") != entry["bytes"]:
        return f"is {info.get('size')} bytes, {entry['bytes']} were written"
    return None


def _verify(fs, run: Run, entries: list[dict], infos: dict, where: str) -> tuple[list[str], list[str]]:
    """The names of ``entries`` whose bytes have the sha256 ``where`` records, and a line for each other. A part
    verified before and unchanged since (same size, times, inode or ETag) is not read again."""
    known = load_checks(run.url)
    keys = {f["name"]: identity(infos[f["name"]], f["sha256"]) for f in entries}
    todo = [f for f in entries if keys[f["name"]] is None or known.get(f["name"]) != keys[f["name"]]]
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib hashes large chunks without the GIL
        found = pool.map(lambda f: sha256_of(fs, f"{run.path}/{f['name']}"), todo)
        digests = dict(zip([f["name"] for f in todo], found, strict=True))
    verified, wrong = [], []
    for f in entries:
        digest = digests.get(f["name"], f["sha256"])
        if digest == f["sha256"]:
            verified.append(f["name"])
            continue
        why = "cannot be read" if digest is None else f"does not match its sha256 in {where} (its bytes changed)"
        wrong.append(f"{run.url}/{f['name']} {why}; its rows are left out ({run.redo})")
    checks = {n: keys[n] for n in verified if keys[n] is not None}
    if checks != known:
        save_checks(run.url, checks)
    return verified, wrong


def read_run(location: str) -> pa.Table:
    """The rows of the run directory ``location`` (local or s3://), read from the parts a query may read
    (``readable_parts``; what is left out is named in ``DamagedPart`` warnings): the guarded reader for code that
    reads a run's parts without DuckDB (``atman run --preview``)."""
    fs, path = filesystem(location)
    path = path.rstrip("/")
    partitions = parse_run_dir(path)
    if partitions is None:
        raise ValueError(f"run: {location} is not a run directory ({run_glob('ROOT', 'MODEL', 'DATE', 'ID')})")
    run = Run(*partitions, path, url(fs, path), fs.exists(f"{path}/{SUCCESS}"))
    names = [part.rsplit("/", 1)[-1] for part in run_parts(fs, run)]
    tables = [read_part(fs, f"{path}/{name}") for name in names]
    return pa.concat_tables(tables, promote_options="default") if tables else SCHEMA.empty_table()


class PartChanged(ValueError):
    """A part whose bytes are not those its run recorded (``read_part``'s ``expected``); the message names it."""


def read_part(fs, path: str, columns: list[str] | None = None, expected: str | None = None) -> pa.Table:
    """One part (``columns``: only those). With ``expected``, the sha256 its run recorded for it, the bytes are read
    once and checked first (PartChanged); without, the caller reads what ``readable_parts`` verified.
    pyarrow.ArrowInvalid or OSError where it is not readable Parquet."""
    import pyarrow.parquet as pq

    if expected is None:
        return pq.read_table(path, filesystem=fs, columns=columns)
    data = fs.cat_file(path)
    if sha256(data) != expected:
        raise PartChanged(f"{path} does not match its sha256 {expected} (its bytes changed)")
    return pq.read_table(pa.BufferReader(data), columns=columns)


def _short(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:200]
