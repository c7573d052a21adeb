"""The job pipeline's cost and scaling: the same prompts through the bare engine, the job without Ray, and the
Ray job with 1 and 2 actors, all in one process, one after another.

    .venv/bin/python bench/bench_pipeline.py                      # 16 prompts, embedded model, word units
    .venv/bin/python bench/bench_pipeline.py --prompts 4 --model DIR --out result.json

Configurations (wall time from start to the last row written, model load included everywhere):
- engine:      load_model + Explainer.explain_batch over the same batches the job forms (batch_rows prompts each);
- inline:      run_job(address="inline"): reader, one in-process worker, Parquet parts, manifest; no Ray;
- ray 1x2:     run_job on an embedded Ray: 1 actor with 2 torch threads (Ray start + actor start included);
- ray 2x1:     2 actors with 1 torch thread each (the two halves of this 2-core machine);
- ray 1x1:     1 actor, 1 thread (so 2x1 / 1x1 is the scaling with actors at equal threads per actor).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from pipeline import AtManConfig, Explainer, load_model
from pipeline.job import run_job
from pipeline.jobspec import JobSpec
from pipeline.models import DEFAULT_MODEL

SUBJECTS = [
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
    ("Cuba", "Havana"), ("India", "Delhi"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
]  # fmt: skip


def prompts(n: int) -> list[dict]:
    """n prompts of 30-45 tokens: two sentences of context, then the completion to explain."""
    out = []
    for i in range(n):
        country, capital = SUBJECTS[i % len(SUBJECTS)]
        other, other_capital = SUBJECTS[(i + 5) % len(SUBJECTS)]
        text = (
            f"Travel notes, page {i + 1}. The capital of {other} is {other_capital}, a city we visited in spring. "
            f"Our next stop was {country}, and we took the night train to its capital, which is called"
        )
        out.append({"id": f"p{i:02d}", "prompt": text, "target": f" {capital}"})
    return out


def spec(model: str, input_path: Path, root: Path, actors: int, cpus: int, batch_rows: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "bench",
            "model": {"id": model},
            "input": {"path": str(input_path)},
            "method": {"granularity": "word"},
            "output": {"root": str(root)},
            "resources": {"actors": actors, "cpus_per_actor": cpus, "batch_rows": batch_rows},
        }
    )


def engine_seconds(model: str, rows: list[dict], batch_rows: int, threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    explainer = Explainer(load_model(model), AtManConfig(granularity="word"))
    ordered = sorted(rows, key=lambda r: len(r["prompt"]))
    for i in range(0, len(ordered), batch_rows):
        batch = ordered[i : i + batch_rows]
        explainer.explain_batch([r["prompt"] for r in batch], [r["target"] for r in batch])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch-rows", type=int, default=4)
    parser.add_argument("--configs", default="engine,inline,ray1x2,ray2x1,ray1x1")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    rows = prompts(args.prompts)
    work = Path(tempfile.mkdtemp(prefix="atman-bench-"))
    input_path = work / "prompts.jsonl"
    input_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    load_model(args.model)  # convert/cache once, outside every timing
    cores = os.cpu_count() or 1
    results = {}
    for name in args.configs.split(","):
        if name == "engine":
            seconds, units = engine_seconds(args.model, rows, args.batch_rows, threads=cores), None
        else:
            actors, cpus = (1, cores) if name == "inline" else (int(name[3]), int(name[5]))
            job = spec(args.model, input_path, work / name, actors, cpus, args.batch_rows)
            summary = run_job(job, name, address="inline" if name == "inline" else "local")
            assert summary.counts["ok"] == len(rows), summary.counts
            seconds, units = summary.seconds, summary.unit_passes
        results[name] = {"seconds": round(seconds, 2), "prompts_per_s": round(len(rows) / seconds, 3)}
        if units:
            results[name]["unit_passes_per_s"] = round(units / seconds, 1)
        print(f"{name:>8}: {seconds:7.1f} s  {len(rows) / seconds:6.3f} prompts/s", flush=True)
    report = {
        "prompts": len(rows),
        "model": args.model,
        "batch_rows": args.batch_rows,
        "machine": {"cpu_count": cores, "platform": platform.platform(), "processor": platform.processor()},
        "torch": torch.__version__,
        "results": results,
    }
    if "engine" in results and "inline" in results:
        report["inline_over_engine"] = round(results["inline"]["seconds"] / results["engine"]["seconds"], 3)
    if "engine" in results and "ray1x2" in results:
        report["ray1x2_over_engine"] = round(results["ray1x2"]["seconds"] / results["engine"]["seconds"], 3)
    if "ray1x1" in results and "ray2x1" in results:
        report["speedup_2_actors_vs_1"] = round(results["ray1x1"]["seconds"] / results["ray2x1"]["seconds"], 3)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
