"""The run's lease on its own (pipeline/lease.py): renewed while held, lost to a driver that took it over after it
expired, refusing a second driver while fresh, given back. Local tmp dirs and TTLs of seconds; the only process
started is a driver of the test's own, killed by its pid. (Leases inside whole runs: tests/test_data_plane.py,
tests/test_node_loss.py, on S3 tests/test_storage_s3.py.)"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.errors import LeaseLost, RunLocked
from pipeline.layout import RunPaths
from pipeline.lease import TTL_ENV, Lease


def _paths(tmp_path: Path) -> RunPaths:
    return RunPaths.locate(str(tmp_path / "out"), "tiny", "r1")


def _held(paths: RunPaths) -> dict:
    return json.loads(Path(paths.lease).read_text())


def _expiry(held: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(held["expires_at"])


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_a_held_lease_is_renewed_past_its_ttl(tmp_path, monkeypatch):
    """Held for longer than its TTL (from the environment), the lease is still alive: each renewal moved its expiry
    on and kept its start; a second driver is refused all along."""
    monkeypatch.setenv(TTL_ENV, "3")
    paths = _paths(tmp_path)
    with Lease(paths) as holder:
        assert (holder.ttl_s, holder.renew_s) == (3.0, pytest.approx(0.5)), "the TTL from the environment, a sixth"
        first = _held(paths)
        time.sleep(4.5)  # one and a half TTLs: only renewals keep it alive
        now = _held(paths)
        assert now["owner"] == holder.owner and now["since"] == first["since"], "renewed, not taken again"
        assert _expiry(now) - _expiry(first) >= dt.timedelta(seconds=3), "the expiry moved on with the renewals"
        assert _expiry(now) > dt.datetime.now(dt.timezone.utc), "still alive after its first TTL"
        with pytest.raises(RunLocked, match="being written by another driver"):
            Lease(paths).acquire()
        holder.check()  # nobody took it: no LeaseLost


def test_a_lease_taken_over_after_its_expiry_stops_the_old_driver_at_its_next_check(tmp_path):
    """The old driver stalled past its TTL (its next renewal comes after the expiry): a new driver takes the run
    over; the old one's next renewal finds the new owner, writes nothing and makes its next check raise LeaseLost."""
    paths = _paths(tmp_path)
    old = Lease(paths, ttl_s=0.5, renew_s=2.0)
    old.acquire()
    try:
        old.check()
        _wait_for(lambda: _expiry(_held(paths)) < dt.datetime.now(dt.timezone.utc), 5, "the old lease to expire")
        new = Lease(paths, ttl_s=60)
        new.acquire()
        assert new.taken_over.startswith(f"{old.owner} (since ") and ": it expired at " in new.taken_over
        lost = _wait_for(lambda: _raises_lease_lost(old), 10, "the old driver to find its lease taken")
        assert re.search(rf"lease of run r1 was taken by {re.escape(new.owner)} while this driver worked", lost)
        assert _held(paths)["owner"] == new.owner, "the old driver wrote nothing over the new lease"
        new.check()
    finally:
        old.release()
    assert _held(paths)["owner"] == new.owner, "giving back a lost lease leaves the new driver's alone"
    new.release()
    assert not Path(paths.lease).exists()


def _raises_lease_lost(lease: Lease) -> str | None:
    try:
        lease.check()
    except LeaseLost as err:
        return str(err)
    return None


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pipeline.layout import RunPaths
    from pipeline.lease import Lease
    lease = Lease(RunPaths.locate(sys.argv[1], "tiny", "r1"))
    lease.acquire()
    print(lease.owner, flush=True)
    time.sleep(300)
    """
)


def test_a_fresh_lease_of_a_live_driver_refuses_a_second_one_naming_it(tmp_path):
    """Another driver process of this machine holds the run: a second driver gets RunLocked naming it; once that
    driver is killed, the run is taken over at once (no wait for the expiry), saying whose lease it was."""
    paths = _paths(tmp_path)
    driver = subprocess.Popen([sys.executable, "-c", HOLDER, paths.root], stdout=subprocess.PIPE, text=True)
    try:
        owner = driver.stdout.readline().strip()
        assert owner.split(":")[1] == str(driver.pid), owner
        held = _held(paths)
        with pytest.raises(RunLocked) as refused:
            Lease(paths).acquire()
        assert str(refused.value) == (
            f"run_id: run r1 is being written by another driver ({owner}, since {held['since']}, lease renewed "
            f"until {held['expires_at']}); wait for it to finish, or start a new run without --run-id"
        )
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        driver.stdout.close()
    with Lease(paths) as rerun:
        assert rerun.taken_over.startswith(f"{owner} (since ")
        assert rerun.taken_over.endswith(f": its driver (pid {driver.pid} on this machine) is gone")


def test_release_gives_the_lease_back(tmp_path, monkeypatch):
    monkeypatch.setenv(TTL_ENV, "60")
    paths = _paths(tmp_path)
    first = Lease(paths)
    with first:
        assert _held(paths)["owner"] == first.owner
        renewal = first._thread
        assert renewal is not None and renewal.is_alive()
    assert not Path(paths.lease).exists() and not renewal.is_alive(), "removed, and no more renewals"
    with Lease(paths) as second:  # right away, though the first one's TTL is a minute
        assert second.taken_over is None and _held(paths)["owner"] == second.owner
        first.release()  # again, while another driver holds the run: its lease is not the first one's to remove
        assert _held(paths)["owner"] == second.owner
    assert not Path(paths.lease).exists()
