"""A multi-node Ray cluster on one machine: a head and N worker nodes, each its own `ray start` with its own temp
dir, ports and resources, for the node-loss tests and benchmarks.

By default the head declares no CPUs, so every task and actor of a job lands on a worker node; each worker node
declares ``cpus`` CPUs and a custom resource ``node<i>: 1`` (a test may pin work to a node with it). Ray registers
every node under this machine's address even when told 127.0.0.1 (it resolves loopback to the host's IP); the
nodes are told apart by node id. ``kill_node(i)`` is a node lost: SIGKILL to its raylet and every process below it.
``stop()`` stops exactly this cluster's processes (by temp dir, as tests/ray_head.py does; `ray stop` would stop
every Ray of the machine). Ports: tests/ports.py; a node whose `ray start` fails is started again on fresh ones.
Usable outside pytest::

    with RayCluster(workers=2, env=s3.env()) as cluster:
        subprocess.run(["atman", "run", "job.yaml", "--address", "auto"], env=cluster.driver_env())
        cluster.kill_node(1)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from ports import ATTEMPTS, free_port

BIN = Path(sys.executable).parent
# every port a node opens, distinct per node: the defaults (agent 52365, metrics, runtime-env agent, workers
# 10002-19999) are shared by all the nodes of one machine and by any other Ray on it
NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


class RayCluster:
    """``workers`` worker nodes of ``cpus`` CPUs each under a head of ``head_cpus`` (none: all work on the workers);
    ``env``: what every node's processes (and so the job's tasks and actors) see besides this process's environment,
    e.g. S3 credentials."""

    def __init__(self, workers: int = 2, cpus: int = 1, env: dict[str, str] | None = None, head_cpus: int = 0) -> None:
        self.workers, self.cpus, self.head_cpus = workers, cpus, head_cpus
        self.root = tempfile.mkdtemp(prefix="atman-cl-")  # short: Ray's socket paths are limited to ~107 bytes
        self.env = {
            **os.environ,
            **(env or {}),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "disabled",
            "HF_HUB_OFFLINE": "1",
            "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
        }
        self._head_port(free_port())

    def _head_port(self, port: int) -> None:
        self.port = port
        self.address = f"127.0.0.1:{self.port}"

    def temp_dir(self, node: int) -> str:
        """Node ``node``'s temp dir (0: the head)."""
        return os.path.join(self.root, f"n{node}")

    def start(self) -> RayCluster:
        try:
            self._start_nodes([0])
            self._start_nodes(list(range(1, self.workers + 1)))  # at once: ~10 s each
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nodes(self, nodes: list[int]) -> None:
        """Start ``nodes`` together, each on fresh ports; one whose `ray start` failed (a port taken since it was
        found free is one cause) is stopped and started again, ATTEMPTS times in all."""
        for attempt in range(1, ATTEMPTS + 1):
            if 0 in nodes and attempt > 1:
                self._head_port(free_port())
            starting = [(i, self._start_node(i)) for i in nodes]
            failed = {i: err for i, proc in starting if (err := self._wait(i, proc))}
            if not failed:
                return
            for i in failed:
                self._stop_node(i)
            nodes = sorted(failed)
        raise RuntimeError(next(iter(failed.values())))

    def _start_node(self, node: int) -> subprocess.Popen:
        ports = {name: free_port() for name in NODE_PORTS}
        cmd = [
            str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir(node)}",
            "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0", "--include-log-monitor=false",
            f"--object-store-memory={100 << 20}",
            *(f"--{name}={port}" for name, port in ports.items()),
        ]  # fmt: skip
        if node == 0:
            cmd += ["--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}", "--include-dashboard=false",
                    "--no-monitor", f"--ray-client-server-port={free_port()}"]  # fmt: skip
        else:
            cmd += [f"--address={self.address}", f"--num-cpus={self.cpus}", f'--resources={{"node{node}": 1}}']
        return subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def _wait(node: int, proc: subprocess.Popen) -> str | None:
        """Why the `ray start` of ``node`` failed, or None once it started."""
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            return f"ray start of node {node} failed ({proc.returncode}): {err[-2000:]}"
        return None

    def _stop_node(self, node: int) -> None:
        """What a failed start of ``node`` left: its processes, its temp dir."""
        self.kill_node(node)
        shutil.rmtree(self.temp_dir(node), ignore_errors=True)

    def node_id(self, node: int) -> str:
        """Node ``node``'s Ray node id (hex), as its raylet logged it."""
        for log in Path(self.temp_dir(node)).glob("session_*/logs/raylet.out"):
            m = re.search(r"node_id=([0-9a-f]{16,})", log.read_text(errors="replace"))
            if m:
                return m.group(1)
        raise RuntimeError(f"node {node}: no node id in its raylet.out under {self.temp_dir(node)}")

    def driver_env(self) -> dict[str, str]:
        """The environment of an `atman run --address auto` driver of this cluster."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def processes(self, node: int) -> list[psutil.Process]:
        """Node ``node``'s live processes: those naming its temp dir, and every process below them (workers and
        actors retitle themselves ``ray::...`` and name it no more)."""
        mark = self.temp_dir(node) + os.sep
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if mark in " ".join(proc.info["cmdline"] or []) + os.sep:
                    found[proc.pid] = proc
                    found.update((c.pid, c) for c in proc.children(recursive=True))
        return list(found.values())

    def actors(self, node: int, name: str = "ray::ExplainWorker") -> list[psutil.Process]:
        """Node ``node``'s processes whose title starts with ``name``."""
        out = []
        for proc in self.processes(node):
            with contextlib.suppress(psutil.Error):
                if (proc.cmdline() or [""])[0].startswith(name):
                    out.append(proc)
        return out

    def kill_node(self, node: int) -> list[int]:
        """The node is lost: SIGKILL to all its processes at once (the list is taken first: a worker whose raylet
        died is reparented and would no longer be found below it). Returns their pids."""
        procs = self.processes(node)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)
        return [p.pid for p in procs]

    def stop(self) -> None:
        """Stop every process of every node (SIGTERM, then SIGKILL after 2 s) and remove the temp dirs."""
        procs = [p for node in range(self.workers + 1) for p in self.processes(node)]
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=2)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    """``predicate()``'s first truthy value, polled every ``every`` s; AssertionError naming ``what`` after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
