"""How far a lower-precision dtype moves AtMan's scores on a trained model, against float32 (same weights, units).

The GPU benchmark (bench_gpu.py --precision-check) showed that on a random-weight 8B model bf16 moves the engine's
and the naive sweep's scores by the same amount (rounding, not the engine), about half the scores' spread. This
measures what that means on a real model and real prompts: SQuAD examples at the default units, AtMan's defaults,
scored once in float32 and once in the other dtype, and compared per example.

    python bench/bench_precision.py --sample 8 --out bench/precision-bf16.json
    python bench/bench_precision.py --model <dir> --limit 1 --dtype bfloat16      # smoke test (tiny model)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import transformers
from scipy.stats import spearmanr

from pipeline.data import SQUAD_DEV
from pipeline.evaluate import SquadEval, load_squad, plausibility
from pipeline.models import DEFAULT_MODEL, load_model


def compare(ref: np.ndarray, low: np.ndarray, truth: np.ndarray) -> dict:
    """One example's unit scores in float32 (``ref``) and in the lower dtype (``low``)."""
    k = min(5, len(ref))
    top_ref, top_low = set(np.argsort(-ref)[:k]), set(np.argsort(-low)[:k])
    rho = spearmanr(ref, low).statistic if len(ref) > 1 else 1.0
    return {
        "units": len(ref),
        "ref_std": float(ref.std()),
        "ref_abs_max": float(np.abs(ref).max()),
        "max_abs_diff": float(np.abs(low - ref).max()),
        "rms_diff": float(np.sqrt(np.mean((low - ref) ** 2))),
        "spearman": float(rho),
        "top1_same": bool(np.argmax(ref) == np.argmax(low)),
        "top5_overlap": len(top_ref & top_low) / k,
        "AP_ref": plausibility(ref, truth)["AP"],
        "AP_low": plausibility(low, truth)["AP"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--data", default=str(SQUAD_DEV))
    parser.add_argument("--sample", type=int, default=None, help="N examples evenly spaced through the file")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()

    examples = load_squad(args.data, args.limit, args.sample)
    evals = {dtype: SquadEval(load_model(args.model, dtype=dtype, device="cpu")) for dtype in ("float32", args.dtype)}
    rows, seconds = [], {dtype: 0.0 for dtype in evals}
    for ex in examples:
        scores = {}
        for dtype, ev in evals.items():
            planned, truth = ev.prepare(ex)
            start = time.perf_counter()
            scores[dtype] = ev.scores("atman", planned, np.random.default_rng(0))
            seconds[dtype] += time.perf_counter() - start
        row = {"id": ex.id} | compare(scores["float32"], scores[args.dtype], truth)
        rows.append(row)
        print(json.dumps(row), flush=True)

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    summary = {
        "examples": len(rows),
        "median_max_abs_diff_over_ref_std": float(np.median([r["max_abs_diff"] / r["ref_std"] for r in rows])),
        "median_rms_diff_over_ref_std": float(np.median([r["rms_diff"] / r["ref_std"] for r in rows])),
        "mean_spearman": mean("spearman"),
        "min_spearman": float(min(r["spearman"] for r in rows)),
        "top1_same": mean("top1_same"),
        "mean_top5_overlap": mean("top5_overlap"),
        "mAP_ref": mean("AP_ref"),
        "mAP_low": mean("AP_low"),
        "seconds_per_example": {dtype: round(s / len(rows), 2) for dtype, s in seconds.items()},
    }
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "summary": summary,
        "examples": rows,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
