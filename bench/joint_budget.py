"""``atman:joint``'s settings measured with the AOPCs (issue 29): the pass budget (at sentence units exact AtMan's is
3-9 passes, where ContextCite spends 64 ablations), the suppression factor of its passes and the LASSO penalty. Per
``--sample`` example this scores the units with ``joint_surrogate`` at budgets of ``--multiples`` x the unit count
(at least ``--floor`` passes), at each of ``--factors`` and ``--alphas``, and measures them as `atman eval squad`
does (AP, AR, AOPC by suppression and by removal, seconds), writing records in the evaluation's shape, so the paired
intervals against an evaluation's records of the same examples (``--against``, e.g. ContextCite's) come from
``bench/paired_eval.py``'s ``paired``. Tuning only: the sample, never the 76.

    .venv/bin/python bench/joint_budget.py --granularity sentence --multiples 1,2,4,8 \\
        --against bench/eval/variants-smollm2-sentence-sample16.json \\
        --out bench/eval/joint-budget-sentence-sample16.json
    .venv/bin/python bench/joint_budget.py --granularity sentence --multiples 1 --factors 0,0.1 --alphas 0.03,0.1 \\
        --against bench/eval/variants-smollm2-sentence-sample16.json \\
        --out bench/eval/joint-factor-sentence-sample16.json

A setting is named ``joint x<multiple>``, with `` f<factor>`` and `` a<alpha>`` added where more than one is given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from paired_eval import paired  # noqa: E402

from pipeline.atman.config import AtManConfig  # noqa: E402
from pipeline.atman.variants import JOINT_ALPHA, joint_surrogate  # noqa: E402
from pipeline.data import SQUAD_DEV  # noqa: E402
from pipeline.evaluate import SquadEval, load_squad  # noqa: E402
from pipeline.models import load_model  # noqa: E402

METRICS = ("AP", "AR", "aopc", "aopc_removal")


def settings(n: int, args) -> dict[str, dict]:
    """Setting name -> ``joint_surrogate``'s keywords (budget, factor, alpha) for an example of ``n`` units."""
    out = {}
    for m, f, a in itertools.product(args.multiples, args.factors, args.alphas):
        name = f"joint x{m}" + (f" f{f:g}" if len(args.factors) > 1 else "")
        name += f" a{a:g}" if len(args.alphas) > 1 else ""
        out[name] = {"budget": max(m * n, args.floor if m > 1 else n), "factor": f, "alpha": a}
    return out


def run(args) -> list[dict]:
    """One record per example: {id, n_units, methods {setting: metrics | passes}}."""
    lm = load_model(args.model)
    ev = SquadEval(lm, args.granularity, lds_masks=0)
    explainer = ev.explainer(AtManConfig(granularity=args.granularity))
    records = []
    for ex in load_squad(args.data, sample=args.sample)[: args.limit]:
        planned, truth = ev.prepare(ex)
        n, methods = len(planned.units), {}
        for name, keywords in settings(n, args).items():
            started = time.perf_counter()
            scores = joint_surrogate(explainer, planned, **keywords)
            measured = ev.measure(planned, truth, scores, time.perf_counter() - started)
            methods[name] = {k: measured[k] for k in (*METRICS, "seconds")} | {"passes": keywords["budget"]}
        records.append({"id": ex.id, "n_units": n, "methods": methods})
        print(ex.id, n, {k: round(v["aopc_removal"], 2) for k, v in methods.items()}, flush=True)
    return records


def summary(records: list[dict], against: dict | None) -> dict:
    """Means per setting and, against every method of ``against``'s records (same example ids), paired intervals."""
    names = list(records[0]["methods"])
    keys = (*METRICS, "seconds", "passes")
    out = {name: {k: sum(r["methods"][name][k] for r in records) / len(records) for k in keys} for name in names}
    if against is None:
        return {"means": out}
    theirs = {e["id"]: e["methods"] for e in against["examples"]}
    joined = [{"methods": r["methods"] | theirs[r["id"]]} for r in records]
    diffs = {f"{name} - {other}": {k: paired(joined, name, other, k) for k in ("AP", "aopc_removal")}
             for name in names for other in theirs[records[0]["id"]]}  # fmt: skip
    return {"means": out, "paired": diffs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--granularity", default="sentence")
    parser.add_argument("--sample", type=int, default=16)
    parser.add_argument("--data", default=str(SQUAD_DEV), help="SQuAD JSONL (default: the bundled 76 examples)")
    parser.add_argument("--limit", type=int, help="only the sample's first N examples (a smoke run)")
    parser.add_argument("--multiples", default="1,2,4,8", type=lambda s: [int(x) for x in s.split(",")])
    numbers = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--factors", default=[AtManConfig().factor], type=numbers, help="the passes' factors")
    parser.add_argument("--alphas", default=[JOINT_ALPHA], type=numbers, help="LASSO penalties")
    parser.add_argument("--floor", type=int, default=0, help="at least this many passes for multiples above 1")
    parser.add_argument("--against", help="an `atman eval squad --out` JSON of the same examples")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    records = run(args)
    against = json.loads(Path(args.against).read_text()) if args.against else None
    result = {"model": args.model, "granularity": args.granularity, "sample": args.sample,
              "factors": args.factors, "alphas": args.alphas, "examples": records}  # fmt: skip
    Path(args.out).write_text(json.dumps(summary(records, against) | result, indent=1) + "\n")
    print(json.dumps(summary(records, against)["means"], indent=1))


if __name__ == "__main__":
    main()
