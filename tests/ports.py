"""Ports for the servers the tests start (Ray heads and nodes, SeaweedFS). They must be told their ports up front
(their own processes find each other by them), so none of them can pick a port itself and report it back.

Binding port 0, reading the number, closing and handing it over (what the tests did) races: the kernel hands the
same ephemeral port to the next bind(0) or outgoing connection of any process, and a machine running Ray (hundreds
of connections) makes that likely. So ports come from below the kernel's ephemeral range, which it never hands out
by itself, and above Ray's default worker ports (10002-19999): only a program that names its ports can take one.
Each is checked free by binding it; each process walks the range from a point of its own (from its pid), so the
test processes of one machine (xdist workers, other sessions) rarely even try the same port; and where one is
still taken between the check and the server's bind, the server fails to start and ``start_with_retries`` starts
it again on fresh ports.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable
from typing import TypeVar

LOW = 20000  # above Ray's default worker ports
FALLBACK_HIGH = 32767  # below Linux's default ephemeral range (32768-60999)
ATTEMPTS = 3

T = TypeVar("T")


def _range() -> range:
    """LOW up to the kernel's ephemeral range (exclusive)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = int(f.read().split()[0]) - 1
    except (OSError, ValueError, IndexError):
        high = FALLBACK_HIGH
    return range(LOW, max(high, LOW + 1000) + 1)


def _walk():
    ports = _range()
    start = (os.getpid() * 7919) % len(ports)
    return itertools.cycle([*ports[start:], *ports[:start]])


_next = _walk()


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port of 127.0.0.1 free now and not handed out before by this process (see the module's docstring)."""
    for _ in range(len(_range())):
        port = next(_next)
        if _is_free(port):
            return port
    raise RuntimeError(f"no free port in {_range()}")


class PortsTaken(RuntimeError):
    """A server did not start, maybe because one of its ports was taken meanwhile: worth a try on fresh ports."""


def start_with_retries(start: Callable[[], T], attempts: int = ATTEMPTS) -> T:
    """``start()``, which picks fresh ports on each call, stops what it started when it fails, and raises
    PortsTaken for a failure a taken port can cause; tried again on that, ``attempts`` times in all, the last
    failure raised."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except PortsTaken:
            if attempt == attempts:
                raise
    raise AssertionError("attempts < 1")
