"""One driver per run: a lease object (``_lease.json``: owner, expiry) in the run's directory, local or on S3.

A driver takes the lease before it reads or writes anything of the run, renews it every ``RENEW_S`` seconds while it
works and removes it when it stops. A second driver on the same run id (a cron overlapping a manual rerun) exits 2
naming the holder. A lease is taken over when it expired (its driver stopped renewing: it was killed, or its
machine lost) or when its driver is a process of this machine that no longer exists (a SIGKILLed driver's rerun
need not wait for the expiry). "This machine" is the same hostname, kernel boot and pid namespace: a pid says
nothing about a container of the same hostname beside this one or elsewhere, whose lease is waited out.

``ATMAN_LEASE_TTL_S`` (seconds, default ``TTL_S``): how long a lease lives unrenewed, so how long a rerun waits for
a driver lost on another machine; the lease is renewed every sixth of it. Tests set it short.

Creation is exclusive where the store can do it: ``O_EXCL`` on a local disk, a conditional PUT (``If-None-Match``)
on S3. Where an S3-compatible server ignores the condition, the lease is read back after writing, and every renewal
checks the owner again: a driver that finds another owner stops at once, so two drivers overlap by at most one
renewal interval, and then only on shards whose parts are idempotent (named by shard).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import socket
import threading
import time

from pipeline.errors import LeaseLost, RunLocked
from pipeline.jobspec import JobSpecError
from pipeline.layout import RunPaths, is_local, publish

TTL_S = 120.0
RENEW_S = 20.0
TTL_ENV = "ATMAN_LEASE_TTL_S"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _gone(pid: int, started: float | None) -> bool:
    """Process ``pid`` of this machine is provably not the driver that started at ``started``: there is none, it is
    a zombie (killed, not reaped by its parent: it runs nothing), or it started at another time (the pid reused)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        return bool(started) and abs(proc.create_time() - started) > 1
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # it exists; whose it is cannot be told
        return False


def _machine() -> str | None:
    """This kernel's boot id and this process's pid namespace (Linux; None elsewhere): a pid is comparable only
    between processes that share both."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _ttl() -> float:
    raw = os.environ.get(TTL_ENV, "").strip()
    if not raw:
        return TTL_S
    try:
        ttl = float(raw)
    except ValueError:
        ttl = 0.0
    if not ttl > 0 or ttl == float("inf"):
        raise JobSpecError(f"{TTL_ENV}: {raw!r} is not a number of seconds > 0 (default {TTL_S:g}); fix or unset it")
    return ttl


class Lease:
    def __init__(self, paths: RunPaths, ttl_s: float | None = None, renew_s: float | None = None) -> None:
        """``ttl_s``: ``ATMAN_LEASE_TTL_S``, else ``TTL_S``; ``renew_s``: a sixth of it, at most ``RENEW_S``."""
        self.paths = paths
        self.ttl_s = _ttl() if ttl_s is None else ttl_s
        self.renew_s = min(RENEW_S, self.ttl_s / 6) if renew_s is None else renew_s
        self.host, self.pid, self.machine = socket.gethostname(), os.getpid(), _machine()
        self.owner = f"{self.host}:{self.pid}:{secrets.token_hex(4)}"
        self.lost: str | None = None
        self.taken_over: str | None = None
        """Whose lease this one replaced and why it could (said to the user by the job), or None."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking and giving back ---------------------------------------------------------------------------------

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        fs = self.paths.fs
        fs.makedirs(self.paths.dir, exist_ok=True)
        for _ in range(5):
            held = self.read()
            if held is not None:
                why = self._stale(held)
                if why is None:
                    raise RunLocked(
                        f"run_id: run {self.paths.run_id} is being written by another driver ({held['owner']}, "
                        f"since {held['since']}, lease renewed until {held['expires_at']}); wait for it to finish, "
                        "or start a new run without --run-id"
                    )
                self._remove(held)
                self.taken_over = f"{held.get('owner', '?')} (since {held.get('since', '?')}): {why}"
            if self._create() and (self.read() or {}).get("owner") == self.owner:
                self._thread = threading.Thread(target=self._renew_loop, name="atman-lease", daemon=True)
                self._thread.start()
                return
            time.sleep(0.2)
        raise RunLocked(f"run_id: could not take the lease of run {self.paths.run_id} (another driver keeps taking it)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (self.read() or {}).get("owner") == self.owner:
                self.paths.fs.rm(self.paths.lease)
        except FileNotFoundError:
            pass

    def check(self) -> None:
        """Raise LeaseLost when another driver has taken the run over (checked at every renewal)."""
        if self.lost:
            raise LeaseLost(self.lost)

    # --- the object ---------------------------------------------------------------------------------------------

    def read(self) -> dict | None:
        try:
            return json.loads(self.paths.fs.cat_file(self.paths.lease))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:  # half-written by a store without atomic writes: treat as expired
            return {"owner": "?", "host": "?", "pid": -1, "since": "?", "expires_at": _now().isoformat()}

    def _body(self, since: str | None = None) -> bytes:
        now = _now()
        return json.dumps(
            {
                "owner": self.owner,
                "host": self.host,
                "pid": self.pid,
                "machine": self.machine,
                "process_started": _started(self.pid),
                "since": since or now.isoformat(),
                "expires_at": (now + dt.timedelta(seconds=self.ttl_s)).isoformat(),
            }
        ).encode()

    def _create(self) -> bool:
        fs, path = self.paths.fs, self.paths.lease
        if is_local(fs):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
            return True
        try:
            fs.pipe_file(path, self._body(), IfNoneMatch="*")
        except FileExistsError:
            return False
        except Exception as err:  # noqa: BLE001 - the precondition failed, or the server does not know it
            text = repr(err).lower()
            if "precondition" in text or "pre-condition" in text or "412" in text:
                return False  # someone else's lease is there (s3fs reports a 412 as OSError 22)
            if fs.exists(path):
                return False
            fs.pipe_file(path, self._body())
        return True

    def _stale(self, held: dict) -> str | None:
        """Why the held lease may be taken over, or None while it is alive."""
        try:
            expires = dt.datetime.fromisoformat(held["expires_at"])
        except (KeyError, ValueError):
            return "it is unreadable"
        if expires < _now():
            return f"it expired at {held['expires_at']}"
        here = held.get("host") == self.host and held.get("machine", self.machine) == self.machine  # older: no machine
        if here and isinstance(held.get("pid"), int) and _gone(held["pid"], held.get("process_started")):
            return f"its driver (pid {held['pid']} on this machine) is gone"
        return None

    def _remove(self, held: dict) -> None:
        fs, path = self.paths.fs, self.paths.lease
        if is_local(fs):  # rename first: of two drivers taking over at once, one rename wins
            aside = f"{path}.stale-{secrets.token_hex(4)}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return
            os.remove(aside)
        else:
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass

    def _renew_loop(self) -> None:
        since = (self.read() or {}).get("since")
        while not self._stop.wait(self.renew_s):
            try:
                held = self.read()
                if held is None or held.get("owner") != self.owner:
                    self.lost = (
                        f"the lease of run {self.paths.run_id} was taken by "
                        f"{(held or {}).get('owner', 'nobody')} while this driver worked (it was not renewed in time)"
                    )
                    return
                publish(self.paths.fs, self.paths.lease, self._body(since))
            except Exception:  # noqa: BLE001 - a store hiccup: try again at the next interval
                continue
