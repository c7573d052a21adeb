"""``atman run``: plan the input into shards, explain the unfinished ones (Ray actors), publish the run.

The data plane (``pipeline/shards.py``): the driver lists the input and plans; workers read, validate and stage
the rows, one task per file; ids are settled over all rows out of core (DuckDB); each shard is explained by one
actor call and published as one part, then a marker records it. The driver holds the plan and the progress record,
never the rows: its memory does not grow with the corpus.

Guarantees (tested in tests/test_job*.py):
- every input row ends as exactly one output row (ok / skipped / error), checked before ``_SUCCESS``;
- a part is named by its shard and published whole, so a retried shard replaces its own part;
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

from pipeline.jobspec import JobSpec, JobSpecError
from pipeline.layout import (
    RunPaths,
    local_root,
    new_run_id,
    part_name,
    publish,
    scratch_dir,
    storage_error,
    valid_run_id,
)
from pipeline.lease import Lease
from pipeline.messages import first_line
from pipeline.models import check_model
from pipeline.reader import list_input
from pipeline.schema import SCHEMA_VERSION, STATUSES
from pipeline.shards import (
    BLOCK_ROWS,
    Plan,
    damaged,
    input_changes,
    load_progress,
    make_plan,
    remove_staging,
    resolve,
    save_progress,
    scan_file,
    staging_ready,
)

log = logging.getLogger(__name__)

LIBRARIES = ("atman-pipeline", "torch", "transformers", "ray", "pyarrow", "datasets", "s3fs")
FOLD_EVERY_S = 10.0
"""How often the driver folds shard markers into the progress record while a run works."""


class RunIncomplete(RuntimeError):
    """The run stopped before every input row was written (it is not marked _SUCCESS); the message says how to
    resume it. ``exit_code``: 1, or 128 + the signal that stopped it."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
            f"output.root: {spec.output.root!r}: cannot read it ({type(err).__name__}: {first_line(err)})"
        ) from None
    executor = _executor(spec, paths, address)
    try:
        with _stop_on_signals(), Lease(paths) as lease, executor:
            listing = list_input(spec.input)
            for name in listing.ignored:
                notice(f"input: not read: {name} (hidden, or not jsonl/csv/parquet, plain or compressed)")
            plan = _load_plan(paths)
            if plan is not None and (changes := input_changes(plan, listing)):
                raise JobSpecError(
                    f"input.path: the input changed since run {run_id} started ({'; '.join(changes[:3])}); a run "
                    "explains one snapshot of its input: start a new run (without --run-id) for the new input"
                )
            checked = plan is None  # a new run checks the model before it stages the input
            if plan is None:
                _check_model(spec, address)
                plan = _stage(executor, spec, paths, listing)
            _check_stop()
            progress, leftover = load_progress(paths)
            progress = {s: r for s, r in progress.items() if s < len(plan.shards)}
            redone = []
            problems = damaged(paths, progress)
            for shard, record in progress.items():  # finalize refused it: without this every rerun would too
                if shard not in problems and record["rows"] != plan.shard_rows_of(shard):
                    problems[shard] = f"its part holds {record['rows']} of its {plan.shard_rows_of(shard)} input rows"
            for shard, why in sorted(problems.items()):
                redone.append(f"shard {shard}: {why}; it is explained again")
                notice(redone[-1])
                del progress[shard]
            if leftover:  # markers of a driver that stopped before folding them in
                save_progress(paths, progress, leftover)
            pending = [
                s
                for s in range(len(plan.shards))
                if s not in progress or (retry_errors and progress[s]["counts"]["error"])
            ]
            if pending and not checked:
                _check_model(spec, address)
            if pending and not staging_ready(paths, plan):  # removed when the run completed: stage it again
                again = _stage(executor, spec, paths, listing, save=False)
                if again.blocks != plan.blocks:
                    raise JobSpecError(
                        f"input.path: the input of run {run_id} reads differently now; start a new run without --run-id"
                    )
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
            f"the run stopped ({type(err).__name__}: {first_line(err)}); finished shards are kept: "
            f"rerun with --run-id {run_id} to finish it"
        ) from err
    summary.processed, summary.unit_passes = processed, passes
    summary.seconds = time.perf_counter() - started
    summary.redone, summary.ignored = redone, list(listing.ignored)
    return summary


def _check_model(spec: JobSpec, address: str) -> None:
    """Fail fast, before any work, on a model this machine cannot load (a cluster may see models this machine does
    not, so only for local runs). Loads transformers (and torch): done only when there is work to do."""
    if address not in ("local", "inline"):
        return
    try:
        check_model(spec.model.id, spec.model.revision, spec.model.trust_remote_code)
    except ValueError as err:
        raise JobSpecError(f"model.id: {str(err).removeprefix('model: ')}") from None


def _load_plan(paths: RunPaths) -> Plan | None:
    try:
        return Plan.from_json(paths.fs.cat_file(paths.plan))
    except FileNotFoundError:
        return None


def _stage(executor, spec: JobSpec, paths: RunPaths, listing, save: bool = True) -> Plan:
    """Scan every input file into staging blocks (where the work runs), settle the ids, cut the shards."""
    blocks = executor.scan(listing, BLOCK_ROWS)
    executor.resolve([b.name for b in blocks])
    res = spec.resources
    plan = make_plan(listing, blocks, res.shard_rows, res.actors, res.batch_rows)
    if save:
        publish(paths.fs, paths.plan, plan.to_json())
    return plan


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


def _executor(spec: JobSpec, paths: RunPaths, address: str):
    return _Inline(spec, paths) if address == "inline" else _Ray(spec, paths, address)


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

    def scan(self, listing, block_rows: int):
        spec_json, compression = self.spec.input.model_dump_json(), self.spec.output.compression
        return [
            b
            for i, f in enumerate(listing.files)
            for b in scan_file(spec_json, self.run, dataclasses.asdict(f), i, block_rows, compression)
        ]

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
    """Ray: scans as tasks (one per file), the id pass as one task, shards on a pool of actors (two in flight
    each, so reading and publishing one shard overlap explaining the other)."""

    def __init__(self, spec: JobSpec, paths: RunPaths, address: str) -> None:
        self.spec, self.paths, self.address = spec, paths, address
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

    def scan(self, listing, block_rows: int):
        ray = self._ensure()
        task = ray.remote(scan_file).options(num_cpus=1, max_retries=2)
        spec_json, compression = self.spec.input.model_dump_json(), self.spec.output.compression
        refs = [
            task.remote(spec_json, self.run, dataclasses.asdict(f), i, block_rows, compression)
            for i, f in enumerate(listing.files)
        ]
        return [b for blocks in _get_all(ray, refs) for b in blocks]

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
            max_task_retries=res.max_restarts,
            max_concurrency=3,  # two shards (one explaining, one reading or publishing) and the progress poll
        )
        actors = [actor.remote(self.spec.model_dump_json(), self.run) for _ in range(min(res.actors, len(pending)))]
        queue = deque(pending)
        inflight: dict = {}

        def submit(a) -> None:
            if queue:
                shard = queue.popleft()
                inflight[a.explain_shard.remote(shard, plan.segments(shard), retry_errors)] = a

        try:
            yield from self._dispatch(ray, actors, submit, inflight, lease, on_partial)
        finally:
            for a in actors:
                with contextlib.suppress(Exception):
                    ray.kill(a)

    @staticmethod
    def _dispatch(ray, actors, submit, inflight, lease, on_partial):
        for a in actors:
            submit(a)
            submit(a)
        polled = time.monotonic()
        polls: list = []
        while inflight:
            lease.check()
            _check_stop()
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                a = inflight.pop(ref)
                yield ray.get(ref)
                submit(a)
            if time.monotonic() - polled > 1.0:  # rows done inside shards still running, across all actors
                done = ray.wait(polls, num_returns=len(polls), timeout=0)[0] if polls else []
                partial = 0
                for p in done:
                    with contextlib.suppress(Exception):
                        partial += sum(ray.get(p).values())
                if done:
                    on_partial(partial)
                polls = [a.progress.remote() for a in actors]
                polled = time.monotonic()


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
