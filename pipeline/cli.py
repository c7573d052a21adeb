"""The ``atman`` command line. Exit codes: 0 ok, 2 bad input or config (stderr names the field), 1 other failure."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from typing import Annotated, Literal, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from pipeline.atman.config import MODES, Aggregate, AtManConfig, Granularity, Kernel, Mode, Postprocess, Precision
from pipeline.data import BOXES, SQUAD_DEV
from pipeline.eval_methods import DEFAULT_METHODS, GRAMMAR
from pipeline.jobspec import AuditSpec
from pipeline.messages import describe, first_line
from pipeline.models import DEFAULT_MODEL, DType

ENGINE = AtManConfig()  # the library defaults, so every command's defaults are the same ones
AUDIT = AuditSpec()  # the job spec's audit thresholds, the defaults of `atman diff`
EvalGranularity = Literal["token", "word", "sentence", "paragraph"]  # `custom` needs a delimiter the data lacks

app = typer.Typer(
    help="AtMan explanations of causal LMs: which parts of the prompt the prediction relies on.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """AtMan explanations of causal LMs: which parts of the prompt the prediction relies on."""


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True
    )  # one line: paths stay whole
    raise typer.Exit(code)


def _method_option(name: str, values: str = "", flag: str | None = None) -> typer.models.OptionInfo:
    """A command-line option for AtManConfig's field ``name``: its help is the field's own documentation (the
    choices and the default come from the field's type and AtManConfig's default, so the CLI cannot drift)."""
    help_text = AtManConfig.model_fields[name].description or ""
    if values:
        help_text = f"{help_text} Give {values}."
    return typer.Option(*([flag] if flag else []), help=help_text)


def _audit_option(name: str) -> typer.models.OptionInfo:
    """An option of `atman diff` for the job spec's audit threshold ``name`` (same help, same default)."""
    return typer.Option(help=AuditSpec.model_fields[name].description)


def _kappa_text(value: float | None) -> str:
    return "none" if value is None else str(value)


def _quiet_libraries() -> None:
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _threshold(value: str) -> float | None:
    if value.strip().lower() in {"none", "off"}:
        return None
    try:
        return float(value)
    except ValueError:
        fail(f"conceptual-threshold: {value!r} is not a number or 'none'")


def _span(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        start, end = (int(x) for x in value.split(":"))
    except ValueError:
        fail(f"explain-span: {value!r} is not START:END character offsets, e.g. 0:42")
    return start, end


_DTYPE = typer.Option(
    help="How the weights are stored: auto = bfloat16 on GPU, float32 on CPU. How the sweep computes on them is "
    "--precision (auto keeps the scores float32-grade on bf16 weights)."
)


@app.command()
def explain(
    prompt: Annotated[str, typer.Option(help="The prompt text.")],
    target: Annotated[str | None, typer.Option(help="Target text to explain (default: generate one).")] = None,
    generate: Annotated[int | None, typer.Option(help="Generate N tokens greedily and explain them.")] = None,
    model: Annotated[str, typer.Option(help="Embedded alias, Hugging Face id or local directory.")] = DEFAULT_MODEL,
    granularity: Annotated[Granularity, _method_option("granularity")] = ENGINE.granularity,
    delimiter: Annotated[str | None, _method_option("delimiter")] = ENGINE.delimiter,
    mode: Annotated[Mode, _method_option("mode")] = ENGINE.mode,
    factor: Annotated[float, _method_option("factor")] = ENGINE.factor,
    conceptual_threshold: Annotated[
        str, _method_option("conceptual_threshold", "a number in [0, 1] or 'none'")
    ] = _kappa_text(ENGINE.conceptual_threshold),
    aggregate: Annotated[Aggregate, _method_option("aggregate")] = ENGINE.aggregate,
    postprocess: Annotated[Postprocess, _method_option("postprocess")] = ENGINE.postprocess,
    normalize: Annotated[bool, _method_option("normalize", flag="--normalize/--no-normalize")] = ENGINE.normalize,
    preset: Annotated[
        Literal["none", "paper"],
        typer.Option(
            help="'paper': the AtMan authors' research code (AtManConfig.paper(): mode, factor, conceptual "
            "suppression, target units, aggregation); --granularity still applies. 'none': the options above."
        ),
    ] = "none",
    explain_span: Annotated[str | None, typer.Option(help="Only explain prompt characters START:END.")] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Wrap in the chat template / raw text (default: the template when the prompt ends in '?').",
        ),
    ] = None,
    dtype: Annotated[DType, _DTYPE] = "auto",
    precision: Annotated[Precision, _method_option("precision")] = ENGINE.precision,
    attention_kernel: Annotated[Kernel, _method_option("attention_kernel")] = ENGINE.attention_kernel,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    image: Annotated[
        list[str] | None,
        typer.Option(help="An image shown before the prompt (vision-language models; repeat for several)."),
    ] = None,
    image_grid: Annotated[
        str | None, typer.Option(help="Group image tokens into ROWSxCOLS cells per image (e.g. 8x8).")
    ] = None,
    overlay: Annotated[
        str | None,
        typer.Option(help="PNG to write the image heatmap to (default with --image: atman-overlay.png)."),
    ] = None,
) -> None:
    """Explain one prediction: score every unit of the prompt by how much suppressing it hurts the target."""
    _quiet_libraries()
    try:
        if preset == "paper":
            config = AtManConfig.paper(
                granularity=granularity, delimiter=delimiter, precision=precision, attention_kernel=attention_kernel
            )
        else:
            config = AtManConfig(
                mode=mode,
                factor=factor,
                granularity=granularity,
                delimiter=delimiter,
                conceptual_threshold=_threshold(conceptual_threshold),
                aggregate=aggregate,
                postprocess=postprocess,
                normalize=normalize,
                precision=precision,
                attention_kernel=attention_kernel,
            )
    except ValidationError as error:
        fail(describe(error))
    import torch

    from pipeline import Explainer, UnsupportedModelError, load_model

    if (image_grid is not None or overlay is not None) and not image:
        fail(f"{'--image-grid' if image_grid is not None else '--overlay'}: needs --image")
    try:
        lm = load_model(model, dtype=dtype, device=device)
        if image and lm.processor is None:
            from pipeline.atman.images import FAMILIES

            fail(
                f"--image: {model!r} is a text-only model (it has no image processor); images need a "
                f"vision-language model of a supported family ({', '.join(FAMILIES)}) given to --model"
            )
        explainer = Explainer(lm, config)
        if image:
            from pipeline.atman.multimodal import load_images

            pictures = load_images(image)
            explanation = explainer.explain(
                prompt, target, generate=generate, explain_span=_span(explain_span), chat=chat, images=pictures,
                image_grid=image_grid,
            )  # fmt: skip
        else:
            explanation = explainer.explain(
                prompt, target, generate=generate, explain_span=_span(explain_span), chat=chat
            )
    except ValidationError as error:
        fail(describe(error))
    except UnsupportedModelError as error:
        fail(f"model: {model!r} cannot be explained exactly: {str(error).removeprefix('model: ')}")
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    except torch.OutOfMemoryError as error:
        fail(
            f"device: out of memory while explaining ({first_line(error)}); lower AtManConfig's batch_size / "
            "max_batch_tokens from Python, pick --dtype bfloat16, a smaller --model, or --device cpu",
            code=1,
        )
    from pipeline.render import chat_note, render_explanation

    if as_json:  # stdout stays pure JSON; its "chat" object says the same
        sys.stdout.write(json.dumps(explanation.to_dict(), ensure_ascii=False) + "\n")
        note = chat_note(explanation, raw_text_hint="--no-chat")
        if note:
            err.print(note, highlight=False, markup=False, soft_wrap=True)
    else:
        render_explanation(explanation, Console(), raw_text_hint="--no-chat")
    if image:
        from pipeline.overlay import write_overlay

        path = write_overlay(explanation, pictures, overlay or "atman-overlay.png")
        (err if as_json else Console()).print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command()
def run(
    job: Annotated[str, typer.Argument(help="Job spec (YAML), e.g. jobs/examples/demo.yaml.")],
    run_id: Annotated[str | None, typer.Option(help="Run id; reuse one to resume that run (default: new).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a spec field: --set method.factor=0.3 (repeatable).")
    ] = None,
    address: Annotated[
        str, typer.Option(help="local (embedded Ray), auto or ray://HOST:10001 (a cluster), inline (no Ray).")
    ] = "local",
    retry_errors: Annotated[bool, typer.Option(help="Explain again the rows of this run that ended in error.")] = False,
    preview: Annotated[int, typer.Option(help="Print the top units of the first N explained prompts.")] = 0,
    precision: Annotated[
        Precision | None, typer.Option(help="Sets the spec's method.precision (same as --set method.precision=...).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Run nothing: print the estimate of `atman plan` instead.")] = False,
) -> None:
    """Run a job: explain every prompt of its input and write Parquet (resumable with --run-id)."""
    from pipeline.jobspec import JobSpecError, load_job

    _quiet_libraries()
    overrides = [*(set_ or []), *([f"method.precision={precision}"] if precision else [])]
    if dry_run:
        _plan(job, run_id, overrides, address, calibrate=True, as_json=False)
        return
    try:
        spec = load_job(job, overrides)
    except JobSpecError as error:
        fail(str(error))
    if address not in ("local", "inline", "auto") and not address.startswith("ray://"):
        fail(f"address: {address!r} is not local, inline, auto or ray://HOST:10001 (use `atman submit` for http://)")
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from pipeline.job import RunIncomplete, run_job

    progress = Progress(
        TextColumn("[bold]explaining"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
    )
    task = progress.add_task("explain", total=None, rate="")

    def started(paths, rows: int, pending: int) -> None:
        err.print(f"run {paths.run_id}: {rows} input rows, {pending} to explain -> {paths.url}", highlight=False)
        progress.update(task, total=pending)

    def advanced(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)
        speed = progress.tasks[0].speed
        progress.update(task, rate=f"{speed:,.1f} rows/s" if speed else "")

    try:
        with progress:
            summary = run_job(
                spec,
                run_id,
                address=address,
                retry_errors=retry_errors,
                on_start=started,
                on_progress=advanced,
                on_notice=lambda text: err.print(f"[yellow]note:[/] {text}", highlight=False, soft_wrap=True),
            )
    except JobSpecError as error:
        fail(str(error))
    except ValueError as error:  # run id
        fail(str(error))
    except RunIncomplete as error:
        fail(str(error), code=error.exit_code)
    from pipeline.render import render_preview, render_summary

    out = Console()
    render_summary(summary, out)
    if preview:
        render_preview(summary.location, preview, out)


@app.command()
def plan(
    job: Annotated[str, typer.Argument(help="Job spec (YAML), e.g. jobs/examples/demo.yaml.")],
    run_id: Annotated[
        str | None, typer.Option(help="The run id the job will run under: the estimate is kept in its directory.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a spec field: --set method.factor=0.3 (repeatable).")
    ] = None,
    address: Annotated[
        str, typer.Option(help="The run to estimate: local (embedded Ray) or inline (no Ray).")
    ] = "local",
    calibrate: Annotated[
        bool, typer.Option(help="Time sample batches on this machine for the wall time; --no-calibrate: counts only.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
) -> None:
    """Estimate a job before running it: rows, shards, units, forward passes and forward-pass tokens per row (from
    a sample of the input), and the wall time and GPU-hours (CPU actor-hours) from a short calibration on this
    machine. The estimate is saved; the run's _manifest.json then compares it with what the run took."""
    _quiet_libraries()
    _plan(job, run_id, set_ or [], address, calibrate, as_json)


def _plan(job: str, run_id: str | None, overrides: list[str], address: str, calibrate: bool, as_json: bool) -> None:
    """`atman plan` (and `atman run --dry-run`): the estimate, printed and saved."""
    from rich.table import Table

    from pipeline.estimate import plan_job, save, summary_rows
    from pipeline.jobspec import JobSpecError, load_job
    from pipeline.layout import valid_run_id

    try:
        spec = load_job(job, overrides)
        if run_id:
            valid_run_id(run_id)  # before the minutes of planning
        with err.status("planning: counting the input, loading the model, timing sample batches"):
            estimate = plan_job(spec, address=address, calibrate=calibrate)
        where = save(estimate, spec, run_id)
    except (JobSpecError, ValueError) as error:  # ValueError: the address, the run id
        fail(str(error))
    if as_json:
        Console().print_json(json.dumps(estimate))
        return
    table = Table(title=f"plan: {job}", show_header=False)
    for label, text in summary_rows(estimate):
        table.add_row(label, text)
    out = Console()
    out.print(table)
    out.print(f"estimate saved: {where}", highlight=False, soft_wrap=True)


@app.command()
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
    from pipeline.query import (
        MEMORY_LIMIT,
        SPILL_LIMIT,
        TIMEOUT_S,
        DamagedPart,
        LinkOutside,
        QueryError,
        connect,
        run_query,
        runs_to_query,
    )

    if format not in ("table", "json", "csv"):
        fail(f"format: {format!r} is not table, json or csv")
    limits = {"memory_limit": memory_limit or MEMORY_LIMIT, "spill_limit": spill_limit or SPILL_LIMIT}
    con = None
    try:
        runs = runs_to_query(root, include_incomplete, run_id)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DamagedPart)
            warnings.simplefilter("always", LinkOutside)
            try:
                con = connect(root, runs=runs, **limits)
            finally:
                for w in caught:
                    err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)
        left_out = sum(issubclass(w.category, DamagedPart) for w in caught)
        if left_out and strict:
            fail(f"--strict: {left_out} problem(s) above leave rows out of the answer; no answer given", code=3)
        table = run_query(con, sql, TIMEOUT_S if timeout is None else timeout)
    except QueryError as error:
        if con is not None:  # closed here: DuckDB tearing down a failed connection at exit can abort the process
            con.close()
        fail(str(error))
    from pipeline.render import print_table

    print_table(table, format, Console())
    if left_out:
        err.print(
            f"[yellow]warning:[/] partial answer: {left_out} problem(s) above left rows out of it "
            "(--strict makes this an error)",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def show(
    root: Annotated[str, typer.Argument(help="Output root (local path or s3://...).")],
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
    try:
        con = connect(root, run_id=run_id)
    except QueryError as error:  # nothing of the run can be read (each reason was warned about)
        fail(str(error))
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


@app.command()
def report(
    root: Annotated[str, typer.Argument(help="Output root (local path or s3://...).")],
    out: Annotated[str, typer.Option("--out", help="The HTML file to write.")],
    run_id: Annotated[str | None, typer.Option(help="Which run (default: the latest complete one).")] = None,
    max_prompts: Annotated[int, typer.Option(help="Most prompts on the page (first by prompt id).")] = 1000,
) -> None:
    """One self-contained HTML page: run summary, method, a heatmap per prompt (score on hover), errors."""
    from pathlib import Path

    from pipeline.report import run_report

    try:
        text, shown = run_report(root, run_id, max_prompts)
    except ValueError as error:
        fail(str(error))
    Path(out).write_text(text, encoding="utf-8")
    Console().print(f"wrote {out}: {shown} prompts", highlight=False, soft_wrap=True)


@app.command()
def diff(
    root: Annotated[str, typer.Argument(help="Output root (local path or s3://...).")],
    base: Annotated[str, typer.Option(help="Base run: RUN_ID or MODEL/RUN_ID.")],
    new: Annotated[str, typer.Option(help="New run: RUN_ID or MODEL/RUN_ID.")],
    min_spearman: Annotated[float, _audit_option("min_spearman")] = AUDIT.min_spearman,
    min_top5_overlap: Annotated[float, _audit_option("min_top5_overlap")] = AUDIT.min_top5_overlap,
    max_abs_delta_ce: Annotated[float | None, _audit_option("max_abs_delta_ce")] = AUDIT.max_abs_delta_ce,
) -> None:
    """Compare two runs prompt by prompt; writes ROOT/_audits/<base>__<new>/audit.parquet (+ .html, summary)."""
    from pipeline.audit import diff_runs, resolve_run

    try:
        thresholds = AuditSpec(
            min_spearman=min_spearman, min_top5_overlap=min_top5_overlap, max_abs_delta_ce=max_abs_delta_ce
        )
        result = diff_runs(root, resolve_run(root, base), resolve_run(root, new), thresholds)
    except ValidationError as error:
        fail(describe(error))
    except ValueError as error:
        fail(str(error))
    _print_audit(result)


def _print_audit(result) -> None:
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
    out.print(table)
    for change in s["config_changed"]:
        out.print(f"note: the runs differ in {change}", highlight=False, markup=False, soft_wrap=True)
    for row in result.table.to_pylist():
        if row["drift"]:
            out.print(f"drift {row['prompt_id']}: {row['reason']}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"audit: {result.location}/audit.parquet", highlight=False, soft_wrap=True)


@app.command()
def audit(
    job: Annotated[str, typer.Argument(help="Job spec (YAML) with an `audit:` section of thresholds.")],
    date: Annotated[
        str | None, typer.Option(help="The audit's date = its run id, YYYY-MM-DD (default: today, UTC).")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a spec field (repeatable).")] = None,
    address: Annotated[str, typer.Option(help="local, auto, ray://... or inline (as for `atman run`).")] = "local",
) -> None:
    """Nightly audit: run the job with run id = the date, diff it against the latest earlier successful run of the
    same job and model. Exit 3 when any prompt drifts past the job's thresholds (for alerting)."""
    from pipeline.audit import audit_date, diff_runs, previous_run
    from pipeline.job import RunIncomplete, run_job
    from pipeline.jobspec import JobSpecError, load_job
    from pipeline.query import list_runs

    _quiet_libraries()
    try:
        spec = load_job(job, set_ or [])
        run_id = audit_date(date)
        summary = run_job(spec, run_id, address=address)
    except (JobSpecError, ValueError) as error:
        fail(str(error))
    except RunIncomplete as error:
        fail(str(error), code=error.exit_code)
    from pipeline.render import render_summary

    render_summary(summary, Console())
    root = spec.output.root
    current = next(r for r in list_runs(root) if r.url.rstrip("/") == summary.location.rstrip("/"))
    before = previous_run(root, spec, current)
    if before is None:
        Console().print(
            f"no earlier successful run of job {spec.name!r} on this model: {run_id} is the baseline",
            highlight=False,
            soft_wrap=True,
        )
        return
    result = diff_runs(root, before, current, spec.audit)
    _print_audit(result)
    if result.drifted:
        err.print(f"[bold red]drift:[/] {result.drifted} prompts past the thresholds of job {spec.name!r}")
        raise typer.Exit(3)


@app.command()
def submit(
    job: Annotated[str, typer.Argument(help="Job spec (YAML).")],
    address: Annotated[str, typer.Option(help="Ray Jobs API of the cluster, e.g. http://HEAD:8265.")],
    run_id: Annotated[str | None, typer.Option(help="Run id (default: new; with --audit: today's date).")] = None,
    wait: Annotated[bool, typer.Option(help="Stream the logs and exit with the job's status.")] = False,
    audit: Annotated[
        bool, typer.Option(help="Submit `atman audit` (run id = the date) instead of `atman run`.")
    ] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a spec field (repeatable).")] = None,
    ship_package: Annotated[
        bool, typer.Option(help="Ship this package with the job (--no-ship-package: the cluster image has it).")
    ] = True,
    resume: Annotated[bool, typer.Option(help="Resubmit a FAILED/STOPPED run (same run id, new attempt).")] = False,
) -> None:
    """Submit the job to a Ray cluster (Ray Jobs API). The submission id is atman-<job>-<run id>, so the same run
    cannot be submitted twice."""
    from pipeline import submit as submitting
    from pipeline.jobspec import JobSpecError, load_job

    try:
        spec = load_job(job, set_ or [])
        sub = submitting.submit(spec, address, run_id=run_id, audit=audit, ship_package=ship_package, resume=resume)
    except (JobSpecError, FileExistsError, ValueError) as error:
        fail(str(error))
    except ConnectionError as error:
        fail(str(error), code=1)
    out = Console()
    out.print(f"submitted {sub.submission_id} (run {sub.run_id}): {sub.entrypoint}", highlight=False, soft_wrap=True)
    if wait:
        code = submitting.wait(address, sub.submission_id, echo=lambda text: out.out(text, highlight=False))
        out.print(f"{sub.submission_id}: exit {code}", highlight=False)
        raise typer.Exit(code)


def _on_job(address: str, submission_id: str, call):
    """``call(JobSubmissionClient)``; an unreachable address exits 1, an unknown submission id exits 2."""
    from pipeline.submit import client

    try:
        jobs = client(address)
    except ConnectionError as error:
        fail(str(error), code=1)
    try:
        return call(jobs)
    except RuntimeError as error:
        fail(f"submission_id: {submission_id!r}: {error}")


SubmissionId = Annotated[str, typer.Argument(help="e.g. atman-demo-2026-11-28")]
Address = Annotated[str, typer.Option(help="Ray Jobs API, e.g. http://HEAD:8265.")]


@app.command()
def status(
    submission_id: SubmissionId,
    address: Address,
) -> None:
    """The status of a submitted job."""
    info = _on_job(address, submission_id, lambda jobs: jobs.get_job_info(submission_id))
    Console().print(f"{submission_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


@app.command()
def logs(
    submission_id: SubmissionId,
    address: Address,
) -> None:
    """The logs of a submitted job."""
    sys.stdout.write(_on_job(address, submission_id, lambda jobs: jobs.get_job_logs(submission_id)))


@app.command()
def stop(
    submission_id: SubmissionId,
    address: Address,
) -> None:
    """Stop a submitted job (rows written so far stay; `atman submit --resume --run-id ...` finishes the run)."""
    stopped = _on_job(address, submission_id, lambda jobs: jobs.stop_job(submission_id))
    Console().print(f"{submission_id}: {'stopping' if stopped else 'not running'}")


@app.command()
def schedule(
    job: Annotated[str, typer.Argument(help="Job spec (YAML) with a `schedule:` section.")],
    format: Annotated[
        str, typer.Option("--format", help="raycronjob, cronjob, crontab; unscheduled: rayjob, raycluster.")
    ] = "raycronjob",
    image: Annotated[str | None, typer.Option(help="Cluster image (built from infra/Dockerfile).")] = None,
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace of the manifests.")] = "default",
    address: Annotated[str | None, typer.Option(help="crontab: the cluster's Jobs API, http://HEAD:8265.")] = None,
    out: Annotated[str | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Render the job's nightly audit: a KubeRay RayCronJob, a Kubernetes CronJob that creates RayJobs, or a
    crontab line that submits to a running cluster; or (unscheduled) a RayJob running it once, a RayCluster."""
    from pathlib import Path

    from pipeline.jobspec import JobSpecError, load_job
    from pipeline.schedule import DEFAULT_IMAGE, render

    try:
        spec = load_job(job)
        text = render(spec, format, image=image or DEFAULT_IMAGE, namespace=namespace, address=address, job_path=job)
    except JobSpecError as error:
        fail(str(error))
    if out:
        Path(out).write_text(text, encoding="utf-8")
        Console().print(f"wrote {out}", highlight=False, soft_wrap=True)
    else:
        sys.stdout.write(text)


eval_app = typer.Typer(help="Evaluate attribution methods (the paper's protocols).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


_DATA = typer.Option(help="SQuAD JSONL (id, context, question, answers[{text, answer_start}]); default: the bundled "
                    "76-example dev subset (CC BY-SA 4.0).")  # fmt: skip


def _grid_value(option: str, text: str, parse, field: str):
    """One value of a sweep's comma-separated grid, parsed and checked as AtManConfig's ``field`` would check it."""
    try:
        value = parse(text.strip())
        AtManConfig(**{field: value})
    except ValueError as error:  # float('x') and pydantic's ValidationError alike
        reason = describe(error) if isinstance(error, ValidationError) else "not a number"
        fail(f"{option}: {text.strip()!r}: {reason}")
    return value


def _eval_model(model: str, dtype: str = "auto"):
    from pipeline import load_model

    try:
        return load_model(model, dtype=dtype)
    except ValueError as error:
        fail(str(error))


def _emit(result: dict, out: str | None, as_json: bool) -> bool:
    """Write an evaluation's JSON result to ``out`` (if given) and print it under ``--json``; True when printed
    (stdout then holds only the JSON, so no table follows)."""
    text = json.dumps(result, ensure_ascii=False)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if as_json:
        sys.stdout.write(text + "\n")
    return as_json


def _with_progress(total: int, run):
    """Run ``run(tick)`` under a progress bar on stderr; ``tick(done, total)`` advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]examples"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    )
    task = progress.add_task("eval", total=total)
    with progress:
        try:
            return run(lambda done, _total: progress.update(task, completed=done))
        except ValueError as error:  # a records file of another run: exit 2 naming records
            if not str(error).startswith("records:"):
                raise
            fail(str(error))


_METRICS = [("mAP", "mAP", ".1f"), ("mAR", "mAR", ".1f"), ("mAP IQ", "mAP_IQ", ".1f"), ("mAR IQ", "mAR_IQ", ".1f"),
            ("AOPC (nats)", "aopc", ".3f"), ("AOPC removal", "aopc_removal", ".3f"),
            ("s / example", "seconds_per_example", ".2f")]  # fmt: skip


def _print_metrics(title: str, keys: list[str], rows: list[tuple[list[str], dict]]) -> None:
    """One table layout for `eval squad`, `eval sweep` and `eval boxes`: key columns, then the metrics of
    MethodResult.summary that the rows have (boxes have no deletion curves)."""
    from rich.table import Table

    columns = [c for c in _METRICS if any(c[1] in m for _, m in rows)]
    table = Table(*keys, *(header for header, _, _ in columns), title=title)
    for names, m in rows:
        table.add_row(*names, *(format(m[key], spec) if m.get(key) is not None else "" for _, key, spec in columns))
    Console().print(table)


_RECORDS = typer.Option(
    help="JSONL file keeping each finished example; rerun with the same file to go on where a run stopped."
)


@eval_app.command("squad")
def eval_squad(
    data: Annotated[str, _DATA] = str(SQUAD_DEV),
    limit: Annotated[int | None, typer.Option(help="Only the first N examples.")] = None,
    sample: Annotated[int | None, typer.Option(help="N examples evenly spaced through the file.")] = None,
    methods: Annotated[
        str, typer.Option(help=f"Comma-separated method names: {GRAMMAR}; <mode>: {', '.join(MODES)}.")
    ] = ",".join(DEFAULT_METHODS),
    model: Annotated[str, typer.Option(help="Embedded alias, Hugging Face id or local directory.")] = DEFAULT_MODEL,
    granularity: Annotated[EvalGranularity, _method_option("granularity")] = ENGINE.granularity,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    out: Annotated[str | None, typer.Option(help="Also write the JSON result to this file.")] = None,
    records: Annotated[str | None, _RECORDS] = None,
    dtype: Annotated[DType, _DTYPE] = "auto",
    precision: Annotated[Precision, _method_option("precision")] = ENGINE.precision,
) -> None:
    """SQuAD plausibility (mAP / mAR, means and interquartile means, 0-100) and deletion AOPC per method."""
    from pipeline.eval_methods import parse_methods
    from pipeline.evaluate import evaluate, load_squad

    _quiet_libraries()
    try:
        names = parse_methods(methods)
        examples = load_squad(data, limit, sample)
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    lm = _eval_model(model, dtype)
    try:
        result = _with_progress(
            len(examples),
            lambda tick: evaluate(lm, examples, names, granularity, on_example=tick, records=records,
                                  precision=precision),
        )  # fmt: skip
    except ValueError as error:  # e.g. a precision the weights' dtype cannot take
        fail(str(error))
    if _emit(result, out, as_json):
        return
    _print_metrics(
        f"SQuAD, {result['n']} examples, {result['model']}, {granularity} units",
        ["method"],
        [([name], m) for name, m in result["methods"].items()],
    )
    Console().print(f"answer units are {100 * result['answer_share']:.1f} % of all units (random's expected mAP)")
    for pair, d in result["differences"].items():
        lo, hi = d["ci95"]
        Console().print(f"mAP {pair}: {d['mAP']:+.1f} (95 % bootstrap CI {lo:+.1f} to {hi:+.1f})", highlight=False)


@eval_app.command("boxes")
def eval_boxes(
    model: Annotated[str, typer.Option(help="A vision-language model: Hugging Face id or local directory.")],
    data: Annotated[
        str,
        typer.Option(
            help="Box JSONL (id, image path relative to the file, question, target, boxes [[x0, y0, x1, y1]]); "
            "default: the bundled synthetic squares."
        ),
    ] = str(BOXES),
    limit: Annotated[int | None, typer.Option(help="Only the first N examples.")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated: atman, atman:<mode>[+squares], ixg, ig, random.")] = (
        "atman,ixg,ig,random"
    ),
    image_grid: Annotated[
        str | None, typer.Option(help="Group image tokens into ROWSxCOLS cells (default: one unit per token).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON result.")] = False,
    out: Annotated[str | None, typer.Option(help="Also write the JSON result to this file.")] = None,
) -> None:
    """The paper's image protocol: the share of relevance inside ground-truth boxes (mAP / mAR) per method."""
    from pipeline.eval_boxes import evaluate_boxes, load_boxes
    from pipeline.eval_methods import parse_methods

    _quiet_libraries()
    try:
        names = parse_methods(methods)
        bad = [n for n in names if not (n.startswith("atman") or n in ("ixg", "ig", "random"))]
        if bad:
            raise ValueError(f"methods: {', '.join(bad)} not available for images (atman, ixg, ig, random)")
        examples = load_boxes(data, limit)
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    lm = _eval_model(model)
    if getattr(lm, "processor", None) is None:
        fail(f"model: {model!r} is not a vision-language model (its config has no vision_config)")
    try:
        result = _with_progress(
            len(examples), lambda tick: evaluate_boxes(lm, examples, names, image_grid, on_example=tick)
        )
    except ValueError as error:
        fail(str(error))
    if _emit(result, out, as_json):
        return
    rows = [([name], m) for name, m in result["methods"].items()]
    _print_metrics(f"boxes, {result['n']} examples, {result['model']}", ["method"], rows)
    Console().print(f"box pixels are {100 * result['box_share']:.1f} % of the units' area (random's expected mAP)")


@eval_app.command("forget")
def eval_forget(
    records: Annotated[str, typer.Argument(help="A records file of `eval squad` or `eval sweep` (--records).")],
    methods: Annotated[
        str,
        typer.Option(help="Comma-separated method names (for a sweep, setting names such as 'factor=0.1 kappa=off')."),
    ],
) -> None:
    """Take methods out of a records file, so the next run with it computes them again (and only them) on every
    example: after a method's code changed, its rows are redone without redoing the others."""
    from pipeline.evaluate import forget_methods

    names = [name.strip() for name in methods.split(",") if name.strip()]
    if not names:
        fail("methods: name at least one method")
    try:
        counts = forget_methods(records, names)
    except FileNotFoundError:
        fail(f"records: {records} does not exist")
    except ValueError as error:
        fail(str(error))
    for name, n in counts.items():
        Console().print(f"{name}: taken out of {n} examples" + ("" if n else " (no example held it)"), highlight=False)


@eval_app.command("sweep")
def eval_sweep(
    data: Annotated[str, _DATA] = str(SQUAD_DEV),
    limit: Annotated[int | None, typer.Option(help="Only the first N examples.")] = None,
    sample: Annotated[int | None, typer.Option(help="N examples evenly spaced through the file.")] = None,
    mode: Annotated[Mode, _method_option("mode")] = ENGINE.mode,
    factors: Annotated[str, typer.Option(help="Comma-separated factors m (AtManConfig.factor).")] = "0,0.05,0.1,0.3",
    kappas: Annotated[
        str, typer.Option(help="Comma-separated conceptual thresholds in [0, 1]; 'none' = off.")
    ] = "none,0.7,0.9",
    model: Annotated[str, typer.Option(help="Embedded alias, Hugging Face id or local directory.")] = DEFAULT_MODEL,
    granularity: Annotated[EvalGranularity, _method_option("granularity")] = ENGINE.granularity,
    out: Annotated[str | None, typer.Option(help="Also write the JSON result to this file.")] = None,
    records: Annotated[str | None, _RECORDS] = None,
) -> None:
    """The paper's line sweep: AtMan's mAP / mAR / AOPC over factor x conceptual threshold on SQuAD."""
    from pipeline.evaluate import load_squad, sweep

    _quiet_libraries()
    grid_f = [_grid_value("factors", x, float, "factor") for x in factors.split(",")]
    grid_k = [_grid_value("kappas", x, _threshold, "conceptual_threshold") for x in kappas.split(",")]
    try:
        examples = load_squad(data, limit, sample)
    except ValueError as error:
        fail(str(error))
    except FileNotFoundError as error:
        fail(f"data: {error}")
    lm = _eval_model(model)
    result = _with_progress(
        len(examples),
        lambda tick: sweep(lm, examples, mode, grid_f, grid_k, granularity, on_example=tick, records=records),
    )
    _emit(result, out, as_json=False)
    _print_metrics(
        f"AtMan {mode} sweep, SQuAD, {result['n']} examples, {result['model']}",
        ["factor", "kappa"],
        [
            ([str(g["factor"]), "off" if g["conceptual_threshold"] is None else str(g["conceptual_threshold"])], g)
            for g in result["grid"]
        ],  # fmt: skip
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
