"""The data plane at corpus scale: how each cost of a job grows with rows (issue 13).

    .venv/bin/python bench/bench_scale.py                                   # 10^4 and 10^5 rows, local disk
    .venv/bin/python bench/bench_scale.py --rows 10000 100000 1000000 --store local s3 --out bench/scale.json

For each store (local disk; S3 = SeaweedFS on 127.0.0.1, started here) and each corpus size, a synthetic JSONL
corpus of short prompts goes through `atman run` (a subprocess: the driver measured is the one a user runs, on an
embedded Ray with one actor) with a 1-layer tiny Llama (the embedded model's tokenizer, random weights, built
here), word units, `batch_rows` 64, the default `shard_rows`. Measured per run:

- wall time and rows/s of the job;
- the driver's peak RSS (the `atman run` process alone, sampled every 50 ms; Ray's own processes excluded);
- parts written; the no-op rerun of the complete run (same run id); `atman query ROOT "SELECT count(*) ..."`;
- pipeline overhead per row outside the model: (job wall − engine time) / rows, where engine time is the bare
  engine (plan + sweep + explanation, the worker's code without the pipeline) on the same kind of rows in the same
  batches (sorted by length, as the worker sorts a shard), with the actor's one torch thread, measured on a
  10,000-row sample in this process before and after the jobs (the lower figure is used: a disturbed
  measurement cannot inflate it) and scaled by rows. The job's wall includes starting Ray, the actor and its
  model, so at small sizes the fixed cost dominates.

Writes a JSON of the figures and, with --plot, a PNG of the costs against rows (log-log).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
ATMAN = str(Path(sys.executable).parent / "atman")
BATCH_ROWS = 64
WORDS = ["red", "blue", "green", "small", "large", "old", "new", "fast", "slow", "round"]


def corpus(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = WORDS[i % 10], WORDS[(i // 10) % 10]
            f.write(json.dumps({"id": f"r{i}", "prompt": f"Item {i} is {a} and", "target": f" {b}"}) + "\n")
    return path


def tiny_model(where: Path) -> str:
    import torch
    import transformers

    from pipeline.models import DEFAULT_MODEL, load_model

    if (where / "config.json").exists():
        return str(where)
    tok = load_model(DEFAULT_MODEL).tokenizer
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(where)
    tok.save_pretrained(where)
    return str(where)


def engine_seconds_per_row(model_dir: str, sample: int = 10_000) -> float:
    """The worker's explaining code without the pipeline: plan, sweep, explanation, in batches of BATCH_ROWS."""
    import torch

    from pipeline import AtManConfig, Explainer, load_model

    torch.set_num_threads(1)  # what the actor gets (cpus_per_actor 1)
    ex = Explainer(load_model(model_dir), AtManConfig(granularity="word"))
    rows = [json.loads(line) for line in corpus(Path(tempfile.mktemp()), sample).read_text().splitlines()]
    rows.sort(key=lambda r: len(r["prompt"]))  # as the worker orders a shard: similar lengths pad little
    started = time.perf_counter()
    for i in range(0, len(rows), BATCH_ROWS):
        planned = [ex.plan(r["prompt"], r["target"]) for r in rows[i : i + BATCH_ROWS]]
        for p, out in zip(planned, ex.run([p.sweep_input for p in planned]), strict=True):
            ex.explanation(p, out)
    return (time.perf_counter() - started) / len(rows)


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds, peak RSS (MB) of the process itself, and its result."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            peak = max(peak, ps.memory_info().rss)
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-3000:]}")
    return wall, peak / 2**20, result


def one(n: int, store: str, model_dir: str, work: Path, env: dict, s3=None, shard_rows: int | None = None) -> dict:
    src = corpus(work / f"in-{n}.jsonl", n)
    if store == "s3":
        fs = s3.filesystem()
        bucket = f"scale-{n}-{shard_rows or 0}-{os.getpid()}"
        fs.mkdir(bucket)
        fs.put_file(str(src), f"{bucket}/in.jsonl")
        path, root = f"s3://{bucket}/in.jsonl", f"s3://{bucket}/out"
    else:
        path, root = str(src), str(work / f"out-{n}-{shard_rows}")
    job = work / f"job-{store}-{n}-{shard_rows}.yaml"
    job.write_text(
        f"name: scale\nmodel: {{id: {model_dir}}}\ninput: {{path: '{path}'}}\noutput: {{root: '{root}'}}\n"
        f"method: {{granularity: word}}\nresources: {{actors: 1, batch_rows: {BATCH_ROWS}"
        + (f", shard_rows: {shard_rows}" if shard_rows else "")
        + "}\n"
    )
    wall, rss, _ = timed([ATMAN, "run", str(job), "--run-id", "b"], env, work)
    rerun, rerun_rss, res = timed([ATMAN, "run", str(job), "--run-id", "b"], env, work)
    assert "explained now: 0" in res.stdout, res.stdout
    query, _, q = timed([ATMAN, "query", root, "SELECT count(*) AS n FROM explanations", "--format", "json"], env, work)
    counted = json.loads(q.stdout)[0]["n"]
    assert counted == n, (counted, n)
    if store == "s3":
        parts = [p for p in fs.glob(f"{bucket}/out/model=*/run_date=*/run_id=b/part-*.parquet")]
    else:
        parts = list(Path(root).glob("model=*/run_date=*/run_id=b/part-*.parquet"))
    return {
        "rows": n,
        "store": store,
        "shard_rows": shard_rows or "default",
        "wall_s": round(wall, 1),
        "rows_per_s": round(n / wall, 1),
        "driver_peak_rss_mb": round(rss, 1),
        "parts": len(parts),
        "noop_rerun_s": round(rerun, 2),
        "noop_rerun_peak_rss_mb": round(rerun_rss, 1),
        "count_query_s": round(query, 2),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for store in sorted({r["store"] for r in results}):
        rs = sorted(
            (r for r in results if r["store"] == store and r["shard_rows"] == "default"), key=lambda r: r["rows"]
        )
        x = [r["rows"] for r in rs]
        axes[0].plot(x, [r["wall_s"] for r in rs], "o-", label=f"job wall ({store})")
        axes[0].plot(x, [r["engine_s"] for r in rs], "x--", label=f"engine alone ({store})")
        axes[1].plot(x, [r["driver_peak_rss_mb"] for r in rs], "o-", label=store)
        axes[2].plot(x, [r["noop_rerun_s"] for r in rs], "o-", label=f"no-op rerun ({store})")
        axes[2].plot(x, [r["count_query_s"] for r in rs], "s--", label=f"count(*) query ({store})")
    axes[0].set(xscale="log", yscale="log", xlabel="rows", ylabel="seconds", title="wall time")
    axes[1].set(xscale="log", xlabel="rows", ylabel="MB", title="driver peak RSS", ylim=(0, None))
    axes[2].set(xscale="log", xlabel="rows", ylabel="seconds", title="resume and query", ylim=(0, None))
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--store", nargs="+", default=["local"], choices=["local", "s3"])
    parser.add_argument("--shard-rows", type=int, nargs="+", default=[0], help="0 = the default")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--plot-from", type=Path, nargs="+", default=None, help="only plot these result JSONs")
    args = parser.parse_args()
    if args.plot_from:  # runs of different invocations (each with its machine and engine figure) in one picture
        plot([r for f in args.plot_from for r in json.loads(f.read_text())["results"]], args.plot)
        return
    work = Path(tempfile.mkdtemp(prefix="atman-scale-"))
    model_dir = tiny_model(work / "tiny-llama-1layer")
    per_row = engine_seconds_per_row(model_dir)
    print(f"engine alone (before the jobs): {per_row * 1000:.3f} ms per row", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = []
    with contextlib.ExitStack() as stack:
        s3 = None
        if "s3" in args.store:
            sys.path.insert(0, str(ROOT / "tests"))
            from seaweed import seaweed_server

            s3 = stack.enter_context(seaweed_server())
            env.update(s3.env())
        for store in args.store:
            for n, shard_rows in [(n, k) for n in args.rows for k in args.shard_rows]:
                r = one(n, store, model_dir, work, env, s3, shard_rows or None)
                r["engine_s"] = round(per_row * n, 1)
                r["overhead_ms_per_row"] = round(1000 * (r["wall_s"] - r["engine_s"]) / n, 3)
                results.append(r)
                print(json.dumps(r), flush=True)
    after = engine_seconds_per_row(model_dir)  # again, so a disturbed measurement shows (the lower one is used)
    print(f"engine alone (after the jobs): {after * 1000:.3f} ms per row", flush=True)
    if after < per_row:
        per_row = after
        for r in results:
            r["engine_s"] = round(per_row * r["rows"], 1)
            r["overhead_ms_per_row"] = round(1000 * (r["wall_s"] - r["engine_s"]) / r["rows"], 3)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }
    report = {"machine": machine, "engine_ms_per_row": round(per_row * 1000, 3), "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
