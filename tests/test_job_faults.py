"""Nothing lost, nothing doubled: an actor killed mid-run, a driver killed mid-run and rerun.

Both use the embedded model (about a second per prompt here), so the run is still going when the kill lands;
each test checks that it did land mid-run rather than trusting the timing.
"""

from __future__ import annotations

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
import pytest

from pipeline.job import run_job
from pipeline.jobspec import JobSpec

ATMAN = str(Path(sys.executable).parent / "atman")
N = 12
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


def _map_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::MapWorker"):
            found.append(proc)
    return found


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _ids(location: str) -> list[str]:
    return ds.dataset(location, format="parquet").to_table(columns=["prompt_id"]).column("prompt_id").to_pylist()


def test_actor_killed_mid_run_loses_and_doubles_nothing(tmp_path, ray_cluster):
    spec = JobSpec.model_validate(
        {
            "name": "faults",
            "input": {"path": str(_input(tmp_path))},
            "method": {"granularity": "word"},
            "output": {"root": str(tmp_path / "out")},
            "resources": {"actors": 1, "batch_rows": 1, "max_restarts": 2},
        }
    )
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run_job(spec, "a1")), daemon=True)
    thread.start()
    victim = _wait_for(lambda: _parts(tmp_path / "out") and _map_workers(), 180, "the first part")[0]
    written_at_kill = len(_parts(tmp_path / "out"))
    os.kill(victim.pid, signal.SIGKILL)
    assert written_at_kill < N, "the kill landed mid-run"
    replacement = _wait_for(lambda: [p for p in _map_workers() if p.pid != victim.pid], 120, "a restarted actor")
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run finished"
    summary = result["summary"]
    assert summary.counts == {"ok": N, "skipped": 0, "error": 0}
    ids = _ids(summary.location)
    assert sorted(ids) == sorted(p["id"] for p in PROMPTS), "every input id exactly once"
    assert replacement and not psutil.pid_exists(victim.pid)
    assert (Path(summary.location) / "_SUCCESS").exists()


def test_driver_killed_then_rerun_completes_the_run(tmp_path):
    _input(tmp_path)
    (tmp_path / "job.yaml").write_text(
        "name: faults\ninput: {path: in.jsonl}\nmethod: {granularity: word}\noutput: {root: out}\n"
        "resources: {actors: 1, batch_rows: 1}\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [ATMAN, "run", "job.yaml", "--run-id", "d1"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: len(_parts(tmp_path / "out")) >= 2 or first.poll() is not None, 240, "two parts")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    run_dir = _parts(tmp_path / "out")[0].parent
    written = len(_parts(tmp_path / "out"))
    assert first.returncode == -signal.SIGKILL, "killed while running"
    assert 2 <= written < N and not (run_dir / "_SUCCESS").exists(), "killed mid-run, not marked complete"

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert (run_dir / "_SUCCESS").exists()
    ids = _ids(str(run_dir))
    assert sorted(ids) == sorted(p["id"] for p in PROMPTS), "every input id exactly once"
    explained_now = int(second.stdout.split("explained now:")[1].split(")")[0])
    assert explained_now <= N - written, "the rerun explains only what the killed run had not written"
    orphans = [
        p.info["cmdline"][0]
        for p in psutil.process_iter(["ppid", "cmdline"])
        if p.info["ppid"] == 1 and (p.info["cmdline"] or [""])[0].startswith("ray::")
    ]
    assert orphans == [], f"Ray processes left behind by the killed driver: {orphans}"
