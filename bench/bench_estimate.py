"""`atman plan` against the real run: is the bill before the spend right?

    .venv/bin/python bench/bench_estimate.py          # the demo job and a 10^5-row job -> bench/estimate.json
    .venv/bin/python bench/bench_estimate.py --jobs demo --out /tmp/estimate.json

For each job: `atman plan JOB --run-id ID --json` (a subprocess, timed: what planning costs), then
`atman run JOB --run-id ID` (a subprocess, timed: the wall time a user sees), then the run's `_manifest.json`,
whose `estimate` block sets the driver's seconds (start to manifest) beside the estimate's. Jobs:

- `demo`: jobs/examples/demo.yaml as it is (output under a temporary root): ten prompts on SmolLM2-135M, CPU.
- `scale`: bench_scale.py's 10^5-row job: short synthetic prompts, a 1-layer tiny Llama with the embedded model's
  tokenizer, word units, batch_rows 64, one actor (its local run took ~126 s in bench/scale.json).

The load average is recorded before each step: plan and run measure the machine as it is, so other work on it
moves both (the plan's calibration sees the load of its own minutes, the run that of its own).
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import BATCH_ROWS, corpus, tiny_model  # noqa: E402


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return wall, out.stdout


def demo_job(work: Path) -> tuple[Path, list[str], Path]:
    """The demo job as it is, its output under ``work``."""
    root = work / "out-demo"
    return ROOT / "jobs/examples/demo.yaml", ["--set", f"output.root={root}"], root


def scale_job(work: Path, rows: int = 100_000) -> tuple[Path, list[str], Path]:
    """bench_scale.py's job on ``rows`` rows."""
    model_dir = tiny_model(work / "tiny-llama-1layer")
    src = corpus(work / f"in-{rows}.jsonl", rows)
    job = work / "scale.yaml"
    job.write_text(
        f"name: scale\nmodel: {{id: {model_dir}}}\ninput: {{path: '{src}'}}\noutput: {{root: '{work / 'out-scale'}'}}\n"
        f"method: {{granularity: word}}\nresources: {{actors: 1, batch_rows: {BATCH_ROWS}}}\n"
    )
    return job, [], work / "out-scale"


def one(name: str, job: Path, extra: list[str], root: Path, env: dict) -> dict:
    run_id = f"estimate-{name}-{int(time.time())}"
    load_plan = os.getloadavg()
    plan_s, out = timed([ATMAN, "plan", str(job), "--run-id", run_id, "--json", *extra], env)
    est = json.loads(out)
    load_run = os.getloadavg()
    run_s, _ = timed([ATMAN, "run", str(job), "--run-id", run_id, *extra], env)
    manifest = json.loads(next(root.glob(f"model=*/run_date=*/run_id={run_id}/_manifest.json")).read_text())
    block = manifest.get("estimate") or {}
    return {
        "job": name,
        "rows": est["rows"],
        "per_row": est["per_row"],
        "totals": est["totals"],
        "calibration": est["calibration"],
        "estimated_steps_s": {p["step"]: p["s"] for p in est["seconds"]},
        "plan_s": round(plan_s, 1),
        "estimated_wall_s": est["wall_s"],
        "actual_wall_s": round(run_s, 1),
        "wall_ratio": round(est["wall_s"] / run_s, 3),
        "manifest_estimate": block,
        "load_avg_before_plan": [round(x, 2) for x in load_plan],
        "load_avg_before_run": [round(x, 2) for x in load_run],
        "within_30_percent": abs(est["wall_s"] / run_s - 1) <= 0.30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", default=["demo", "scale"], choices=["demo", "scale"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/estimate.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="atman-estimate-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = []
    for name in args.jobs:
        results.append(one(name, *(demo_job(work) if name == "demo" else scale_job(work)), env))
        print(json.dumps({k: results[-1][k] for k in ("job", "estimated_wall_s", "actual_wall_s", "wall_ratio")}))
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }
    command = "bench/bench_estimate.py " + " ".join(sys.argv[1:])
    args.out.write_text(json.dumps({"machine": machine, "command": command.strip(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
