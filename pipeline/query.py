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

What a query reads is checked first (``pipeline.parts.readable_parts``, the guard every reader of parts uses): a
complete run's ``_manifest.json`` must name one part per shard with its size and sha256, and each part must match
them. A part that does not, or that the manifest does not name, and a run whose manifest is invalid, are left out
with a ``DamagedPart`` warning naming them; an incomplete run's parts are checked against the progress records its
workers wrote (one not yet recorded is read unverified). A part's check is remembered (``integrity.cache_dir``)
until its file changes, so a second query does not hash it again. Queries run with a time limit and modest memory
and spill limits (``connect``, ``run_query``).
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import threading
import warnings

import duckdb
import pyarrow as pa

from pipeline.integrity import links_leaving
from pipeline.layout import (
    PARTITIONS,
    SUCCESS,
    filesystem,
    is_local,
    parse_run_dir,
    partition_pattern,
    run_glob,
    storage_error,
    url,
)
from pipeline.parts import SCHEMA, V2_COLUMNS, DamagedPart, Run, readable_parts, sql_type

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


class LinkOutside(UserWarning):
    """A link under a local root that leads outside it: the connection then reads only the runs' verified parts."""


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
    image_rows = _image_rows(columns.issuperset(V2_COLUMNS))
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


# the view image_units before its rank: (column, expression over explanations, its type from the part schema)
_IMAGE_UNIT_COLUMNS = (
    *((c, c, "VARCHAR") for c in ("model", "run_date")),
    *((c, c, sql_type(c)) for c in ("run_id", "prompt_id", "status", "image", "image_width", "image_height")),
    ("unit_index", "unnest(range(len(image_scores)))", "BIGINT"),
    ("box", "unnest(image_box)", sql_type("image_box", element=True)),
    ("view", "unnest(image_view)", sql_type("image_view", element=True)),
    ("score", "unnest(image_scores)", sql_type("image_scores", element=True)),
)


def _image_rows(v2: bool) -> str:
    """One row per image unit of the ok rows with an image; where no part has the v2 columns (v1 parts only), no
    rows of the same shape."""
    if not v2:
        nulls = ", ".join(f"NULL::{kind} AS {name}" for name, _, kind in _IMAGE_UNIT_COLUMNS)
        return f"SELECT {nulls} WHERE false"
    listing = ", ".join(name if expr == name else f"{expr} AS {name}" for name, expr, _ in _IMAGE_UNIT_COLUMNS)
    return f"SELECT {listing} FROM explanations WHERE status = 'ok' AND image_scores IS NOT NULL"


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


def _refused(err: duckdb.Error) -> str:
    """The path DuckDB refused, else its message."""
    m = re.search(r'Cannot access \w+ "([^"]*)"', str(err))
    return m.group(1) if m else _short(err)


def _short(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:200]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
