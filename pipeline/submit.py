"""``atman submit``: the same job spec, run on a Ray cluster through Ray's Job Submission API.

The submission id is deterministic (``atman-<job>-<run id>``): Ray refuses a second submission with the same id,
so a nightly run submitted twice is not run twice. What the job needs travels in the runtime_env:
- ``working_dir``: the job spec (as validated here, overrides applied) and, for a relative local input path,
  the input files (the spec is rewritten to point at the shipped copy);
- ``py_modules``: this package, unless ``ship_package=False`` (the cluster image already has it).
The output root must be reachable from the cluster: s3:// or an absolute path on shared storage.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

import pipeline
from pipeline.jobspec import JobSpec, JobSpecError
from pipeline.layout import is_relative_local, new_run_id, valid_run_id
from pipeline.messages import first_line

AGENT_WAIT_S = 60  # how long to wait for a fresh head's job agent
MAX_SHIPPED_INPUT = 100 * 2**20  # Ray's working_dir limit is 500 MiB; inputs that big belong on S3


@dataclass(frozen=True)
class Submission:
    submission_id: str
    run_id: str
    entrypoint: str


def submission_id(spec: JobSpec, run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"atman-{spec.name}-{run_id}")


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConnectionError(f"address: cannot reach the Ray Jobs API at {address} ({first_line(err)})") from None


def submit(
    spec: JobSpec,
    address: str,
    *,
    run_id: str | None = None,
    audit: bool = False,
    ship_package: bool = True,
    resume: bool = False,
    base_dir: Path | None = None,
) -> Submission:
    """Submit ``spec`` (validated, overrides applied) as one Ray job. Raises JobSpecError for a spec a cluster
    cannot run, FileExistsError when the submission id exists already, ConnectionError for an unreachable address
    or a head that does not take the job (its job agent not up after ``AGENT_WAIT_S``: exit 1, submit again).
    ``resume``: when the run's submission ended FAILED or STOPPED, submit it again as ``<id>-attempt<N>`` (same
    run id, so the job writes only what is missing)."""
    base_dir = base_dir or Path.cwd()
    run_id = (
        valid_run_id(run_id)
        if run_id
        else (dt.datetime.now(dt.timezone.utc).date().isoformat() if audit else new_run_id())
    )
    _check_output_root(spec)
    jobs = client(address)
    sid = _free_submission_id(jobs, submission_id(spec, run_id), resume, address)
    workdir = Path(tempfile.mkdtemp(prefix="atman-submit-"))
    try:
        data = spec.model_dump(mode="json")
        data["input"]["path"] = _ship_input(spec.input.path, base_dir, workdir)
        (workdir / "job.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        command = (
            f"audit job.yaml --date {run_id}" if audit else f"run job.yaml --run-id {run_id}"
        ) + " --address auto"
        entrypoint = f"python -m pipeline.cli {command}"
        runtime_env: dict = {"working_dir": str(workdir)}
        if ship_package:
            runtime_env["py_modules"] = [str(Path(pipeline.__file__).parent)]
        metadata = {"atman_job": spec.name, "atman_run_id": run_id, "atman_config_hash": spec.config_hash()}
        _submit_job(jobs, address, sid, entrypoint, runtime_env, metadata)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Submission(sid, run_id, entrypoint)


def _free_submission_id(jobs, base: str, resume: bool, address: str) -> str:
    """``base``, or with ``resume`` the first ``<base>-attempt<N>`` not taken after a FAILED or STOPPED one; any
    other existing submission is a FileExistsError: a run is submitted once."""
    sid, attempt = base, 1
    while (existing := _status(jobs, sid)) is not None:
        if not resume or existing not in ("FAILED", "STOPPED"):
            hint = " (--resume submits it again)" if existing in ("FAILED", "STOPPED") else ""
            raise FileExistsError(
                f"submission {sid!r} exists already (status {existing}): each run is submitted once{hint}; "
                f"see `atman logs {sid} --address {address}`, or submit with another --run-id"
            )
        attempt += 1
        sid = f"{base}-attempt{attempt}"
    return sid


def _submit_job(jobs, address: str, sid: str, entrypoint: str, runtime_env: dict, metadata: dict) -> None:
    """Submit the job as ``sid``, waiting up to ``AGENT_WAIT_S`` for a head whose job agent is not up yet (one that
    has just started answers before it is); every other refusal is a ConnectionError saying nothing was submitted."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            jobs.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env, metadata=metadata)
            return
        except RuntimeError as err:
            if "already exists" in str(err):
                raise FileExistsError(f"submission {sid!r} exists already: each run is submitted once") from None
            if "No available agent" not in str(err):
                raise ConnectionError(
                    f"address: the Ray Jobs API at {address} refused submission {sid!r} ({first_line(err)}); "
                    "nothing was submitted: see the head's dashboard log, then submit again"
                ) from None
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"address: the Ray head at {address} answers, but its job agent was not up after "
                    f"{AGENT_WAIT_S} s (a head that has just started needs a while, a busy one longer); nothing "
                    "was submitted: wait a minute and run the same command again"
                ) from None
            time.sleep(2)


def _status(jobs, sid: str) -> str | None:
    try:
        return jobs.get_job_status(sid).value
    except RuntimeError:  # no such submission
        return None


def _check_output_root(spec: JobSpec) -> None:
    root = spec.output.root
    if is_relative_local(root):
        raise JobSpecError(
            f"output.root: {root!r} is a relative local path; a cluster job writes where the cluster can read "
            "it back: use s3://bucket/prefix or an absolute path on shared storage (--set output.root=...)"
        )


def _ship_input(path: str, base_dir: Path, workdir: Path) -> str:
    """A relative local input is copied into the working_dir (same relative path); others stay as they are."""
    if not is_relative_local(path):
        return path
    source = base_dir / path
    has_glob = any(c in path for c in "*?[")
    matches = sorted(base_dir.glob(path)) if has_glob else ([source] if source.exists() else [])
    if not matches:
        raise JobSpecError(f"input.path: {path!r} does not exist (relative to {base_dir})")
    size = sum(f.stat().st_size for m in matches for f in ([m] if m.is_file() else m.rglob("*")) if f.is_file())
    if size > MAX_SHIPPED_INPUT:
        raise JobSpecError(
            f"input.path: {path!r} is {size / 2**20:.0f} MiB; put inputs that large on S3 (s3://...) for a cluster"
        )
    for match in matches:
        target = workdir / "input" / match.relative_to(base_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        if match.is_dir():
            shutil.copytree(match, target)
        else:
            shutil.copy2(match, target)
    return f"input/{path}"


def wait(address: str, sid: str, echo=print, poll_s: float = 1.0) -> int:
    """Stream the job's logs until it ends; the job's exit code (0 when it succeeded, 3 for audit drift)."""
    jobs = client(address)
    shown = 0
    while True:
        logs = jobs.get_job_logs(sid)
        if len(logs) > shown:
            echo(logs[shown:].rstrip("\n"))
            shown = len(logs)
        info = jobs.get_job_info(sid)
        if info.status.is_terminal():
            logs = jobs.get_job_logs(sid)
            if len(logs) > shown:
                echo(logs[shown:].rstrip("\n"))
            if info.status.value == "SUCCEEDED":
                return 0
            code = info.driver_exit_code
            return code if code not in (None, 0) else 1
        time.sleep(poll_s)
