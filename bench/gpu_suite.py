"""Every GPU figure of issue 26 in one command (≤ 8 minutes of an H200): one JSON, and bench/RESULTS.md's tables.

    python bench/gpu_suite.py --out gpu-suite.json --markdown gpu-suite.md   # on a GPU host
    python bench/gpu_suite.py --smoke --out smoke.json            # tiny shapes, CPU: tests/test_gpu_suite.py

Sections, run in this order, each within its own time budget (seconds on an H200; steps whose predicted time no
longer fits are recorded as not run, with the prediction), and all within 465 s (``DEADLINE``). A section whose
prerequisite is missing (no CUDA, Ray not installed) is recorded as "not run: <why>", one that raises as
"failed: <why>", and the others still run; the JSON and the markdown are rewritten after every section, so a run
stopped part way still leaves its figures.

1. ``engine`` (200 s): the 8B Llama shape (bench_gpu.py's ``build``: random bf16 weights made on the device), a
   full token-level sweep (one pass per prompt token), 16 target tokens, log_additive, batches of 16 rows / 16,384
   tokens (bench/RESULTS.md's). Most wanted first, so that the budget cuts comparisons, not goals: 1,024 tokens in
   ``bf16`` with attention kernel ``sdpa`` (the figure of issue 26's start: 19.86 s) and ``flex``; the default
   policy (``precision.AUTO``) with bf16's faster kernel; 2,048 tokens in bf16 with it; a torch.profiler summary
   of one more 1,024-token bf16 flex run (matrix products, attention, element-wise work, gaps: wall time in which
   no kernel runs); the default policy with the other kernel; 2,048 tokens with the default policy. A run is left
   out (and says so) when its prediction (the same configuration at 1,024 tokens x 2^2.05, else the slowest run
   at its length x 1.6) does not fit what is left. Each policy x kernel gets one warm-up pass first (160 tokens;
   flex: its compilation), reported apart. Goals: bf16 1,024 ≤ 13 s, 2,048 ≤ 50 s, default policy ≤ 1.6x bf16.
2. ``precision`` (40 s): the same weights at 256 tokens: each policy of ``precision.POLICIES`` against fp32 with
   TF32 off (the bf16 weights cast to float32: the same values), as bench_gpu's ``--precision-check`` does:
   Spearman, top-5 overlap, top-1 agreement, largest and RMS score change over the fp32 scores' spread (what
   bench/bench_precision.py measures on trained models on a CPU, where mAP also exists; random weights have no
   answer words). Goal (issue 26, 1): the default policy's Spearman ≥ 0.95.
3. ``exactness`` (60 s): the float32 weights at 256 tokens, TF32 off: the fast engine with sdpa and with flex
   against the naive reference sweep (``reference_sweep``). Goal: every target token's CE within 1e-4.
4. ``job`` (140 s): ``pipeline.job.run_job`` (``atman run``) on Ray actors. A random-initialised Llama 3.2 1B shape
   saved on the device (safetensors) with the SmolLM2 tokenizer, 1,000 prompts of SQuAD length (pipeline/data's
   76 SQuAD examples repeated: context + question, the context explained, the answer as target), sentence units
   (word units would take ~22x the passes: 97 words against 4.4 sentences per context on average, which would
   not fit three runs into the section), ``batch_rows`` 32. The bare engine (``Explainer.explain_batch`` over the
   same prompts, model load included as the actor's is) first; then a job with one actor and ``gpus_per_actor:
   1``; then two actors sharing the GPU (0.5 each), with one CUDA out-of-memory injected into each actor's first
   engine call of more than one prompt. The injection is a Ray ``worker_process_setup_hook`` of this script
   (``_suite_worker_hook``): it wraps the actor's engine call, raising ``torch.OutOfMemoryError`` while the file
   ARMED exists in the suite's faults folder, and logs every engine call's prompts, and each actor's
   CUDA_VISIBLE_DEVICES, Ray GPU ids and device; pipeline/ has no switch for it. GPU busy: NVML (nvidia-ml-py)
   sampled every 0.1 s in a thread during each run.
   Goals: job rows/s ≥ 0.9x the engine's, GPU busy ≥ 85 % of the run, the OOM halves the batch, every row exactly
   once. Ray is started by the suite (a GPU resource per visible GPU; on a CPU one declared GPU with no device
   behind it), so its start is not in the job's time, as on a cluster already up.
5. ``dispatch`` (20 s): a small Llama in float32 split between ``cuda:0`` (embedding, first half of the layers) and
   the CPU (the rest, the LM head) with ``load_model(..., device_map={...})`` against the same model wholly on
   ``cuda:0``: scores equal to 1e-4 (precision fp32), for sdpa and flex.

On the lent H200 (torch, transformers, accelerate, scipy and nvidia-ml-py are there; Ray, DuckDB, pydantic and
platformdirs are not, its transformers is older than ours, nothing can be downloaded, and a call carries at most
64 MiB): here, once, ``make gpu-wheels`` (bench/gpu_wheels.py: the locked wheels in two carries of ≤ 60 MiB, with
the SmolLM2 tokenizer). Then two ``run`` calls, back to back (the machine stays warm ~30 s after a call):

    1. carry [".gpu-wheels/a"], timeout_s 180:
       bash bench/gpu_setup.sh
    2. carry [".gpu-wheels/b"], timeout_s 600:
       bash bench/gpu_setup.sh; export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; python3 bench/gpu_suite.py
       --out $OUT/gpu-suite.json --markdown $OUT/gpu-suite.md --profile-table $OUT/gpu-profile.txt
       2>&1 | tee $OUT/gpu-suite.log

Call 1 installs Ray (carry a) into /tmp/site; call 2 installs the rest (carry b) and runs the suite (≤ 8 min). If the
machine went cold between the calls, call 2 still runs every section but the job, which says Ray is missing. Device
time: call 1 ~1-2 min (the machine's start, ~20 s of install), call 2 ~8.5 min: ~11 of a session's 15 minutes, so
call 2 cannot be tried twice; ``--sections job,dispatch`` reruns only those. The JSON, the markdown (paste it into
bench/RESULTS.md), the profiler's table and the log come back from $OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]  # bench_gpu, and pipeline without an install (the device)

from bench_gpu import build, sweep_input, timed  # noqa: E402

from pipeline.atman import attention, precision  # noqa: E402
from pipeline.atman.reference import reference_sweep  # noqa: E402
from pipeline.atman.sweep import KERNELS, sweep  # noqa: E402

MODE = "log_additive"
BUDGETS = {"engine": 200, "precision": 40, "exactness": 60, "job": 140, "dispatch": 20}
"""Seconds of an H200 per section (460 in all, the model builds inside them; the process's start takes ~15)."""
DEADLINE = 465
"""The sections' seconds in all, from the end of the imports (~15 s): the suite takes ≤ 8 minutes (issue 26). A
section gets at most what is left of it, none when nothing is left."""
SMOKE_BUDGET = 120
"""Each section's budget in a smoke run: tiny shapes take seconds, nothing is to be cut."""
GOALS = {"bf16_1024_s": 13.0, "bf16_2048_s": 50.0, "auto_over_bf16": 1.6, "spearman": 0.95, "exact": 1e-4}
JOB_GOALS = {"job_over_engine": 0.9, "gpu_busy_pct": 85.0}
FAULTS_ENV = "ATMAN_SUITE_FAULTS"
JOB_RUNS = (("1x1", 1, 1, False), ("2x0.5", 2, 0.5, True))
"""The job section's runs: name, actors, gpus_per_actor, whether a CUDA OOM is injected."""
DOUBLING = 2.05
"""Time grows with the prompt length to this power for a token-level sweep (19.86 s -> 81.36 s, bench/RESULTS.md)."""


@dataclass(frozen=True)
class Sizes:
    """What one run of the suite measures: the full sizes on a GPU, tiny ones in a smoke run."""

    shape: str = "8b"
    lengths: tuple[int, int] = (1024, 2048)
    target_tokens: int = 16
    warmup_tokens: int = 160
    batch_size: int = 16
    max_batch_tokens: int = 16384
    check_tokens: int = 256
    job_shape: str = "1b"
    job_prompts: int = 1000
    job_granularity: str = "sentence"
    batch_rows: int = 32


SMOKE = Sizes(
    shape="tiny",
    lengths=(32, 64),
    target_tokens=4,
    warmup_tokens=24,
    check_tokens=24,
    job_shape="tiny",
    job_prompts=8,
    batch_rows=2,
)


class NotRun(Exception):
    """A section (or step) cannot run here; the message says why."""


class Budget:
    """A section's time: ``left()`` seconds remain; ``fits(s)`` whether a step predicted to take s does."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def fits(self, predicted: float) -> bool:
        return predicted <= self.left()


@dataclass
class Suite:
    """What the sections share: the options, the device, the engine shape's model (sections 1 to 3)."""

    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    model: torch.nn.Module | None = None
    reference: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def engine_model(self, dtype: torch.dtype) -> torch.nn.Module:
        """The engine shape's model in ``dtype``: built once (bf16, on the device), then cast in place (bf16 ->
        float32 is exact, so every section sees the same weights)."""
        if self.model is None:
            self.model = build(self.sizes.shape, self.device, torch.bfloat16)
        if next(self.model.parameters()).dtype != dtype:
            self.model.to(dtype)
        return self.model


# --- helpers -----------------------------------------------------------------------------------------------------


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def goal(name: str, target: str, value, met: bool | None, kind: str, note: str | None = None) -> dict:
    """One of issue 26's goals: ``kind`` "gpu" (a speed or GPU-numerics goal: judged on the full sizes with CUDA
    only) or "always" (exactness, rows: judged in every run, the smoke run included)."""
    entry = {"goal": name, "target": target, "value": value, "met": met, "kind": kind}
    return entry | ({"note": note} if note else {})


def judged(suite: Suite, met: bool | None) -> bool | None:
    """A "gpu" goal is judged on the full sizes with CUDA only; elsewhere it is None (not judged)."""
    return met if suite.cuda and not suite.args.smoke else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def unit_scores(out) -> torch.Tensor:
    """Each unit's score: the summed rise of the target tokens' CE when it is suppressed."""
    return (out.ce - out.base_ce[None]).sum(1).double()


def run_sweep(model, seq, policy: str, kernel: str, sizes: Sizes):
    """The fast engine over one prompt, computing as ``policy`` says, with attention kernel ``kernel``."""
    with attention.activated(model), precision.computing(model, policy):
        return sweep(
            model,
            [seq],
            mode=MODE,
            batch_size=sizes.batch_size,
            max_batch_tokens=sizes.max_batch_tokens,
            attention_kernel=kernel,
        )[0]


def run_reference(model, seq):
    """The naive sweep (one unit per pass, full recompute) in float32 with TF32 off."""
    with attention.activated(model), precision.computing(model, "fp32"):
        return reference_sweep(model, [seq], mode=MODE)[0]


# --- 1. engine ---------------------------------------------------------------------------------------------------


def engine_section(suite: Suite, budget: Budget) -> dict:
    sizes, device = suite.sizes, suite.device
    model = suite.engine_model(torch.bfloat16)
    auto = precision.resolve("auto", torch.bfloat16, device)
    first, second = sizes.lengths
    runs: list[dict] = []
    warmed: dict[tuple[str, str], float] = {}

    def run(n: int, policy: str, kernel: str | None) -> None:
        if kernel is None:
            runs.append({"prompt_tokens": n, "precision": policy, "status": f"not run: no {policy} run at {first}"})
        else:
            runs.append(engine_run(suite, model, budget, runs, warmed, n, policy, kernel))

    # most wanted first (the goals: bf16 at both lengths, the default policy at the first), so that what the
    # budget cuts is the comparisons
    run(first, "bf16", "sdpa")
    run(first, "bf16", "flex")
    run(first, auto, fastest(runs, first, "bf16"))
    run(second, "bf16", fastest(runs, first, "bf16"))
    profile = engine_profile(suite, model, budget, runs)
    run(first, auto, other(fastest(runs, first, auto)))
    run(second, auto, fastest(runs, first, auto))
    return {
        "shape": sizes.shape,
        "dtype": "bfloat16",
        "mode": MODE,
        "default_policy": auto,
        "batch_size": sizes.batch_size,
        "max_batch_tokens": sizes.max_batch_tokens,
        "runs": runs,
        "profile": profile,
        "goals": engine_goals(suite, runs, auto),
    }


def other(kernel: str | None) -> str | None:
    """The attention kernel that is not ``kernel``."""
    return None if kernel is None else next(k for k in KERNELS if k != kernel)


def engine_run(suite, model, budget, runs, warmed, n: int, policy: str, kernel: str) -> dict:
    """One timed sweep at ``n`` prompt tokens (a warm-up of this policy and kernel first, once)."""
    sizes = suite.sizes
    entry = {
        "prompt_tokens": n,
        "target_tokens": sizes.target_tokens,
        "passes": n + 1,
        "precision": policy,
        "kernel": kernel,
    }
    predicted = predict(runs, n, policy, kernel)
    if not budget.fits(predicted):
        return entry | {"status": f"not run: predicted {predicted:.0f} s, {budget.left():.0f} s of the budget left"}
    try:
        if (policy, kernel) not in warmed:
            warm = sweep_input(model, sizes.warmup_tokens, 4, 0.1, None)
            warmed[(policy, kernel)] = timed(partial(run_sweep, model, warm, policy, kernel, sizes), suite.device)[1]
        seq = sweep_input(model, n, sizes.target_tokens, 0.1, None)
        out, seconds, peak = timed(partial(run_sweep, model, seq, policy, kernel, sizes), suite.device)
    except Exception as err:  # noqa: BLE001 - one configuration failing (a compile, a kernel) leaves the others
        free_memory()
        return entry | {"status": f"failed: {one_line(err)}"}
    entry |= {"status": "ok", "engine_s": round(seconds, 2), "warmup_s": round(warmed[(policy, kernel)], 2)}
    entry["finite"] = bool(torch.isfinite(out.ce).all() and torch.isfinite(out.base_ce).all())
    if peak is not None:
        entry["peak_gib"] = round(peak / 2**30, 2)
    print(json.dumps({"engine": entry}), flush=True)
    return entry


def predict(runs: list[dict], n: int, policy: str, kernel: str) -> float:
    """Seconds a run will take, from those done: the same configuration at another length (scaled by DOUBLING),
    else the slowest run at this length x 1.6 (another policy or kernel), else nothing known (0)."""
    done = [r for r in runs if r.get("status") == "ok"]
    same = [r for r in done if (r["precision"], r["kernel"]) == (policy, kernel)]
    if same:
        r = max(same, key=lambda r: r["prompt_tokens"])
        return r["engine_s"] * (n / r["prompt_tokens"]) ** DOUBLING
    here = [r["engine_s"] for r in done if r["prompt_tokens"] == n]
    return max(here) * 1.6 if here else 0.0


def fastest(runs: list[dict], n: int, policy: str) -> str | None:
    done = [r for r in runs if r.get("status") == "ok" and r["prompt_tokens"] == n and r["precision"] == policy]
    return min(done, key=lambda r: r["engine_s"])["kernel"] if done else None


def best(runs: list[dict], n: int, policy: str) -> dict | None:
    done = [r for r in runs if r.get("status") == "ok" and r["prompt_tokens"] == n and r["precision"] == policy]
    return min(done, key=lambda r: r["engine_s"]) if done else None


def engine_goals(suite: Suite, runs: list[dict], auto: str) -> list[dict]:
    first, second = suite.sizes.lengths
    out = []
    for n, limit in ((first, GOALS["bf16_1024_s"]), (second, GOALS["bf16_2048_s"])):
        r = best(runs, n, "bf16")
        value = None if r is None else r["engine_s"]
        met = None if value is None else judged(suite, value <= limit)
        note = None if r is None else f"{r['kernel']}"
        name = f"engine, bf16, {n:,} tokens + {suite.sizes.target_tokens} targets"
        out.append(goal(name, f"≤ {limit:g} s", value, met, "gpu", note))
    b, a = best(runs, first, "bf16"), best(runs, first, auto)
    ratio = None if a is None or b is None else round(a["engine_s"] / b["engine_s"], 3)
    met = None if ratio is None else judged(suite, ratio <= GOALS["auto_over_bf16"])
    name = f"default policy ({auto}) over bf16 at {first:,} tokens"
    out.append(goal(name, f"≤ {GOALS['auto_over_bf16']:g}x", ratio, met, "gpu"))
    return out


def engine_profile(suite: Suite, model, budget: Budget, runs: list[dict]) -> dict:
    """One more first-length bf16 run (flex, else sdpa) under torch.profiler, summed by kind of kernel."""
    n = suite.sizes.lengths[0]
    flex_ran = any(
        r.get("status") == "ok" and (r["prompt_tokens"], r["precision"], r["kernel"]) == (n, "bf16", "flex")
        for r in runs
    )
    kernel = "flex" if flex_ran else fastest(runs, n, "bf16")
    if kernel is None:
        return {"status": f"not run: no bf16 run at {n} tokens"}
    predicted = predict(runs, n, "bf16", kernel) * 1.3  # the profiler's own cost
    if not budget.fits(predicted):
        return {"status": f"not run: predicted {predicted:.0f} s, {budget.left():.0f} s of the budget left"}
    from torch.profiler import ProfilerActivity, profile

    seq = sweep_input(model, n, suite.sizes.target_tokens, 0.1, None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if suite.cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run_sweep(model, seq, "bf16", kernel, suite.sizes)
        sync(suite.device)
        wall = time.perf_counter() - start
    if suite.args.profile_table:
        key = "self_cuda_time_total" if suite.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=80)
        Path(suite.args.profile_table).write_text(table)
    summary = kernel_summary(prof, wall) if suite.cuda else operator_summary(prof, wall)
    return {"status": "ok", "prompt_tokens": n, "precision": "bf16", "kernel": kernel} | summary


def kernel_kind(name: str) -> str:
    """A GPU kernel's kind by its name: attention (cuDNN / flash SDPA, FlexAttention's compiled template),
    products (cuBLAS / CUTLASS GEMMs), else element-wise (norms, RoPE, activations, copies, reductions)."""
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "sdpa", "attention", "flex", "triton_tem_")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "gemv", "splitk")):
        return "products"
    return "element-wise"


def kernel_summary(prof, wall: float) -> dict:
    """GPU seconds per kind of kernel, the GPU's busy time (union of kernel intervals) and the gaps (wall - busy)."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kinds: Counter = Counter()
    names: Counter = Counter()
    spans = []
    for e in kernels:
        seconds = e.time_range.elapsed_us() / 1e6
        kinds[kernel_kind(e.name)] += seconds
        names[e.name] += seconds
        spans.append((e.time_range.start, e.time_range.end))
    busy = union_us(spans) / 1e6
    return {
        "wall_s": round(wall, 2),
        "gpu_busy_s": round(busy, 2),
        "gaps_s": round(wall - busy, 2),
        "kinds_s": {k: round(v, 2) for k, v in sorted(kinds.items())},
        "kernels": len(kernels),
        "top_kernels": [{"name": n[:120], "s": round(s, 3), "kind": kernel_kind(n)} for n, s in names.most_common(12)],
    }


def operator_summary(prof, wall: float) -> dict:
    """Without a GPU: self CPU seconds per kind of operator (products: mm/addmm/bmm; attention: SDPA, flex)."""
    kinds: Counter = Counter()
    for e in prof.key_averages():
        name = e.key.lower()
        kind = "element-wise"
        if any(k in name for k in ("attention", "flex", "sdpa")):
            kind = "attention"
        elif name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mm"):
            kind = "products"
        kinds[kind] += e.self_cpu_time_total / 1e6
    return {
        "wall_s": round(wall, 3),
        "kinds_s": {k: round(v, 3) for k, v in sorted(kinds.items())},
        "note": "CPU: self CPU time by operator (no GPU kernels, no gaps)",
    }


def union_us(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


# --- 2. precision, 3. exactness ----------------------------------------------------------------------------------


def fp32_reference(suite: Suite) -> dict:
    """The fast engine (sdpa) on the float32 weights, TF32 off, at the check length: sections 2 and 3's reference."""
    if not suite.reference:
        model = suite.engine_model(torch.float32)
        seq = sweep_input(model, suite.sizes.check_tokens, suite.sizes.target_tokens, 0.1, None)
        out, seconds, _ = timed(partial(run_sweep, model, seq, "fp32", "sdpa", suite.sizes), suite.device)
        suite.reference.update(seq=seq, out=out, seconds=seconds)
    return suite.reference


def precision_section(suite: Suite, budget: Budget) -> dict:
    from scipy.stats import spearmanr

    model = suite.engine_model(torch.bfloat16)
    seq = sweep_input(model, suite.sizes.check_tokens, suite.sizes.target_tokens, 0.1, None)  # = the reference's
    scores, seconds = {}, {}
    for name in precision.POLICIES:
        out, seconds[name], _ = timed(partial(run_sweep, model, seq, name, "sdpa", suite.sizes), suite.device)
        scores[name] = unit_scores(out).cpu()
    ref = fp32_reference(suite)
    if not torch.equal(ref["seq"].multipliers, seq.multipliers) or not torch.equal(ref["seq"].input_ids, seq.input_ids):
        raise RuntimeError("the fp32 reference explained another prompt than the policies")
    want = unit_scores(ref["out"]).cpu()
    std = float(want.std())
    policies = {}
    for name, got in scores.items():
        diff = got - want
        k = min(5, len(want))
        top = len(set(want.topk(k).indices.tolist()) & set(got.topk(k).indices.tolist())) / k
        policies[name] = {
            "spearman": round(float(spearmanr(want.numpy(), got.numpy()).statistic), 4),
            "top5_overlap": top,
            "top1_same": bool(want.argmax() == got.argmax()),
            "max_abs_over_std": round(float(diff.abs().max()) / std, 4),
            "rms_over_std": round(float(diff.pow(2).mean().sqrt()) / std, 4),
            "seconds": round(seconds[name], 2),
        }
    auto = precision.resolve("auto", torch.bfloat16, suite.device)
    rho = policies[auto]["spearman"]
    return {
        "prompt_tokens": suite.sizes.check_tokens,
        "weights": "bfloat16 (policies); the same values as float32 (reference: fp32, TF32 off)",
        "reference_s": round(ref["seconds"], 2),
        "fp32_score_std": round(std, 4),
        "policies": policies,
        "goals": [
            goal(
                f"default policy ({auto}): Spearman vs fp32 (random {suite.sizes.shape} weights; issue 26, 1)",
                "≥ 0.95",
                rho,
                judged(suite, rho >= GOALS["spearman"]),
                "gpu",
                "mAP needs a trained model: CPU figures",
            ),
        ],
    }


def exactness_section(suite: Suite, budget: Budget) -> dict:
    ref = fp32_reference(suite)
    model, seq = suite.engine_model(torch.float32), ref["seq"]
    naive, naive_s, _ = timed(partial(run_reference, model, seq), suite.device)
    kernels, goals = {}, []
    for kernel in KERNELS:
        if kernel == "sdpa":
            out, seconds = ref["out"], ref["seconds"]
        else:
            try:
                out, seconds, _ = timed(partial(run_sweep, model, seq, "fp32", kernel, suite.sizes), suite.device)
            except Exception as err:  # noqa: BLE001 - the other kernel's figure stands
                kernels[kernel] = {"status": f"failed: {one_line(err)}"}
                goals.append(goal(f"engine = naive sweep, fp32, {kernel}", "≤ 1e-4", None, False, "always"))
                continue
        base = float((out.base_ce - naive.base_ce).abs().max())  # no suppression: the kernels' rounding alone
        ce = max(float((out.ce - naive.ce).abs().max()), base)
        score = float((unit_scores(out) - unit_scores(naive)).abs().max())
        kernels[kernel] = {"status": "ok", "max_abs_ce": ce, "max_abs_base_ce": base, "max_abs_score": score,
                           "engine_s": round(seconds, 2)}  # fmt: skip
        goals.append(
            goal(
                f"engine = naive sweep, fp32, {kernel} (per target token's CE)",
                "≤ 1e-4",
                ce,
                ce <= GOALS["exact"],
                "always",
            )
        )
    return {
        "prompt_tokens": suite.sizes.check_tokens,
        "target_tokens": suite.sizes.target_tokens,
        "naive_s": round(naive_s, 2),
        "score_abs_max": float(unit_scores(naive).abs().max()),
        "kernels": kernels,
        "goals": goals,
    }


# --- 4. the job on GPU actors ------------------------------------------------------------------------------------


def _suite_worker_hook() -> None:
    """Ray ``worker_process_setup_hook`` of the job section, run in every Ray worker process at its start (pickled
    by value: no import of this script there). Wraps ``ExplainWorker.__init__`` so that each actor notes where it
    computes (``actor-<pid>.json``: CUDA_VISIBLE_DEVICES, Ray's GPU ids, the engine's device) and logs every engine
    call's number of prompts (``calls-<pid>.jsonl``) in the folder ``$ATMAN_SUITE_FAULTS``; while the file ARMED is
    there, the first engine call of more than one prompt in each actor raises ``torch.OutOfMemoryError`` (as CUDA
    does when a batch does not fit), which the worker answers by halving the group."""
    import json
    import os

    folder = os.environ.get("ATMAN_SUITE_FAULTS")
    if not folder:
        return
    from pipeline import worker

    init = worker.ExplainWorker.__init__
    if getattr(init, "_suite_wrapped", False):
        return

    def wrapped_init(self, *args, **kwargs):
        import ray
        import torch

        init(self, *args, **kwargs)
        pid = os.getpid()
        device = self.explainer.device
        note = {
            "pid": pid,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "ray_gpu_ids": [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])],
            "device": str(device),
            "cuda_devices_seen": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        }
        with open(os.path.join(folder, f"actor-{pid}.json"), "w") as f:
            json.dump(note, f)
        run, fired = self.explainer.run, []

        def traced(inputs, batch_size=None):
            armed = os.path.exists(os.path.join(folder, "ARMED"))
            oom = armed and not fired and len(inputs) > 1
            with open(os.path.join(folder, f"calls-{pid}.jsonl"), "a") as f:
                f.write(json.dumps({"prompts": len(inputs), "batch_size": batch_size, "oom": oom}) + "\n")
            if oom:
                fired.append(True)
                raise torch.OutOfMemoryError("CUDA out of memory (injected by bench/gpu_suite.py)")
            return run(inputs, batch_size=batch_size)

        self.explainer.run = traced

    wrapped_init._suite_wrapped = True
    worker.ExplainWorker.__init__ = wrapped_init


class GpuSampler:
    """The GPU's utilisation (NVML: the share of the last sample period in which a kernel ran, %) sampled every
    ``period`` s in a thread while ``with sampler.window() as w`` is open; ``w`` then holds the summary."""

    def __init__(self, period: float = 0.1) -> None:
        self.period, self.why = period, None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as err:  # noqa: BLE001 - no NVIDIA driver, or nvidia-ml-py not installed
            self.nvml, self.why = None, f"not run: no NVML here ({one_line(err)})"

    @contextlib.contextmanager
    def window(self):
        summary: dict = {}
        if self.nvml is None:
            summary["status"] = self.why
            yield summary
            return
        samples: list[int] = []
        stop = threading.Event()
        thread = threading.Thread(target=self._sample, args=(samples, stop), daemon=True)
        thread.start()
        try:
            yield summary
        finally:
            stop.set()
            thread.join()
            summary.update(busy_summary(samples))

    def _sample(self, samples: list[int], stop: threading.Event) -> None:
        while not stop.is_set():
            samples.append(int(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))
            stop.wait(self.period)


def busy_summary(samples: list[int]) -> dict:
    """Mean utilisation over the whole window, and from the first sample with a kernel running on."""
    if not samples:
        return {"status": "not run: no sample"}
    first = next((i for i, s in enumerate(samples) if s > 0), len(samples))
    after = samples[first:] or [0]
    return {
        "status": "ok",
        "samples": len(samples),
        "busy_pct": round(sum(samples) / len(samples), 1),
        "busy_after_first_kernel_pct": round(sum(after) / len(after), 1),
    }


def job_section(suite: Suite, budget: Budget) -> dict:
    lacking = missing("ray", "duckdb", "pydantic", "platformdirs", "pyarrow")
    if lacking:
        raise NotRun(f"{', '.join(lacking)} not importable here (on the lent GPU: make gpu-wheels, see the docstring)")
    work = Path(tempfile.mkdtemp(prefix="atman-suite-job-"))
    try:
        return job_runs(suite, budget, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class JobSetup:
    """What the job section's runs share: sizes, the saved model, the prompts (rows and their JSONL file), the
    folder of the actors' logs, the GPU sampler, the working folder."""

    sizes: Sizes
    work: Path
    model_dir: str
    rows: list[dict]
    prompts: Path
    faults: Path
    sampler: GpuSampler


def job_runs(suite: Suite, budget: Budget, work: Path) -> dict:
    sizes = suite.sizes
    tokenizer = load_tokenizer(suite)
    model_dir, save_s = save_job_model(suite, tokenizer, work / "model")
    rows = squad_rows(sizes.job_prompts, bool(getattr(tokenizer, "chat_template", None)))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    setup = JobSetup(sizes, work, model_dir, rows, prompts, work / "faults", GpuSampler())
    setup.faults.mkdir()
    result = {
        "shape": sizes.job_shape,
        "prompts": len(rows),
        "granularity": sizes.job_granularity,
        "batch_rows": sizes.batch_rows,
        "model_save_s": round(save_s, 2),
    }
    with ray_session(suite, setup.faults) as ray_info:
        result["ray"] = ray_info
        with setup.sampler.window() as busy:
            result["engine"] = engine_baseline(model_dir, rows, sizes)
        result["engine"]["gpu"] = busy
        runs = {}
        for name, actors, gpus, armed in JOB_RUNS:
            if suite.args.smoke and name != "2x0.5":
                runs[name] = {"status": "not run: smoke run (on a CPU the 2-actor job exercises the same code)"}
                continue
            predicted = result["engine"]["seconds"] + 15  # the engine's, and the actors' start and staging
            if not budget.fits(predicted):
                runs[name] = {"status": f"not run: predicted {predicted:.0f} s, {budget.left():.0f} s left"}
                continue
            runs[name] = job_run(setup, name, actors, gpus, armed)
        result["runs"] = runs
    result["goals"] = job_goals(suite, result)
    return result


def load_tokenizer(suite: Suite):
    """The SmolLM2 tokenizer: ``--tokenizer``, else the carried copy (.gpu-wheels/b/tokenizer), else the embedded
    model's converted directory (converted once from its GGUF where the wheel is installed)."""
    from transformers import AutoTokenizer

    path = suite.args.tokenizer
    if path is None:
        carried = ROOT / ".gpu-wheels" / "b" / "tokenizer"
        if carried.is_dir():
            path = carried
        else:
            from pipeline.models import DEFAULT_MODEL, converted_dir

            path = converted_dir(DEFAULT_MODEL)
    return AutoTokenizer.from_pretrained(str(path))


def save_job_model(suite: Suite, tokenizer, path: Path) -> tuple[str, float]:
    """The job's model (random weights of ``sizes.job_shape``, bf16 on CUDA, float32 on a CPU) saved with the
    tokenizer as a local model directory, as a user's fine-tuned model would be."""
    start = time.perf_counter()
    dtype = torch.bfloat16 if suite.cuda else torch.float32
    vocab = max(len(tokenizer), 1000)
    overrides = {"vocab_size": vocab, "max_position_embeddings": 2048} if suite.sizes.job_shape == "tiny" else {}
    model = build(suite.sizes.job_shape, suite.device, dtype, **overrides)
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"the {suite.sizes.job_shape} shape's vocabulary is smaller than the tokenizer's")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    free_memory()
    return str(path), time.perf_counter() - start


def squad_rows(n: int, chat: bool) -> list[dict]:
    """``n`` job rows from the bundled SQuAD examples, repeated (each with its own id): context + question, the
    context explained, the first answer as target (as ``atman eval squad`` asks)."""
    from pipeline.data import SQUAD_DEV

    examples = [json.loads(line) for line in SQUAD_DEV.read_text().splitlines() if line.strip()]
    rows = []
    for i in range(n):
        ex = examples[i % len(examples)]
        prompt, target = f"{ex['context']}\n\n{ex['question']}", ex["answers"][0]["text"]
        if not chat:
            prompt, target = f"{prompt}\nAnswer:", f" {target}"
        rows.append(
            {"id": f"{ex['id']}-{i}", "prompt": prompt, "target": target, "span": [0, len(ex["context"])], "chat": chat}
        )
    return rows


@contextlib.contextmanager
def ray_session(suite: Suite, faults: Path):
    """A Ray session of this process: one GPU resource per visible GPU (one declared GPU without a device on a
    CPU), every worker running ``_suite_worker_hook``; shut down and its files removed afterwards."""
    import ray

    if ray.is_initialized():
        raise NotRun("a Ray session is already running in this process")
    temp = tempfile.mkdtemp(prefix="atman-suite-ray-")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    gpus = torch.cuda.device_count() if suite.cuda else 1
    if __name__ != "__main__":  # imported (not run as a script): ship the hook by value all the same
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start = time.perf_counter()
    ray.init(
        num_cpus=max(2, os.cpu_count() or 1),
        num_gpus=gpus,
        include_dashboard=False,
        _temp_dir=temp,
        object_store_memory=1 << 30,
        logging_level=logging.WARNING,
        runtime_env={"worker_process_setup_hook": _suite_worker_hook, "env_vars": {FAULTS_ENV: str(faults)}},
    )
    info = {
        "version": ray.__version__,
        "start_s": round(time.perf_counter() - start, 2),
        "gpus": gpus,
        "gpu_resource": "one per visible GPU" if suite.cuda else "declared, no device behind it",
    }
    try:
        yield info
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def engine_baseline(model_dir: str, rows: list[dict], sizes: Sizes) -> dict:
    """The bare engine over the job's prompts, in the job's groups (``batch_rows`` prompts, shortest first), with
    the model's load: what one actor does, without the job around it."""
    from pipeline import AtManConfig, Explainer, load_model

    start = time.perf_counter()
    explainer = Explainer(load_model(model_dir), AtManConfig(granularity=sizes.job_granularity))
    loaded = time.perf_counter()
    ordered = sorted(rows, key=lambda r: len(r["prompt"]))
    done = 0
    for i in range(0, len(ordered), sizes.batch_rows):
        group = ordered[i : i + sizes.batch_rows]
        done += len(
            explainer.explain_batch(
                [r["prompt"] for r in group],
                [r["target"] for r in group],
                explain_spans=[tuple(r["span"]) for r in group],
                chat=group[0]["chat"],
            )
        )
    sync(explainer.device)
    seconds = time.perf_counter() - start
    result = {
        "rows": done,
        "seconds": round(seconds, 2),
        "load_s": round(loaded - start, 2),
        "rows_per_s": round(done / seconds, 2),
        "device": str(explainer.device),
        "precision": explainer.precision,
    }
    del explainer
    free_memory()
    return result


def job_spec(setup: JobSetup, name: str, actors: int, gpus: float):
    from pipeline.jobspec import JobSpec

    return JobSpec.model_validate(
        {
            "name": "gpu-suite",
            "model": {"id": setup.model_dir},
            "input": {"path": str(setup.prompts), "explain_span_column": "span", "chat_column": "chat"},
            "method": {"granularity": setup.sizes.job_granularity},
            "output": {"root": str(setup.work / f"out-{name}")},
            "resources": {
                "actors": actors,
                "gpus_per_actor": gpus,
                "batch_rows": setup.sizes.batch_rows,
                "cpus_per_actor": 1,
            },
        }
    )


def job_run(setup: JobSetup, name: str, actors: int, gpus: float, armed: bool) -> dict:
    """One ``run_job`` on the suite's Ray, sampled (GPU busy; Ray's free GPU at each progress report); then its
    output checked (every row once) and the actors' logs (where they computed, the engine calls, the injected OOM)
    read and cleared."""
    import ray

    from pipeline.job import run_job

    free_gpu: list[float] = []

    def progress(done: int, total: int) -> None:
        free_gpu.append(ray.available_resources().get("GPU", 0.0))

    if armed:
        (setup.faults / "ARMED").touch()
    try:
        with setup.sampler.window() as busy:
            summary = run_job(job_spec(setup, name, actors, gpus), name, on_progress=progress)
    finally:
        (setup.faults / "ARMED").unlink(missing_ok=True)
    manifest = json.loads((Path(summary.location) / "_manifest.json").read_text())
    actors_seen, calls = read_faults(setup.faults)
    result = {
        "status": "ok",
        "actors": actors,
        "gpus_per_actor": gpus,
        "seconds": round(summary.seconds, 2),
        "rows_per_s": round(summary.rows / summary.seconds, 2),
        "counts": summary.counts,
        "output": rows_once(summary.location, [r["id"] for r in setup.rows]),
        "gpu": busy,
        "compute": manifest.get("compute"),
        "actors_seen": actors_seen,
        "min_free_gpu": min(free_gpu) if free_gpu else None,
        "oom": halving(calls) if armed else None,
    }
    print(json.dumps({"job": name, "seconds": result["seconds"], "counts": summary.counts}), flush=True)
    return result


def rows_once(location: str, ids: list[str]) -> dict:
    """Whether the run's parts hold every input id exactly once, all ``ok``."""
    import pyarrow.dataset as ds

    table = ds.dataset(location, format="parquet").to_table(columns=["prompt_id", "status"])
    got = table.column("prompt_id").to_pylist()
    statuses = Counter(table.column("status").to_pylist())
    once = len(got) == len(set(got)) == len(ids) and set(got) == set(ids)
    return {
        "rows": len(got),
        "distinct": len(set(got)),
        "expected": len(ids),
        "statuses": dict(statuses),
        "every_row_once": once,
        "all_ok": statuses.get("ok", 0) == len(ids),
    }


def read_faults(faults: Path) -> tuple[list[dict], dict[int, list[dict]]]:
    """The actors' notes and engine-call logs of the run that just ended (then removed: each run's actors are new
    processes)."""
    actors = [json.loads(p.read_text()) for p in sorted(faults.glob("actor-*.json"))]
    calls = {}
    for path in sorted(faults.glob("calls-*.jsonl")):
        calls[int(path.stem.split("-")[1])] = [json.loads(line) for line in path.read_text().splitlines()]
    for path in [*faults.glob("actor-*.json"), *faults.glob("calls-*.jsonl")]:
        path.unlink()
    return actors, calls


def halving(calls: dict[int, list[dict]]) -> dict:
    """Each injected OOM on a group of n prompts and the two engine calls after it in that actor: halved when they
    are n // 2 and n - n // 2 prompts."""
    events = []
    for pid, log in calls.items():
        for i, call in enumerate(log):
            if call["oom"]:
                n, after = call["prompts"], [c["prompts"] for c in log[i + 1 : i + 3]]
                events.append({"pid": pid, "prompts": n, "retried_as": after, "halved": after == [n // 2, n - n // 2]})
    return {"injected": len(events), "events": events, "halved": bool(events) and all(e["halved"] for e in events)}


def job_goals(suite: Suite, result: dict) -> list[dict]:
    engine, runs = result["engine"], result.get("runs", {})
    one, two = runs.get("1x1", {}), runs.get("2x0.5", {})
    out = []
    ratio = round(one["rows_per_s"] / engine["rows_per_s"], 3) if one.get("status") == "ok" else None
    out.append(
        goal(
            "job rows/s over the bare engine's (1 actor, gpus_per_actor 1)",
            "≥ 0.9x",
            ratio,
            None if ratio is None else judged(suite, ratio >= JOB_GOALS["job_over_engine"]),
            "gpu",
        )
    )
    busy = (one.get("gpu") or {}).get("busy_pct")
    note = None if busy is not None else (one.get("gpu") or {}).get("status")
    out.append(
        goal(
            "GPU busy over the job's run (NVML, 1 actor)",
            "≥ 85 %",
            busy,
            None if busy is None else judged(suite, busy >= JOB_GOALS["gpu_busy_pct"]),
            "gpu",
            note,
        )
    )
    oom = (two.get("oom") or {}).get("halved")
    out.append(goal("an injected CUDA OOM halves the batch (2 actors x 0.5 GPU)", "halved", oom, oom, "always"))
    ran = [r for r in runs.values() if r.get("status") == "ok"]
    met = bool(ran) and all(r["output"]["every_row_once"] and r["output"]["all_ok"] for r in ran)
    out.append(goal(f"every row exactly once, all ok ({len(ran)} job runs)", "yes", met, met, "always"))
    shared = two.get("min_free_gpu") == 0 and len({tuple(a["ray_gpu_ids"]) for a in two.get("actors_seen", [])}) == 1
    out.append(goal("two actors at 0.5 GPU co-scheduled on one GPU", "yes", shared, shared, "always"))
    return out


# --- 5. a model split between cuda:0 and the CPU -----------------------------------------------------------------


def dispatch_section(suite: Suite, budget: Budget) -> dict:
    if not suite.cuda:
        raise NotRun("no CUDA")
    lacking = missing("accelerate", "pydantic", "platformdirs")
    if lacking:
        raise NotRun(f"{', '.join(lacking)} not importable here")
    work = Path(tempfile.mkdtemp(prefix="atman-suite-dispatch-"))
    try:
        return dispatch_compare(suite, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def dispatch_compare(suite: Suite, work: Path) -> dict:
    from pipeline import AtManConfig, Explainer, load_model

    tokenizer = load_tokenizer(suite)
    overrides = dict(
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=512,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        initializer_range=0.1,
    )
    model = build("tiny", torch.device("cpu"), torch.float32, **overrides)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    device_map = split_map(model)
    whole = load_model(str(work), dtype="float32", device="cuda")
    split = load_model(str(work), dtype="float32", device_map=device_map)
    places = sorted({p.device.type for p in split.model.parameters()})
    rows = squad_rows(3, chat=False)
    prompts, targets = [r["prompt"] for r in rows], [r["target"] for r in rows]
    kernels, goals = {}, []
    for kernel in KERNELS:
        config = AtManConfig(precision="fp32", attention_kernel=kernel, granularity="word")
        want = Explainer(whole, config).explain_batch(prompts, targets, chat=False)
        got = Explainer(split, config).explain_batch(prompts, targets, chat=False)
        diff = max(float(abs(g.scores - w.scores).max()) for g, w in zip(got, want, strict=True))
        base = max(abs(g.base_target_ce - w.base_target_ce) for g, w in zip(got, want, strict=True))
        kernels[kernel] = {
            "max_abs_score": diff,
            "max_abs_base_ce": base,
            "score_abs_max": max(float(abs(w.scores).max()) for w in want),
        }
        worst = max(diff, base)
        goals.append(goal(f"split model = whole model, fp32, {kernel}", "≤ 1e-4", worst, worst <= 1e-4, "always"))
    return {
        "layers": len(model.model.layers),
        "parameter_devices": places,
        "device_map": device_map,
        "kernels": kernels,
        "goals": goals,
    }


def split_map(model) -> dict:
    """Embedding, rotary and the first half of the layers on cuda:0; the other layers, the norm, the LM head on
    the CPU."""
    n = len(model.model.layers)
    layers = {f"model.layers.{i}": 0 if i < n // 2 else "cpu" for i in range(n)}
    return {"model.embed_tokens": 0, "model.rotary_emb": 0, **layers, "model.norm": "cpu", "lm_head": "cpu"}


# --- the run -----------------------------------------------------------------------------------------------------

SECTIONS = {
    "engine": engine_section,
    "precision": precision_section,
    "exactness": exactness_section,
    "job": job_section,
    "dispatch": dispatch_section,
}


def run_section(name: str, suite: Suite, left: float) -> dict:
    """Section ``name`` within its budget, at most ``left`` seconds (what the suite has left)."""
    seconds = SMOKE_BUDGET if suite.args.smoke else round(min(BUDGETS[name], left))
    if seconds < 5:
        return {"status": f"not run: the suite's {DEADLINE} s are spent", "budget_s": seconds}
    if name in ("job", "dispatch"):  # the engine shape's model is not used again: its memory goes back
        suite.model = None
        suite.reference.clear()
        free_memory()
    budget = Budget(seconds)
    print(f"--- {name} (budget {seconds} s)", flush=True)
    try:
        body, status = SECTIONS[name](suite, budget), "ok"
    except NotRun as why:
        body, status = {}, f"not run: {why}"
    except Exception as err:  # noqa: BLE001 - a failed section is recorded; the next ones still run
        body, status = {"traceback": traceback.format_exc()[-6000:]}, f"failed: {one_line(err)}"
        print(body["traceback"], file=sys.stderr, flush=True)
    free_memory()
    return {"status": status, "budget_s": seconds, "seconds": round(budget.elapsed(), 1)} | body


def machine(device: torch.device) -> dict:
    """What the figures ran on: the card's name, driver, memory; torch, transformers and the other libraries."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    for name in ("ray", "accelerate", "pydantic", "duckdb"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[name] = metadata.version(name)
    if device.type != "cuda":
        return info | {"device": "cpu", "card": None, "driver": None}
    props = torch.cuda.get_device_properties(device)
    return info | {
        "device": "cuda",
        "card": torch.cuda.get_device_name(device),
        "driver": driver_version(),
        "cuda": torch.version.cuda,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "gpus": torch.cuda.device_count(),
    }


def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001 - nvidia-smi knows it too
        pass
    try:
        cmd = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return None


def all_goals(result: dict) -> list[dict]:
    return [g | {"section": name} for name, s in result["sections"].items() for g in s.get("goals", [])]


def write(result: dict, args: argparse.Namespace) -> None:
    result["goals"] = all_goals(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few prompts (the CPU test)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, of " + ", ".join(SECTIONS))
    parser.add_argument("--tokenizer", default=None, help="the SmolLM2 tokenizer's directory (default: see above)")
    parser.add_argument("--out", default=None, help="the JSON")
    parser.add_argument("--markdown", default=None, help="the tables for bench/RESULTS.md")
    parser.add_argument("--profile-table", default=None, help="torch.profiler's table of section 1's profiled run")
    args = parser.parse_args()
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: {', '.join(unknown)} not among {', '.join(SECTIONS)}")
    transformers.utils.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    suite = Suite(args, SMOKE if args.smoke else Sizes(), device)
    started = time.perf_counter()
    result = {
        "suite": "bench/gpu_suite.py",
        "smoke": args.smoke,
        "date": dt.date.today().isoformat(),
        "machine": machine(device),
        "sizes": suite.sizes.__dict__,
        "sections": {},
    }
    for name in SECTIONS:
        if name not in names:
            result["sections"][name] = {"status": "not run: not asked for (--sections)"}
            continue
        left = DEADLINE - (time.perf_counter() - started)
        result["sections"][name] = run_section(name, suite, left)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        write(result, args)
    write(result, args)
    print(markdown(result), flush=True)


# --- markdown ----------------------------------------------------------------------------------------------------


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2e}" if value != 0 and abs(value) < 1e-2 else f"{value:,.2f}"
    return str(value)


def met_text(g: dict) -> str:
    if g["met"] is None:
        return "not judged" + (f" ({g['note']})" if g.get("note") else " (smoke or no GPU)")
    return "**met**" if g["met"] else "**not met**"


def markdown(result: dict) -> str:
    m = result["machine"]
    where = (
        f"{m['card']}, driver {m['driver']}, {m['gpu_memory_gib']} GiB"
        if m.get("card")
        else "CPU (smoke run: tiny shapes, speed goals not judged)"
    )
    lines = [
        f"## GPU suite (issue 26): {where}",
        "",
        f"`bench/gpu_suite.py`{' --smoke' if result['smoke'] else ''}, {result['date']}; torch {m['torch']}, "
        f"transformers {m['transformers']}, Ray {m.get('ray', '—')}, Python {m['python']}; "
        f"{result.get('wall_s', 0):.0f} s in all.",
        "",
        "| section | goal | target | measured | |",
        "|---|---|---|---:|---|",
    ]
    for g in result.get("goals", []):
        lines.append(f"| {g['section']} | {g['goal']} | {g['target']} | {fmt(g['value'])} | {met_text(g)} |")
    for name, section in result["sections"].items():
        lines += ["", f"### {name}: {section['status']} ({section.get('seconds', 0)} s of {section.get('budget_s')})"]
        if section["status"] == "ok":
            lines += TABLES[name](section)
    return "\n".join(lines) + "\n"


def engine_table(s: dict) -> list[str]:
    lines = [
        "",
        f"{s['shape']} shape, {s['dtype']} weights, token units, {s['mode']}, batch {s['batch_size']} "
        f"rows / {s['max_batch_tokens']} tokens; default policy = {s['default_policy']}.",
        "",
        "| prompt + target tokens | precision | kernel | engine | warm-up | peak memory | |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in s["runs"]:
        tokens = f"{r['prompt_tokens']:,} + {r.get('target_tokens', 16)}"
        if r.get("status") != "ok":
            lines.append(f"| {tokens} | {r['precision']} | {r.get('kernel', '—')} | — | — | — | {r['status']} |")
            continue
        peak = f"{r['peak_gib']:.2f} GiB" if "peak_gib" in r else "—"
        timing = f"{r['engine_s']:.2f} s | {r['warmup_s']:.2f} s | {peak}"
        lines.append(f"| {tokens} | {r['precision']} | {r['kernel']} | {timing} | |")
    p = s["profile"]
    if p.get("status") == "ok":
        lines += [
            "",
            f"Profile ({p['prompt_tokens']:,} tokens, {p['precision']}, {p['kernel']}): wall {p['wall_s']} s"
            + (f", GPU busy {p['gpu_busy_s']} s, gaps {p['gaps_s']} s" if "gpu_busy_s" in p else ""),
            "",
            "| kind | seconds |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {v} |" for k, v in p["kinds_s"].items()]
    else:
        lines += ["", f"Profile: {p.get('status')}"]
    return lines


def precision_table(s: dict) -> list[str]:
    lines = [
        "",
        f"{s['prompt_tokens']} tokens; reference fp32 (TF32 off) {s['reference_s']} s; fp32 scores' std "
        f"{s['fp32_score_std']}.",
        "",
        "| policy | Spearman | top-5 overlap | top-1 same | max \\|Δ\\| / std | RMS / std | seconds |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, p in s["policies"].items():
        lines.append(
            f"| {name} | {p['spearman']:.4f} | {p['top5_overlap']:.2f} | {fmt(p['top1_same'])} | "
            f"{p['max_abs_over_std']:.4f} | {p['rms_over_std']:.4f} | {p['seconds']:.2f} |"
        )
    return lines


def exactness_table(s: dict) -> list[str]:
    lines = [
        "",
        f"{s['prompt_tokens']} + {s['target_tokens']} tokens, fp32, TF32 off; naive sweep {s['naive_s']} s; "
        f"max \\|score\\| {s['score_abs_max']:.3g}.",
        "",
        "| kernel | max \\|Δ CE\\| per target token | of it, the unsuppressed pass | max \\|Δ score\\| | engine |",
        "|---|---:|---:|---:|---:|",
    ]
    for kernel, k in s["kernels"].items():
        if k["status"] != "ok":
            lines.append(f"| {kernel} | {k['status']} | | | |")
            continue
        base = f"{k['max_abs_base_ce']:.2e}" if "max_abs_base_ce" in k else "—"
        lines.append(
            f"| {kernel} | {k['max_abs_ce']:.2e} | {base} | {k['max_abs_score']:.2e} | {k['engine_s']:.2f} s |"
        )
    return lines


def job_table(s: dict) -> list[str]:
    e = s["engine"]
    lines = [
        "",
        f"{s['shape']} shape, {s['prompts']:,} SQuAD prompts, {s['granularity']} units, batch_rows "
        f"{s['batch_rows']}; Ray {s['ray']['version']} ({s['ray']['gpu_resource']}), started in "
        f"{s['ray']['start_s']} s (not in the times).",
        "",
        "| run | wall | rows/s | vs engine | GPU busy | busy after first kernel | rows once |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| engine ({e['device']}, {e['precision']}; load {e['load_s']} s) | {e['seconds']} s | "
        f"{e['rows_per_s']} | 1.00 | {fmt(e['gpu'].get('busy_pct'))} | "
        f"{fmt(e['gpu'].get('busy_after_first_kernel_pct'))} | |",
    ]
    for name, r in s["runs"].items():
        if r.get("status") != "ok":
            lines.append(f"| job {name} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| job {name} | {r['seconds']} s | {r['rows_per_s']} | {r['rows_per_s'] / e['rows_per_s']:.2f} "
            f"| {fmt(r['gpu'].get('busy_pct'))} | {fmt(r['gpu'].get('busy_after_first_kernel_pct'))} | "
            f"{fmt(r['output']['every_row_once'])} |"
        )
    oom = s["runs"].get("2x0.5", {}).get("oom")
    if oom:
        events = "; ".join(f"{e['prompts']} prompts -> {e['retried_as']}" for e in oom["events"])
        lines += ["", f"Injected OOM: {oom['injected']} ({events}); halved: {fmt(oom['halved'])}."]
    return lines


def dispatch_table(s: dict) -> list[str]:
    lines = [
        "",
        f"{s['layers']} layers, parameters on {', '.join(s['parameter_devices'])}.",
        "",
        "| kernel | max \\|Δ score\\| | max \\|Δ base CE\\| | max \\|score\\| |",
        "|---|---:|---:|---:|",
    ]
    for kernel, k in s["kernels"].items():
        lines.append(f"| {kernel} | {k['max_abs_score']:.2e} | {k['max_abs_base_ce']:.2e} | {k['score_abs_max']:.3g} |")
    return lines


TABLES = {
    "engine": engine_table,
    "precision": precision_table,
    "exactness": exactness_table,
    "job": job_table,
    "dispatch": dispatch_table,
}


if __name__ == "__main__":
    main()
