"""SIGTERM (how Kubernetes and Ray stop a job) and SIGINT as a clean stop of the run between two steps.

The handler only notes the signal: raising inside Ray's C++ wait would corrupt its state. The driver's loops call
``check()`` between steps, which raises ``Stopped``; the run then folds its progress, shuts Ray down and gives its
lease back. ``ray.init`` installs a handler of its own that exits without cleaning up, so the executor calls
``reclaim()`` after it. Main thread only: elsewhere Python cannot install handlers, and nothing is caught.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A stop signal arrived while the driver worked (a BaseException: no handler of row errors catches it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While entered, SIGTERM and SIGINT are noted (the first one; later ones are ignored, so a second signal does
    not break the cleanup the first one started) and ``check()`` raises ``Stopped`` for it."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._before: dict = {}

    def __enter__(self) -> StopSignals:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self._before = {s: signal.signal(s, self._note) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)
        self._before = {}

    def _note(self, signum, _frame) -> None:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        self.received = signum

    def check(self) -> None:
        """Raise ``Stopped`` once a signal has arrived (called between steps and while waiting on Ray)."""
        if self.received is not None:
            raise Stopped(self.received)

    def reclaim(self) -> None:
        """Install this object's handler again (after a library replaced it), unless a signal already arrived."""
        if self._before and self.received is None and threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, self._note)
