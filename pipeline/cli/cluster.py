"""The commands that hand a job to a Ray cluster and follow it there (the Ray Jobs API): ``atman submit``,
``status``, ``logs`` and ``stop``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from pipeline.cli.common import fail, reported
from pipeline.cli.jobs import SetField

SubmissionId = Annotated[str, typer.Argument(help="e.g. atman-demo-2026-11-28")]
Address = Annotated[str, typer.Option(help="Ray Jobs API, e.g. http://HEAD:8265.")]


def submit(
    job: Annotated[str, typer.Argument(help="Job spec (YAML).")],
    address: Annotated[str, typer.Option(help="Ray Jobs API of the cluster, e.g. http://HEAD:8265.")],
    run_id: Annotated[str | None, typer.Option(help="Run id (default: new; with --audit: today's date).")] = None,
    wait: Annotated[bool, typer.Option(help="Stream the logs and exit with the job's status.")] = False,
    audit: Annotated[
        bool, typer.Option(help="Submit `atman audit` (run id = the date) instead of `atman run`.")
    ] = False,
    set_: SetField = None,
    ship_package: Annotated[
        bool, typer.Option(help="Ship this package with the job (--no-ship-package: the cluster image has it).")
    ] = True,
    resume: Annotated[bool, typer.Option(help="Resubmit a FAILED/STOPPED run (same run id, new attempt).")] = False,
) -> None:
    """Submit the job to a Ray cluster (Ray Jobs API). The submission id is atman-<job>-<run id>, so the same run
    cannot be submitted twice."""
    from pipeline import submit as submitting
    from pipeline.jobspec import load_job

    # ValueError: the job spec; FileExistsError: the submission exists already; ConnectionError: no cluster there
    with reported(ValueError, FileExistsError, ConnectionError):
        spec = load_job(job, set_ or [])
        sub = submitting.submit(spec, address, run_id=run_id, audit=audit, ship_package=ship_package, resume=resume)
    out = Console()
    out.print(f"submitted {sub.submission_id} (run {sub.run_id}): {sub.entrypoint}", highlight=False, soft_wrap=True)
    if wait:
        code = submitting.wait(address, sub.submission_id, echo=lambda text: out.out(text, highlight=False))
        out.print(f"{sub.submission_id}: exit {code}", highlight=False)
        raise typer.Exit(code)


def _on_job(address: str, submission_id: str, call):
    """``call(JobSubmissionClient)``; an unreachable address exits 1, an unknown submission id exits 2."""
    from pipeline.submit import client

    with reported(ConnectionError):
        jobs = client(address)
    try:
        return call(jobs)
    except RuntimeError as error:  # the Jobs API's answer to an id it does not know: bad input
        fail(f"submission_id: {submission_id!r}: {error}")


def status(
    submission_id: SubmissionId,
    address: Address,
) -> None:
    """The status of a submitted job."""
    info = _on_job(address, submission_id, lambda jobs: jobs.get_job_info(submission_id))
    Console().print(f"{submission_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


def logs(
    submission_id: SubmissionId,
    address: Address,
) -> None:
    """The logs of a submitted job."""
    sys.stdout.write(_on_job(address, submission_id, lambda jobs: jobs.get_job_logs(submission_id)))


def stop(
    submission_id: SubmissionId,
    address: Address,
) -> None:
    """Stop a submitted job (rows written so far stay; `atman submit --resume --run-id ...` finishes the run)."""
    stopped = _on_job(address, submission_id, lambda jobs: jobs.stop_job(submission_id))
    Console().print(f"{submission_id}: {'stopping' if stopped else 'not running'}")
