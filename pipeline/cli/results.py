"""The commands that read what runs wrote under an output root: ``atman query`` (SQL), ``show`` (one prompt),
``report`` (an HTML page) and ``diff`` (two runs compared prompt by prompt)."""

from __future__ import annotations

import warnings
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.cli.common import AUDIT, audit_option, err, fail, reported
from pipeline.errors import AnswerWithheld

Root = Annotated[str, typer.Argument(help="Output root (local path or s3://...).")]


def query(
    root: Annotated[str, typer.Argument(help="Output root (local path or s3://bucket/prefix).")],
    sql: Annotated[str, typer.Argument(help="One SELECT over the views explanations, units and runs.")],
    format: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
    include_incomplete: Annotated[bool, typer.Option(help="Also read runs without _SUCCESS.")] = False,
    run_id: Annotated[
        str | None, typer.Option(help="Read only this run (an error when none of it can be read).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Stop the query after this many seconds (default 300; 0: no limit).")
    ] = None,
    memory_limit: Annotated[
        str | None, typer.Option(help="DuckDB's memory limit, e.g. 4GB (default 2GB); past it a query spills.")
    ] = None,
    spill_limit: Annotated[
        str | None, typer.Option(help="Most a query may spill to its temp directory, e.g. 20GB (default 8GB).")
    ] = None,
    strict: Annotated[
        bool, typer.Option(help="Exit 3 with no answer when any part or run is left out (damaged, unverifiable).")
    ] = False,
) -> None:
    """SQL (DuckDB, read-only) over every run under ROOT: `explanations` (one row per prompt and run, with
    columns model and run_date), `units` (one row per prompt, run and unit, with its rank) and `runs`. Queries
    read nothing outside ROOT; a ROOT without runs is an error, not an empty answer. Parts are verified against
    their run's manifest (sha256) first: one that does not match is left out with a warning, and the answer is
    marked partial (exit 0; --strict: exit 3)."""
    from pipeline.query import MEMORY_LIMIT, SPILL_LIMIT, TIMEOUT_S, QueryError, run_query, runs_to_query

    if format not in ("table", "json", "csv"):
        fail(f"format: {format!r} is not table, json or csv")
    limits = {"memory_limit": memory_limit or MEMORY_LIMIT, "spill_limit": spill_limit or SPILL_LIMIT}
    con = None
    with reported(QueryError, AnswerWithheld):
        try:
            runs = runs_to_query(root, include_incomplete, run_id)
            con, left_out = _connect_verified(root, runs, limits)
            if left_out and strict:
                raise AnswerWithheld(
                    f"--strict: {left_out} problem(s) above leave rows out of the answer; no answer given"
                )
            table = run_query(con, sql, TIMEOUT_S if timeout is None else timeout)
        except QueryError:
            if con is not None:  # closed here: DuckDB tearing down a failed connection at exit can abort the process
                con.close()
            raise
    from pipeline.render import print_table

    print_table(table, format, Console())
    if left_out:
        err.print(
            f"[yellow]warning:[/] partial answer: {left_out} problem(s) above left rows out of it "
            "(--strict makes this an error)",
            highlight=False,
            soft_wrap=True,
        )


def _connect_verified(root: str, runs, limits: dict):
    """The connection over ``runs`` and how many parts or runs it left out: each reason (a damaged part, a link
    outside the root) is warned about on stderr as it is found."""
    from pipeline.query import DamagedPart, LinkOutside, connect

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DamagedPart)
        warnings.simplefilter("always", LinkOutside)
        try:
            con = connect(root, runs=runs, **limits)
        finally:
            for w in caught:
                err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)
    return con, sum(issubclass(w.category, DamagedPart) for w in caught)


def show(
    root: Root,
    prompt_id: Annotated[str, typer.Argument(help="The prompt's id.")],
    run_id: Annotated[str | None, typer.Option(help="Which run (default: the latest that has the prompt).")] = None,
    top: Annotated[int, typer.Option(help="How many top units to list.")] = 5,
    overlay: Annotated[
        str | None, typer.Option(help="For a row with an image: write its map (PNG) to this file.")
    ] = None,
) -> None:
    """One prompt of a run in the terminal: units coloured by score, target, base CE, status, top units."""
    from pipeline.query import QueryError, connect
    from pipeline.render import render_row

    where = "prompt_id = $pid" + (" AND run_id = $rid" if run_id else "")
    with reported(QueryError):  # nothing of the run can be read (each reason was warned about)
        con = connect(root, run_id=run_id)
    rows = con.execute(
        f"SELECT * FROM explanations WHERE {where} ORDER BY run_date DESC, written_at DESC LIMIT 1",
        {"pid": prompt_id, **({"rid": run_id} if run_id else {})},
    ).fetchall()
    if not rows:
        scope = f"run {run_id!r}" if run_id else "any complete run"
        fail(f"prompt_id: {prompt_id!r} is not in {scope} under {root}")
    names = [d[0] for d in con.description]
    row = dict(zip(names, rows[0], strict=True))
    render_row(row, Console(), top_k=top)
    if overlay:
        if row.get("image_scores") is None:
            fail(f"--overlay: {prompt_id!r} has no image units")
        from pipeline.overlay import row_overlay

        picture, why = row_overlay(row)
        picture.save(overlay)
        Console().print(f"wrote {overlay}" + (f" (boxes only: {why})" if why else ""), highlight=False, soft_wrap=True)


def report(
    root: Root,
    out: Annotated[str, typer.Option("--out", help="The HTML file to write.")],
    run_id: Annotated[str | None, typer.Option(help="Which run (default: the latest complete one).")] = None,
    max_prompts: Annotated[int, typer.Option(help="Most prompts on the page (first by prompt id).")] = 1000,
) -> None:
    """One self-contained HTML page: run summary, method, a heatmap per prompt (score on hover), errors."""
    from pathlib import Path

    from pipeline.report import run_report

    with reported(ValueError):
        text, shown = run_report(root, run_id, max_prompts)
    Path(out).write_text(text, encoding="utf-8")
    Console().print(f"wrote {out}: {shown} prompts", highlight=False, soft_wrap=True)


def diff(
    root: Root,
    base: Annotated[str, typer.Option(help="Base run: RUN_ID or MODEL/RUN_ID.")],
    new: Annotated[str, typer.Option(help="New run: RUN_ID or MODEL/RUN_ID.")],
    min_spearman: Annotated[float, audit_option("min_spearman")] = AUDIT.min_spearman,
    min_top5_overlap: Annotated[float, audit_option("min_top5_overlap")] = AUDIT.min_top5_overlap,
    max_abs_delta_ce: Annotated[float | None, audit_option("max_abs_delta_ce")] = AUDIT.max_abs_delta_ce,
) -> None:
    """Compare two runs prompt by prompt; writes ROOT/_audits/<base>__<new>/audit.parquet (+ .html, summary)."""
    from pipeline.audit import diff_runs, resolve_run
    from pipeline.jobspec import AuditSpec

    with reported(ValueError):  # pydantic's ValidationError (a threshold) too, named field by field
        thresholds = AuditSpec(
            min_spearman=min_spearman, min_top5_overlap=min_top5_overlap, max_abs_delta_ce=max_abs_delta_ce
        )
        result = diff_runs(root, resolve_run(root, base), resolve_run(root, new), thresholds)
    print_audit(result)


def print_audit(result) -> None:
    """A diff's summary, the config changes between the runs and each drifted prompt (`atman diff`, `atman audit`)."""
    from rich.table import Table

    s = result.summary()
    table = Table(show_header=False)
    for key in ("compared", "only_in_base", "only_in_new", "mean_spearman", "mean_top5_overlap", "drifted"):
        value = s[key]
        table.add_row(
            key.replace("_", " "),
            "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value),
        )
    out = Console()
    out.print(f"[bold]{s['new']}[/] vs [bold]{s['base']}[/]", highlight=False)
    if s["method_changed"]:
        old, now = s["method"]["base"], s["method"]["new"]
        out.print(
            f"warning: the runs ran different methods ({old} -> {now}): the scores are not comparable; the numbers "
            "below say how far the two methods agree, not whether either drifted",
            style="yellow", highlight=False, markup=False, soft_wrap=True,
        )  # fmt: skip
    out.print(table)
    for change in s["config_changed"]:
        out.print(f"note: the runs differ in {change}", highlight=False, markup=False, soft_wrap=True)
    for row in result.table.to_pylist():
        if row["drift"]:
            out.print(f"drift {row['prompt_id']}: {row['reason']}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"audit: {result.location}/audit.parquet", highlight=False, soft_wrap=True)
