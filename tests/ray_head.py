"""A real Ray head for the submission tests: `ray start --head` on 127.0.0.1 with the dashboard (Jobs API) on
loopback, the venv's bin first on PATH (a job's entrypoint runs with the PATH of the process that ran
`ray start`), stopped afterwards by killing exactly its own processes (`ray stop` would also stop the other
Ray instances of the test session). Its ports: tests/ports.py (a start that fails is tried again on fresh ones)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from ports import PortsTaken, free_port, start_with_retries

BIN = Path(sys.executable).parent


def _own_processes(temp_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if temp_dir in cmd or any(f.path.startswith(temp_dir) for f in proc.open_files()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _stop(temp_dir: str) -> None:
    procs = _own_processes(temp_dir)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


def _start() -> tuple[str, str]:
    """One try at a head on fresh ports: its temp dir and the Jobs API's address once it answers. A failed try
    stops what it started and raises PortsTaken (a port taken meanwhile is one cause)."""
    temp_dir = tempfile.mkdtemp(prefix="atman-head-")
    port, dashboard = free_port(), free_port()
    # every port a head opens, free: the defaults (dashboard agent 52365, metrics, runtime-env agent, client server)
    # collide with the session's other Ray, whose agent then answers nothing: "No available agent to submit job"
    extra = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port", "node-manager-port",
             "object-manager-port")]  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled"}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [
        str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats", *extra,
    ]  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            raise PortsTaken(f"ray start failed: {started.stderr[-2000:]}")
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    return temp_dir, address
            except OSError:
                if time.monotonic() > deadline:
                    raise PortsTaken(f"the Jobs API at {address} did not come up") from None
                time.sleep(0.5)
    except BaseException:
        _stop(temp_dir)
        raise


@pytest.fixture(scope="session")
def ray_head():
    temp_dir, address = start_with_retries(_start)
    try:
        yield address
    finally:
        _stop(temp_dir)
