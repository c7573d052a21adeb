"""Shards: the unit of work, of publishing and of resume of a job (the data plane; the driver holds no rows).

1. ``list_input`` (driver): the input's files, sizes and versions; a listing, no file is opened.
2. ``scan_file`` (a worker, one task per file, or per piece of a file larger than ``input.split_bytes``:
   ``stage_input``, pipeline/pieces.py): stream the file's rows, validate them, write them as blocks of at most
   ``BLOCK_ROWS`` rows to ``_staging/`` (Parquet, STAGED_SCHEMA); a piece's rows are those of a whole-file read.
3. ``resolve`` (a worker): DuckDB over the blocks' ids, out of core: ids for rows without one and for repeats
   (``reader.resolve_ids``) go to ``_staging/_fixups.parquet``.
4. ``make_plan`` (driver): consecutive blocks form shards of at most ``shard_rows`` rows; the plan (``_plan.json``)
   names them, with the input's listing, so a rerun finds the same shards (and refuses a changed input).
5. Each shard is explained by one actor call and published as one part (``part-s<shard>.parquet``), then a marker
   (``_progress/s<shard>.json``: rows, counts, size, sha256) says it is done; the driver folds markers into
   ``_progress.json``. A rerun reads that record and the markers left since (not every part), checks each record
   against the plan (``record_problem``) and each part's size and checksum, and redoes only shards that are
   unfinished or damaged, or whose record does not hold.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.jobspec import InputSpec, JobSpecError
from pipeline.layout import (
    FIXUPS,
    MARKERS,
    PROGRESS,
    RunPaths,
    block_name,
    fresh_ls,
    is_local,
    parquet_bytes,
    part_name,
    publish,
    shard_name,
    url,
)
from pipeline.parts import STATUSES, file_sha256, sha256
from pipeline.pieces import split
from pipeline.reader import (
    STAGED_SCHEMA,
    InputFile,
    InputListing,
    Piece,
    PieceOverrun,
    PromptColumnMissing,
    apply_fixups,
    iter_requests,
    resolve_ids,
)

log = logging.getLogger(__name__)

BLOCK_ROWS = 1000
"""Rows per staging block: the grain at which shards are cut."""
PLAN_VERSION = 3
"""3 adds ``split_bytes``; a version 2 plan (every file scanned whole) still loads."""


@dataclass(frozen=True)
class Block:
    name: str
    rows: int
    lo: int
    """Smallest ordinal (input position) in the block."""
    hi: int


@dataclass
class Plan:
    input: list[dict]
    """The input's listing (path, kind, size, version, split per file) when the run started."""
    blocks: list[Block]
    shards: list[list[tuple[int, int, int]]]
    """Per shard, its segments: (block index, first row, end row) — a shard may cut a block."""
    shard_rows: int
    ignored: list[str] = field(default_factory=list)
    split_bytes: int = 0
    """The piece size the input was scanned with (0: every file whole), kept so a rerun stages it the same way."""

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.blocks)

    def segments(self, shard: int) -> list[dict]:
        """The shard's rows as ``{"block": Block fields, "start", "stop"}`` (what a worker reads)."""
        return [
            {"block": self.blocks[i].__dict__, "start": start, "stop": stop} for i, start, stop in self.shards[shard]
        ]

    def shard_rows_of(self, shard: int) -> int:
        return sum(stop - start for _, start, stop in self.shards[shard])

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": PLAN_VERSION,
                "input": self.input,
                "ignored": self.ignored,
                "shard_rows": self.shard_rows,
                "blocks": [[b.name, b.rows, b.lo, b.hi] for b in self.blocks],
                "shards": [[list(seg) for seg in s] for s in self.shards],
                "split_bytes": self.split_bytes,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        d = json.loads(data)
        if d.get("version") not in (2, PLAN_VERSION):
            raise ValueError(f"_plan.json: version {d.get('version')} is not 2 or {PLAN_VERSION}")
        return cls(
            input=d["input"],
            blocks=[Block(*b) for b in d["blocks"]],
            shards=[[tuple(seg) for seg in s] for s in d["shards"]],
            shard_rows=d["shard_rows"],
            ignored=d.get("ignored", []),
            split_bytes=d.get("split_bytes", 0),
        )


# --- staging (runs where the work runs: a Ray task, or in-process for `inline`) ----------------------------------


@dataclass
class Scanned:
    """What a scan task returns: its blocks, in input order, and what only the whole file can settle."""

    blocks: list[Block]
    overrun: bool = False
    """A CSV piece read a record past its end (a quoted line break): the file is scanned again whole."""
    no_prompt: str | None = None
    """A JSONL piece whose rows all lack the prompt key: the file's error unless another piece has rows."""


def scan_file(
    input_json: str,
    run: dict,
    file: dict,
    index: int,
    block_rows: int,
    compression: str,
    piece: dict | None = None,
    part: int = 0,
) -> Scanned:
    """Stream one input file, or one ``piece`` of it (``part``: its number), into staging blocks. Never holds
    more than a block."""
    spec = InputSpec.model_validate_json(input_json)
    paths = RunPaths(**run)
    fs = paths.fs
    scanned = Scanned([])
    rows: list[dict] = []

    def flush() -> None:
        table = pa.Table.from_pylist(rows, schema=STAGED_SCHEMA)
        name = block_name(index, len(scanned.blocks), None if piece is None else part)
        publish(fs, f"{paths.staging}/{name}", parquet_bytes(table, compression))
        ordinals = table.column("ordinal")
        scanned.blocks.append(Block(name, table.num_rows, ordinals[0].as_py(), ordinals[-1].as_py()))
        rows.clear()

    try:
        for request in iter_requests(spec, InputFile(**file), index, None if piece is None else Piece(**piece)):
            rows.append(request)
            if len(rows) >= block_rows:
                flush()
    except PieceOverrun:
        scanned.overrun = True
        return scanned
    except PromptColumnMissing as err:
        if piece is None:
            raise
        scanned.no_prompt = str(err)
    if rows:
        flush()
    return scanned


def stage_input(
    listing: InputListing,
    spec: InputSpec,
    run: dict,
    block_rows: int,
    compression: str,
    split_bytes: int,
    tasks: Callable[[list[tuple]], list],
    notice: Callable[[str], None],
) -> list[Block]:
    """Scan every input file into staging blocks, in input order: a file larger than ``split_bytes`` in pieces,
    a task each (pipeline/pieces.py; 0: every file whole). ``tasks(calls)`` runs ``(function, *args)`` calls where
    the work runs and returns their results in order."""
    input_json = spec.model_dump_json()
    files = [asdict(f) for f in listing.files]
    pieces = split(listing.files, input_json, split_bytes, tasks, notice)

    def scan(i: int, piece: Piece | None = None, part: int = 0) -> tuple:
        piece_dict = None if piece is None else asdict(piece)
        return scan_file, input_json, run, files[i], i, block_rows, compression, piece_dict, part

    owners = [i for i in range(len(files)) for _ in pieces.get(i, [None])]
    calls = [scan(i, p, j) for i in range(len(files)) for j, p in enumerate(pieces.get(i, [None]))]
    results: dict[int, list[Scanned]] = {}
    for i, scanned in zip(owners, tasks(calls), strict=True):
        results.setdefault(i, []).append(scanned)
    again = [i for i in pieces if _settled(listing.files[i], results[i], RunPaths(**run), notice)]
    for i, scanned in zip(again, tasks([scan(i) for i in again]) if again else [], strict=True):
        results[i] = [scanned]
    return [b for i in range(len(files)) for scanned in results[i] for b in scanned.blocks]


def _settled(file: InputFile, scanned: list[Scanned], paths: RunPaths, notice) -> bool:
    """What only a file's pieces together say: whether it must be scanned again whole (its piece blocks are
    removed), or (raised) that no row of it has the prompt key."""
    if any(s.overrun for s in scanned):
        notice(f"input: {file.name}: a quoted CSV field holds a line break where a piece starts: scanned by one task")
        names = [f"{paths.staging}/{b.name}" for s in scanned for b in s.blocks]
        if names:
            paths.fs.rm(names)
        return True
    missing = [s.no_prompt for s in scanned if s.no_prompt]
    if missing and all(s.no_prompt or not s.blocks for s in scanned):
        raise JobSpecError(missing[0])
    return False


def resolve(run: dict, blocks: list[str], memory_limit: str = "512MB") -> int:
    """Choose ids for rows without one and for repeated ids over every block (DuckDB, spilling to a local temp dir
    past ``memory_limit``); writes ``_staging/_fixups.parquet``. Returns how many rows got a new id."""
    import duckdb

    paths = RunPaths(**run)
    fs = paths.fs
    with tempfile.TemporaryDirectory(prefix="atman-ids-") as tmp:
        con = duckdb.connect(":memory:", config={"memory_limit": memory_limit, "temp_directory": tmp})
        if not is_local(fs):
            con.register_filesystem(fs)  # DuckDB's own S3 client is an extension it cannot fetch offline
        files = [url(fs, f"{paths.staging}/{b}") for b in blocks]
        listing = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
        con.execute(f"CREATE VIEW ids AS SELECT ordinal, prompt_id, source, id_generated FROM read_parquet({listing})")
        fixups = resolve_ids(con, "ids")
        con.close()
    publish(fs, f"{paths.staging}/{FIXUPS}", parquet_bytes(fixups, "zstd"))
    return fixups.num_rows


def read_shard(paths: RunPaths, segments: list[dict]) -> pa.Table:
    """A shard's requests (STAGED_SCHEMA) with their final ids, in input order."""
    fs = paths.fs
    blocks = [Block(**seg["block"]) for seg in segments]
    table = pa.concat_tables(
        [
            pq.read_table(f"{paths.staging}/{b.name}", filesystem=fs).slice(seg["start"], seg["stop"] - seg["start"])
            for b, seg in zip(blocks, segments, strict=True)
        ]
    )
    lo, hi = min(b.lo for b in blocks), max(b.hi for b in blocks)
    fixups = pq.read_table(
        f"{paths.staging}/{FIXUPS}", filesystem=fs, filters=[("ordinal", ">=", lo), ("ordinal", "<=", hi)]
    )
    return apply_fixups(table, fixups)


def staging_ready(paths: RunPaths, plan: Plan) -> bool:
    fs = paths.fs
    try:
        present = {p.rsplit("/", 1)[-1] for p in fresh_ls(fs, paths.staging)}
    except FileNotFoundError:
        return False
    return FIXUPS in present and all(b.name in present for b in plan.blocks)


# --- planning ----------------------------------------------------------------------------------------------------


def make_plan(
    listing: InputListing, blocks: list[Block], shard_rows: int, actors: int, batch_rows: int, split_bytes: int = 0
) -> Plan:
    """Cut the rows (in input order) into shards of ``shard_rows`` rows, fewer when the input is small: about four
    shards per actor, but not fewer rows than a batch. A shard may start or end inside a block. ``split_bytes``:
    the piece size the blocks were scanned with, recorded."""
    total = sum(b.rows for b in blocks)
    target = max(1, min(shard_rows, max(batch_rows, math.ceil(total / (4 * actors)))))
    shards: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = target
    for i, b in enumerate(blocks):
        start = 0
        while start < b.rows:
            take = min(room, b.rows - start)
            current.append((i, start, start + take))
            start += take
            room -= take
            if room == 0:
                shards.append(current)
                current, room = [], target
    if current:
        shards.append(current)
    return Plan(listing.fingerprint(), list(blocks), shards, shard_rows, list(listing.ignored), split_bytes)


def input_changes(plan: Plan, listing: InputListing) -> list[str]:
    """How the input differs from the plan's listing (empty when it is the same)."""
    before = {(f["path"], f.get("split")): f for f in plan.input}
    now = {(f["path"], f.get("split")): f for f in listing.fingerprint()}
    changes = []
    for key in sorted(set(before) | set(now), key=str):
        name = key[0] if key[1] is None else f"{key[0]}[{key[1]}]"
        if key not in now:
            changes.append(f"{name} is gone")
        elif key not in before:
            changes.append(f"{name} is new")
        elif before[key]["size"] != now[key]["size"]:
            changes.append(f"{name} changed (size {before[key]['size']} -> {now[key]['size']})")
        elif before[key]["version"] != now[key]["version"]:  # e.g. restored from a copy: the bytes may differ
            changes.append(
                f"{name} was modified (mtime/version changed: {before[key]['version']} -> {now[key]['version']}, "
                f"size the same: {now[key]['size']})"
            )
    return changes


def plan_problem(plan: Plan) -> str | None:
    """What in a plan read back does not hold together (a shard naming rows its block does not have), or None."""
    for s, segments in enumerate(plan.shards):
        for segment in segments:
            if len(segment) != 3 or not all(isinstance(x, int) for x in segment):
                return f"shard {s} has a segment {list(segment)!r}, not [block, start, stop]"
            i, start, stop = segment
            if not (0 <= i < len(plan.blocks) and 0 <= start < stop <= plan.blocks[i].rows):
                return f"shard {s} names rows {start}..{stop} of block {i}, which the plan's blocks do not have"
    return None


# --- progress ----------------------------------------------------------------------------------------------------


def marker(
    shard: int, rows: pa.Table, data: bytes, *, explained: int, unit_passes: int, seconds: float, compute=None
) -> dict:
    """What says a shard is done: its part's name, size and checksum, its rows' statuses, and how the actor that
    wrote it computed (``compute``: device, weights' dtype, resolved precision)."""
    statuses = rows.column("status").to_pylist()
    record = {
        "shard": shard,
        "part": part_name(shard),
        "rows": rows.num_rows,
        "bytes": len(data),
        "sha256": sha256(data),
        "md5": hashlib.md5(data).hexdigest(),  # what S3 lists as the ETag of a single PUT: checked without a read
        "counts": {s: statuses.count(s) for s in STATUSES},
        "explained": explained,
        "unit_passes": unit_passes,
        "seconds": round(seconds, 3),
        "compute": compute,
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    return record | {"check": record_check(record)}


def record_check(record: dict) -> str:
    """A digest of what a progress record claims (shard, part, rows, the part's size and checksum, counts): a record
    changed after it was written no longer matches it, which the driver sees without reading the part."""
    counts = record.get("counts")
    claims = [record.get(k) for k in ("shard", "part", "rows", "bytes", "sha256")]
    claims.append(sorted(counts.items()) if isinstance(counts, dict) else counts)
    return hashlib.sha256(json.dumps(claims).encode()).hexdigest()[:16]


def write_marker(paths: RunPaths, record: dict) -> None:
    publish(paths.fs, paths.marker(record["shard"]), json.dumps(record).encode())


_MARKER_NAME = re.compile(r"s(\d+)\.json")


def load_progress(
    paths: RunPaths, plan: Plan, notice: Callable[[str], None], staged: Callable[[], None]
) -> tuple[dict[int, dict], list[int], dict[int, str]]:
    """Finished shards, each record a claim checked against the plan (``record_problem``): the consolidated record
    (``_progress.json``, one read; rebuilt from the parts when it is unreadable), overlaid with the markers written
    since (one listing, one read per marker left by a driver that stopped before folding them in, and one read of
    its part's status column). Returns the records that hold, the shards of the markers read (to fold in and
    remove) and, per shard, why its record does not hold (the shard is explained again). A part's size and
    checksum are ``damaged``'s. ``staged()`` makes sure the input is staged (to rebuild the record)."""
    fs = paths.fs
    records, problems = _consolidated(paths, plan, notice, staged)
    try:
        names = sorted(p.rsplit("/", 1)[-1] for p in fresh_ls(fs, paths.markers))
    except FileNotFoundError:
        names = []
    leftover = []
    for name in names:
        m = _MARKER_NAME.fullmatch(name)
        if m is None or name != f"{shard_name(int(m[1]))}.json":
            continue  # not a marker (a temporary file of an interrupted write: finalize removes it)
        shard, where = int(m[1]), f"{MARKERS}/{name}"
        leftover.append(shard)
        record, why = None, None
        try:
            record = json.loads(fs.cat_file(f"{paths.markers}/{name}"))
        except FileNotFoundError:
            continue
        except ValueError as err:  # a marker is published whole: this one is not what a worker wrote
            why = f"is unreadable ({type(err).__name__}: {err})"
        if why is None:
            why = record_problem(record, shard, plan) or status_problem(paths, record)
        records.pop(shard, None)  # the marker is newer than the consolidated record: it decides
        if why is None:
            records[shard] = record
        elif shard < len(plan.shards):
            problems[shard] = f"{where} {why}"
        else:
            notice(f"{where} is removed: it {why}")
    return records, leftover, problems


def record_problem(record, shard: int, plan: Plan) -> str | None:
    """What a progress record of ``shard`` (a marker, or an entry of ``_progress.json``) claims that does not hold
    against the plan, or None. Trusted as it stands, a marker of another shard made a run complete without that
    shard's rows, and counts that were not its part's made the manifest count them wrongly."""
    if not isinstance(record, dict):
        return f"is not a record (a JSON object is expected, got {type(record).__name__})"
    if record.get("shard") != shard:
        return f"says shard {record.get('shard')!r}, its name shard {shard}"
    if not 0 <= shard < len(plan.shards):
        return f"is of shard {shard}, which the plan does not have (it has {len(plan.shards)})"
    if record.get("part") != part_name(shard):
        return f"names part {record.get('part')!r}, not {part_name(shard)}"
    rows = plan.shard_rows_of(shard)
    if record.get("rows") != rows:
        return f"says rows: {record.get('rows')!r}, the plan gives the shard {rows}"
    counts = record.get("counts")
    if not isinstance(counts, dict) or sorted(counts) != sorted(STATUSES) or not all(map(_count, counts.values())):
        return f"has counts {counts!r}, not a number of rows for each of {', '.join(STATUSES)}"
    if sum(counts.values()) != rows:
        return f"has counts {_show(counts)}, which sum to {sum(counts.values())}, not to its {rows} rows"
    if not _count(record.get("bytes")) or not re.fullmatch(r"[0-9a-f]{64}", str(record.get("sha256"))):
        return "has no valid size or sha256 of its part"
    if "check" in record and record["check"] != record_check(record):
        return "does not match its own check (it was changed after it was written)"
    return None


def status_problem(paths: RunPaths, record: dict) -> str | None:
    """Whether the record's counts are its part's: the part's status column is read (its footer and one column
    chunk). A missing or unreadable part is left to ``damaged``, which names it."""
    try:
        table = pq.read_table(paths.part(record["part"]), filesystem=paths.fs, columns=["status"])
    except (OSError, pa.ArrowInvalid):
        return None
    found = Counter(table.column("status").to_pylist())
    if found == Counter({s: n for s, n in record["counts"].items() if n}):
        return None
    return f"has counts {_show(record['counts'])}, its part's status column {_show(found)}"


def _consolidated(paths: RunPaths, plan: Plan, notice, staged) -> tuple[dict[int, dict], dict[int, str]]:
    """The entries of ``_progress.json`` that hold, and why the others do not. An unreadable file is a lost cache:
    the record is rebuilt from the parts."""
    try:
        data = paths.fs.cat_file(paths.progress)
    except FileNotFoundError:
        return {}, {}
    try:
        entries = json.loads(data)["shards"]
        if not isinstance(entries, list):
            raise TypeError(f"'shards' is a {type(entries).__name__}, not a list")
    except (ValueError, KeyError, TypeError) as err:
        notice(
            f"{PROGRESS} of run {paths.run_id} is unreadable ({type(err).__name__}: {err}); it is rebuilt from the "
            "parts, each read back and checked against the plan"
        )
        staged()
        records = rebuild_progress(paths, plan, notice)
        save_progress(paths, records)
        return records, {}
    records, problems = {}, {}
    for entry in entries:
        shard = entry.get("shard") if isinstance(entry, dict) else None
        if not _count(shard) or shard >= len(plan.shards):
            notice(f"{PROGRESS}: an entry of no shard of the plan is dropped ({str(entry)[:120]})")
            continue
        why = record_problem(entry, shard, plan)
        if why is None and "check" not in entry:  # written before records had checks: its part says
            why = status_problem(paths, entry)
            entry["check"] = record_check(entry)
        if why is None:
            records[shard] = entry
        else:
            problems[shard] = f"its entry in {PROGRESS} {why}"
    return records, problems


def rebuild_progress(paths: RunPaths, plan: Plan, notice) -> dict[int, dict]:
    """Records of the parts that read back as their shard's (exactly the ids of the shard's staged rows, all of this
    run, each with a status), made from the parts themselves: each part is read once, hashed and three of its
    columns parsed; each shard's staged rows are read once (the input must be staged)."""
    fs, records = paths.fs, {}
    names = {part_name(s): s for s in range(len(plan.shards))}
    for path in paths.parts():
        shard = names.get(path.rsplit("/", 1)[-1])
        if shard is None:
            continue  # finalize removes it
        try:
            data = fs.cat_file(path)
            table = pq.read_table(pa.BufferReader(data), columns=["prompt_id", "run_id", "status"])
        except (OSError, pa.ArrowInvalid) as err:
            notice(f"shard {shard}: {part_name(shard)} is unreadable ({type(err).__name__}: {err}); it is redone")
            continue
        ids = sorted(map(str, table.column("prompt_id").to_pylist()))
        runs, statuses = set(table.column("run_id").to_pylist()), set(table.column("status").to_pylist())
        if ids != sorted(read_shard(paths, plan.segments(shard)).column("prompt_id").to_pylist()):
            notice(f"shard {shard}: {part_name(shard)} does not hold the shard's rows (other ids); it is redone")
            continue
        if runs != {paths.run_id} or not statuses <= set(STATUSES):
            notice(f"shard {shard}: {part_name(shard)} holds rows of runs {sorted(map(str, runs))} or statuses "
                   f"{sorted(map(str, statuses))}, not run {paths.run_id}'s; it is redone")  # fmt: skip
            continue
        records[shard] = marker(shard, table, data, explained=0, unit_passes=0, seconds=0.0)
    return records


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _show(counts) -> str:
    return ", ".join(f"{s} {counts.get(s, 0)}" for s in STATUSES)


def save_progress(paths: RunPaths, records: dict[int, dict], fold: list[int] = ()) -> None:
    """Write the consolidated record, then remove the markers of the shards ``fold`` names (now in the record)."""
    fs = paths.fs
    body = {"updated_at": dt.datetime.now(dt.timezone.utc).isoformat(), "shards": [records[k] for k in sorted(records)]}
    publish(fs, paths.progress, json.dumps(body).encode())
    stale = [paths.marker(s) for s in fold]
    if stale:
        try:
            fs.rm(stale)
        except FileNotFoundError:
            for path in stale:  # some were never written (a shard finished before markers existed)
                if fs.exists(path):
                    fs.rm(path)


def damaged(paths: RunPaths, records: dict[int, dict], checksums: bool = True) -> dict[int, str]:
    """Shard -> why its part cannot be trusted: missing, another size, or (``checksums``) other bytes. One listing
    of the run; on S3 a part's ETag (the MD5 of a single PUT) is compared without reading it, a local part is
    hashed (sha256, a few threads)."""
    fs = paths.fs
    infos = {}
    try:
        for info in fresh_ls(fs, paths.dir, detail=True):
            infos[info["name"].rsplit("/", 1)[-1]] = info
    except FileNotFoundError:
        pass
    bad, to_hash = {}, []
    for shard, record in records.items():
        name = record["part"]
        info = infos.get(name)
        if info is None:
            bad[shard] = f"{name} is missing"
        elif info.get("size") != record["bytes"]:
            bad[shard] = f"{name} is {info.get('size')} bytes, {record['bytes']} were written"
        elif checksums:
            etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
            if etag and "-" not in etag and record.get("md5") and not is_local(fs):
                if etag != record["md5"]:
                    bad[shard] = f"{name} does not match its checksum (its bytes changed after it was written)"
            else:
                to_hash.append(shard)
    if to_hash:
        with ThreadPoolExecutor(max_workers=4) as pool:
            digests = pool.map(lambda s: file_sha256(fs, paths.part(records[s]["part"])), to_hash)
            for shard, digest in zip(to_hash, digests, strict=True):
                if digest != records[shard]["sha256"]:
                    name = records[shard]["part"]
                    bad[shard] = f"{name} does not match its checksum (its bytes changed after it was written)"
    return bad


def remove_staging(paths: RunPaths) -> None:
    fs = paths.fs
    if fs.exists(paths.staging):
        fs.rm(paths.staging, recursive=True)
