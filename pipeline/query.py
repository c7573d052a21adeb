"""SQL over a root of job outputs (DuckDB): views ``explanations`` (one row per prompt and run), ``units`` (one
row per prompt, run and unit, with its rank) and ``image_units`` (one row per image unit of a row with an image:
its box [x0, y0, x1, y1] in the image's pixels, view, score and rank), for local roots and s3:// roots alike.

    con = pipeline.query.connect("out/")
    con.execute("SELECT unit_text, avg(score) FROM units WHERE rank <= 3 GROUP BY 1 ORDER BY 2 DESC").fetchall()

Only runs with ``_SUCCESS`` are visible unless ``include_incomplete``. ``run_query`` runs user SQL read-only:
one SELECT-like statement (no COPY, ATTACH, INSTALL, CREATE, SET...). The connection itself reads nothing but the
root: once the views exist, DuckDB's external access is off except for the root's directory (or bucket prefix), no
extension is installed or loaded, and the configuration is locked, so a query cannot read /etc/passwd, another
directory, an https:// URL or another bucket. In a local root with a link that leads outside it, the connection may
read only the runs' parts (a glob under the root would list through the link).

What a query reads is checked first: a complete run's ``_manifest.json`` must name one part per shard with its size
and sha256, and each part must match them. A part that does not, or that the manifest does not name, and a run whose
manifest is invalid, are left out with a ``DamagedPart`` warning naming them. A part's check is remembered
(``pipeline.integrity.cache_dir``) until its file changes, so a second query does not hash it again. Queries run
with a time limit and modest memory and spill limits (``connect``, ``run_query``).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
import secrets
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from pipeline.integrity import (
    BadManifest,
    identity,
    links_leaving,
    load_checks,
    manifest_parts,
    save_checks,
    sha256_of,
)
from pipeline.layout import (
    MANIFEST,
    PART_GLOB,
    PARTITIONS,
    SUCCESS,
    filesystem,
    fresh_ls,
    is_local,
    parse_run_dir,
    part_name,
    partition_pattern,
    run_glob,
    storage_error,
    url,
)
from pipeline.parts import SCHEMA

READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}
# No extension is fetched or loaded: s3:// is read by the registered fsspec filesystem, and an https:// path must
# fail, not install httpfs under $HOME/.duckdb.
_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
TIMEOUT_S = 300.0  # a query's time limit (atman query --timeout)
MEMORY_LIMIT = "2GB"  # DuckDB's memory limit (atman query --memory-limit); its own default is 80 % of the RAM
SPILL_LIMIT = "8GB"  # what a query may spill to its temp directory (--spill-limit); DuckDB's: 90 % of the free disk
# a part's path ends in its run directory's levels and its own name: the partitions are read from there only
_PART_PATH = "/".join(partition_pattern(p) for p in PARTITIONS) + "/[^/]+$"


class QueryError(ValueError):
    """User SQL that cannot run (syntax, a write, several statements); the message says why."""


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


def list_runs(root: str, include_incomplete: bool = False) -> list[Run]:
    """Every run under ``root``, oldest first (by run date, then run id)."""
    fs, base = filesystem(root)
    runs = []
    for path in fs.glob(run_glob(base)):
        partitions = parse_run_dir(path)
        if partitions is None:
            continue
        complete = fs.exists(f"{path}/{SUCCESS}")
        if complete or include_incomplete:
            runs.append(Run(*partitions, path, url(fs, path), complete))
    return sorted(runs, key=lambda r: (r.run_date, r.run_id, r.model))


def runs_to_query(root: str, include_incomplete: bool = False, run_id: str | None = None) -> list[Run]:
    """The runs ``atman query`` reads (only ``run_id``'s where given); QueryError when there are none, so that a
    missing or empty root is not answered with an empty result (``count(*)`` = 0 reads as "no rows matched", not as
    "wrong root")."""
    fs, base = filesystem(root)
    try:
        exists = fs.exists(base)
        runs = list_runs(root, include_incomplete=True) if exists else []
    except Exception as err:
        if not storage_error(err):
            raise
        raise QueryError(f"root: cannot read {root} ({_short(err)})") from None
    if not exists:
        raise QueryError(f"root: {root} does not exist (give the output.root a job wrote to)")
    if run_id is not None:
        if not any(r.run_id == run_id for r in runs):
            raise QueryError(f"run_id: no run {run_id!r} under {root} (`SELECT run_id FROM runs` lists them)")
        runs = [r for r in runs if r.run_id == run_id]
    chosen = [r for r in runs if r.complete or include_incomplete]
    if chosen:
        return chosen
    if runs:  # only incomplete ones, and they were not asked for
        raise QueryError(
            f"root: no complete runs under {root} ({len(runs)} incomplete; --include-incomplete reads them)"
        )
    raise QueryError(f"root: no runs under {root} (a run is a directory {run_glob('ROOT', 'MODEL', 'DATE', 'ID')})")


class DamagedPart(UserWarning):
    """Something a query would read that is missing, damaged or cannot be verified (a part, a run's manifest): it is
    left out, and the warning names it and says how to repair it."""


class LinkOutside(UserWarning):
    """A link under a local root that leads outside it: the connection then reads only the runs' verified parts."""


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
    part for every shard, rows that add up, no part on disk it does not name). An incomplete one: the parts it has
    so far, unverified (--include-incomplete). One read of the manifest and one listing per run, never a listing of
    the whole root; a part is hashed only when it changed since it was last verified (``integrity.cache_dir``)."""
    infos = {info["name"].rsplit("/", 1)[-1]: info for info in fresh_ls(fs, run.path, detail=True)}
    if not run.complete:
        return sorted(n for n, i in infos.items() if fnmatch.fnmatch(n, PART_GLOB) and not i.get("islink")), []
    try:
        manifest = run.manifest(fs)
        entries = manifest_parts(manifest, f"{run.url}/{MANIFEST}", run.redo)
    except BadManifest as err:
        return [], [f"run {run.run_id} is left out: {err}"]
    problems, present = _coverage(run, manifest, entries, infos), []
    for f in sorted(entries, key=lambda f: f["name"]):
        why = _mismatch(f, infos.get(f["name"]))
        if why:
            problems.append(f"{run.url}/{f['name']} {why}; its rows are left out ({run.redo})")
        else:
            present.append(f)
    verified, wrong = _verify(fs, run, present, infos)
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


def _verify(fs, run: Run, entries: list[dict], infos: dict) -> tuple[list[str], list[str]]:
    """The names of ``entries`` whose bytes have their manifest's sha256, and a line for each other. A part
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
        why = "cannot be read" if digest is None else "does not match its sha256 in the manifest (its bytes changed)"
        wrong.append(f"{run.url}/{f['name']} {why}; its rows are left out ({run.redo})")
    checks = {n: keys[n] for n in verified if keys[n] is not None}
    if checks != known:
        save_checks(run.url, checks)
    return verified, wrong


def connect(
    root: str,
    include_incomplete: bool = False,
    *,
    run_id: str | None = None,
    runs: list[Run] | None = None,
    memory_limit: str = MEMORY_LIMIT,
    spill_limit: str = SPILL_LIMIT,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``explanations``, ``units``, ``image_units`` and ``runs`` over ``root``, or
    only over the runs named by ``run_id`` or given as ``runs`` (``show``, ``report`` and ``diff`` open just what
    they are asked about). The connection can read nothing but ``root`` (see ``_confine``), uses at most
    ``memory_limit`` of memory and spills at most ``spill_limit`` (DuckDB sizes: '2GB', '512MB'). What is left out
    (``readable_parts``) is named in ``DamagedPart`` warnings; QueryError when nothing chosen is left to read."""
    fs, base = filesystem(root)
    con = _open(memory_limit, spill_limit)
    if runs is None:
        runs = [r for r in list_runs(root, include_incomplete) if run_id is None or r.run_id == run_id]
    runs = list(dict.fromkeys(runs))  # a run diffed against itself is read once
    links = _outside_links(fs, base)
    files, problems = [], []
    for run in runs:
        through = next((link for link in links if run.path.startswith(f"{link}/")), None)
        if through:
            problems.append(f"run {run.run_id} is left out: {run.url} is reached through {through}, a link outside")
            continue
        names, why = readable_parts(fs, run)
        files += [url(fs, f"{run.path}/{name}") for name in names]
        problems += why
    for problem in problems:
        warnings.warn(problem, DamagedPart, 2)
    if not is_local(fs):
        con.register_filesystem(fs)  # DuckDB cannot fetch its httpfs extension offline; s3fs does the reading
    read = _explanations_view(con, root, files)
    if not read and (problems or len(read) < len(files)):
        first = problems[0] if problems else "every part is damaged"
        raise QueryError(f"root: nothing left to read under {root}: {first}")
    _derived_views(con, runs)
    _confine(con, url(fs, f"{base.rstrip('/')}/"), read if links else None)
    return con


def _open(memory_limit: str, spill_limit: str) -> duckdb.DuckDBPyConnection:
    limits = {"memory_limit": memory_limit, "max_temp_directory_size": spill_limit}
    try:
        return duckdb.connect(":memory:", config=_CONFIG | limits | {"temp_directory": _private_temp_dir()})
    except duckdb.Error as err:
        raise QueryError(
            f"memory_limit / spill_limit: {memory_limit!r} / {spill_limit!r}: {_short(err)} (sizes like 2GB, 512MB)"
        ) from None


def _outside_links(fs, base: str) -> list[str]:
    """The links under a local root that lead outside it, each named in a ``LinkOutside`` warning (none on S3)."""
    if not is_local(fs):
        return []
    found = links_leaving(base)
    for link, target in found:
        warnings.warn(
            f"{link} is a link to {target}, outside the root: ignored; queries of this root read only its runs' "
            "parts (remove the link to read its other files)",
            LinkOutside,
            3,
        )
    return [link for link, _ in found]


def _explanations_view(con: duckdb.DuckDBPyConnection, root: str, files: list[str]) -> list[str]:
    """The view ``explanations`` over ``files``, model and run_date taken from each part's run directory (its last
    three levels: a root inside a 'model=' directory changes nothing); the files it reads. A part DuckDB cannot read
    (damaged bytes in an incomplete run's part, which no checksum guards) is named and left out."""
    files = list(files)
    groups = {p: i for i, p in enumerate(PARTITIONS, 1)}
    while files:
        listing = ", ".join(_quote(f) for f in files)
        source = f"read_parquet([{listing}], filename = true, union_by_name = true)"
        try:
            con.execute(
                f"""CREATE OR REPLACE VIEW explanations AS
                SELECT regexp_extract(filename, {_quote(_PART_PATH)}, {groups["model"]}) AS model,
                       regexp_extract(filename, {_quote(_PART_PATH)}, {groups["run_date"]}) AS run_date,
                       * EXCLUDE (filename)
                FROM {source}"""
            )
            return files
        except duckdb.Error as err:
            bad = next((f for f in files if f in str(err)), None)
            if bad is None:
                raise QueryError(f"root: cannot read the parts under {root} ({str(err).strip()})") from None
            warnings.warn(f"{bad} cannot be read ({_short(err)}); its rows are left out", DamagedPart, 3)
            files.remove(bad)
    empty = pa.schema([pa.field("model", pa.string()), pa.field("run_date", pa.string()), *SCHEMA])
    con.register("_empty_explanations", empty.empty_table())  # an empty root: the same columns, no rows
    con.execute("CREATE OR REPLACE VIEW explanations AS SELECT * FROM _empty_explanations")
    return []


def _derived_views(con: duckdb.DuckDBPyConnection, runs: list[Run]) -> None:
    """The views ``units``, ``image_units`` (over ``explanations``) and ``runs``."""
    con.execute(
        """CREATE VIEW units AS
        SELECT *, rank() OVER (PARTITION BY model, run_id, prompt_id ORDER BY score DESC) AS rank
        FROM (
            SELECT model, run_date, run_id, prompt_id, status,
                   unnest(range(len(scores))) AS unit_index,
                   unnest(unit_text) AS unit_text, unnest(unit_start) AS unit_start,
                   unnest(unit_length) AS unit_length, unnest(scores) AS score
            FROM explanations WHERE status = 'ok'
        )"""
    )
    columns = {row[0] for row in con.execute("DESCRIBE explanations").fetchall()}
    image_rows = (
        "SELECT model, run_date, run_id, prompt_id, status, image, image_width, image_height, "
        "unnest(range(len(image_scores))) AS unit_index, unnest(image_box) AS box, unnest(image_view) AS view, "
        "unnest(image_scores) AS score FROM explanations WHERE status = 'ok' AND image_scores IS NOT NULL"
        if "image_scores" in columns  # v1 parts only: no image columns, an empty view of the same shape
        else "SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS run_date, NULL::VARCHAR AS run_id, "
        "NULL::VARCHAR AS prompt_id, NULL::VARCHAR AS status, NULL::VARCHAR AS image, NULL::INTEGER AS image_width, "
        "NULL::INTEGER AS image_height, NULL::BIGINT AS unit_index, NULL::FLOAT[] AS box, NULL::VARCHAR AS view, "
        "NULL::FLOAT AS score WHERE false"
    )
    con.execute(
        f"""CREATE VIEW image_units AS
        SELECT *, rank() OVER (PARTITION BY model, run_id, prompt_id ORDER BY score DESC) AS rank
        FROM ({image_rows})"""
    )
    run_rows = [
        {"model": r.model, "run_date": r.run_date, "run_id": r.run_id, "location": r.url, "complete": r.complete}
        for r in runs
    ]
    run_schema = pa.schema(
        [("model", pa.string()), ("run_date", pa.string()), ("run_id", pa.string()), ("location", pa.string()),
         ("complete", pa.bool_())]
    )  # fmt: skip
    con.register("_runs", pa.Table.from_pylist(run_rows, schema=run_schema))
    con.execute("CREATE VIEW runs AS SELECT * FROM _runs")


def _private_temp_dir() -> str:
    """Where DuckDB may spill: a fresh path it creates only if it spills and removes on close. DuckDB lets queries
    read its temp directory even with external access off, and its default (./.tmp) would open the working
    directory's .tmp to them."""
    return os.path.join(tempfile.gettempdir(), f"atman-query-{secrets.token_hex(6)}")


def _confine(con: duckdb.DuckDBPyConnection, root_dir: str, only: list[str] | None = None) -> None:
    """From here on the connection reads only under ``root_dir`` (a directory URL ending in '/'), or only the files
    ``only`` (a root with a link leading outside it): external access off but for them, then the configuration
    locked so that no query can turn it back on. The order matters: DuckDB takes no new allowed directories once
    external access is off."""
    if only is None:
        con.execute("SET allowed_directories = ?", [[root_dir]])
    else:
        con.execute("SET allowed_paths = ?", [only])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def run_query(con: duckdb.DuckDBPyConnection, sql: str, timeout: float | None = TIMEOUT_S) -> pa.Table:
    """Run one read-only statement, interrupted after ``timeout`` seconds (None or 0: no limit); QueryError for
    anything else, for SQL DuckDB rejects, and for a query that runs out of time or memory."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise QueryError(f"sql: {err}") from None
    if len(statements) != 1:
        raise QueryError(f"sql: give exactly one statement (got {len(statements)})")
    kind = statements[0].type.name
    if kind not in READ_ONLY_STATEMENTS:
        raise QueryError(f"sql: only SELECT queries run here (got {kind}); the outputs are read-only")
    timer = threading.Timer(timeout, con.interrupt) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.PermissionException as err:  # connect() confined the connection to the root
        raise QueryError(
            f"sql: reads outside the output root are not allowed ({_refused(err)}); "
            "query the views explanations, units, image_units and runs"
        ) from None
    except duckdb.InterruptException:
        raise QueryError(f"sql: stopped after {timeout:g} s, the time limit (--timeout sets it; 0: none)") from None
    except duckdb.OutOfMemoryException as err:
        raise QueryError(
            f"sql: the query needs more memory than allowed ({_short(err)}); --memory-limit and --spill-limit "
            "raise the limits"
        ) from None
    except duckdb.Error as err:
        raise QueryError(f"sql: {str(err).strip()}") from None
    finally:
        if timer:
            timer.cancel()


def read_run(location: str) -> pa.Table:
    """The rows of the run directory ``location`` (local or s3://), read from the parts a query may read
    (``readable_parts``; what is left out is named in ``DamagedPart`` warnings): the guarded reader for code that
    reads a run's parts without DuckDB (``atman run --preview``)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(location)
    path = path.rstrip("/")
    partitions = parse_run_dir(path)
    if partitions is None:
        raise ValueError(f"run: {location} is not a run directory ({run_glob('ROOT', 'MODEL', 'DATE', 'ID')})")
    run = Run(*partitions, path, url(fs, path), fs.exists(f"{path}/{SUCCESS}"))
    names = [part.rsplit("/", 1)[-1] for part in run_parts(fs, run)]
    tables = [pq.read_table(f"{path}/{name}", filesystem=fs) for name in names]
    return pa.concat_tables(tables, promote_options="default") if tables else SCHEMA.empty_table()


def _refused(err: duckdb.Error) -> str:
    """The path DuckDB refused, else its message."""
    m = re.search(r'Cannot access \w+ "([^"]*)"', str(err))
    return m.group(1) if m else _short(err)


def _short(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:200]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
