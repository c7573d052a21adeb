"""Staging: the input's rows, read, validated and written as Parquet blocks under ``_staging/`` before any is
explained, so workers read shards by row range and the driver never holds a row.

- ``stage_input`` (driver): one ``scan_file`` call per input file, or per piece of a file larger than
  ``input.split_bytes`` (``pipeline/pieces.py``), run where the work runs (an executor's ``scan``);
- ``scan_file`` (a task): stream one file's (or piece's) rows, validate them (``pipeline/reader.py``), write blocks of
  at most ``BLOCK_ROWS`` rows (STAGED_SCHEMA); a piece's rows are those of a whole-file read;
- ``resolve`` (a task): DuckDB over the blocks' ids, out of core: ids for rows without one and for repeats go to
  ``_staging/_fixups.parquet``;
- ``read_shard`` (a worker): a shard's rows, by the plan's segments, with the fixups applied;
- ``staging_ready`` / ``remove_staging`` (driver): staging is removed when the run completes, and made again when a
  rerun has work to do.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.jobspec import InputSpec, JobSpecError
from pipeline.layout import FIXUPS, RunPaths, block_name, fresh_ls, is_local, parquet_bytes, publish, url
from pipeline.pieces import split
from pipeline.plan import Block, Plan
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

BLOCK_ROWS = 1000
"""Rows per staging block: the grain at which shards are cut."""


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
        return scan_file, input_json, run, files[i], i, BLOCK_ROWS, compression, piece_dict, part

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


def remove_staging(paths: RunPaths) -> None:
    fs = paths.fs
    if fs.exists(paths.staging):
        fs.rm(paths.staging, recursive=True)
