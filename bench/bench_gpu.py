"""GPU benchmark: a full token-level AtMan sweep on a random-initialised Llama-8B-shaped model, bf16.

One call does it all (prepared for a lent H100/H200, ~15 minutes of device time in total):

    python bench/bench_gpu.py --out $OUT/gpu.json              # 1,024 and 2,048 tokens, engine only
    python bench/bench_gpu.py --lengths 1024 --reference       # also the naive sweep at 1,024 (~1 min)
    python bench/bench_gpu.py --shape tiny --lengths 64        # smoke test of this script on a CPU
    python bench/bench_gpu.py --lengths 256 --modes log_additive --precision-check --out $OUT/precision.json
                                          # engine vs naive in bf16 and in fp32 (same weights): is a bf16 gap noise?

Goals (issue 2): 1,024-token prompt + 16 target tokens <= 12 s, 2,048 <= 45 s, peak memory <= 1.3 x weights.
Weights are random: speed does not depend on their values, and no download is possible there.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.atman import attention
from pipeline.atman.plan import embedding_cosine, unit_multipliers
from pipeline.atman.reference import reference_sweep
from pipeline.atman.sweep import SweepInput, sweep
from pipeline.atman.units import Unit

SHAPES = {
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "1b": dict(  # Llama 3.2 1B: the job benchmark's model (bench/gpu_suite.py)
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1000,
        max_position_embeddings=4096,
    ),
}


def build(shape: str, device: torch.device, dtype: torch.dtype, **overrides) -> torch.nn.Module:
    """A random-initialised Llama of ``shape`` (``overrides``: config fields to change), made on ``device``."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in bf16 on the device: no fp32 copy of 8B weights
    try:
        with device:
            model = LlamaForCausalLM(LlamaConfig(**(SHAPES[shape] | overrides)))
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def sweep_input(model, n_prompt: int, n_target: int, factor: float, kappa: float | None) -> SweepInput:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (n_prompt + n_target,), generator=torch.Generator().manual_seed(1))
    units = [Unit(str(p), p, 1, (p,)) for p in range(n_prompt)]  # token granularity: one pass per prompt token
    cosine = None
    if kappa is not None:
        emb = model.get_input_embeddings().weight
        cosine = embedding_cosine(emb, ids.to(emb.device)).cpu()
    return SweepInput(ids, n_target, unit_multipliers(len(ids), units, factor, cosine, kappa))


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return out, time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--target-tokens", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=["scale", "log_additive"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--kappa", type=float, default=None, help="conceptual threshold (default off)")
    parser.add_argument("--reference", action="store_true", help="also time the naive sweep (first length only)")
    parser.add_argument(
        "--precision-check",
        action="store_true",
        help="after the timings: engine and naive sweep at the first length, in bf16 and again with the same weights "
        "cast to fp32; reports how far each is from the fp32 naive sweep (skips nothing else)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="write torch.profiler's table (top kernels by GPU time) of the first length and mode's sweep here",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here too")
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.shape, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": args.shape,
        "dtype": str(dtype),
        "weights_gib": round(weights / 2**30, 2),
        "runs": [],
    }
    with attention.activated(model):  # AtMan's attention for the whole benchmark
        measure(model, args, results)
        if args.precision_check:
            precision_check(model, args, results)
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def measure(model, args, results: dict) -> None:
    device = next(model.parameters()).device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for n in args.lengths:
        seq = sweep_input(model, n, args.target_tokens, 0.1, args.kappa)
        for mode in args.modes:
            sweep(model, [sweep_input(model, 32, 4, 0.1, None)], mode=mode)  # warm-up: kernels, allocator
            run = partial(
                sweep, model, [seq], mode=mode, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens
            )
            out, seconds, peak = timed(run, device)
            if args.profile and n == args.lengths[0] and mode == args.modes[0]:
                profile(run, device, args.profile)
            entry = {
                "prompt_tokens": n,
                "target_tokens": args.target_tokens,
                "mode": mode,
                "passes": n + 1,
                "engine_s": round(seconds, 2),
            }
            if peak is not None:
                entry |= {"peak_gib": round(peak / 2**30, 2), "peak_over_weights": round(peak / weights, 3)}
            if args.reference and n == args.lengths[0]:
                ref, ref_s, ref_peak = timed(partial(reference_sweep, model, [seq], mode=mode), device)
                fast_scores, ref_scores = ((o[0].ce - o[0].base_ce[None]).sum(1).float() for o in (out, ref))
                entry |= {
                    "reference_s": round(ref_s, 2),
                    "speedup": round(ref_s / seconds, 2),
                    "max_abs_score_diff": float((fast_scores - ref_scores).abs().max()),
                }
                if ref_peak is not None:
                    entry["reference_peak_gib"] = round(ref_peak / 2**30, 2)
            results["runs"].append(entry)
            print(json.dumps(entry), flush=True)


def profile(run, device, path: str) -> None:
    """One more run of the sweep under torch.profiler; the table of operators by GPU (or CPU) time goes to path."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
    with open(path, "w") as f:
        f.write(table)
    print(table, flush=True)


def precision_check(model, args, results: dict) -> None:
    """How far the engine is from the naive sweep, against how far bf16 itself moves the naive sweep.

    A bf16 gap between two exact methods is rounding only if the same gap appears between the naive sweep in bf16
    and in fp32 (same weights); in fp32 the engine must equal the naive sweep to ~1e-4.
    """
    n, mode = args.lengths[0], args.modes[0]
    seq = sweep_input(model, n, args.target_tokens, 0.1, args.kappa)

    def scores(fn):
        out = fn(model, [seq], mode=mode)[0]
        return (out.ce - out.base_ce[None]).sum(1).double()

    engine = partial(sweep, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens)
    eng16, ref16 = scores(engine), scores(reference_sweep)
    torch.backends.cuda.matmul.allow_tf32 = False  # true fp32 products
    torch.backends.cudnn.allow_tf32 = False
    model.float()
    eng32, ref32 = scores(engine), scores(reference_sweep)
    results["precision"] = entry = {
        "prompt_tokens": n,
        "mode": mode,
        "max_abs_engine32_vs_naive32": float((eng32 - ref32).abs().max()),
        "max_abs_engine16_vs_naive32": float((eng16 - ref32).abs().max()),
        "max_abs_naive16_vs_naive32": float((ref16 - ref32).abs().max()),
        "max_abs_engine16_vs_naive16": float((eng16 - ref16).abs().max()),
        "naive32_score_abs_max": float(ref32.abs().max()),
        "naive32_score_std": float(ref32.std()),
    }
    print(json.dumps(entry), flush=True)


if __name__ == "__main__":
    main()
