"""``atman run``: plan the input into shards, explain the unfinished ones (Ray actors), publish the run.

The data plane (``pipeline/shards.py``): the driver lists the input and plans; workers read, validate and stage
the rows, one task per file (or per piece of a large one); ids are settled over all rows out of core (DuckDB);
each shard is explained by one actor call and published as one part, then a marker records it. The driver holds
the plan and the progress record, never the rows: its memory does not grow with the corpus.

Guarantees (tested in tests/test_job*.py):
- every input row ends as exactly one output row (ok / skipped / error), checked before ``_SUCCESS``;
- a part is named by its shard and published whole, so a retried shard replaces its own part;
- a shard whose actor is lost (its process killed, its node lost) goes to a live actor (``_Pool``);
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
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata

from pipeline.errors import RunIncomplete
from pipeline.jobspec import JobSpec, JobSpecError
from pipeline.layout import (
    RunPaths,
    local_root,
    new_run_id,
    part_name,
    publish,
    remove_temps,
    scratch_dir,
    storage_error,
    valid_run_id,
)
from pipeline.lease import Lease
from pipeline.messages import first_line
from pipeline.models import check_model
from pipeline.parts import SCHEMA_VERSION, STATUSES
from pipeline.reader import list_input
from pipeline.shards import (
    BLOCK_ROWS,
    Plan,
    damaged,
    input_changes,
    load_progress,
    make_plan,
    plan_problem,
    remove_staging,
    resolve,
    save_progress,
    stage_input,
    staging_ready,
)

log = logging.getLogger(__name__)

LIBRARIES = ("atman-pipeline", "torch", "transformers", "ray", "pyarrow", "datasets", "s3fs")
FOLD_EVERY_S = 10.0
"""How often the driver folds shard markers into the progress record while a run works."""


class Stopped(BaseException):
    """SIGTERM / SIGINT arrived while the driver worked (a BaseException: no handler of row errors catches it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc)
    run_id = valid_run_id(run_id) if run_id else new_run_id()
    notice = on_notice or (lambda text: log.warning("%s", text))
    try:
        paths = RunPaths.locate(spec.output.root, spec.model.id, run_id)
        paths.fs.makedirs(paths.dir, exist_ok=True)
    except Exception as err:
        if not storage_error(err):
            raise
        raise JobSpecError(
            f"output.root: {spec.output.root!r} {_root_problem(err)} ({type(err).__name__}: {first_line(err)})"
        ) from None
    executor = _executor(spec, paths, address, notice)
    try:
        with _stop_on_signals(), Lease(paths) as lease, executor:
            if lease.taken_over:
                notice(f"run {run_id}: took over the lease of an earlier driver, {lease.taken_over}")
            listing = list_input(spec.input)
            for name in listing.ignored:
                notice(f"input: not read: {name} (hidden, or not jsonl/csv/parquet, plain or compressed)")
            plan = _load_plan(paths, notice)
            if plan is not None and (changes := input_changes(plan, listing)):
                raise JobSpecError(
                    f"input.path: the input changed since run {run_id} started ({'; '.join(changes[:3])}); a run "
                    "explains one snapshot of its input: start a new run (without --run-id) for the new input"
                )
            checked = plan is None  # a new run checks the model before it stages the input
            if plan is None:
                _check_model(spec, address)
                plan = _stage(executor, spec, paths, listing, spec.input.split_bytes, notice)
            _check_stop()
            staged = functools.partial(_staged, executor, spec, paths, listing, plan, notice)
            progress, leftover, problems = load_progress(paths, plan, notice, staged)  # checked against the plan
            redone = []
            problems |= damaged(paths, progress)
            for shard, why in sorted(problems.items()):
                redone.append(f"shard {shard}: {why}; it is explained again")
                notice(redone[-1])
                progress.pop(shard, None)
            if leftover or problems:  # markers of a driver that stopped before folding them in; dropped records
                save_progress(paths, progress, leftover)
            pending = [
                s
                for s in range(len(plan.shards))
                if s not in progress or (retry_errors and progress[s]["counts"]["error"])
            ]
            if pending and not checked:
                _check_model(spec, address)
            if pending:
                staged()
            if pending and paths.fs.exists(paths.success):
                paths.fs.rm(paths.success)  # the run is about to change: it is not complete until finalize says so
            todo = sum(progress[s]["counts"]["error"] if s in progress else plan.shard_rows_of(s) for s in pending)
            if on_start:
                on_start(paths, plan.rows, todo)
            processed, passes = _explain(
                executor, paths, plan, pending, todo, progress, retry_errors, lease, on_progress
            )
            summary = finalize(spec, paths, plan, progress, started_at, notice)
    except Stopped as stop:
        raise RunIncomplete(
            f"the run was stopped ({stop}); finished shards are kept: rerun with --run-id {run_id} to finish it",
            exit_code=128 + stop.signum,
        ) from None
    except (JobSpecError, RunIncomplete):
        raise
    except Exception as err:
        reason = _unsupported_model(err)
        if reason is not None:  # the model, not the data: every worker refuses it before writing a row
            with contextlib.suppress(Exception):
                remove_staging(paths)  # staged rows are not output, but leave nothing of a run that cannot start
            raise JobSpecError(f"model.id: {spec.model.id!r} cannot be explained exactly: {reason}") from None
        cause = _job_spec_error(err)
        if cause is not None:
            raise cause from None
        raise RunIncomplete(
            f"the run stopped ({_write_problem(err) or ''}{type(err).__name__}: {first_line(err)}); finished "
            f"shards are kept: rerun with --run-id {run_id} to finish it"
        ) from err
    summary.processed, summary.unit_passes = processed, passes
    summary.seconds = time.perf_counter() - started
    summary.redone, summary.ignored = redone, list(listing.ignored)
    return summary


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
    err = getattr(err, "cause", None) or err  # a Ray task's error wraps the worker's
    code = getattr(err, "errno", None)
    if code not in _CANNOT_WRITE:
        return None
    what, fix = _CANNOT_WRITE[code]
    where = getattr(err, "filename", None)
    if where is None:
        return f"{what} writing a file of the run, its staging or Ray's scratch directory: {fix}; "
    return f"{what} writing {where}: {fix}; "


def _check_model(spec: JobSpec, address: str) -> None:
    """Fail fast, before any work, on a model this machine cannot load (a cluster may see models this machine does
    not, so only for local runs). Loads transformers (and torch): done only when there is work to do."""
    if address not in ("local", "inline"):
        return
    try:
        check_model(spec.model.id, spec.model.revision, spec.model.trust_remote_code)
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


def _stage(executor, spec: JobSpec, paths: RunPaths, listing, split_bytes: int, notice, save: bool = True) -> Plan:
    """Scan every input file into staging blocks (where the work runs; a file larger than ``split_bytes`` in
    pieces, a task each; a rerun passes its plan's), settle the ids, cut the shards."""
    run, compression = dataclasses.asdict(paths), spec.output.compression
    blocks = stage_input(listing, spec.input, run, BLOCK_ROWS, compression, split_bytes, executor.scan, notice)
    executor.resolve([b.name for b in blocks])
    res = spec.resources
    plan = make_plan(listing, blocks, res.shard_rows, res.actors, res.batch_rows, split_bytes)
    if save:
        publish(paths.fs, paths.plan, plan.to_json())
    return plan


def _staged(executor, spec: JobSpec, paths: RunPaths, listing, plan: Plan, notice) -> None:
    """Make sure the plan's staged input is there: it is removed when the run completes, and staged again (the
    same blocks, or exit 2) when a rerun has work to do or parts to check."""
    if staging_ready(paths, plan):
        return
    again = _stage(executor, spec, paths, listing, plan.split_bytes, notice, save=False)
    if again.blocks != plan.blocks:
        raise JobSpecError(
            f"input.path: the input of run {paths.run_id} reads differently now; start a new run without --run-id"
        )


_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_handler: list = []  # the handler of the run in progress (ray.init installs its own; it is put back after)
_signalled: list[int] = []


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM (how Kubernetes and Ray stop a job) and SIGINT into ``Stopped`` while the run works, so it
    stops between steps: progress folded, Ray shut down, lease given back. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):  # only noted here: raising inside Ray's C++ wait would corrupt its state
        for sig in _SIGNALS:  # once: a second signal must not break the cleanup the first one started
            signal.signal(sig, signal.SIG_IGN)
        _signalled.append(signum)

    before = {s: signal.signal(s, stop) for s in _SIGNALS}
    _handler.append(stop)
    _signalled.clear()
    try:
        yield
    finally:
        _handler.remove(stop)
        for s, handler in before.items():
            signal.signal(s, handler)


def _check_stop() -> None:
    """Raise ``Stopped`` once a signal has arrived (called between steps and while waiting on Ray)."""
    if _signalled:
        raise Stopped(_signalled[0])


def _reclaim_signals() -> None:
    if _handler and threading.current_thread() is threading.main_thread():
        for s in _SIGNALS:
            signal.signal(s, _handler[-1])


def _explain(executor, paths, plan, pending, total, progress, retry_errors, lease, on_progress) -> tuple[int, int]:
    """Explain the pending shards (``total`` rows to explain); fold their markers into the progress record as they
    come."""
    if not pending:
        return 0, 0
    processed, passes = 0, 0
    folded_at, fold = time.monotonic(), []
    done = [0]

    def partial(rows: int) -> None:
        if on_progress:
            on_progress(min(total, done[0] + rows), total)

    try:
        for record in executor.explain(plan, pending, retry_errors, lease, partial):
            progress[record["shard"]] = record
            fold.append(record["shard"])
            processed += record["explained"]
            passes += record["unit_passes"]
            done[0] = processed
            if on_progress:
                on_progress(processed, total)
            if time.monotonic() - folded_at > FOLD_EVERY_S:
                save_progress(paths, progress, fold)
                folded_at, fold = time.monotonic(), []
    except BaseException:
        with contextlib.suppress(Exception):  # still under the lease: what finished stays recorded
            save_progress(paths, progress, fold)
        raise
    save_progress(paths, progress, fold)
    return processed, passes


def _unsupported_model(err: BaseException) -> str | None:
    """The reason when ``err`` is (or, through Ray, wraps) the engine's refusal of the model; else None."""
    name = "UnsupportedModelError"  # by name: importing the engine would load torch into the driver
    err = getattr(err, "cause", None) or err
    if any(c.__name__ == name for c in type(err).__mro__) and not hasattr(err, "cause"):
        message = str(err)
    else:
        cause = first_line(err)
        if not re.match(rf"(?:[\w.]+\.)?{name}: ", cause):
            return None
        message = cause.split(": ", 1)[1]
    return message.removeprefix("model: ")


def _job_spec_error(err: BaseException) -> JobSpecError | None:
    """A JobSpecError raised inside a Ray task (a broken input file found by the worker that scans it)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, JobSpecError):
        return JobSpecError(str(cause))
    m = re.search(r"JobSpecError: (.+)", first_line(err))
    if isinstance(err, JobSpecError) or m:
        return JobSpecError(m.group(1) if m else str(err))
    return None


# --- execution ---------------------------------------------------------------------------------------------------


def _executor(spec: JobSpec, paths: RunPaths, address: str, notice: Callable[[str], None] | None = None):
    return _Inline(spec, paths) if address == "inline" else _Ray(spec, paths, address, notice)


class _Inline:
    """Everything in this process, one step after another (debugging, benchmarks)."""

    def __init__(self, spec: JobSpec, paths: RunPaths) -> None:
        self.spec, self.paths = spec, paths
        self.run = dataclasses.asdict(paths)
        self.worker = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.worker = None

    def scan(self, calls: list[tuple]) -> list:
        """Run the staging calls ``(function, *args)`` (scans of files and pieces, their first pass) in order."""
        return [fn(*args) for fn, *args in calls]

    def resolve(self, blocks: list[str]) -> int:
        return resolve(self.run, blocks)

    def explain(self, plan: Plan, pending: list[int], retry_errors: bool, lease, on_partial):
        from pipeline.worker import ExplainWorker

        if self.worker is None:
            self.worker = ExplainWorker(self.spec.model_dump_json(), self.run)
        for shard in pending:
            lease.check()
            _check_stop()
            yield self.worker.explain_shard(shard, plan.segments(shard), retry_errors)


class _Ray:
    """Ray: scans as tasks (one per file, or per piece of a large file), the id pass as one task, shards on a pool
    of actors (two in flight each, so reading and publishing one shard overlap explaining the other)."""

    def __init__(self, spec: JobSpec, paths: RunPaths, address: str, notice: Callable[[str], None] | None = None):
        self.spec, self.paths, self.address = spec, paths, address
        self.notice = notice or (lambda text: log.warning("%s", text))
        self.run = dataclasses.asdict(paths)
        self.started_here = False
        self.scratch: str | None = None
        self.watchdog: subprocess.Popen | None = None

    def __enter__(self):
        return self

    def _ensure(self):
        import ray

        if ray.is_initialized():
            return ray
        res = self.spec.resources
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")  # no native stack dump on SIGTERM
        self.started_here = True
        if self.address == "local":
            self.scratch = _scratch_dir(self.spec, self.paths.run_id)
            self.watchdog = _watchdog(self.scratch)
            ray.init(
                num_cpus=max(os.cpu_count() or 1, int(res.actors * res.cpus_per_actor + 0.999) + 1),
                include_dashboard=False,
                _temp_dir=self.scratch,
                logging_level=logging.WARNING,
                configure_logging=True,
            )
        else:
            ray.init(address=self.address, logging_level=logging.WARNING)
        _reclaim_signals()  # ray.init installs a SIGTERM handler that exits without cleaning up
        return ray

    def __exit__(self, *exc) -> None:
        if not self.started_here:
            return
        import ray

        ray.shutdown()
        if self.watchdog is not None:
            self.watchdog.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.watchdog.wait(timeout=5)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def scan(self, calls: list[tuple]) -> list:
        """The staging calls ``(function, *args)`` (scans of files and pieces, their first pass) as tasks, a CPU
        each; their results in order."""
        ray = self._ensure()
        tasks: dict = {}
        refs = []
        for fn, *args in calls:
            if fn not in tasks:
                tasks[fn] = ray.remote(fn).options(num_cpus=1, max_retries=2)
            refs.append(tasks[fn].remote(*args))
        return _get_all(ray, refs)

    def resolve(self, blocks: list[str]) -> int:
        ray = self._ensure()
        return _get_all(ray, [ray.remote(resolve).options(num_cpus=1, max_retries=2).remote(self.run, blocks)])[0]

    def explain(self, plan: Plan, pending: list[int], retry_errors: bool, lease, on_partial):
        from pipeline.worker import ExplainWorker

        ray = self._ensure()
        res = self.spec.resources
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
        actor = ray.remote(ExplainWorker).options(
            num_cpus=res.cpus_per_actor,
            num_gpus=res.gpus_per_actor or None,
            max_restarts=res.max_restarts,
            max_task_retries=0,  # a lost actor's shards go to a live actor (_Pool), not to wait for its restart
            max_concurrency=4,  # two shards (one explaining, one reading or publishing), progress poll, probe
        )
        actors = [actor.remote(self.spec.model_dump_json(), self.run) for _ in range(min(res.actors, len(pending)))]

        def call(a, shard: int):
            return a.explain_shard.remote(shard, plan.segments(shard), retry_errors)

        pool = _Pool(ray, actors, call, deque(pending), res.max_restarts, self.notice)
        try:
            yield from self._dispatch(ray, pool, lease, on_partial)
        finally:
            for a in actors:
                with contextlib.suppress(Exception):
                    ray.kill(a)

    @staticmethod
    def _dispatch(ray, pool: _Pool, lease, on_partial):
        pool.start()
        polled = time.monotonic()
        polls: list = []
        while pool.busy():
            lease.check()
            _check_stop()
            refs = pool.waiting()
            ready = ray.wait(refs, num_returns=1, timeout=0.5)[0] if refs else []
            if not refs:  # every actor lost, each waiting for Ray to restart it
                time.sleep(0.5)
            for ref in ready:
                record = pool.settle(ref)
                if record is not None:
                    yield record
            pool.probe_lost()
            if time.monotonic() - polled > 1.0:  # rows done inside shards still running, across all actors
                done = ray.wait(polls, num_returns=len(polls), timeout=0)[0] if polls else []
                partial = 0
                for p in done:
                    with contextlib.suppress(Exception):
                        partial += sum(ray.get(p).values())
                if done:
                    on_partial(partial)
                polls = [pool.actors[i].progress.remote() for i in pool.up]
                polled = time.monotonic()


class _Pool:
    """The run's actors and the shards in flight on them (two each). Ray restarts a lost actor (its process killed,
    its node lost) up to ``max_restarts`` times, where there is room for it: a cluster that lost a node may have
    none. So a shard whose actor is lost does not wait for that restart: it goes back to the front of the queue
    for the live actors, and the user is told (a shard lost more than ``max_restarts`` times stops the run). A lost
    actor is probed every second; once Ray has restarted it, it takes shards again."""

    PROBE_S = 1.0

    def __init__(self, ray, actors: list, call, queue: deque, max_restarts: int, notice) -> None:
        self.ray, self.actors, self.call, self.queue = ray, actors, call, queue
        self.max_restarts, self.notice = max_restarts, notice
        self.shards: dict = {}  # ref -> (actor, shard, the actor's life it was given to)
        self.probes: dict = {}  # ref -> actor
        self.up: set[int] = set()
        self.lost: dict[int, float] = {}  # lost actor -> when to probe it next
        self.where = ["node unknown"] * len(actors)
        self.life = [0] * len(actors)  # counts the actor's losses: a late failure from an earlier life is no news
        self.losses: dict[int, int] = {}  # shard -> how often its actor was lost while it had it

    def start(self) -> None:
        for i in range(len(self.actors)):
            self._probe(i)  # where it runs, for the notices
            self._fill(i)

    def busy(self) -> bool:
        return bool(self.shards or self.queue)

    def waiting(self) -> list:
        return [*self.probes, *self.shards]

    def settle(self, ref) -> dict | None:
        """The marker of a finished shard; None for an answered probe, or a shard whose actor was lost."""
        if ref in self.probes:
            self._probed(self.probes.pop(ref), ref)
            return None
        i, shard, life = self.shards.pop(ref)
        try:
            record = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as err:
            if err.actor_init_failed:
                raise
            self._lose(i, shard, err, life)
            return None
        self.lost.pop(i, None)  # it answered: whatever made it look lost has passed
        self._fill(i)
        return record

    def probe_lost(self) -> None:
        now = time.monotonic()
        for i, due in self.lost.items():
            if due <= now and i not in self.probes.values():
                self._probe(i)

    def _fill(self, i: int) -> None:
        self.up.add(i)
        while self.queue and sum(a == i for a, _, _ in self.shards.values()) < 2:
            shard = self.queue.popleft()
            self.shards[self.call(self.actors[i], shard)] = (i, shard, self.life[i])

    def _probe(self, i: int) -> None:
        self.probes[self.actors[i].__ray_call__.remote(_whereabouts)] = i

    def _lose(self, i: int, shard: int, err: BaseException, life: int) -> None:
        self.losses[shard] = times = self.losses.get(shard, 0) + 1
        if times > self.max_restarts:
            raise RuntimeError(
                f"shard {shard}: its actor was lost {times} times while explaining it ({type(err).__name__}; "
                f"resources.max_restarts: {self.max_restarts})"
            ) from err
        if i in self.up and life == self.life[i]:
            self.up.discard(i)
            self.lost[i] = time.monotonic() + self.PROBE_S
            self.life[i] += 1
        self.queue.appendleft(shard)
        self.notice(
            f"shard {shard}: its actor {i} ({self.where[i]}) was lost ({type(err).__name__}); the shard is explained "
            f"again by {'another actor' if self.up else 'the first actor Ray restarts'}"
        )
        for j in sorted(self.up):
            self._fill(j)

    def _probed(self, i: int, ref) -> None:
        try:
            where = self.ray.get(ref)
        except self.ray.exceptions.ActorDiedError as err:
            if err.actor_init_failed:
                raise
            self.up.discard(i)
            self.lost.pop(i, None)
            self.notice(f"actor {i} ({self.where[i]}) is gone: Ray will not restart it (resources.max_restarts)")
            if not self.up and not self.lost:
                raise RuntimeError(f"every actor of the run is gone (the last: {type(err).__name__})") from err
            return
        except self.ray.exceptions.RayActorError:  # unavailable: being restarted, or not yet known to be lost
            if i in self.lost:
                self.lost[i] = time.monotonic() + self.PROBE_S
            return
        self.where[i] = where
        if self.lost.pop(i, None) is not None:
            self.notice(f"actor {i} was restarted ({where}); it explains shards again")
            self._fill(i)


def _whereabouts(_worker) -> str:
    """Where an actor runs (called in it through Ray's ``__ray_call__``): its node's id (short) and address."""
    import ray

    return f"node {ray.get_runtime_context().get_node_id()[:8]} at {ray.util.get_node_ip_address()}"


def _get_all(ray, refs: list) -> list:
    """Results in order; the first failure is raised (its JobSpecError, if any, unwrapped by run_job)."""
    waiting = list(refs)
    while waiting:
        _check_stop()
        _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.5)
    return ray.get(refs)


def _watchdog(scratch: str) -> subprocess.Popen:
    """A small process that outlives a SIGKILLed driver and stops the Ray processes it left (their files are in
    ``scratch``). It ends by itself when the driver ends normally (it is terminated)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.watchdog", str(os.getpid()), scratch],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the driver's process group: a signal to the group does not reach it
    )


def scratch_path(root: str, model_id: str, run_id: str) -> str:
    """Ray's session directory for a local run: ``ROOT/_scratch/<run_id>`` for a local root whose path is short
    enough for Ray's Unix sockets (~107 bytes in all), else ``$TMPDIR/atman-ray-<hash>``. The same for every
    attempt of a run, so a rerun finds what a killed driver left. Ray encodes its socket paths as ASCII, so a root
    with any other character also takes the second form."""
    local = local_root(root)
    if local is not None:
        root = local
        path = scratch_dir(local, run_id)
        if len(path) <= 40 and path.isascii():
            return path
    key = hashlib.sha256(f"{root}\n{model_id}\n{run_id}".encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"atman-ray-{key}")


def _scratch_dir(spec: JobSpec, run_id: str) -> str:
    """The run's scratch directory, emptied of Ray processes an earlier driver of this run left (this driver holds
    the run's lease, so whatever still uses the directory belongs to a driver that is gone)."""
    from pipeline.watchdog import stop

    path = scratch_path(spec.output.root, spec.model.id, run_id)
    for pid in stop(path):
        log.warning("stopped process %d left by an earlier driver of this run", pid)
    os.makedirs(path, exist_ok=True)
    return path


# --- publishing ----------------------------------------------------------------------------------------------------


def compute_of(progress: dict[int, dict]) -> list[dict]:
    """How the run's actors computed (device, dtype, resolved precision), each distinct setting once, from the
    shards' markers; a shard written by an older version without the record is left out."""
    seen = {json.dumps(r["compute"], sort_keys=True) for r in progress.values() if r.get("compute")}
    return [json.loads(c) for c in sorted(seen)]


def finalize(spec: JobSpec, paths: RunPaths, plan: Plan, progress: dict[int, dict], started_at, notice) -> RunSummary:
    """Check every shard is written with all its rows, remove parts no shard names, write manifest then _SUCCESS."""
    fs = paths.fs
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
    named = {part_name(s) for s in range(len(plan.shards))}
    for path in paths.parts():
        if path.rsplit("/", 1)[-1] not in named:  # e.g. a part of an earlier layout: its rows would count twice
            notice(f"removing {path}: no shard of this run writes it")
            fs.rm(path)
    for path in remove_temps(fs, paths.dir) + remove_temps(fs, paths.markers):  # every worker has finished
        log.info("removed %s, left by an interrupted write", path)
    counts = {s: sum(r["counts"][s] for r in progress.values()) for s in STATUSES}
    files = [
        {k: progress[s][k] for k in ("part", "bytes", "sha256", "rows", "counts")} | {"shard": s}
        for s in range(len(plan.shards))
    ]
    for f in files:
        f["name"] = f.pop("part")
    rows = sum(f["rows"] for f in files)
    finished_at = dt.datetime.now(dt.timezone.utc)
    try:
        previous = json.loads(fs.cat_file(paths.manifest))
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
        "method_params": spec.method.atman_config().model_dump(mode="json"),
        "compute": compute_of(progress),
        "rows": rows,
        "counts": counts,
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
    publish(fs, paths.manifest, json.dumps(manifest, indent=2).encode())
    publish(fs, paths.success, b"")
    remove_staging(paths)
    return RunSummary(
        run_id=paths.run_id,
        location=paths.url,
        counts=counts,
        rows=rows,
        processed=0,
        seconds=0.0,
        unit_passes=0,
        files=len(files),
        shards=len(plan.shards),
    )


def _versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
