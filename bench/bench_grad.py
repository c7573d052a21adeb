"""The suppression gradient against exact AtMan on SQuAD (issue 29): `atman eval squad`'s evaluation of ``atman``,
``atman:grad`` and ``atman:grad-path`` (the records it writes), plus what the evaluation does not keep: each
example's unit scores (``--scores``, one line per example as it finishes) and, per estimator, Spearman's rank
correlation of its scores with exact AtMan's, and grad-path's completeness (its scores' sum against the rise with
every unit suppressed).

    python bench/bench_grad.py --sample 16 --granularity word --lds-masks 0 \\
        --records bench/eval/grad-smollm2-word.records.jsonl --scores bench/eval/grad-smollm2-word.scores.jsonl \\
        --out bench/eval/grad-smollm2-word.json

``--summarize``: no computing, only the JSON from the records and scores files as they are (a run stopped early is
summarized over the examples it finished).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from pipeline.data import SQUAD_DEV
from pipeline.eval_methods import check_lds_masks, parse_methods
from pipeline.evaluate import load_records, map_differences, method_results, spearman
from pipeline.models import DEFAULT_MODEL

METHODS = "atman,atman:grad,atman:grad-path"


def run(args, names: list[str]) -> dict:
    """Evaluate, appending each finished example's scores to ``args.scores``; the records' header."""
    from pipeline import AtManConfig, load_model
    from pipeline.evaluate import SquadEval, load_squad, run_examples

    lm = load_model(args.model)
    examples = load_squad(str(SQUAD_DEV), sample=args.sample)
    ev = SquadEval(lm, args.granularity, 0, "auto", check_lds_masks(args.lds_masks))
    exact = ev.explainer(AtManConfig(granularity=args.granularity))
    current: dict = {}

    def score(name, planned, rng):
        if current.get("planned") is not planned:
            current.clear()
            current["planned"] = planned
        scores = ev.scores(name, planned, rng)
        current[name] = scores.tolist()
        return scores

    start = time.perf_counter()

    def tick(i: int, n: int) -> None:
        planned = current.pop("planned", None)
        if planned is not None:  # the rise grad-path's scores should sum to, outside the methods' timing
            current["rise_all"] = float(exact.suppressed_rise(planned, [list(range(len(planned.units)))])[0])
            current["id"] = examples[i - 1].id
            with open(args.scores, "a") as f:
                f.write(json.dumps(current) + "\n")
        print(f"{i}/{n} {time.perf_counter() - start:.0f} s", flush=True)

    header = {"model": lm.model_id, "granularity": args.granularity}
    run_examples(ev, examples, names, score, args.records, header, 0, tick)
    return header


def summarize(args, names: list[str], header: dict) -> dict:
    """The JSON of the examples that both files hold."""
    with open(args.scores) as f:
        scored = {s["id"]: s for s in map(json.loads, f)}
    records = load_records(args.records, header)
    per_example = [
        {**r, "methods": {n: r["methods"][n] for n in names}}
        for i, r in records.items()
        if i in scored and all(n in r["methods"] for n in names)
    ]
    results = method_results(per_example, names)
    kept = [scored[r["id"]] for r in per_example]
    rank = {n: [spearman(np.array(s[n]), np.array(s["atman"])) for s in kept] for n in names if n != "atman"}
    return {
        "n": len(per_example),
        **header,
        "methods": {m: results[m].summary() for m in names},
        "spearman_vs_atman": {
            n: {"mean": float(np.mean(r)), "median": float(np.median(r)), "per_example": r} for n, r in rank.items()
        },
        "completeness": [
            {"sum_grad_path": float(np.sum(s["atman:grad-path"])), "rise_all": s["rise_all"]} for s in kept
        ]
        if "atman:grad-path" in names
        else [],
        "differences": map_differences(results, 0),
        "examples": per_example,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=16)
    parser.add_argument("--granularity", default="word")
    parser.add_argument("--lds-masks", type=int, default=0)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--records", required=True)
    parser.add_argument("--scores", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument("--model-id", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="the records' (--summarize)")
    args = parser.parse_args()
    names = parse_methods(args.methods)
    header = {"model": args.model_id, "granularity": args.granularity} if args.summarize else run(args, names)
    result = summarize(args, names, header)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for name, m in result["methods"].items():
        keys = ("mAP", "mAR", "aopc", "aopc_removal", "seconds_per_example")
        print(name, {k: m[k] for k in keys}, result["spearman_vs_atman"].get(name))


if __name__ == "__main__":
    main()
