"""A node lost under a run: every input row still ends in the output exactly once.

The cluster tests run a real multi-node Ray cluster on this machine (tests/cluster.py: a head and worker nodes, each
its own `ray start`), the input and output on S3 (SeaweedFS), and an `atman run --address auto` driver:
- a worker node is lost (its raylet and every process below it SIGKILLed) while an actor on it explains a shard:
  its shards are explained again by the actor on the other node (which has no room for a restarted one), the user
  is told which node and shards, and the run completes;
- the node of the driver is lost (the head and the driver SIGKILLed together): a rerun of the run id takes over at
  once, since the holder of the lease is provably gone (this machine, its pid gone), and completes the run; the
  same lease from another machine is refused, naming when it expires.
The lease tests below them check, without Ray, when a lease is provably gone and that one from another machine is
waited out (a short ``ATMAN_LEASE_TTL_S``); the pool test checks the driver's dispatch on a scripted fake Ray.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pytest
from cluster import RayCluster, wait_for
from seaweed import s3_bucket, s3_server  # noqa: F401 - fixtures

from pipeline.job import run_job
from pipeline.jobspec import JobSpecError, load_job
from pipeline.layout import RunPaths
from pipeline.lease import Lease, RunLocked

ATMAN = str(Path(sys.executable).parent / "atman")
N, SHARD_ROWS = 96, 4
SHARDS = N // SHARD_ROWS
IDS = [f"q{i:03d}" for i in range(N)]
EXPLAINING = "ray::ExplainWorker.explain_shard"  # an actor's process title while it runs a shard


# --- the cluster tests -------------------------------------------------------------------------------------------


@pytest.fixture
def start_cluster(s3_server):  # noqa: F811
    """``start_cluster(**RayCluster arguments)``: a cluster whose nodes see the S3 server; every one started is
    stopped in teardown, whatever the test did to it."""
    started: list[RayCluster] = []

    def start(**kwargs) -> RayCluster:
        started.append(RayCluster(env=s3_server.env(), **kwargs))
        return started[-1].start()

    yield start
    for cluster in started:
        cluster.stop()


def _job(tmp_path: Path, fs, bucket: str, model: str, actors: int) -> None:
    rows = [{"id": i, "prompt": f"Question {i}: the capital of France is Paris and of Italy", "target": " Rome"}
            for i in IDS]  # fmt: skip
    fs.pipe_file(f"{bucket}/in/prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "job.yaml").write_text(
        f"name: nodeloss\nmodel: {{id: {model}}}\ninput: {{path: 's3://{bucket}/in/prompts.jsonl'}}\n"
        f"output: {{root: 's3://{bucket}/out'}}\nmethod: {{granularity: word}}\n"
        f"resources: {{actors: {actors}, batch_rows: 2, shard_rows: {SHARD_ROWS}, max_restarts: 3}}\n"
    )


def _driver(tmp_path: Path, run_id: str, env: dict, address: str) -> subprocess.Popen:
    """`atman run`, its output in files (a pipe nobody reads would stall it)."""
    out, err = (open(tmp_path / f"{run_id}.{n}", "w") for n in ("out", "err"))  # noqa: SIM115 - the child holds them
    with out, err:
        cmd = [ATMAN, "run", "job.yaml", "--run-id", run_id, "--address", address]
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=err)


def _run_dir(fs, bucket: str, run_id: str) -> str | None:
    fs.invalidate_cache()
    found = fs.glob(f"{bucket}/out/model=*/run_date=*/run_id={run_id}")
    return found[0] if found else None


def _parts(fs, bucket: str, run_id: str) -> list[str]:
    run_dir = _run_dir(fs, bucket, run_id)
    return fs.glob(f"{run_dir}/part-*.parquet") if run_dir else []


def _first_parts(driver: subprocess.Popen, fs, bucket: str, run_id: str, also=lambda: True) -> list[str]:
    """The parts published once the first is (and ``also()`` holds); the driver must still be running."""
    wait_for(lambda: driver.poll() is not None or (_parts(fs, bucket, run_id) and also()), 150, "a part", every=0.2)
    assert driver.poll() is None, f"the driver exited {driver.returncode} before the kill"
    return _parts(fs, bucket, run_id)


def _recorded_rows(fs, run_dir: str) -> int:
    """Rows of the shards the run recorded as done: ``_progress.json`` and the markers not yet folded into it (a
    part published without its marker is no record: a rerun rightly explains that shard again)."""
    fs.invalidate_cache()
    rows = {}
    with contextlib.suppress(FileNotFoundError):
        rows |= {r["shard"]: r["rows"] for r in json.loads(fs.cat_file(f"{run_dir}/_progress.json"))["shards"]}
    with contextlib.suppress(FileNotFoundError):
        for path in fs.glob(f"{run_dir}/_progress/s*.json"):
            record = json.loads(fs.cat_file(path))
            rows[record["shard"]] = record["rows"]
    return sum(rows.values())


def _assert_exactly_once(fs, run_dir: str) -> None:
    fs.invalidate_cache()
    assert fs.exists(f"{run_dir}/_SUCCESS")
    ids = ds.dataset(run_dir, filesystem=fs, format="parquet").to_table(columns=["prompt_id"])["prompt_id"]
    assert sorted(ids.to_pylist()) == IDS, "every input id exactly once"
    manifest = json.loads(fs.cat_file(f"{run_dir}/_manifest.json"))
    assert manifest["counts"] == {"ok": N, "skipped": 0, "error": 0} and manifest["rows"] == N
    assert manifest["shards"] == SHARDS and sorted(f["shard"] for f in manifest["files"]) == list(range(SHARDS))
    assert sum(f["rows"] for f in manifest["files"]) == N


@pytest.mark.cluster
@pytest.mark.slow
def test_a_worker_node_lost_mid_run_its_shards_are_explained_on_the_other(
    tmp_path,
    s3_server,  # noqa: F811
    s3_bucket,  # noqa: F811
    tiny_model_dir,
    start_cluster,
):
    fs = s3_server.filesystem()
    _job(tmp_path, fs, s3_bucket, tiny_model_dir, actors=2)
    cluster = start_cluster(workers=2, cpus=1)  # one actor per node: node 2 has no room for node 1's restart
    lost = cluster.node_id(1)
    driver = _driver(tmp_path, "w1", cluster.driver_env(), "auto")
    try:
        at_kill = _first_parts(driver, fs, s3_bucket, "w1", also=lambda: cluster.actors(1, EXPLAINING))
        cluster.kill_node(1)
        assert len(at_kill) < SHARDS and not cluster.processes(1), "node 1 was lost mid-run, all of it"
        try:
            driver.wait(timeout=100)
        except subprocess.TimeoutExpired:
            tail = (tmp_path / "w1.err").read_text()[-3000:]
            pytest.fail(f"the run had not completed 100 s after node 1 was lost; the driver said: {tail}")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    err = (tmp_path / "w1.err").read_text()
    assert driver.returncode == 0, err
    redone = re.findall(r"shard (\d+): its actor \d \(node (\w+) at [^)]+\) was lost \((\w+)\)", " ".join(err.split()))
    assert redone, f"the user is told which shards are explained again: {err}"
    assert {node for _, node, _ in redone} == {lost[:8]}, f"the lost node is named: {err}"
    assert len(redone) == len({s for s, _, _ in redone}) <= 2, "the shards in flight on node 1, each once"
    _assert_exactly_once(fs, _run_dir(fs, s3_bucket, "w1"))


@pytest.mark.cluster
@pytest.mark.slow
def test_the_drivers_node_lost_a_rerun_takes_over_at_once_and_completes(
    tmp_path,
    s3_server,  # noqa: F811
    s3_bucket,  # noqa: F811
    tiny_model_dir,
    start_cluster,
):
    fs = s3_server.filesystem()
    _job(tmp_path, fs, s3_bucket, tiny_model_dir, actors=1)
    cluster = start_cluster(workers=0, head_cpus=2)  # the head runs the driver and the work
    driver = _driver(tmp_path, "h1", cluster.driver_env(), "auto")
    try:
        at_kill = _first_parts(driver, fs, s3_bucket, "h1")
    finally:
        driver.send_signal(signal.SIGKILL)
        cluster.kill_node(0)
        driver.wait(timeout=30)
    run_dir = _run_dir(fs, s3_bucket, "h1")
    assert len(at_kill) < SHARDS and not fs.exists(f"{run_dir}/_SUCCESS"), "lost mid-run"
    lease = json.loads(fs.cat_file(f"{run_dir}/_lease.json"))
    assert (lease["host"], lease["pid"]) == (socket.gethostname(), driver.pid), "the lost driver's lease is left"
    fs.pipe_file(f"{run_dir}/_lease.json", json.dumps({**lease, "host": "elsewhere"}).encode())
    with pytest.raises(RunLocked, match=re.escape(f"lease renewed until {lease['expires_at']}")):
        run_job(load_job(tmp_path / "job.yaml"), "h1", address="inline")  # another machine's: waited out

    fs.pipe_file(f"{run_dir}/_lease.json", json.dumps(lease).encode())
    recorded = _recorded_rows(fs, run_dir)  # the actor may have recorded the part it had published
    env = {**os.environ, **s3_server.env(), "HF_HUB_OFFLINE": "1"}  # the rerun: local embedded Ray
    started = dt.datetime.now(dt.timezone.utc)
    assert started < dt.datetime.fromisoformat(lease["expires_at"]), "the lease had not expired"
    rerun = subprocess.run([ATMAN, "run", "job.yaml", "--run-id", "h1"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=150)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr  # a lease still alive would have been exit 2 at once
    explained = int(re.search(r"explained now: (\d+)", rerun.stdout).group(1))
    assert explained == N - recorded, (
        f"the rerun explains exactly what the lost driver had not recorded: {explained} rows, {recorded} recorded, "
        f"{len(at_kill)} parts at the kill"
    )
    _assert_exactly_once(fs, run_dir)
    assert not fs.exists(f"{run_dir}/_lease.json"), "the rerun gives the lease back"


# --- the lease: provably gone, or waited out ------------------------------------------------------------------------


def _paths(tmp_path: Path, run_id: str = "r1") -> RunPaths:
    paths = RunPaths.locate(str(tmp_path / "out"), "tiny", run_id)
    os.makedirs(paths.dir, exist_ok=True)
    return paths


def _hold(paths: RunPaths, **body) -> None:
    future = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).isoformat()
    body = {"owner": "o", "host": socket.gethostname(), "since": "?", "expires_at": future} | body
    Path(paths.lease).write_text(json.dumps(body))


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_a_lease_of_another_machine_is_waited_out_for_its_ttl(tmp_path, monkeypatch):
    monkeypatch.setenv("ATMAN_LEASE_TTL_S", "1.2")
    paths = _paths(tmp_path)
    holder = Lease(paths)
    assert (holder.ttl_s, holder.renew_s) == (1.2, pytest.approx(0.2)), "the TTL from the environment"
    with holder:
        time.sleep(2.5)  # twice the TTL: renewed meanwhile
        with pytest.raises(RunLocked, match="being written by another driver"):
            Lease(paths).acquire()
        holder._stop.set()  # its machine is lost: no more renewals
        holder._thread.join()
        body = json.loads(Path(paths.lease).read_text())
        Path(paths.lease).write_text(json.dumps({**body, "host": "elsewhere"}))
        with pytest.raises(RunLocked, match=re.escape(body["expires_at"])):
            Lease(paths).acquire()  # nothing says the driver on that machine is gone: wait for the expiry
        time.sleep(max(0.0, (dt.datetime.fromisoformat(body["expires_at"]) - dt.datetime.now(dt.timezone.utc))
                       .total_seconds()) + 0.1)  # fmt: skip
        taker = Lease(paths)
        taker.acquire()
        assert json.loads(Path(paths.lease).read_text())["owner"] == taker.owner
        taker.release()


@pytest.mark.parametrize("ttl", ["0", "-5", "soon", "nan", "inf"])
def test_a_bad_lease_ttl_is_named(tmp_path, monkeypatch, ttl):
    monkeypatch.setenv("ATMAN_LEASE_TTL_S", ttl)
    with pytest.raises(JobSpecError, match=rf"^ATMAN_LEASE_TTL_S: '{ttl}' is not a number of seconds > 0"):
        Lease(_paths(tmp_path))


def test_a_killed_driver_not_yet_reaped_is_gone(tmp_path):
    """A zombie (SIGKILLed, its parent has not waited for it, as under a container's init that never reaps) runs
    nothing: its lease is taken over at once."""
    paths = _paths(tmp_path)
    code = (
        "import sys; from pipeline.layout import RunPaths; from pipeline.lease import Lease\n"
        f"Lease(RunPaths.locate({str(tmp_path / 'out')!r}, 'tiny', 'r1')).acquire(); print('held', flush=True)\n"
        "import time; time.sleep(120)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        os.kill(child.pid, signal.SIGKILL)
        wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 10, "the zombie")
        taker = Lease(paths)
        taker.acquire()
        taker.release()
    finally:
        child.kill()
        child.wait()


def test_only_a_pid_of_this_machine_proves_its_driver_gone(tmp_path):
    paths = _paths(tmp_path)
    _hold(paths, pid=_dead_pid(), machine="another-boot/4026531836")  # the same hostname, another machine
    with pytest.raises(RunLocked, match="being written by another driver"):
        Lease(paths).acquire()
    here = Lease(paths).machine
    assert here, "Linux: the boot id and the pid namespace"
    _hold(paths, pid=os.getpid(), machine=here, process_started=1.0)  # a live pid, started at another time: reused
    Lease(paths).acquire()
    _hold(paths, pid=os.getppid(), machine=here)  # a live process, no start time recorded: it may be the driver
    with pytest.raises(RunLocked):
        Lease(paths).acquire()


# --- the dispatch: a lost actor's shards go to the live ones --------------------------------------------------------


class _Ref:
    def __init__(self, result) -> None:
        self.result = result


class _FakeRay:
    """Ray's calls the pool makes: ``get`` returns or raises what a scripted ref holds; ``wait`` is first come."""

    import ray.exceptions as exceptions

    @staticmethod
    def get(ref):
        if isinstance(ref.result, BaseException):
            raise ref.result
        return ref.result

    @staticmethod
    def wait(refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]


class _Actor:
    """Its first ``lost`` shards fail as on a lost node; then ``restarting`` probes answer "being restarted", and
    after that it works again, unless ``dead`` (Ray will not restart it). Probes before the loss find it."""

    def __init__(self, name: str, lost: int = 0, restarting: int = 0, dead: bool = False) -> None:
        self.name, self.lost, self.restarting, self.dead = name, lost, restarting, dead
        self.shards: list[int] = []
        self.__ray_call__ = self  # .remote(_whereabouts)
        self.progress = type("Progress", (), {"remote": staticmethod(lambda: _Ref({}))})

    def remote(self, *_) -> _Ref:
        ex = _FakeRay.exceptions
        if self.lost == 0 and self.dead:
            return _Ref(ex.ActorDiedError())
        if self.lost == 0 and self.restarting:
            self.restarting -= 1
            return _Ref(ex.ActorUnavailableError("The actor is restarting", None))
        return _Ref(f"node {self.name} at 10.0.0.1")

    def explain(self, shard: int) -> _Ref:
        if self.lost:
            self.lost -= 1
            return _Ref(_FakeRay.exceptions.ActorUnavailableError("Socket closed", None))
        self.shards.append(shard)
        return _Ref({"shard": shard})


def _dispatch(actors: list[_Actor], shards: int, max_restarts: int = 3) -> tuple[list[int], list[str]]:
    from pipeline.executors import Pool, dispatch
    from pipeline.signals import StopSignals

    class Lease:
        def check(self) -> None:
            pass

    notes: list[str] = []
    pool = Pool(_FakeRay, actors, lambda a, s: a.explain(s), deque(range(shards)), max_restarts, notes.append)
    pool.PROBE_S = 0.0
    done = [r["shard"] for r in dispatch(_FakeRay, pool, Lease(), StopSignals(), lambda rows: None)]
    return done, notes


def test_a_lost_actors_shards_go_to_the_live_one_and_it_comes_back():
    a, b = _Actor("aaaa", lost=2, restarting=3), _Actor("bbbb")
    done, notes = _dispatch([a, b], 8)
    assert sorted(done) == list(range(8)), "every shard once"
    lost = [n for n in notes if "was lost" in n]
    assert sorted(n.split(":")[0] for n in lost) == ["shard 0", "shard 1"], notes
    assert "its actor 0 (node aaaa at 10.0.0.1) was lost (ActorUnavailableError)" in lost[0]
    assert "explained again by another actor" in lost[0]
    assert sum("actor 0 was restarted (node aaaa" in n for n in notes) == 1, "a late failure of its first life"
    assert a.shards and sorted(a.shards + b.shards) == list(range(8)), "the restarted actor takes shards again"


def test_a_shard_lost_more_than_max_restarts_times_stops_the_run():
    actors = [_Actor("aaaa", lost=2, restarting=1), _Actor("bbbb", lost=2, restarting=1)]
    with pytest.raises(RuntimeError, match=r"^shard \d: its actor was lost 2 times .*max_restarts: 1\)"):
        _dispatch(actors, 2, max_restarts=1)


def test_when_every_actor_is_gone_the_run_stops():
    with pytest.raises(RuntimeError, match="every actor of the run is gone"):
        _dispatch([_Actor("aaaa", lost=2, dead=True)], 4)
