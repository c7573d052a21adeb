"""Which precision policy keeps AtMan's scores float32-grade: each policy against float32, on a trained model.

The reference is float32 weights computed in float32. Every policy runs on the same weights stored in bfloat16
(what `dtype: auto` loads on a GPU), so its figures include the storage rounding. Per SQuAD example, at the
default units and method: Spearman correlation of the unit scores, top-5 overlap, top-1 agreement, AP against the
answer words; summed: mean Spearman, mAP. `auto` must be the cheapest policy (precision.POLICIES' cost order)
with mean Spearman >= 0.95 and mAP within 1 point of float32 on every model measured (docs/PRECISION.md).

    python bench/bench_precision.py --model smollm2-135m-instruct --sample 16 --out bench/precision-smollm2.json
    python bench/bench_precision.py --model gemma3-270m --sample 16 --out bench/precision-gemma3.json
    python bench/bench_precision.py --table bench/precision-smollm2.json bench/precision-gemma3.json
    python bench/bench_precision.py --model <dir> --limit 1 --policies bf16     # smoke test (tiny model)

Results are written after every example, so a long run can be read (and stopped) part way.
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

from pipeline.atman.config import AtManConfig
from pipeline.atman.explainer import Explainer
from pipeline.atman.precision import POLICIES
from pipeline.data import SQUAD_DEV
from pipeline.evaluate import SquadEval, load_squad, plausibility
from pipeline.models import DEFAULT_MODEL, LoadedModel, load_model

MIN_SPEARMAN, MAX_MAP_DROP = 0.95, 1.0


def compare(ref: np.ndarray, low: np.ndarray, truth: np.ndarray) -> dict:
    """One example's unit scores in float32 (``ref``) and under a policy (``low``)."""
    k = min(5, len(ref))
    top_ref, top_low = set(np.argsort(-ref)[:k]), set(np.argsort(-low)[:k])
    rho = spearmanr(ref, low).statistic if len(ref) > 1 else 1.0
    return {
        "units": len(ref),
        "ref_std": float(ref.std()),
        "max_abs_diff": float(np.abs(low - ref).max()),
        "rms_diff": float(np.sqrt(np.mean((low - ref) ** 2))),
        "spearman": float(rho),
        "top1_same": bool(np.argmax(ref) == np.argmax(low)),
        "top5_overlap": len(top_ref & top_low) / k,
        "AP_ref": plausibility(ref, truth)["AP"],
        "AP_low": plausibility(low, truth)["AP"],
    }


def summarize(rows: list[dict], seconds: float) -> dict:
    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    return {
        "examples": len(rows),
        "mean_spearman": mean("spearman"),
        "min_spearman": float(min(r["spearman"] for r in rows)),
        "top1_same": mean("top1_same"),
        "mean_top5_overlap": mean("top5_overlap"),
        "median_rms_diff_over_ref_std": float(np.median([r["rms_diff"] / max(r["ref_std"], 1e-12) for r in rows])),
        "mAP_ref": mean("AP_ref"),
        "mAP_low": mean("AP_low"),
        "seconds_per_example": round(seconds / len(rows), 2),
    }


def measure(args) -> dict:
    examples = load_squad(args.data, args.limit, args.sample)
    ref_lm = load_model(args.model, dtype="float32", device="cpu")
    low = LoadedModel(_bf16_copy(ref_lm.model), ref_lm.tokenizer, ref_lm.model_id, ref_lm.revision)
    squad = SquadEval(ref_lm)
    ref = Explainer(ref_lm, AtManConfig(granularity=squad.granularity, precision="fp32"))
    policies = {p: Explainer(low, AtManConfig(granularity=squad.granularity, precision=p)) for p in args.policies}
    result = {
        "model": args.model,
        "weights": "bfloat16 (policies); float32 (reference)",
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "policies": {p: {"examples": []} for p in args.policies},
    }
    seconds = dict.fromkeys(["fp32 weights"] + args.policies, 0.0)
    for ex in examples:
        planned, truth = squad.prepare(ex)
        start = time.perf_counter()
        ref_scores = ref.score(planned).scores.astype(np.float64)
        seconds["fp32 weights"] += time.perf_counter() - start
        for name, explainer in policies.items():
            start = time.perf_counter()
            scores = explainer.score(planned).scores.astype(np.float64)
            seconds[name] += time.perf_counter() - start
            rows = result["policies"][name]["examples"]
            rows.append({"id": ex.id} | compare(ref_scores, scores, truth))
            result["policies"][name]["summary"] = summarize(rows, seconds[name])
            print(json.dumps({"policy": name} | rows[-1]), flush=True)
        result["reference_seconds_per_example"] = round(seconds["fp32 weights"] / len(rows), 2)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    return result


def _bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)


def passes(summary: dict) -> bool:
    return summary["mean_spearman"] >= MIN_SPEARMAN and summary["mAP_ref"] - summary["mAP_low"] <= MAX_MAP_DROP


def table(paths: list[str]) -> str:
    """The markdown table of several models' results and the policy `auto` must be."""
    results = [json.load(open(p)) for p in paths]
    lines = [
        "| model | policy | examples | mean Spearman (min) | top-1 same | top-5 overlap | mAP fp32 → policy "
        "| s/example |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ok: dict[str, bool] = {}
    for r in results:
        for name, p in r["policies"].items():
            s = p["summary"]
            ok[name] = ok.get(name, True) and passes(s)
            lines.append(
                f"| {r['model']} | {name} | {s['examples']} | {s['mean_spearman']:.3f} ({s['min_spearman']:.2f}) | "
                f"{s['top1_same']:.2f} | {s['mean_top5_overlap']:.2f} | {s['mAP_ref']:.1f} → {s['mAP_low']:.1f} | "
                f"{s['seconds_per_example']} |"
            )
    chosen = min((n for n, good in ok.items() if good), key=lambda n: POLICIES[n].cost, default=None)
    lines.append("")
    rule = f"cheapest with mean Spearman >= {MIN_SPEARMAN} and mAP within {MAX_MAP_DROP:g} on every model"
    lines.append(f"auto ({rule}): {chosen or 'none of those measured'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--policies", default="bf16,mixed_bf16,mixed_fp16,tf32,fp32",
                        help="comma-separated: " + ", ".join(POLICIES))  # fmt: skip
    parser.add_argument("--data", default=str(SQUAD_DEV))
    parser.add_argument("--sample", type=int, default=None, help="N examples evenly spaced through the file")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--table", nargs="+", default=None, help="print the table of these result files and stop")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown:
        parser.error(f"--policies: {', '.join(unknown)} not among {', '.join(POLICIES)}")
    transformers.utils.logging.set_verbosity_error()
    result = measure(args)
    print(json.dumps({p: v.get("summary") for p, v in result["policies"].items()}, indent=2))


if __name__ == "__main__":
    main()
