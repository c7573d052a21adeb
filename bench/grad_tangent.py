"""Why ``atman:grad`` ranks units only about 0.75 like exact AtMan (issue 29's fast-variant goal), measured: the
suppression gradient is the tangent of each unit's CE rise at no suppression (log m = 0), exact AtMan's score the
rise at factor 0.1 (log m = -2.3). If what separates them is the rise's curvature between the two, the gradient's
Spearman with exact AtMan's rises grows as the factor nears 1 and is about 1 there.

Per ``--sample`` example (the first ``--limit``): ``atman:grad``'s scores once, exact AtMan's single-unit rises at
each of ``--factors`` (``Explainer.suppressed_rise``: the default config's passes, sum aggregate), and Spearman's
rank correlation of the two; means and medians per factor.

    .venv/bin/python bench/grad_tangent.py --sample 16 --limit 6 --factors 0.1,0.5,0.9 \\
        --out bench/eval/grad-tangent-smollm2-word.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from pipeline.atman.config import AtManConfig  # noqa: E402
from pipeline.atman.gradient import grad_scores  # noqa: E402
from pipeline.data import SQUAD_DEV  # noqa: E402
from pipeline.evaluate import SquadEval, load_squad, spearman  # noqa: E402
from pipeline.models import load_model  # noqa: E402


def run(args) -> list[dict]:
    """One record per example: {id, n_units, spearman {factor: rho}, seconds {grad, factor: s}}."""
    lm = load_model(args.model)
    ev = SquadEval(lm, args.granularity, lds_masks=0)
    explainer = ev.explainer(AtManConfig(granularity=args.granularity))
    records = []
    for ex in load_squad(args.data, sample=args.sample)[: args.limit]:
        planned, _ = ev.prepare(ex)
        started = time.perf_counter()
        grad = grad_scores(explainer, planned)
        seconds, rho = {"grad": time.perf_counter() - started}, {}
        for factor in args.factors:
            started = time.perf_counter()
            rises = explainer.suppressed_rise(planned, [[i] for i in range(len(planned.units))], factor)
            seconds[f"{factor:g}"] = time.perf_counter() - started
            rho[f"{factor:g}"] = spearman(grad, rises)
        records.append({"id": ex.id, "n_units": len(planned.units), "spearman": rho, "seconds": seconds})
        print(ex.id, len(planned.units), {k: round(v, 3) for k, v in rho.items()}, flush=True)
    return records


def summary(records: list[dict]) -> dict:
    """Per factor: the mean, median, minimum and maximum of the examples' Spearman."""
    out = {}
    for factor in records[0]["spearman"]:
        values = np.array([r["spearman"][factor] for r in records], dtype=np.float64)
        out[factor] = {"mean": values.mean(), "median": float(np.median(values)), "min": values.min(),
                       "max": values.max()}  # fmt: skip
    return {k: {m: float(v) for m, v in d.items()} for k, d in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--granularity", default="word")
    parser.add_argument("--sample", type=int, default=16)
    parser.add_argument("--limit", type=int, help="only the sample's first N examples")
    parser.add_argument("--data", default=str(SQUAD_DEV), help="SQuAD JSONL (default: the bundled 76 examples)")
    parser.add_argument("--factors", default=[0.1, 0.5, 0.9], type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    records = run(args)
    result = {"model": args.model, "granularity": args.granularity, "sample": args.sample, "limit": args.limit,
              "summary": summary(records), "examples": records}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
