"""The commands that run a job spec here: ``atman run`` (and ``plan``, its estimate), ``atman audit`` (a dated run
diffed against the one before) and ``atman schedule`` (the manifests that run it nightly elsewhere)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console

from pipeline.atman.config import Precision
from pipeline.cli.common import err, fail, quiet_libraries, reported
from pipeline.errors import AnswerWithheld, RunIncomplete
from pipeline.jobspec import JobSpecError

JobSpecFile = Annotated[str, typer.Argument(help="Job spec (YAML), e.g. jobs/examples/demo.yaml.")]
SetFields = Annotated[
    list[str] | None, typer.Option("--set", help="Override a spec field: --set method.factor=0.3 (repeatable).")
]
SetField = Annotated[list[str] | None, typer.Option("--set", help="Override a spec field (repeatable).")]
ADDRESSES = ("local", "inline", "auto")


def run(
    job: JobSpecFile,
    run_id: Annotated[str | None, typer.Option(help="Run id; reuse one to resume that run (default: new).")] = None,
    set_: SetFields = None,
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
    from pipeline.jobspec import load_job

    quiet_libraries()
    overrides = [*(set_ or []), *([f"method.precision={precision}"] if precision else [])]
    if dry_run:
        estimate_job(job, run_id, overrides, address, calibrate=True, as_json=False)
        return
    with reported(JobSpecError):
        spec = load_job(job, overrides)
    if address not in ADDRESSES and not address.startswith("ray://"):
        fail(f"address: {address!r} is not local, inline, auto or ray://HOST:10001 (use `atman submit` for http://)")
    with reported(ValueError, RunIncomplete):  # ValueError: the run id
        summary = _run_with_progress(spec, run_id, address, retry_errors)
    from pipeline.render import render_preview, render_summary

    out = Console()
    render_summary(summary, out)
    if preview:
        render_preview(summary.location, preview, out)


def _run_with_progress(spec, run_id: str | None, address: str, retry_errors: bool):
    """``run_job`` under a progress bar on stderr: rows explained of those to explain, their rate and the ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from pipeline.job import run_job

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

    with progress:
        return run_job(
            spec,
            run_id,
            address=address,
            retry_errors=retry_errors,
            on_start=started,
            on_progress=advanced,
            on_notice=lambda text: err.print(f"[yellow]note:[/] {text}", highlight=False, soft_wrap=True),
        )


def plan(
    job: JobSpecFile,
    run_id: Annotated[
        str | None, typer.Option(help="The run id the job will run under: the estimate is kept in its directory.")
    ] = None,
    set_: SetFields = None,
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
    quiet_libraries()
    estimate_job(job, run_id, set_ or [], address, calibrate, as_json)


def estimate_job(
    job: str, run_id: str | None, overrides: list[str], address: str, calibrate: bool, as_json: bool
) -> None:
    """`atman plan` (and `atman run --dry-run`): the estimate, printed and saved."""
    from rich.table import Table

    from pipeline.estimate import plan_job, save, summary_rows
    from pipeline.jobspec import load_job
    from pipeline.layout import valid_run_id

    with reported(ValueError):  # the job spec, the address, the run id
        spec = load_job(job, overrides)
        if run_id:
            valid_run_id(run_id)  # before the minutes of planning
        with err.status("planning: counting the input, loading the model, timing sample batches"):
            estimate = plan_job(spec, address=address, calibrate=calibrate)
        where = save(estimate, spec, run_id)
    if as_json:
        Console().print_json(json.dumps(estimate))
        return
    table = Table(title=f"plan: {job}", show_header=False)
    for label, text in summary_rows(estimate):
        table.add_row(label, text)
    out = Console()
    out.print(table)
    out.print(f"estimate saved: {where}", highlight=False, soft_wrap=True)


def audit(
    job: Annotated[str, typer.Argument(help="Job spec (YAML) with an `audit:` section of thresholds.")],
    date: Annotated[
        str | None, typer.Option(help="The audit's date = its run id, YYYY-MM-DD (default: today, UTC).")
    ] = None,
    set_: SetField = None,
    address: Annotated[str, typer.Option(help="local, auto, ray://... or inline (as for `atman run`).")] = "local",
) -> None:
    """Nightly audit: run the job with run id = the date, diff it against the latest earlier successful run of the
    same job and model. Exit 3 when any prompt drifts past the job's thresholds (for alerting)."""
    from pipeline.audit import audit_date, diff_runs, previous_run
    from pipeline.cli.results import print_audit
    from pipeline.job import run_job
    from pipeline.jobspec import load_job
    from pipeline.query import list_runs
    from pipeline.render import render_summary

    quiet_libraries()
    with reported(ValueError, RunIncomplete):  # ValueError: the job spec, the date
        spec = load_job(job, set_ or [])
        run_id = audit_date(date)
        summary = run_job(spec, run_id, address=address)
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
    print_audit(result)
    if result.drifted:
        err.print(f"[bold red]drift:[/] {result.drifted} prompts past the thresholds of job {spec.name!r}")
        raise typer.Exit(AnswerWithheld.exit_code)


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

    from pipeline.jobspec import load_job
    from pipeline.schedule import DEFAULT_IMAGE, render

    with reported(JobSpecError):
        spec = load_job(job)
        text = render(spec, format, image=image or DEFAULT_IMAGE, namespace=namespace, address=address, job_path=job)
    if out:
        Path(out).write_text(text, encoding="utf-8")
        Console().print(f"wrote {out}", highlight=False, soft_wrap=True)
    else:
        sys.stdout.write(text)
