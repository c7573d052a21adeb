"""Paired 95 % bootstrap intervals of one method against the others, for every metric of an `atman eval squad --out`
JSON (the evaluation's own ``map_differences`` gives AtMan against each method, mAP only).

    .venv/bin/python bench/paired_eval.py bench/eval/variants-smollm2-sentence-sample16.json atman:joint
"""

from __future__ import annotations

import argparse
import json

import numpy as np

METRICS = ("AP", "aopc", "aopc_removal", "lds", "lds_removal")


def paired(examples: list[dict], a: str, b: str, key: str, resamples: int = 10_000, seed: int = 0) -> tuple | None:
    """Mean of a - b over the examples and its 95 % percentile bootstrap interval; None where a metric is missing."""
    if any(key not in e["methods"][a] or key not in e["methods"][b] for e in examples):
        return None
    x = np.array([e["methods"][a][key] - e["methods"][b][key] for e in examples])
    means = x[np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))].mean(axis=1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result")
    parser.add_argument("method")
    args = parser.parse_args()
    result = json.loads(open(args.result).read())
    examples = result["examples"]
    print(f"| {args.method} − method | " + " | ".join(METRICS) + " |")
    print("|---|" + "---:|" * len(METRICS))
    for other in result["methods"]:
        if other == args.method:
            continue
        cells = [paired(examples, args.method, other, key) for key in METRICS]
        text = ["—" if c is None else f"{c[0]:+.3g} ({c[1]:+.3g}, {c[2]:+.3g})" for c in cells]
        print(f"| {other} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()
