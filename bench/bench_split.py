"""Staging one large JSONL file: one scan task against the file scanned in pieces by several (pipeline/pieces.py).

    .venv/bin/python bench/bench_split.py                                    # 10^6 rows, local disk
    .venv/bin/python bench/bench_split.py --rows 1000000 10000000 --store local s3 --repeat 2 --out bench/split.json

For each store (local disk; S3 = SeaweedFS on 127.0.0.1, started here) and corpus size, one JSONL file of short
prompts (bench_scale.py's corpus) is staged as `atman run` stages it, up to the plan: listing, first pass (the
pieces' newline count), scans, id pass, plan; no model. The driver is a process of its own on a local Ray with 4
CPUs declared (Ray's start is timed apart), run with the file as one scan task (split_bytes above its size) and in
4 pieces (split_bytes = a quarter of it), `--repeat` times each, interleaved. Measured: the wall time of each phase,
each task's wall and CPU seconds, and the driver's peak RSS (the driver process alone, sampled every 50 ms; Ray's
processes excluded). Every run of a corpus must stage the same rows (a digest of ordinals, ids, sources, messages).

On a machine with fewer cores than pieces the wall-time speedup is bounded by its cores; on one that other work
shares, wall times vary with that work: the summary keeps the least of the repeats and the CPU critical path (the
slowest piece's CPU seconds), what the scan takes with a core per piece. `--scan-only-from N` skips the id pass on
S3 from N rows (DuckDB reads the blocks through fsspec, slowly; the id pass is the same whatever the split).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_scale import WORDS, timed  # noqa: E402

WHOLE = 1 << 50


def corpus(path: Path, n: int) -> Path:
    """bench_scale.py's rows (``{"id", "prompt", "target"}``, ~65 bytes), written fast (no json.dumps)."""
    line = '{{"id": "r{i}", "prompt": "Item {i} is {a} and", "target": " {b}"}}\n'
    with open(path, "w", encoding="utf-8") as f:
        for lo in range(0, n, 100_000):
            rows = range(lo, min(n, lo + 100_000))
            f.write("".join(line.format(i=i, a=WORDS[i % 10], b=WORDS[(i // 10) % 10]) for i in rows))
    return path


def measured(fn, *args):
    """``fn(*args)`` in a task, with the task's wall and CPU seconds: on a machine that other work shares, the
    CPU seconds of the slowest piece say what the phase takes with a core per piece."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def stage(path: str, root: str, split_bytes: int, resolve: bool) -> dict:
    """The driver's side (``--stage``): stage ``path`` under ``root`` on a fresh local Ray with 4 CPUs; the wall
    time of each phase, and each task's wall and CPU seconds. Without ``resolve``, the id pass is skipped."""
    import ray

    from pipeline import job
    from pipeline.jobspec import JobSpec
    from pipeline.reader import list_input

    scratch = tempfile.mkdtemp(prefix="atman-bench-ray-")
    started = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=scratch, logging_level="WARNING")
    ray_s = time.perf_counter() - started
    spec = JobSpec.model_validate(
        {"name": "split", "input": {"path": path, "split_bytes": split_bytes}, "output": {"root": root}}
    )
    notes: list[str] = []
    attempt = job.open_run(spec, "b", "auto", False, notes.append)
    paths, executor = attempt.paths, attempt.executor
    phases: list[dict] = []
    scan, id_pass = executor.scan, executor.resolve

    def timed_scan(calls: list[tuple]) -> list:
        t = time.perf_counter()
        out = scan([(measured, *call) for call in calls])
        phase = {"phase": f"{calls[0][0].__name__} x{len(calls)}", "seconds": round(time.perf_counter() - t, 2)}
        phase["task_wall_s"] = [round(w, 2) for _, w, _ in out]
        phase["task_cpu_s"] = [round(c, 2) for _, _, c in out]
        phases.append(phase)
        return [result for result, _, _ in out]

    def timed_resolve(blocks: list[str]) -> int:
        t = time.perf_counter()
        out = id_pass(blocks) if resolve else 0
        phases.append({"phase": f"resolve ({len(blocks)} blocks)" if resolve else "resolve skipped"})
        phases[-1]["seconds"] = round(time.perf_counter() - t, 2)
        return out

    executor.scan, executor.resolve = timed_scan, timed_resolve
    t = time.perf_counter()
    listing = list_input(spec.input)
    list_s = time.perf_counter() - t
    plan = job._stage(attempt, listing, split_bytes)
    staging_s = time.perf_counter() - t
    digest = ray.get(ray.remote(staged_digest).remote(dataclasses.asdict(paths), [b.name for b in plan.blocks]))
    ray.shutdown()
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "ray_start_s": round(ray_s, 2),
        "list_s": round(list_s, 3),
        "phases": phases,
        "staging_s": round(staging_s, 2),
        "rows": plan.rows,
        "blocks": len(plan.blocks),
        "pieces": len({b.name.rsplit("-b", 1)[0] for b in plan.blocks}),
        "staged_sha256": digest,
        "notes": notes,
    }


def staged_digest(run: dict, blocks: list[str]) -> str:
    """sha256 of the staged rows' ordinal, id, source and message, in plan order, and of the id fixups (a task:
    the driver never reads the rows)."""
    import hashlib

    import pyarrow.parquet as pq

    from pipeline.layout import FIXUPS, RunPaths

    paths = RunPaths(**run)
    digest = hashlib.sha256()
    fixups = f"{paths.staging}/{FIXUPS}"
    for name in [*blocks, FIXUPS] if paths.fs.exists(fixups) else blocks:  # row by row: any blocks
        table = pq.read_table(f"{paths.staging}/{name}", filesystem=paths.fs)
        cols = [c for c in ("ordinal", "prompt_id", "source", "input_error") if c in table.column_names]
        for row in zip(*table.select(cols).to_pydict().values(), strict=True):
            digest.update(json.dumps(row).encode())
    return digest.hexdigest()


def one(n: int, store: str, tasks: int, src: Path, work: Path, env: dict, s3=None, resolve: bool = True) -> dict:
    size = src.stat().st_size
    split_bytes = WHOLE if tasks == 1 else max(1024, -(-size // tasks))
    if store == "s3":
        fs = s3.filesystem()
        bucket = f"split-{n}-{os.getpid()}"
        if not fs.exists(f"{bucket}/in.jsonl"):
            fs.mkdir(bucket)
            fs.put_file(str(src), f"{bucket}/in.jsonl")
        path, root = f"s3://{bucket}/in.jsonl", f"s3://{bucket}/out-{tasks}"
    else:
        path, root = str(src), str(work / f"out-{n}-{tasks}")
    cmd = [sys.executable, __file__, "--stage", path, root, str(split_bytes), "resolve" if resolve else "scan"]
    load = os.getloadavg()[0]
    wall, rss, result = timed(cmd, env, ROOT)
    staged = json.loads(result.stdout.strip().splitlines()[-1])
    if store == "s3":
        fs.rm(root, recursive=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
    assert staged["rows"] == n and staged["pieces"] == tasks, staged
    return {
        "rows": n,
        "store": store,
        "scan_tasks": tasks,
        "file_mb": round(size / 2**20, 1),
        "split_bytes": None if tasks == 1 else split_bytes,
        "driver_wall_s": round(wall, 1),
        "driver_peak_rss_mb": round(rss, 1),
        "load_avg_1m_before": round(load, 2),
        "id_pass": resolve,
        **staged,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--store", nargs="+", default=["local"], choices=["local", "s3"])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=1, help="measure each setting this often, interleaved")
    parser.add_argument("--scan-only-from", type=int, default=None, help="skip the id pass on S3 from these rows")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="only merge these result JSONs into --out")
    parser.add_argument("--stage", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.merge:  # runs of several invocations (each with its stores and sizes) in one report
        write(args.out, [r for f in args.merge for r in json.loads(f.read_text())["results"]])
        return
    if args.stage:
        path, root, split_bytes, what = args.stage
        print(json.dumps(stage(path, root, int(split_bytes), what == "resolve")), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="atman-split-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    results = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        s3 = None
        if "s3" in args.store:
            sys.path.insert(0, str(ROOT / "tests"))
            from seaweed import seaweed_server

            s3 = stack.enter_context(seaweed_server())
            env.update(s3.env())
        for n in args.rows:
            src = corpus(work / f"in-{n}.jsonl", n)
            for store, _, tasks in itertools.product(args.store, range(args.repeat), args.tasks):
                resolve = store != "s3" or args.scan_only_from is None or n < args.scan_only_from
                r = one(n, store, tasks, src, work, env, s3, resolve)
                results.append(r)
                print(json.dumps(r), flush=True)
                if args.out:  # what is measured so far survives a run cut short
                    write(args.out, results)
            src.unlink()


def summary(results: list[dict]) -> list[dict]:
    """Per (rows, store, scan tasks): the least of the repeats (the run other work disturbed least), the scan
    phases' CPU critical path (first pass and scan: the slowest task's CPU seconds), and whether every run staged
    the same rows (ordinals, ids, sources, messages) as every other of that corpus and store."""
    out = []
    for key in dict.fromkeys((r["rows"], r["store"], r["id_pass"], r["scan_tasks"]) for r in results):
        runs = [r for r in results if (r["rows"], r["store"], r["id_pass"], r["scan_tasks"]) == key]
        same = {r["staged_sha256"] for r in results if (r["rows"], r["store"]) == key[:2]}
        scans = [[p for p in r["phases"] if "task_cpu_s" in p] for r in runs]
        out.append(
            {
                "rows": key[0],
                "store": key[1],
                "id_pass": key[2],
                "scan_tasks": key[3],
                "runs": len(runs),
                "staging_s_min": min(r["staging_s"] for r in runs),
                "staging_s_all": [r["staging_s"] for r in runs],
                "scan_phases_s_min": min(round(sum(p["seconds"] for p in ps), 2) for ps in scans),
                "scan_critical_cpu_s_min": min(round(sum(max(p["task_cpu_s"]) for p in ps), 2) for ps in scans),
                "scan_total_cpu_s_min": min(round(sum(sum(p["task_cpu_s"]) for p in ps), 2) for ps in scans),
                "driver_peak_rss_mb_max": max(r["driver_peak_rss_mb"] for r in runs),
                "load_avg_1m": [r["load_avg_1m_before"] for r in runs],
                "same_rows_every_run": len(same) == 1,
            }
        )
    for s in out:
        base = next((b for b in out if (b["rows"], b["store"], b["id_pass"], b["scan_tasks"]) == (*_k(s), 1)), None)
        if base is not None:
            s["staging_speedup"] = round(base["staging_s_min"] / s["staging_s_min"], 2)
            s["scan_speedup"] = round(base["scan_phases_s_min"] / s["scan_phases_s_min"], 2)
            s["scan_critical_cpu_speedup"] = round(base["scan_critical_cpu_s_min"] / s["scan_critical_cpu_s_min"], 2)
    return out


def _k(s: dict) -> tuple:
    return s["rows"], s["store"], s["id_pass"]


def write(out: Path, results: list[dict]) -> None:
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }
    report = {"machine": machine, "summary": summary(results), "results": results}
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
