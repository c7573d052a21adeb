"""Nothing lost, nothing doubled: an actor killed mid-run, a driver killed mid-run and rerun.

The kill point is a point of progress, not a time: the kill lands once K of the run's 24 shards are published,
with the other shards' rows (at least half the prompts) still to explain. The actor publishes the parts (and after
each its marker, which records the shard as done), so the moment the test sees the K-th part (or marker) it stops
that actor (SIGSTOP) before it looks again and kills: what it reads then is what was written at the kill, however
fast the host explains (before, a fast host could finish shards between the look and the kill). The only window
left is between seeing the part and the SIGSTOP, one system call (and whatever delay the host's scheduler adds);
the test polls every 10 ms and checks that the kill did land mid-run (what was written at the kill, that the run
was still going, what was written after it) rather than trusting the timing. So the model's speed does not matter:
the runs explain with the tiny random Llama (conftest's ``tiny_model_dir``), and the run has enough shards (24 of
2 rows) that a scheduling delay of the test of many shards' time still finds the run mid-way. Only this test
session's own processes are looked at, stopped or killed: Ray workers below the raylet of the `ray_cluster`
fixture, or the processes of a driver's scratch dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.executors import scratch_path
from pipeline.job import run_job
from pipeline.jobspec import JobSpec

ATMAN = str(Path(sys.executable).parent / "atman")
N = 48
PROMPTS = [
    {
        "id": f"q{i}",
        "prompt": f"Question {i}: the capital of France is Paris and the capital of Italy is",
        "target": " Rome",
    }
    for i in range(N)
]

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _input(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def _parts(root: Path) -> list[Path]:
    return sorted(root.glob("model=*/run_date=*/run_id=*/part-*.parquet"))


def _rows(parts: list[Path]) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts)


def _ray_processes(scratch: str) -> list[str]:
    """Processes of the Ray a driver started for this run (they name its scratch directory)."""
    from pipeline.watchdog import ours

    found = []
    for p in psutil.process_iter():
        # a process may exit (or become a zombie, which is dead) between ``ours`` and reading its command line
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and ours(p, scratch):
                found.append(" ".join(p.cmdline())[:80])
    return found


def _actors(scratch: str) -> list[psutil.Process]:
    """The ExplainWorker actors of the Ray a driver started for this run (the processes that publish its parts)."""
    from pipeline.watchdog import ours

    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if (p.info["cmdline"] or [""])[0].startswith("ray::ExplainWorker") and ours(p, scratch):
                found.append(p)
    return found


def _signal(procs: list[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


def _wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _recorded(root: Path) -> int:
    """Rows of the shards the run recorded as done: a part is published first, then its marker (``_progress/``),
    which the driver folds into ``_progress.json``; a part without its marker is explained again by a rerun."""
    rows: dict[int, int] = {}
    for run_dir in root.glob("model=*/run_date=*/run_id=*"):
        with contextlib.suppress(FileNotFoundError):
            rows |= {r["shard"]: r["rows"] for r in json.loads((run_dir / "_progress.json").read_text())["shards"]}
        for path in (run_dir / "_progress").glob("s*.json"):  # not a marker's temporary file (TMP_PREFIX): it
            # is no record until renamed, and a process killed before the rename leaves it unrecorded for good
            with contextlib.suppress(FileNotFoundError):  # folded meanwhile: read above, or at the next look
                record = json.loads(path.read_text())
                rows[record["shard"]] = record["rows"]
    return sum(rows.values())


def _stop_writers_once(proc: subprocess.Popen, scratch: str, ready, what: str) -> list[psutil.Process]:
    """Once ``ready()`` (or the driver ``proc`` ended), its actors stopped (SIGSTOP): nothing is published from
    then on until they get SIGCONT. The actors are found first (their search walks every process), then ``ready``
    is polled every 10 ms, so the SIGSTOP follows what it waited for within milliseconds."""
    actors = _wait_for(lambda: _actors(scratch) or proc.poll() is not None, 180, "the run's actor", every=0.2)
    if actors is True:
        return []
    _wait_for(lambda: ready() or proc.poll() is not None, 180, what, every=0.01)
    _signal(actors, signal.SIGSTOP)
    return actors


def _ids(location: str) -> list[str]:
    return ds.dataset(location, format="parquet").to_table(columns=["prompt_id"]).column("prompt_id").to_pylist()


def test_actor_killed_mid_run_loses_and_doubles_nothing(tmp_path, ray_cluster, tiny_model_dir):
    out = tmp_path / "out"
    spec = JobSpec.model_validate(
        {
            "name": "faults",
            "model": {"id": tiny_model_dir},
            "input": {"path": str(_input(tmp_path))},
            "method": {"granularity": "word"},
            "output": {"root": str(out)},
            "resources": {"actors": 1, "batch_rows": 1, "shard_rows": 2, "max_restarts": 2},
        }
    )
    actors = lambda: ray_cluster.processes("ray::ExplainWorker")  # noqa: E731 - this session's actors only
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run_job(spec, "a1")), daemon=True)
    thread.start()
    victim = _wait_for(actors, 150, "the run's actor", every=0.2)[0]  # its search walks every process: found first
    try:
        _wait_for(lambda: _parts(out), 150, "the first part", every=0.01)
    finally:
        os.kill(victim.pid, signal.SIGSTOP)  # it publishes the parts: none from here on (see the module's docstring)
        at_kill, killed_at = _parts(out), time.time_ns()
        os.kill(victim.pid, signal.SIGKILL)
    running = thread.is_alive()
    assert running and _rows(at_kill) <= N // 2, f"the kill landed mid-run ({_rows(at_kill)} of {N} rows written)"
    replacement = _wait_for(lambda: [p for p in actors() if p.pid != victim.pid], 90, "a restarted actor")
    thread.join(timeout=240)
    assert not thread.is_alive(), "the run finished"
    summary = result["summary"]
    assert summary.counts == {"ok": N, "skipped": 0, "error": 0}
    ids = _ids(summary.location)
    assert sorted(ids) == sorted(p["id"] for p in PROMPTS), "every input id exactly once"
    after = [p for p in _parts(out) if p not in at_kill]
    assert len(after) >= 4 and all(p.stat().st_mtime_ns > killed_at for p in after), "the restarted actor wrote them"
    assert replacement and not victim.is_running()
    assert (Path(summary.location) / "_SUCCESS").exists()
    _wait_for(lambda: not actors(), 30, "the run's actors to be stopped")


def _cli_job(tmp_path: Path, run_id: str, model: str) -> tuple[list[str], dict]:
    """The input, a job spec of 2-row shards on ``model``, and the `atman run` command line and environment for
    ``run_id``."""
    _input(tmp_path)
    (tmp_path / "job.yaml").write_text(
        f"name: faults\nmodel: {{id: {model}}}\ninput: {{path: in.jsonl}}\nmethod: {{granularity: word}}\n"
        "output: {root: out}\nresources: {actors: 1, batch_rows: 1, shard_rows: 2}\n"
    )
    return [ATMAN, "run", "job.yaml", "--run-id", run_id], {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_driver_killed_then_rerun_completes_the_run(tmp_path, tiny_model_dir):
    cmd, env = _cli_job(tmp_path, "d1", tiny_model_dir)
    out = tmp_path / "out"
    scratch = scratch_path(str(out), tiny_model_dir, "d1")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stopped: list[psutil.Process] = []
    try:
        stopped = _stop_writers_once(first, scratch, lambda: _recorded(out) >= 4, "two shards recorded")
        with contextlib.suppress(ProcessLookupError):
            os.kill(first.pid, signal.SIGSTOP)  # the driver too: what it had written at the kill stays as read
        written, recorded = _rows(_parts(out)), _recorded(out)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        _signal(stopped, signal.SIGCONT)  # the actor goes on, as after any kill, until its Ray stops it
    run_dir = _parts(out)[0].parent
    assert first.returncode == -signal.SIGKILL, "killed while running"
    assert 4 <= recorded <= written <= N // 2 and not (run_dir / "_SUCCESS").exists(), "killed mid-run, not complete"
    _wait_for(lambda: not _ray_processes(scratch), 60, "the watchdog to stop the killed driver's Ray")
    before = _recorded(out)  # the actor may have recorded a shard more before its Ray was stopped

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert (run_dir / "_SUCCESS").exists()
    ids = _ids(str(run_dir))
    assert sorted(ids) == sorted(p["id"] for p in PROMPTS), "every input id exactly once"
    explained_now = int(second.stdout.split("explained now:")[1].split(")")[0])
    assert recorded <= before and explained_now == N - before, (  # the actor went on after the kill (SIGCONT)
        f"the rerun explains exactly what the killed run had not recorded: {explained_now} rows; {recorded} were "
        f"recorded at the kill, {before} before the rerun; it said: {second.stderr[-2000:]}"
    )
    assert not _ray_processes(scratch), "nothing of either driver's Ray is left"


def test_sigterm_stops_cleanly_and_says_how_to_resume(tmp_path, tiny_model_dir):
    """How Kubernetes and Ray stop a job: no stack dump, a resume hint, exit 128 + 15, nothing left running."""
    cmd, env = _cli_job(tmp_path, "t1", tiny_model_dir)
    scratch = scratch_path(str(tmp_path / "out"), tiny_model_dir, "t1")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stopped: list[psutil.Process] = []
    try:
        # the actor stays stopped until the driver has ended: it cannot finish the run while the driver reacts
        stopped = _stop_writers_once(first, scratch, lambda: _parts(tmp_path / "out"), "a part")
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            _, stderr = first.communicate(timeout=60)
        finally:
            _signal(stopped, signal.SIGCONT)
    assert first.returncode == 128 + signal.SIGTERM, stderr
    text = " ".join(stderr.split())
    assert "the run was stopped (SIGTERM)" in text and "rerun with --run-id t1" in text, stderr
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr, stderr
    run_dir = _parts(tmp_path / "out")[0].parent
    assert _rows(_parts(tmp_path / "out")) <= N // 2 and not (run_dir / "_SUCCESS").exists(), "stopped mid-run"
    assert not (run_dir / "_lease.json").exists(), "the lease is given back"
    assert not _ray_processes(scratch)
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert sorted(_ids(str(run_dir))) == sorted(p["id"] for p in PROMPTS)
