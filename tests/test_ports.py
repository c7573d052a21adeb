"""tests/ports.py, the ports of the servers the tests start: outside the kernel's ephemeral range, free, never the
same twice in one process; a start that fails on a taken port is tried again."""

from __future__ import annotations

import itertools
import socket

import ports
import pytest


def test_ports_are_free_distinct_and_outside_the_ephemeral_range():
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
    got = [ports.free_port() for _ in range(20)]
    assert len(set(got)) == 20, "never handed out twice by one process (the servers have not bound them yet)"
    assert all(ports.LOW <= p < ephemeral for p in got)
    for port in got:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_port_is_skipped(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        number = taken.getsockname()[1]
        monkeypatch.setattr(ports, "_next", itertools.chain([number], ports._walk()))
        assert ports.free_port() != number


def test_a_start_is_tried_again_on_a_taken_port_only():
    tries = []

    def start(fails: int, error: Exception):
        tries.append(1)
        if len(tries) <= fails:
            raise error
        return "up"

    taken = ports.PortsTaken("address already in use")
    assert ports.start_with_retries(lambda: start(ports.ATTEMPTS - 1, taken)) == "up"
    assert len(tries) == ports.ATTEMPTS
    tries.clear()
    with pytest.raises(ports.PortsTaken, match="address already in use"):
        ports.start_with_retries(lambda: start(ports.ATTEMPTS, taken))
    assert len(tries) == ports.ATTEMPTS, "the last failure is raised"
    tries.clear()
    with pytest.raises(ValueError):
        ports.start_with_retries(lambda: start(1, ValueError("broken binary")))
    assert len(tries) == 1, "any other failure is raised at once"
