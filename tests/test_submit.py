"""`atman submit` / status / logs / stop against a real Ray head (`ray start --head` on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ray_head import ray_head  # noqa: F401 - fixture

ROOT = Path(__file__).parent.parent
ATMAN = str(Path(sys.executable).parent / "atman")

pytestmark = pytest.mark.cluster


def _cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([ATMAN, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_submit_the_demo_job_round_trip(ray_head, tmp_path, tiny_model_dir):  # noqa: F811
    out_root = tmp_path / "out"
    args = ["jobs/examples/demo.yaml", "--address", ray_head, "--run-id", "sub1"]
    args += ["--set", f"output.root={out_root}", "--set", f"model.id={tiny_model_dir}"]
    first = _cli("submit", *args, "--wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "submitted atman-demo-sub1 (run sub1)" in first.stdout
    assert "explained now: 10" in first.stdout, "the job's logs are streamed"
    (run_dir,) = out_root.glob("model=*/run_date=*/run_id=sub1")
    assert (run_dir / "_SUCCESS").exists() and list(run_dir.glob("part-*.parquet"))

    again = _cli("submit", *args)
    assert again.returncode == 2
    assert "submission 'atman-demo-sub1' exists already (status SUCCEEDED)" in again.stderr

    status = _cli("status", "atman-demo-sub1", "--address", ray_head)
    assert status.returncode == 0 and "atman-demo-sub1: SUCCEEDED" in status.stdout
    logs = _cli("logs", "atman-demo-sub1", "--address", ray_head)
    assert logs.returncode == 0 and "explained now: 10" in logs.stdout
    stop = _cli("stop", "atman-demo-sub1", "--address", ray_head)
    assert stop.returncode == 0 and "not running" in stop.stdout
    unknown = _cli("status", "atman-demo-nope", "--address", ray_head)
    assert unknown.returncode == 2 and "atman-demo-nope" in unknown.stderr


def test_submit_refuses_what_a_cluster_cannot_run(ray_head):  # noqa: F811
    relative = _cli("submit", "jobs/examples/demo.yaml", "--address", ray_head)
    assert relative.returncode == 2 and "output.root: 'out/' is a relative local path" in relative.stderr
    unreachable = _cli("submit", "jobs/examples/demo.yaml", "--address", "http://127.0.0.1:9", "--set",
                       "output.root=/tmp/x", timeout=120)  # fmt: skip
    assert unreachable.returncode == 1 and "address: cannot reach the Ray Jobs API" in unreachable.stderr
