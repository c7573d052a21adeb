"""``python -m pipeline.watchdog DRIVER_PID SCRATCH``: when the driver process ends without cleaning up (SIGKILL,
OOM killer), stop the Ray processes it started for a local run and remove their scratch directory.

Ray's processes are recognised by the scratch directory (the run's own ``_temp_dir``) in their command line or
among their open files, as a whole path: ``ROOT/_scratch/a`` never matches the processes of run ``ab`` (their
``ROOT/_scratch/ab``), so nothing another run or program started is touched. The driver terminates this process when it
ends normally.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time

import psutil


def _mentions(scratch: str) -> re.Pattern:
    """``scratch`` as a whole path inside a command-line argument: followed by a separator, a quote, a delimiter or
    the end, never by more of a longer name."""
    return re.compile(re.escape(scratch.rstrip(os.sep)) + r"(?=$|[\\/\s'\",;:=])")


def ours(proc: psutil.Process, scratch: str) -> bool:
    scratch = scratch.rstrip(os.sep)
    try:
        mention = _mentions(scratch)
        if any(mention.search(part) for part in proc.cmdline()):
            return True
        return any(f.path == scratch or f.path.startswith(scratch + os.sep) for f in proc.open_files())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def stop(scratch: str) -> list[int]:
    me = os.getpid()
    victims = [p for p in psutil.process_iter() if p.pid != me and ours(p, scratch)]
    for p in victims:
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(victims, timeout=10)
    return [p.pid for p in victims]


def main(driver: int, scratch: str) -> None:
    try:
        proc = psutil.Process(driver)
    except psutil.NoSuchProcess:
        proc = None
    while proc is not None and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
        time.sleep(1.0)
    time.sleep(1.0)  # the driver's own shutdown, when it had one, goes first
    stop(scratch)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), os.path.abspath(sys.argv[2]))
