"""A run's progress: which shards are published, with what (rows, counts, size, sha256), and which parts are damaged.

A worker publishes a shard's part, then its marker (``_progress/s<shard>.json``, ``marker`` / ``write_marker``); the
driver folds markers into ``_progress.json`` (``save_progress``). A rerun reads that record and the markers left
since (not every part: ``load_progress``), checks each record against the plan (``record_problem``) and each part's
size and checksum (``damaged``), and redoes only shards that are unfinished or damaged, or whose record does not
hold; without a readable record, the parts themselves are read (``rebuild_progress``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.layout import MARKERS, PROGRESS, RunPaths, fresh_ls, is_local, part_name, publish, shard_name
from pipeline.parts import STATUSES, file_sha256, sha256
from pipeline.plan import Plan
from pipeline.staging import read_shard

log = logging.getLogger(__name__)


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
