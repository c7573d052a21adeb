"""``atman run``: a run as five phases, each a function below, called in this order by ``run_job``:

1. **list** (``list_phase``): the input's files, from ``input.path`` (``pipeline/reader.py``).
2. **stage** (``stage_phase``): a new run checks the model, then workers scan the input into staging blocks (one
   task per file, or per piece of a large one), the ids are settled over all rows out of core (DuckDB), and the
   rows are cut into shards: the run's plan, saved once (``pipeline/staging.py``, ``pipeline/plan.py``). A rerun
   loads that plan and refuses an input that changed since.
3. **plan** (``plan_phase``): what this attempt must do: the progress record checked against the plan and the
   parts (damaged parts are redone: ``pipeline/progress.py``), the shards still to explain, their staged input.
4. **explain** (``explain_phase``): the executor (``pipeline/executors.py``: inline, or Ray actors) explains the
   pending shards; each is published as one part, then a marker (``pipeline/worker.py``); the markers are folded
   into the progress record as they come.
5. **finalize** (``finalize``): every shard checked complete, the manifest then ``_SUCCESS`` written.

Around them: the run's lease (``pipeline/lease.py``), stop signals (``pipeline/signals.py``), and one place that
turns whatever stopped the run into exit 2 (``BadInput``: fix the input, config or model) or ``RunIncomplete``
(finished shards are kept; the message names the rerun). The driver holds the plan and the progress record, never
the rows: its memory does not grow with the corpus.

Guarantees (tested in tests/test_job*.py):
- every input row ends as exactly one output row (ok / skipped / error), checked before ``_SUCCESS``;
- a part is named by its shard and published whole, so a retried shard replaces its own part;
- a shard whose actor is lost (its process killed, its node lost) goes to a live actor (``executors.Pool``);
- a rerun of a run id reads the progress record (not every part), verifies each finished part's size and sha256,
  and redoes only unfinished or damaged shards (``retry_errors`` also redoes the rows that ended in ``error``);
- a run is one snapshot of its input: a rerun on a changed input exits 2 naming what changed;
- one driver per run (``pipeline/lease.py``); SIGTERM stops cleanly and says how to resume;
- ``_manifest.json`` then ``_SUCCESS`` are written last; ``_SUCCESS`` is removed before a run changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import functools
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata

from pipeline.errors import BadInput, MethodUnsupported, RunIncomplete, UnsupportedModel
from pipeline.executors import Executor, executor, worker_error
from pipeline.jobspec import JobSpec, JobSpecError
from pipeline.layout import RunPaths, new_run_id, part_name, publish, remove_temps, storage_error, valid_run_id
from pipeline.lease import Lease
from pipeline.messages import first_line
from pipeline.methods import method_params
from pipeline.models import check_model
from pipeline.parts import SCHEMA_VERSION, STATUSES
from pipeline.plan import Plan, input_changes, make_plan, plan_problem
from pipeline.progress import damaged, load_progress, save_progress
from pipeline.reader import InputListing, list_input
from pipeline.signals import Stopped, StopSignals
from pipeline.staging import remove_staging, stage_input, staging_ready

log = logging.getLogger(__name__)

LIBRARIES = ("atman-pipeline", "torch", "transformers", "ray", "pyarrow", "datasets", "s3fs")
FOLD_EVERY_S = 10.0
"""How often the driver folds shard markers into the progress record while a run works."""


@dataclass
class RunSummary:
    run_id: str
    location: str
    counts: dict[str, int]
    rows: int
    processed: int
    """Rows explained by this invocation (the rest were already written by an earlier one)."""
    seconds: float
    unit_passes: int
    files: int
    shards: int = 0
    redone: list[str] = field(default_factory=list)
    """Why shards were redone (damaged parts found on resume)."""
    ignored: list[str] = field(default_factory=list)
    """Files of a directory input that were not read."""
    preview: list[dict] = field(default_factory=list)

    @property
    def prompts_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def passes_per_s(self) -> float:
        return self.unit_passes / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Attempt:
    """One invocation of a run: what every phase needs."""

    spec: JobSpec
    paths: RunPaths
    address: str
    retry_errors: bool
    notice: Callable[[str], None]
    signals: StopSignals
    executor: Executor


@dataclass
class Work:
    """What the plan phase leaves to explain: the progress record (shard -> marker), the pending shards, the rows
    they hold (``todo``), and why shards were redone."""

    progress: dict[int, dict]
    pending: list[int]
    todo: int
    redone: list[str]


def run_job(
    spec: JobSpec,
    run_id: str | None = None,
    *,
    address: str = "local",
    retry_errors: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    on_start: Callable[[RunPaths, int, int], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run (or resume) a job. ``address``: ``local`` (embedded Ray), ``auto`` / ``ray://...`` (a cluster), or
    ``inline`` (no Ray: one in-process worker; for debugging and benchmarks). ``on_start(paths, rows, pending)``
    is called once the plan is known; ``on_progress(done, pending)`` as rows are explained (all actors together);
    ``on_notice(text)`` for what the user should know (ignored input files, damaged parts redone)."""
    started, started_at = time.perf_counter(), dt.datetime.now(dt.timezone.utc)
    attempt = open_run(spec, run_id, address, retry_errors, on_notice or (lambda text: log.warning("%s", text)))
    with reported(attempt), attempt.signals, Lease(attempt.paths) as lease, attempt.executor:
        if lease.taken_over:
            attempt.notice(f"run {attempt.paths.run_id}: took over the lease of an earlier driver, {lease.taken_over}")
        listing = list_phase(attempt)
        plan, checked = stage_phase(attempt, listing)
        work = plan_phase(attempt, plan, listing, checked)
        if on_start:
            on_start(attempt.paths, plan.rows, work.todo)
        processed, passes = explain_phase(attempt, plan, work, lease, on_progress)
        summary = finalize(spec, attempt.paths, plan, work.progress, started_at, attempt.notice)
    summary.processed, summary.unit_passes = processed, passes
    summary.seconds = time.perf_counter() - started
    summary.redone, summary.ignored = work.redone, list(listing.ignored)
    return summary


def open_run(spec: JobSpec, run_id: str | None, address: str, retry_errors: bool, notice) -> Attempt:
    """The run's directory (made; exit 2 naming output.root when it cannot be), its executor and stop signals."""
    run_id = valid_run_id(run_id) if run_id else new_run_id()
    try:
        paths = RunPaths.locate(spec.output.root, spec.model.id, run_id)
        paths.fs.makedirs(paths.dir, exist_ok=True)
    except Exception as err:
        if not storage_error(err):
            raise
        raise JobSpecError(
            f"output.root: {spec.output.root!r} {_root_problem(err)} ({type(err).__name__}: {first_line(err)})"
        ) from None
    signals = StopSignals()
    return Attempt(spec, paths, address, retry_errors, notice, signals, executor(spec, paths, address, signals, notice))


# --- the phases ----------------------------------------------------------------------------------------------------


def list_phase(attempt: Attempt) -> InputListing:
    """**list**: the input's files; those of a directory that are not read are named."""
    listing = list_input(attempt.spec.input)
    for name in listing.ignored:
        attempt.notice(f"input: not read: {name} (hidden, or not jsonl/csv/parquet, plain or compressed)")
    return listing


def stage_phase(attempt: Attempt, listing: InputListing) -> tuple[Plan, bool]:
    """**stage**: a new run's model checked, its input staged and cut into shards (the plan, saved once); a rerun's
    plan loaded and its input checked unchanged. Also says whether the model was checked."""
    plan = _load_plan(attempt.paths, attempt.notice)
    if plan is not None and (changes := input_changes(plan, listing)):
        raise JobSpecError(
            f"input.path: the input changed since run {attempt.paths.run_id} started ({'; '.join(changes[:3])}); a "
            "run explains one snapshot of its input: start a new run (without --run-id) for the new input"
        )
    checked = plan is None
    if plan is None:
        _check_model(attempt)
        plan = _stage(attempt, listing, attempt.spec.input.split_bytes)
    attempt.signals.check()
    return plan, checked


def plan_phase(attempt: Attempt, plan: Plan, listing: InputListing, checked: bool) -> Work:
    """**plan**: the progress record checked against the plan and the parts (a damaged part's shard is explained
    again), the shards to explain (with ``retry_errors`` also those with errors); when there are any, the model
    checked, the staged input made ready and ``_SUCCESS`` removed (the run is about to change)."""
    paths, retry = attempt.paths, attempt.retry_errors
    staged = functools.partial(_staged, attempt, listing, plan)
    progress, leftover, problems = load_progress(paths, plan, attempt.notice, staged)  # checked against the plan
    problems |= damaged(paths, progress)
    redone = []
    for shard, why in sorted(problems.items()):
        redone.append(f"shard {shard}: {why}; it is explained again")
        attempt.notice(redone[-1])
        progress.pop(shard, None)
    if leftover or problems:  # markers of a driver that stopped before folding them in; dropped records
        save_progress(paths, progress, leftover)
    pending = [s for s in range(len(plan.shards)) if s not in progress or (retry and progress[s]["counts"]["error"])]
    if pending:
        if not checked:
            _check_model(attempt)
        staged()
        if paths.fs.exists(paths.success):
            paths.fs.rm(paths.success)
    todo = sum(progress[s]["counts"]["error"] if s in progress else plan.shard_rows_of(s) for s in pending)
    return Work(progress, pending, todo, redone)


def explain_phase(attempt: Attempt, plan: Plan, work: Work, lease, on_progress) -> tuple[int, int]:
    """**explain**: the pending shards, by the executor; their markers folded into the progress record as they
    come (every ``FOLD_EVERY_S``, and at the end, also when the run stops). Returns rows explained, unit passes."""
    if not work.pending:
        return 0, 0
    processed, passes, total, progress = 0, 0, work.todo, work.progress
    folded_at, fold = time.monotonic(), []

    def partial(rows: int) -> None:
        if on_progress:
            on_progress(min(total, processed + rows), total)

    try:
        for record in attempt.executor.explain(plan, work.pending, attempt.retry_errors, lease, partial):
            progress[record["shard"]] = record
            fold.append(record["shard"])
            processed += record["explained"]
            passes += record["unit_passes"]
            if on_progress:
                on_progress(processed, total)
            if time.monotonic() - folded_at > FOLD_EVERY_S:
                save_progress(attempt.paths, progress, fold)
                folded_at, fold = time.monotonic(), []
    except BaseException:
        with contextlib.suppress(Exception):  # still under the lease: what finished stays recorded
            save_progress(attempt.paths, progress, fold)
        raise
    save_progress(attempt.paths, progress, fold)
    return processed, passes


# --- the phases' steps ---------------------------------------------------------------------------------------------


def _check_model(attempt: Attempt) -> None:
    """Fail fast, before any work, on a model this machine cannot load (a cluster may see models this machine does
    not, so only for local runs). Loads transformers (and torch): done only when there is work to do."""
    if attempt.address not in ("local", "inline"):
        return
    m = attempt.spec.model
    try:
        check_model(m.id, m.revision, m.trust_remote_code)
    except ValueError as err:
        raise JobSpecError(f"model.id: {str(err).removeprefix('model: ')}") from None


def _load_plan(paths: RunPaths, notice) -> Plan | None:
    """The run's plan; None for a new run, and for an unreadable plan from which no part was written yet (the input
    is staged again). An unreadable plan with parts is exit 2: without it no part can be matched to its rows."""
    try:
        data = paths.fs.cat_file(paths.plan)
    except FileNotFoundError:
        return None
    try:
        plan = Plan.from_json(data)
        why = plan_problem(plan)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        why = f"{type(err).__name__}: {first_line(err)}"
    if why is None:
        return plan
    parts = paths.parts()
    if parts:
        raise JobSpecError(
            f"run_id: the plan of run {paths.run_id} ({paths.plan}) is unreadable ({why}), and {len(parts)} parts "
            "were written from it: they cannot be matched to their input rows without it. Start a new run without "
            f"--run-id, or remove {paths.dir} and rerun with --run-id {paths.run_id} to explain it all again"
        )
    notice(f"{paths.plan} is unreadable ({why}); no part was written from it yet: the input is staged again")
    return None


def _stage(attempt: Attempt, listing: InputListing, split_bytes: int, save: bool = True) -> Plan:
    """Scan every input file into staging blocks (where the work runs; a file larger than ``split_bytes`` in
    pieces, a task each; a rerun passes its plan's), settle the ids, cut the shards."""
    spec, paths, run = attempt.spec, attempt.paths, dataclasses.asdict(attempt.paths)
    scan = attempt.executor.scan
    blocks = stage_input(listing, spec.input, run, spec.output.compression, split_bytes, scan, attempt.notice)
    attempt.executor.resolve([b.name for b in blocks])
    res = spec.resources
    plan = make_plan(listing, blocks, res.shard_rows, res.actors, res.batch_rows, split_bytes)
    if save:
        publish(paths.fs, paths.plan, plan.to_json())
    return plan


def _staged(attempt: Attempt, listing: InputListing, plan: Plan) -> None:
    """Make sure the plan's staged input is there: it is removed when the run completes, and staged again (the
    same blocks, or exit 2) when a rerun has work to do or parts to check."""
    if staging_ready(attempt.paths, plan):
        return
    again = _stage(attempt, listing, plan.split_bytes, save=False)
    if again.blocks != plan.blocks:
        raise JobSpecError(
            f"input.path: the input of run {attempt.paths.run_id} reads differently now; start a new run without "
            "--run-id"
        )


# --- how a run stops -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def reported(attempt: Attempt) -> Iterator[None]:
    """Whatever stops the run leaves as one of two errors: ``BadInput`` (exit 2: nothing to retry until the input,
    the config or the model changes) or ``RunIncomplete`` (finished shards are kept; the message names the rerun,
    and a stop signal N exits 128 + N). A worker's error is recognised by its type (``executors.worker_error``)."""
    run_id = attempt.paths.run_id
    try:
        yield
    except Stopped as stop:
        raise RunIncomplete(
            f"the run was stopped ({stop}); finished shards are kept: rerun with --run-id {run_id} to finish it",
            exit_code=128 + stop.signum,
        ) from None
    except Exception as err:
        cause = worker_error(err)
        if isinstance(cause, UnsupportedModel):  # the model, not the data: every worker refuses it before a row
            with contextlib.suppress(Exception):
                remove_staging(attempt.paths)  # staged rows are not output; leave nothing of a run that cannot start
            if isinstance(cause, MethodUnsupported):  # the chosen method's refusal, not AtMan's
                raise JobSpecError(f"method.name: {cause} (model.id {attempt.spec.model.id!r})") from None
            reason = str(cause).removeprefix("model: ")
            raise JobSpecError(f"model.id: {attempt.spec.model.id!r} cannot be explained exactly: {reason}") from None
        if isinstance(cause, (BadInput, RunIncomplete)):
            if cause is err:
                raise
            raise cause.with_traceback(None) from None  # e.g. a broken input file, found by the task that scans it
        raise RunIncomplete(
            f"the run stopped ({_write_problem(cause) or ''}{type(err).__name__}: {first_line(err)}); finished "
            f"shards are kept: rerun with --run-id {run_id} to finish it"
        ) from err


_CANNOT_WRITE = {
    errno.ENOSPC: ("no space left on the device", "free space there"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there"),
    errno.EROFS: ("a read-only file system", "make it writable"),
    errno.EACCES: ("permission denied", "make it writable"),
    errno.EPERM: ("permission denied", "make it writable"),
}


def _root_problem(err: BaseException) -> str:
    """What stopped the driver making the run's directory: a root that cannot be written is not one that is gone
    or that cannot be read."""
    code = getattr(err, "errno", None)
    if code in _CANNOT_WRITE:
        what, fix = _CANNOT_WRITE[code]
        return f"cannot be written ({what}): {fix}, or choose another output.root"
    if isinstance(err, FileNotFoundError):
        return "does not exist and cannot be made (a bucket is not made for you): create it, or fix output.root"
    return "cannot be reached or read"


def _write_problem(err: BaseException) -> str | None:
    """For an error of writing (disk full, read-only, denied) in the driver or a worker: which path it was and what
    to do, as the start of the message; else None."""
    code = getattr(err, "errno", None)
    if code not in _CANNOT_WRITE:
        return None
    what, fix = _CANNOT_WRITE[code]
    where = getattr(err, "filename", None)
    if where is None:
        return f"{what} writing a file of the run, its staging or Ray's scratch directory: {fix}; "
    return f"{what} writing {where}: {fix}; "


# --- finalize ------------------------------------------------------------------------------------------------------


def compute_of(progress: dict[int, dict]) -> list[dict]:
    """How the run's actors computed (device, dtype, resolved precision), each distinct setting once, from the
    shards' markers; a shard written by an older version without the record is left out."""
    seen = {json.dumps(r["compute"], sort_keys=True) for r in progress.values() if r.get("compute")}
    return [json.loads(c) for c in sorted(seen)]


def finalize(spec: JobSpec, paths: RunPaths, plan: Plan, progress: dict[int, dict], started_at, notice) -> RunSummary:
    """**finalize**: check every shard is written with all its rows, remove parts no shard names, write the
    manifest then ``_SUCCESS``, remove the staged input."""
    _check_complete(paths, plan, progress)
    fs = paths.fs
    named = {part_name(s) for s in range(len(plan.shards))}
    for path in paths.parts():
        if path.rsplit("/", 1)[-1] not in named:  # e.g. a part of an earlier layout: its rows would count twice
            notice(f"removing {path}: no shard of this run writes it")
            fs.rm(path)
    for path in remove_temps(fs, paths.dir) + remove_temps(fs, paths.markers):  # every worker has finished
        log.info("removed %s, left by an interrupted write", path)
    manifest = _manifest(spec, paths, plan, progress, started_at)
    publish(fs, paths.manifest, json.dumps(manifest, indent=2).encode())
    publish(fs, paths.success, b"")
    remove_staging(paths)
    return RunSummary(
        run_id=paths.run_id,
        location=paths.url,
        counts=manifest["counts"],
        rows=manifest["rows"],
        processed=0,
        seconds=0.0,
        unit_passes=0,
        files=len(manifest["files"]),
        shards=len(plan.shards),
    )


def _check_complete(paths: RunPaths, plan: Plan, progress: dict[int, dict]) -> None:
    """``RunIncomplete`` naming the rerun when a shard has no output yet, or other rows than its input."""
    missing = [s for s in range(len(plan.shards)) if s not in progress]
    if missing:
        rows = sum(plan.shard_rows_of(s) for s in missing)
        raise RunIncomplete(
            f"{len(missing)} of {len(plan.shards)} shards ({rows} of {plan.rows} input rows) have no output yet; "
            f"rerun with --run-id {paths.run_id} to finish it"
        )
    short = [s for s in range(len(plan.shards)) if progress[s]["rows"] != plan.shard_rows_of(s)]
    if short:
        raise RunIncomplete(
            f"shards {short[:5]} hold another number of rows than their input; rerun with --run-id {paths.run_id}"
        )


def _manifest(spec: JobSpec, paths: RunPaths, plan: Plan, progress: dict[int, dict], started_at) -> dict:
    """The run's ``_manifest.json``: what ran (config, model, libraries, compute), on what input, what came out
    (a part entry per shard: bytes, sha256, rows, counts, shard, name), when; ``atman plan``'s estimate beside."""
    files = [
        {k: progress[s][k] for k in ("bytes", "sha256", "rows", "counts")} | {"shard": s, "name": progress[s]["part"]}
        for s in range(len(plan.shards))
    ]
    finished_at = dt.datetime.now(dt.timezone.utc)
    try:
        previous = json.loads(paths.fs.cat_file(paths.manifest))
    except (FileNotFoundError, json.JSONDecodeError):
        previous = {}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "job": spec.name,
        "run_id": paths.run_id,
        "run_date": paths.run_date,
        "model": {"id": spec.model.id, "revision": spec.model.revision, "slug": paths.model},
        "config": spec.model_dump(mode="json"),
        "config_hash": spec.config_hash(),
        "method_params": method_params(spec.method.name, spec.method.atman_config()),
        "compute": compute_of(progress),
        "rows": sum(f["rows"] for f in files),
        "counts": {s: sum(r["counts"][s] for r in progress.values()) for s in STATUSES},
        "shards": len(plan.shards),
        "files": files,
        "input": {"files": plan.input, "ignored": plan.ignored},
        "started_at": previous.get("started_at", started_at.isoformat()),  # the run's first attempt
        "attempts": previous.get("attempts", 0) + 1,
        "finished_at": finished_at.isoformat(),
        "libraries": {"python": platform.python_version(), **_versions()},
    }
    from pipeline.estimate import estimate_block  # `atman plan`'s saved estimate of this job, beside the actual

    if (estimate := estimate_block(spec, paths, plan, progress, started_at, finished_at)) is not None:
        manifest["estimate"] = estimate
    return manifest


def _versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
