"""Shards: the unit of work, of publishing and of resume of a job (the data plane; the driver holds no rows).

1. ``list_input`` (driver): the input's files, sizes and versions; a listing, no file is opened.
2. ``scan_file`` (a worker, one task per file): stream the file's rows, validate them, write them as blocks of at
   most ``BLOCK_ROWS`` rows to ``_staging/`` (Parquet, STAGED_SCHEMA).
3. ``resolve`` (a worker): DuckDB over the blocks' ids, out of core: ids for rows without one and for repeats
   (``reader.resolve_ids``) go to ``_staging/_fixups.parquet``.
4. ``make_plan`` (driver): consecutive blocks form shards of at most ``shard_rows`` rows; the plan (``_plan.json``)
   names them, with the input's listing, so a rerun finds the same shards (and refuses a changed input).
5. Each shard is explained by one actor call and published as one part (``part-s<shard>.parquet``), then a marker
   (``_progress/s<shard>.json``: rows, counts, size, sha256) says it is done; the driver folds markers into
   ``_progress.json``. A rerun reads that record and the markers left since (not every part), checks each part's
   size and checksum, and redoes only shards that are unfinished or damaged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.jobspec import InputSpec
from pipeline.layout import RunPaths, fresh_ls, is_local, parquet_bytes, part_name, publish, url
from pipeline.reader import STAGED_SCHEMA, InputFile, InputListing, apply_fixups, iter_requests, resolve_ids

log = logging.getLogger(__name__)

BLOCK_ROWS = 1000
"""Rows per staging block: the grain at which shards are cut."""
FIXUPS = "_fixups.parquet"
PLAN_VERSION = 2


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
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        d = json.loads(data)
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"_plan.json: version {d.get('version')} is not {PLAN_VERSION}")
        return cls(
            input=d["input"],
            blocks=[Block(*b) for b in d["blocks"]],
            shards=[[tuple(seg) for seg in s] for s in d["shards"]],
            shard_rows=d["shard_rows"],
            ignored=d.get("ignored", []),
        )


# --- staging (runs where the work runs: a Ray task, or in-process for `inline`) ----------------------------------


def scan_file(input_json: str, run: dict, file: dict, index: int, block_rows: int, compression: str) -> list[Block]:
    """Stream one input file into staging blocks; returns them in input order. Never holds more than a block."""
    spec = InputSpec.model_validate_json(input_json)
    paths = RunPaths(**run)
    fs = paths.fs
    blocks: list[Block] = []
    rows: list[dict] = []

    def flush() -> None:
        table = pa.Table.from_pylist(rows, schema=STAGED_SCHEMA)
        name = f"f{index:06d}-b{len(blocks):06d}.parquet"
        publish(fs, f"{paths.staging}/{name}", parquet_bytes(table, compression))
        ordinals = table.column("ordinal")
        blocks.append(Block(name, table.num_rows, ordinals[0].as_py(), ordinals[-1].as_py()))
        rows.clear()

    for request in iter_requests(spec, InputFile(**file), index):
        rows.append(request)
        if len(rows) >= block_rows:
            flush()
    if rows:
        flush()
    return blocks


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
        con.execute(f"CREATE VIEW ids AS SELECT ordinal, prompt_id, source FROM read_parquet({listing})")
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


def make_plan(listing: InputListing, blocks: list[Block], shard_rows: int, actors: int, batch_rows: int) -> Plan:
    """Cut the rows (in input order) into shards of ``shard_rows`` rows, fewer when the input is small: about four
    shards per actor, but not fewer rows than a batch. A shard may start or end inside a block."""
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
    return Plan(listing.fingerprint(), list(blocks), shards, shard_rows, list(listing.ignored))


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
        elif (before[key]["size"], before[key]["version"]) != (now[key]["size"], now[key]["version"]):
            changes.append(f"{name} changed (size {before[key]['size']} -> {now[key]['size']})")
    return changes


# --- progress ----------------------------------------------------------------------------------------------------


def marker(
    shard: int, rows: pa.Table, data: bytes, *, explained: int, unit_passes: int, seconds: float, compute=None
) -> dict:
    """What says a shard is done: its part's name, size and checksum, its rows' statuses, and how the actor that
    wrote it computed (``compute``: device, weights' dtype, resolved precision)."""
    statuses = rows.column("status").to_pylist()
    return {
        "shard": shard,
        "part": part_name(shard),
        "rows": rows.num_rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "md5": hashlib.md5(data).hexdigest(),  # what S3 lists as the ETag of a single PUT: checked without a read
        "counts": {s: statuses.count(s) for s in ("ok", "skipped", "error")},
        "explained": explained,
        "unit_passes": unit_passes,
        "seconds": round(seconds, 3),
        "compute": compute,
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }


def write_marker(paths: RunPaths, record: dict) -> None:
    publish(paths.fs, paths.marker(record["shard"]), json.dumps(record).encode())


def load_progress(paths: RunPaths) -> tuple[dict[int, dict], list[int]]:
    """Finished shards: the consolidated record, overlaid with the markers written since (one read, one listing,
    plus one read per marker left by a driver that stopped before folding them in), and the shards of those
    markers."""
    fs = paths.fs
    records: dict[int, dict] = {}
    try:
        records = {r["shard"]: r for r in json.loads(fs.cat_file(paths.progress))["shards"]}
    except FileNotFoundError:
        pass
    try:
        names = sorted(fresh_ls(fs, paths.markers))
    except FileNotFoundError:
        names = []
    leftover = []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            record = json.loads(fs.cat_file(name))
        except (FileNotFoundError, json.JSONDecodeError):
            continue  # a marker is published whole; an unreadable one is not ours
        records[record["shard"]] = record
        leftover.append(record["shard"])
    return records, leftover


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
            digests = pool.map(lambda s: _sha256(fs, paths.part(records[s]["part"])), to_hash)
            for shard, digest in zip(to_hash, digests, strict=True):
                if digest != records[shard]["sha256"]:
                    name = records[shard]["part"]
                    bad[shard] = f"{name} does not match its checksum (its bytes changed after it was written)"
    return bad


def _sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remove_staging(paths: RunPaths) -> None:
    fs = paths.fs
    if fs.exists(paths.staging):
        fs.rm(paths.staging, recursive=True)
