"""Chaos: a real job under the faults of a real cluster, round after round; every round must end exactly once.

    .venv/bin/python bench/chaos.py --rows 100000 --rounds 6 --seed 0 --out bench/chaos.json --markdown

Set-up (all on this machine): SeaweedFS on 127.0.0.1 holds the input and the output (S3), a Ray cluster of a head
and two worker nodes (tests/cluster.py) runs the job's actors (two, one per worker node), the driver is
`atman run JOB --run-id cN --address auto` with RAY_ADDRESS the head's (a subprocess, as a user runs it). The
model is bench_scale.py's 1-layer tiny Llama (the embedded tokenizer), word units, `batch_rows` 64, `shard_rows`
--shard-rows.

A clean round first (no fault) gives the baseline wall time W. Then each round picks a fault (in turn, from
--faults) and a moment uniformly in [0.15 W, 0.85 W] (seeded), injects it, and drives the run to its end as a user
would: rerun with the same run id until the driver exits 0, then read the output back (`atman query`) and, when
the query warns of a damaged part, rerun once more to repair it. Faults:

- ``actor_kill``: SIGKILL one explaining actor (Ray restarts it; its shard is retried);
- ``driver_kill``: SIGKILL the driver (the rerun takes over the lease of a holder that is provably gone);
- ``sigterm``: SIGTERM to the driver (exit 143, the resume hint);
- ``s3_outage``: the S3 server stopped (SIGSTOP) for 20 s, then resumed;
- ``node_kill``: worker node 1 lost (SIGKILL to its raylet and everything under it); restarted after the round;
- ``damaged_part``: one byte of a finished part flipped on S3 while the run goes on.

Every round is checked: the output's prompt ids (read from the parts the manifest names) equal the input's ids,
each once, and `_SUCCESS` is there. The cost of a fault: extra wall seconds (all attempts and waits, minus W), the
attempts, and the rows the reruns explained (the drivers' "explained now"; a driver killed mid-run reports nothing,
so rows it explained and lost show only in the extra wall).
A fault that comes after its run has finished tests nothing (the moments are drawn from the clean run's wall, so a
clean run slowed by other work draws moments too late): the benchmark then exits 1 naming those rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_scale import corpus, tiny_model  # noqa: E402
from cluster import RayCluster  # noqa: E402
from seaweed import seaweed_server  # noqa: E402

ATMAN = str(Path(sys.executable).parent / "atman")
FAULTS = ("actor_kill", "driver_kill", "sigterm", "s3_outage", "node_kill", "damaged_part")
OUTAGE_S = 20.0
ATTEMPT_TIMEOUT_S = 1800


class Bench:
    """The store, the cluster and the job, shared by the rounds."""

    def __init__(self, args, work: Path, s3, cluster: RayCluster) -> None:
        self.args, self.work, self.s3, self.cluster = args, work, s3, cluster
        self.fs = s3.filesystem()
        self.bucket = f"chaos-{os.getpid()}"
        self.fs.mkdir(self.bucket)
        src = corpus(work / "in.jsonl", args.rows)
        self.fs.put_file(str(src), f"{self.bucket}/in.jsonl")
        self.ids = {f"r{i}" for i in range(args.rows)}
        self.root = f"s3://{self.bucket}/out"
        model = tiny_model(work / "tiny-llama-1layer")
        self.job = work / "job.yaml"
        self.job.write_text(
            f"name: chaos\nmodel: {{id: {model}}}\ninput: {{path: 's3://{self.bucket}/in.jsonl'}}\n"
            f"output: {{root: '{self.root}'}}\nmethod: {{granularity: word}}\n"
            f"resources: {{actors: 2, batch_rows: 64, shard_rows: {args.shard_rows}, max_restarts: 3}}\n"
        )
        self.env = {**cluster.driver_env(), **s3.env()}

    def start(self, run_id: str) -> subprocess.Popen:
        cmd = [ATMAN, "run", str(self.job), "--run-id", run_id, "--address", "auto"]  # RAY_ADDRESS: the head
        return subprocess.Popen(cmd, env=self.env, cwd=self.work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip

    def run_dir(self, run_id: str) -> str:
        self.fs.invalidate_cache()  # s3fs caches listings: the run changes under it
        found = self.fs.glob(f"{self.bucket}/out/model=*/run_date=*/run_id={run_id}")
        return found[0] if found else ""

    def check(self, run_id: str) -> tuple[bool, str]:
        """Exactly once: `_SUCCESS`, no damaged-part warning from the query, the ids equal the input's, each once."""
        where = self.run_dir(run_id)
        if not where or not self.fs.exists(f"{where}/_SUCCESS"):
            return False, "no _SUCCESS"
        sql = f"SELECT prompt_id FROM explanations WHERE run_id = '{run_id}'"
        cmd = [ATMAN, "query", self.root, sql, "--format", "json"]
        q = subprocess.run(cmd, env=self.env, cwd=self.work, capture_output=True, text=True, timeout=600)
        if q.returncode != 0 or "left out" in q.stderr:
            return False, f"query (exit {q.returncode}): {q.stderr.strip()[-300:]}"
        got = [r["prompt_id"] for r in json.loads(q.stdout)]
        if len(got) != len(self.ids) or set(got) != self.ids:
            return False, f"{len(got)} rows, {len(set(got))} distinct ids, {len(self.ids - set(got))} missing"
        return True, "every id once"


def _weed(s3) -> psutil.Process:
    port = s3.endpoint.rsplit(":", 1)[1]
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and os.path.basename(cmd[0]) == "weed" and f"-s3.port={port}" in cmd:
            return proc
    raise RuntimeError("the SeaweedFS server of this benchmark is not running")


def inject(fault: str, bench: Bench, driver: subprocess.Popen, run_id: str) -> str:
    """Do ``fault`` now; returns what was done."""
    cl = bench.cluster
    if fault == "actor_kill":
        actors = cl.actors(1) + cl.actors(2)
        if not actors:
            return "no actor alive"
        actors[0].send_signal(signal.SIGKILL)
        return f"killed actor {actors[0].pid}"
    if fault == "driver_kill":
        driver.send_signal(signal.SIGKILL)
        return f"killed driver {driver.pid}"
    if fault == "sigterm":
        driver.send_signal(signal.SIGTERM)
        return f"SIGTERM to driver {driver.pid}"
    if fault == "s3_outage":
        weed = _weed(bench.s3)
        weed.suspend()
        time.sleep(OUTAGE_S)
        weed.resume()
        return f"S3 server stopped for {OUTAGE_S:.0f} s"
    if fault == "node_kill":
        return f"node 1 lost ({len(cl.kill_node(1))} processes)"
    if fault == "damaged_part":
        parts = []
        while not parts and driver.poll() is None:  # the first part to be published, if none is yet
            where = bench.run_dir(run_id)
            parts = sorted(bench.fs.glob(f"{where}/part-*.parquet")) if where else []
            time.sleep(0 if parts else 1.0)
        if not parts:
            return "the run finished before a part could be damaged"
        data = bytearray(bench.fs.cat_file(parts[0]))
        data[len(data) // 2] ^= 0x01
        bench.fs.pipe_file(parts[0], bytes(data))
        return f"flipped a byte of {parts[0].rsplit('/', 1)[-1]}"
    raise ValueError(f"--faults: unknown fault {fault!r} (choose from {', '.join(FAULTS)})")


def _finish(driver: subprocess.Popen) -> tuple[int, int, str]:
    """Wait for the driver; its exit code, the rows it explained and its output's tail."""
    out, _ = driver.communicate(timeout=ATTEMPT_TIMEOUT_S)
    m = re.search(r"explained now\s*[:│|]\s*([\d,]+)", out or "")
    return driver.returncode, int(m.group(1).replace(",", "")) if m else 0, (out or "")[-600:]


def one_round(bench: Bench, run_id: str, fault: str | None, at_s: float) -> dict:
    started = time.perf_counter()
    driver = bench.start(run_id)
    did = ""
    if fault:
        with contextlib.suppress(subprocess.TimeoutExpired):
            driver.wait(timeout=at_s)  # a driver that finishes first leaves the fault nothing to hit
        did = inject(fault, bench, driver, run_id) if driver.poll() is None else "the run had finished"
    attempts, explained, after, exits, notes = 0, 0, 0, [], []
    while True:
        code, rows, tail = _finish(driver)
        attempts, explained = attempts + 1, explained + rows
        after += rows if attempts > 1 else 0
        exits.append(code)
        ok, why = bench.check(run_id) if code == 0 else (False, tail.strip().splitlines()[-1:] or [""])
        if ok or attempts >= 6 or code == 2:  # 2: the job itself is refused; a rerun cannot help
            break
        notes.append(why if isinstance(why, str) else why[0])
        driver = bench.start(run_id)
    wall = time.perf_counter() - started
    if fault == "node_kill":  # back to two workers for the next round
        bench.cluster._wait(1, bench.cluster._start_node(1))
    return {
        "fault": fault or "none", "at_s": round(at_s, 1), "did": did, "exactly_once": ok, "check": why,
        "attempts": attempts, "exits": exits, "wall_s": round(wall, 1), "rows_explained": explained,
        "rows_by_reruns": after, "notes": notes,
    }  # fmt: skip


def markdown(report: dict) -> str:
    base = report["baseline"]
    lines = [
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; {report['rows']:,} rows, "
        f"seed {report['seed']}; clean run {base['wall_s']} s.",
        "",
        "| round | fault | at | what happened | attempts (exits) | exactly once | extra wall | rows reruns explained |",
        "|---:|---|---:|---|---|---|---:|---:|",
    ]
    for i, r in enumerate(report["rounds"], 1):
        lines.append(
            f"| {i} | {r['fault']} | {r['at_s']} s | {r['did']} | {r['attempts']} ({', '.join(map(str, r['exits']))}) "
            f"| {'yes' if r['exactly_once'] else 'NO: ' + r['check']} | {r['wall_s'] - base['wall_s']:+.1f} s "
            f"| {r['rows_by_reruns']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--shard-rows", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if unknown := [f for f in faults if f not in FAULTS]:
        parser.error(f"--faults: unknown {unknown} (choose from {', '.join(FAULTS)})")
    rng = random.Random(args.seed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the cluster and the store still stop
    work = Path(tempfile.mkdtemp(prefix="atman-chaos-"))
    with seaweed_server() as s3, RayCluster(workers=2, cpus=1, env=s3.env()) as cluster:
        bench = Bench(args, work, s3, cluster)
        baseline = one_round(bench, "c0", None, 0.0)
        print(json.dumps(baseline), flush=True)
        if not baseline["exactly_once"]:
            raise SystemExit(f"the clean round failed: {baseline}")
        rounds = []
        for i in range(1, args.rounds + 1):
            fault = faults[(i - 1) % len(faults)]
            at = rng.uniform(0.15, 0.85) * baseline["wall_s"]
            rounds.append(one_round(bench, f"c{i}", fault, at))
            print(json.dumps(rounds[-1]), flush=True)
    machine = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }
    report = {"machine": machine, "rows": args.rows, "seed": args.seed, "baseline": baseline, "rounds": rounds}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        print(markdown(report))
    if not all(r["exactly_once"] for r in rounds):
        raise SystemExit("a round did not end exactly once (see the table)")
    if missed := [i for i, r in enumerate(rounds, 1) if r["did"] == "the run had finished"]:
        raise SystemExit(  # a clean run slowed by other work gives moments the faulted runs never reach
            f"round(s) {missed}: the fault came after the run had finished, so it tested nothing; run again on a "
            "quieter machine (the moments are drawn from the clean run's wall time)"
        )


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
