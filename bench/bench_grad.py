"""The suppression gradient against exact AtMan on SQuAD (issue 29): `atman eval squad`'s evaluation of ``atman``,
``atman:grad`` and ``atman:grad-path`` (the same records and JSON it writes), plus what the evaluation does not keep:
each example's unit scores and, per estimator, Spearman's rank correlation of its scores with exact AtMan's.

    python bench/bench_grad.py --sample 16 --granularity word --lds-masks 0 \\
        --records bench/eval/grad-smollm2-word-sample16.records.jsonl --out bench/eval/grad-smollm2-word-sample16.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from pipeline import load_model
from pipeline.data import SQUAD_DEV
from pipeline.eval_methods import check_lds_masks, parse_methods
from pipeline.evaluate import SquadEval, load_squad, map_differences, method_results, run_examples, spearman
from pipeline.models import DEFAULT_MODEL

METHODS = "atman,atman:grad,atman:grad-path"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=16)
    parser.add_argument("--granularity", default="word")
    parser.add_argument("--lds-masks", type=int, default=0)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--records", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    names = parse_methods(args.methods)
    lm = load_model(args.model)
    examples = load_squad(str(SQUAD_DEV), sample=args.sample)
    ev = SquadEval(lm, args.granularity, 0, "auto", check_lds_masks(args.lds_masks))
    scored: list[dict] = []  # per example computed here: {name: unit scores}

    def score(name, planned, rng):
        if not scored or scored[-1]["planned"] is not planned:
            scored.append({"planned": planned})
        scores = ev.scores(name, planned, rng)
        scored[-1][name] = scores
        return scores

    header = {"model": lm.model_id, "granularity": args.granularity}
    start = time.perf_counter()

    def tick(i: int, n: int) -> None:
        print(f"{i}/{n} {time.perf_counter() - start:.0f} s", flush=True)

    per_example = run_examples(ev, examples, names, score, args.records, header, 0, tick)
    results = method_results(per_example, names)
    rank = {
        name: [spearman(s[name], s["atman"]) for s in scored if name in s and "atman" in s]
        for name in names
        if name != "atman"
    }
    result = {
        "n": len(examples),
        "model": lm.model_id,
        "granularity": args.granularity,
        "dtype": str(ev.base.dtype).removeprefix("torch."),
        "precision": ev.base.precision,
        "wall_seconds": time.perf_counter() - start,
        "methods": {m: results[m].summary() for m in names},
        "spearman_vs_atman": {
            name: {"mean": float(np.mean(r)), "median": float(np.median(r)), "per_example": r}
            for name, r in rank.items()
            if r
        },
        "differences": map_differences(results, 0),
        "examples": per_example,
        "scores": [{k: v.tolist() for k, v in s.items() if k != "planned"} for s in scored],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for name, m in result["methods"].items():
        r = result["spearman_vs_atman"].get(name, {})
        print(
            name,
            {k: m[k] for k in ("mAP", "mAR", "aopc", "aopc_removal", "seconds_per_example") if k in m},
            r.get("mean"),
            r.get("median"),
        )


if __name__ == "__main__":
    main()
