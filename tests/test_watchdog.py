"""The watchdog and the scratch directory: a run's Ray processes are found by their whole scratch path, so starting
run ``a`` never stops the processes of run ``ab``; a root Ray cannot use for its sockets gets a private path."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from pipeline.executors import scratch_path
from pipeline.watchdog import ours, stop


def _sleeper(*args: str) -> subprocess.Popen:
    """A process whose command line names a scratch path the way Ray's do (``--temp-dir=...``, ``.../session_x``)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])


def test_a_run_id_that_prefixes_another_does_not_claim_its_processes(tmp_path):
    other = tmp_path / "_scratch" / "ab"
    procs = [_sleeper(f"--temp-dir={other}"), _sleeper(f"{other}/session_latest/logs")]
    try:
        time.sleep(0.2)
        for p in procs:
            assert not ours(psutil.Process(p.pid), str(tmp_path / "_scratch" / "a"))
            assert ours(psutil.Process(p.pid), str(other))
        assert stop(str(tmp_path / "_scratch" / "a")) == []
        assert all(p.poll() is None for p in procs)  # run ab's processes are alive
        assert sorted(stop(str(other))) == sorted(p.pid for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_root_with_non_ascii_characters_gets_an_ascii_scratch_path():
    root = "/tmp/ü"  # short: an ASCII name this short would get its own _scratch
    path = scratch_path(str(root), "m", "r1")
    assert path.isascii() and "atman-ray-" in path
    assert scratch_path(str(root), "m", "r1") == path  # the same for every attempt of the run
    short = scratch_path("/tmp/o", "m", "r1")
    assert short == "/tmp/o/_scratch/r1"
