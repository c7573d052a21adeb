"""SQL over a root of job outputs (DuckDB): views ``explanations`` (one row per prompt and run), ``units`` (one
row per prompt, run and unit, with its rank) and ``image_units`` (one row per image unit of a row with an image:
its box [x0, y0, x1, y1] in the image's pixels, view, score and rank), for local roots and s3:// roots alike.

    con = pipeline.query.connect("out/")
    con.execute("SELECT unit_text, avg(score) FROM units WHERE rank <= 3 GROUP BY 1 ORDER BY 2 DESC").fetchall()

Only runs with ``_SUCCESS`` are visible unless ``include_incomplete``. ``run_query`` runs user SQL read-only:
one SELECT-like statement (no COPY, ATTACH, INSTALL, CREATE, SET...). The connection itself reads nothing but the
root: once the views exist, DuckDB's external access is off except for the root's directory (or bucket prefix), no
extension is installed or loaded, and the configuration is locked, so a query cannot read /etc/passwd, another
directory, an https:// URL or another bucket.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import tempfile
import warnings
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from pipeline.layout import (
    MANIFEST,
    PART_GLOB,
    SUCCESS,
    filesystem,
    fresh_ls,
    is_local,
    parse_run_dir,
    partition_pattern,
    run_glob,
    storage_error,
    url,
)
from pipeline.schema import SCHEMA

READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}
# No extension is fetched or loaded: s3:// is read by the registered fsspec filesystem, and an https:// path must
# fail, not install httpfs under $HOME/.duckdb.
_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


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
        try:
            return json.loads(fs.cat_file(f"{self.path}/{MANIFEST}"))
        except FileNotFoundError:
            return {}


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


def runs_to_query(root: str, include_incomplete: bool = False) -> list[Run]:
    """The runs ``atman query`` reads; QueryError when there are none, so that a missing or empty root is not
    answered with an empty result (``count(*)`` = 0 reads as "no rows matched", not as "wrong root")."""
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
    chosen = [r for r in runs if r.complete or include_incomplete]
    if chosen:
        return chosen
    if runs:  # only incomplete ones, and they were not asked for
        raise QueryError(
            f"root: no complete runs under {root} ({len(runs)} incomplete; --include-incomplete reads them)"
        )
    raise QueryError(f"root: no runs under {root} (a run is a directory {run_glob('ROOT', 'MODEL', 'DATE', 'ID')})")


class DamagedPart(UserWarning):
    """A part a run's manifest names is missing, has another size, or cannot be read: it is left out."""


def run_parts(fs, run: Run) -> list[str]:
    """The parts of a run that its manifest names (a complete run), or that it has so far (an incomplete one): one
    read and one listing per run, never a listing of the whole root. Parts that are missing or of another size than
    written are left out with a ``DamagedPart`` warning naming them."""
    sizes = {}
    for info in fresh_ls(fs, run.path, detail=True):
        sizes[info["name"].rsplit("/", 1)[-1]] = info.get("size")
    named = run.manifest(fs).get("files") if run.complete else None
    if named is None:  # incomplete (or written before manifests listed parts): what is there
        named = [{"name": n, "bytes": b} for n, b in sizes.items() if fnmatch.fnmatch(n, PART_GLOB)]
    out = []
    for f in sorted(named, key=lambda f: f["name"]):
        where = f"{run.url}/{f['name']}"
        if f["name"] not in sizes:
            warnings.warn(f"{where} is missing; its rows are left out (rerun the run to redo it)", DamagedPart, 2)
        elif f.get("bytes") is not None and sizes[f["name"]] != f["bytes"]:
            warnings.warn(
                f"{where} is {sizes[f['name']]} bytes, {f['bytes']} were written; its rows are left out "
                f"(`atman run JOB --run-id {run.run_id}` redoes it)",
                DamagedPart,
                2,
            )
        else:
            out.append(url(fs, f"{run.path}/{f['name']}"))
    return out


def connect(
    root: str,
    include_incomplete: bool = False,
    *,
    run_id: str | None = None,
    runs: list[Run] | None = None,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``explanations``, ``units``, ``image_units`` and ``runs`` over ``root``, or
    only over the runs named by ``run_id`` or given as ``runs`` (``show``, ``report`` and ``diff`` open just what
    they are asked about). The connection can read nothing but ``root`` (see ``_confine``)."""
    fs, base = filesystem(root)
    con = duckdb.connect(":memory:", config=_CONFIG | {"temp_directory": _private_temp_dir()})
    if runs is None:
        runs = [r for r in list_runs(root, include_incomplete) if run_id is None or r.run_id == run_id]
    runs = list(dict.fromkeys(runs))  # a run diffed against itself is read once
    files = [f for run in runs for f in run_parts(fs, run)]
    if not is_local(fs):
        con.register_filesystem(fs)  # DuckDB cannot fetch its httpfs extension offline; s3fs does the reading
    while files:
        listing = ", ".join(_quote(f) for f in files)
        source = f"read_parquet([{listing}], filename = true, union_by_name = true)"
        try:
            con.execute(
                f"""CREATE OR REPLACE VIEW explanations AS
                SELECT regexp_extract(filename, {_quote(partition_pattern("model"))}, 1) AS model,
                       regexp_extract(filename, {_quote(partition_pattern("run_date"))}, 1) AS run_date,
                       * EXCLUDE (filename)
                FROM {source}"""
            )
            break
        except duckdb.Error as err:  # a part whose bytes are damaged (same size): name it, leave it out
            bad = next((f for f in files if f in str(err)), None)
            if bad is None:
                raise QueryError(f"root: cannot read the parts under {root} ({str(err).strip()})") from None
            warnings.warn(f"{bad} cannot be read ({_short(err)}); its rows are left out", DamagedPart, 2)
            files.remove(bad)
    if not files:  # an empty root: the same columns, no rows
        empty = pa.schema([pa.field("model", pa.string()), pa.field("run_date", pa.string()), *SCHEMA])
        con.register("_empty_explanations", empty.empty_table())
        con.execute("CREATE VIEW explanations AS SELECT * FROM _empty_explanations")
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
    _confine(con, url(fs, f"{base.rstrip('/')}/"))
    return con


def _private_temp_dir() -> str:
    """Where DuckDB may spill: a fresh path it creates only if it spills and removes on close. DuckDB lets queries
    read its temp directory even with external access off, and its default (./.tmp) would open the working
    directory's .tmp to them."""
    return os.path.join(tempfile.gettempdir(), f"atman-query-{secrets.token_hex(6)}")


def _confine(con: duckdb.DuckDBPyConnection, root_dir: str) -> None:
    """From here on the connection reads only under ``root_dir`` (a directory URL ending in '/'): external access
    off but for it, then the configuration locked so that no query can turn it back on. The order matters: DuckDB
    takes no new allowed directories once external access is off."""
    con.execute("SET allowed_directories = ?", [[root_dir]])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """Run one read-only statement; QueryError for anything else (or for SQL DuckDB rejects)."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise QueryError(f"sql: {err}") from None
    if len(statements) != 1:
        raise QueryError(f"sql: give exactly one statement (got {len(statements)})")
    kind = statements[0].type.name
    if kind not in READ_ONLY_STATEMENTS:
        raise QueryError(f"sql: only SELECT queries run here (got {kind}); the outputs are read-only")
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.PermissionException as err:  # connect() confined the connection to the root
        raise QueryError(
            f"sql: reads outside the output root are not allowed ({_refused(err)}); "
            "query the views explanations, units, image_units and runs"
        ) from None
    except duckdb.Error as err:
        raise QueryError(f"sql: {str(err).strip()}") from None


def _refused(err: duckdb.Error) -> str:
    """The path DuckDB refused, else its message."""
    m = re.search(r'Cannot access \w+ "([^"]*)"', str(err))
    return m.group(1) if m else _short(err)


def _short(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:200]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
