"""SQL over a root of job outputs (DuckDB): views ``explanations`` (one row per prompt and run) and ``units`` (one
row per prompt, run and unit, with its rank), for local roots and s3:// roots alike.

    con = pipeline.query.connect("out/")
    con.execute("SELECT unit_text, avg(score) FROM units WHERE rank <= 3 GROUP BY 1 ORDER BY 2 DESC").fetchall()

Only runs with ``_SUCCESS`` are visible unless ``include_incomplete``. ``run_query`` runs user SQL read-only:
one SELECT-like statement, configuration locked (no COPY, ATTACH, INSTALL, CREATE, SET...).
"""

from __future__ import annotations

import fnmatch
import json
import re
import warnings
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from pipeline.layout import MANIFEST, PART_GLOB, SUCCESS, filesystem, fresh_ls
from pipeline.schema import SCHEMA

READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}


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
    base = base.rstrip("/")
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    runs = []
    for path in fs.glob(f"{base}/model=*/run_date=*/run_id=*"):
        m = re.search(r"model=([^/]+)/run_date=([^/]+)/run_id=([^/]+)$", path)
        if not m:
            continue
        complete = fs.exists(f"{path}/{SUCCESS}")
        if complete or include_incomplete:
            url = path if protocol in ("file", "local") else f"{protocol}://{path}"
            runs.append(Run(m.group(1), m.group(2), m.group(3), path, url, complete))
    return sorted(runs, key=lambda r: (r.run_date, r.run_id, r.model))


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
    prefix = run.url[: -len(run.path)] if run.url != run.path else ""
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
            out.append(f"{prefix}{run.path}/{f['name']}")
    return out


def connect(
    root: str,
    include_incomplete: bool = False,
    *,
    run_id: str | None = None,
    runs: list[Run] | None = None,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``explanations``, ``units`` and ``runs`` over ``root``, or only over the
    runs named by ``run_id`` or given as ``runs`` (``show``, ``report`` and ``diff`` open just what they are asked
    about)."""
    fs, _ = filesystem(root)
    con = duckdb.connect(":memory:")
    if runs is None:
        runs = [r for r in list_runs(root, include_incomplete) if run_id is None or r.run_id == run_id]
    runs = list(dict.fromkeys(runs))  # a run diffed against itself is read once
    files = [f for run in runs for f in run_parts(fs, run)]
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol not in ("file", "local"):
        con.register_filesystem(fs)  # DuckDB cannot fetch its httpfs extension offline; s3fs does the reading
    while files:
        listing = ", ".join(_quote(f) for f in files)
        source = f"read_parquet([{listing}], filename = true, union_by_name = true)"
        try:
            con.execute(
                f"""CREATE OR REPLACE VIEW explanations AS
                SELECT regexp_extract(filename, 'model=([^/]+)', 1) AS model,
                       regexp_extract(filename, 'run_date=([^/]+)', 1) AS run_date,
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
    return con


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
    if not con.execute("SELECT current_setting('lock_configuration')").fetchall()[0][0]:
        con.execute("SET lock_configuration = true")  # no SET / PRAGMA changes from here on
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as err:
        raise QueryError(f"sql: {str(err).strip()}") from None


def _short(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:200]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
