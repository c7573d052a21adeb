"""`atman submit` / status / logs / stop against a real Ray head (`ray start --head` on 127.0.0.1)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray_head import ray_head  # noqa: F401 - fixture

ROOT = Path(__file__).parent.parent
ATMAN = str(Path(sys.executable).parent / "atman")

pytestmark = pytest.mark.cluster


def _cli(*args, timeout=240) -> subprocess.CompletedProcess:
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


def test_submit_refuses_what_a_cluster_cannot_run(ray_head, tmp_path):  # noqa: F811
    relative = _cli("submit", "jobs/examples/demo.yaml", "--address", ray_head)
    assert relative.returncode == 2 and "output.root: 'out/' is a relative local path" in relative.stderr
    unreachable = _cli("submit", "jobs/examples/demo.yaml", "--address", "http://127.0.0.1:9", "--set",
                       f"output.root={tmp_path}", timeout=120)  # fmt: skip
    assert unreachable.returncode == 1 and "address: cannot reach the Ray Jobs API" in unreachable.stderr


def test_a_failed_run_exits_with_its_code_and_resume_submits_a_new_attempt(ray_head, tmp_path, tiny_model_dir):  # noqa: F811
    prompts = tmp_path / "prompts.jsonl"  # absolute (not shipped), and missing at first: the job fails on the cluster
    args = ["jobs/examples/demo.yaml", "--address", ray_head, "--run-id", "res1", "--set", f"input.path={prompts}"]
    args += ["--set", f"output.root={tmp_path / 'out'}", "--set", f"model.id={tiny_model_dir}"]
    failed = _cli("submit", *args, "--wait", timeout=240)
    assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "input.path:" in failed.stdout and "atman-demo-res1: exit 2" in failed.stdout, "the job's own exit code"
    status = _cli("status", "atman-demo-res1", "--address", ray_head, timeout=120)
    assert status.returncode == 0 and "atman-demo-res1: FAILED" in status.stdout

    refused = _cli("submit", *args, timeout=120)
    assert refused.returncode == 2
    assert "'atman-demo-res1' exists already (status FAILED)" in refused.stderr and "--resume" in refused.stderr

    shutil.copy(ROOT / "jobs" / "examples" / "prompts.jsonl", prompts)
    resumed = _cli("submit", *args, "--resume", "--wait", timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "submitted atman-demo-res1-attempt2 (run res1)" in resumed.stdout
    (run_dir,) = (tmp_path / "out").glob("model=*/run_date=*/run_id=res1")
    assert (run_dir / "_SUCCESS").exists()

    done = _cli("submit", *args, "--resume", timeout=120)
    assert done.returncode == 2, "a run whose last attempt succeeded is not submitted again"
    assert "'atman-demo-res1-attempt2' exists already (status SUCCEEDED)" in done.stderr


class _Jobs:
    """What `wait` asks of the Jobs API, for a job that ends with ``status`` and ``exit_code``."""

    def __init__(self, status: str, exit_code: int | None) -> None:
        self.status, self.exit_code, self.polls = status, exit_code, 0

    def get_job_logs(self, sid):
        return "line 1\nline 2\n" if self.polls else "line 1\n"

    def get_job_info(self, sid):
        from ray.job_submission import JobStatus

        self.polls += 1
        status = JobStatus.RUNNING if self.polls == 1 else JobStatus(self.status)
        return SimpleNamespace(status=status, driver_exit_code=self.exit_code)


@pytest.mark.parametrize(
    ("status", "exit_code", "expected"),
    [("SUCCEEDED", 0, 0), ("FAILED", 3, 3), ("FAILED", None, 1), ("FAILED", 0, 1), ("STOPPED", None, 1)],
)
def test_wait_exits_with_the_jobs_code(monkeypatch, status, exit_code, expected):
    """A failed or stopped job never exits 0: its driver's code, else 1. The logs are streamed once each."""
    from pipeline import submit

    jobs = _Jobs(status, exit_code)
    monkeypatch.setattr(submit, "client", lambda address: jobs)
    echoed: list[str] = []
    assert submit.wait("http://head:8265", "atman-x-1", echo=echoed.append, poll_s=0) == expected
    assert "\n".join(echoed) == "line 1\nline 2"
