"""Where a run's work happens, behind one small interface: ``Inline`` (this process, one step after another: for
debugging and benchmarks) and ``RayExecutor`` (scan tasks, the id pass as a task, a pool of actors for the shards).

An executor is a context manager with three calls, the phases of ``pipeline/job.py`` that do work:
- ``scan(calls)``: run the staging calls ``(function, *args)`` (scans of files and pieces); their results in order;
- ``resolve(blocks)``: settle the ids over the staged blocks (one task, out of core);
- ``explain(plan, pending, retry_errors, lease, on_partial)``: explain the pending shards, yielding each shard's
  marker as it is published.
Both check the run's ``StopSignals`` and lease between steps. An error a worker raised reaches the driver as itself
(``worker_error``): the driver tests its type, never Ray's message text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from pipeline.jobspec import JobSpec
from pipeline.layout import RunPaths, local_root, scratch_dir
from pipeline.plan import Plan
from pipeline.signals import StopSignals
from pipeline.staging import resolve

log = logging.getLogger(__name__)


class Executor(Protocol):
    def __enter__(self) -> Executor: ...
    def __exit__(self, *exc) -> None: ...
    def scan(self, calls: list[tuple]) -> list: ...
    def resolve(self, blocks: list[str]) -> int: ...
    def explain(self, plan: Plan, pending: list[int], retry_errors: bool, lease, on_partial) -> Iterator[dict]: ...


def worker_error(err: BaseException) -> BaseException:
    """The error a worker raised, out of Ray's wrapper: a failed task's ``RayTaskError`` carries it as ``cause``;
    an actor whose creation failed dies with an ``ActorDiedError`` built from such a ``RayTaskError``. Anything
    else (or a cause Ray could not carry) is returned as it is."""
    cause = getattr(err, "cause", None)
    if cause is None and getattr(err, "actor_init_failed", False) and err.args:
        cause = getattr(err.args[0], "cause", None)
    return cause if isinstance(cause, BaseException) else err


def executor(spec: JobSpec, paths: RunPaths, address: str, signals: StopSignals, notice: Callable[[str], None]):
    """``inline``: this process; anything else is a Ray address (``local`` starts an embedded Ray)."""
    return Inline(spec, paths, signals) if address == "inline" else RayExecutor(spec, paths, address, signals, notice)


class Inline:
    """Everything in this process, one step after another (debugging, benchmarks)."""

    def __init__(self, spec: JobSpec, paths: RunPaths, signals: StopSignals) -> None:
        self.spec, self.paths, self.signals = spec, paths, signals
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
            self.signals.check()
            yield self.worker.explain_shard(shard, plan.segments(shard), retry_errors)


class RayExecutor:
    """Ray: scans as tasks (one per file, or per piece of a large file), the id pass as one task, shards on a pool
    of actors (two in flight each, so reading and publishing one shard overlap explaining the other)."""

    def __init__(self, spec: JobSpec, paths: RunPaths, address: str, signals: StopSignals, notice) -> None:
        self.spec, self.paths, self.address, self.signals, self.notice = spec, paths, address, signals, notice
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
            self.scratch = clear_scratch(self.spec, self.paths.run_id)
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
        self.signals.reclaim()  # ray.init installs a SIGTERM handler that exits without cleaning up
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
        return self._get_all(ray, refs)

    def resolve(self, blocks: list[str]) -> int:
        ray = self._ensure()
        return self._get_all(ray, [ray.remote(resolve).options(num_cpus=1, max_retries=2).remote(self.run, blocks)])[0]

    def explain(self, plan: Plan, pending: list[int], retry_errors: bool, lease, on_partial):
        from pipeline.worker import ExplainWorker

        ray = self._ensure()
        res = self.spec.resources
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
        actor = ray.remote(ExplainWorker).options(
            num_cpus=res.cpus_per_actor,
            num_gpus=res.gpus_per_actor or None,
            max_restarts=res.max_restarts,
            max_task_retries=0,  # a lost actor's shards go to a live actor (Pool), not to wait for its restart
            max_concurrency=4,  # two shards (one explaining, one reading or publishing), progress poll, probe
        )
        actors = [actor.remote(self.spec.model_dump_json(), self.run) for _ in range(min(res.actors, len(pending)))]

        def call(a, shard: int):
            return a.explain_shard.remote(shard, plan.segments(shard), retry_errors)

        pool = Pool(ray, actors, call, deque(pending), res.max_restarts, self.notice)
        try:
            yield from dispatch(ray, pool, lease, self.signals, on_partial)
        finally:
            for a in actors:
                with contextlib.suppress(Exception):
                    ray.kill(a)

    def _get_all(self, ray, refs: list) -> list:
        """Results in order; the first failure is raised (a worker's own error: see ``worker_error``)."""
        waiting = list(refs)
        while waiting:
            self.signals.check()
            _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.5)
        return ray.get(refs)


def dispatch(ray, pool: Pool, lease, signals: StopSignals, on_partial) -> Iterator[dict]:
    """Keep the pool's actors busy until every shard is published; yield each shard's marker as it comes, report
    the rows done inside shards still running, and stop between waits on a lost lease or a stop signal."""
    pool.start()
    polls = _Polls(ray, pool, on_partial)
    while pool.busy():
        lease.check()
        signals.check()
        refs = pool.waiting()
        ready = ray.wait(refs, num_returns=1, timeout=0.5)[0] if refs else []
        if not refs:  # every actor lost, each waiting for Ray to restart it
            time.sleep(0.5)
        for ref in ready:
            record = pool.settle(ref)
            if record is not None:
                yield record
        pool.probe_lost()
        polls.tick()


class _Polls:
    """Rows done inside shards still running, across all actors: asked of the live actors every second, the answers
    read at the next tick (a progress call runs on another of the actor's threads while it explains)."""

    EVERY_S = 1.0

    def __init__(self, ray, pool: Pool, on_partial) -> None:
        self.ray, self.pool, self.on_partial = ray, pool, on_partial
        self.at, self.refs = time.monotonic(), []

    def tick(self) -> None:
        if time.monotonic() - self.at <= self.EVERY_S:
            return
        done = self.ray.wait(self.refs, num_returns=len(self.refs), timeout=0)[0] if self.refs else []
        partial = 0
        for ref in done:
            with contextlib.suppress(Exception):
                partial += sum(self.ray.get(ref).values())
        if done:
            self.on_partial(partial)
        self.refs = [self.pool.actors[i].progress.remote() for i in self.pool.up]
        self.at = time.monotonic()


class Pool:
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


def clear_scratch(spec: JobSpec, run_id: str) -> str:
    """The run's scratch directory, emptied of Ray processes an earlier driver of this run left (this driver holds
    the run's lease, so whatever still uses the directory belongs to a driver that is gone)."""
    from pipeline.watchdog import stop

    path = scratch_path(spec.output.root, spec.model.id, run_id)
    for pid in stop(path):
        log.warning("stopped process %d left by an earlier driver of this run", pid)
    os.makedirs(path, exist_ok=True)
    return path
