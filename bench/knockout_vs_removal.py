"""What separates AtMan's knockout (log_additive at factor 0: the units' keys out of attention in every layer and
head) from removal (their tokens dropped from the input, as the removal AOPC and ContextCite do), measured (issue
29: the sentence-unit gap to ContextCite). With every key of the units out of attention nothing of theirs reaches
a later token, so knockout should equal removal with the kept tokens at their original positions
(``position_ids``), and the whole difference from removal should be the later tokens' position shift.

Per ``--sample`` example, over ``--masks`` random ablations (the evaluation's LDS ablations, ``SquadEval.ablations``:
each unit kept with probability 1/2), the target CE's rise under three operations: knockout (the engine at factor
0), removal (the evaluation's), and removal at the original positions (``SquadEval._removed_ce``). Reported: the largest
|knockout - removal at original positions| (nats; equal to the engine's precision if the reasoning holds), and
Spearman's correlation and the mean |difference| between knockout's rises and removal's.

    .venv/bin/python bench/knockout_vs_removal.py --granularity sentence --sample 16 \\
        --out bench/eval/knockout-vs-removal-smollm2-sentence-sample16.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from pipeline.data import SQUAD_DEV  # noqa: E402
from pipeline.evaluate import SquadEval, load_squad, spearman  # noqa: E402
from pipeline.models import load_model  # noqa: E402


def example(ev: SquadEval, ex) -> dict:
    """One example's ablations (the evaluation's LDS draw: ``ev.ablations``, knockout and removal rises) and, for each
    that ablates a unit, the rise with its tokens removed at the original positions."""
    planned, _ = ev.prepare(ex)
    data = ev.ablations(planned)
    some = [i for i, m in enumerate(data.masks) if (m == 0).any()]
    base = ev._base_ce(planned)
    kept = [ev._removed_ce(planned, np.flatnonzero(data.masks[i] == 0), keep_positions=True) - base for i in some]
    knockout, removal = data.suppressed[some], data.removed[some]
    return {
        "id": ex.id, "n_units": len(planned.units), "ablations": len(some),
        "max_abs_knockout_vs_original_positions": float(np.abs(knockout - np.array(kept)).max()),
        "spearman_knockout_removal": spearman(knockout, removal),
        "mean_abs_knockout_minus_removal": float(np.abs(knockout - removal).mean()),
        "mean_abs_removal": float(np.abs(removal).mean()),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--granularity", default="sentence")
    parser.add_argument("--sample", type=int, default=16)
    parser.add_argument("--limit", type=int, help="only the sample's first N examples")
    parser.add_argument("--data", default=str(SQUAD_DEV), help="SQuAD JSONL (default: the bundled 76 examples)")
    parser.add_argument("--masks", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lm = load_model(args.model)
    ev = SquadEval(lm, args.granularity, precision="fp32", lds_masks=args.masks)
    rows = []
    for ex in load_squad(args.data, sample=args.sample)[: args.limit]:
        rows.append(example(ev, ex))
        print(json.dumps(rows[-1]), flush=True)
    keys = [k for k in rows[0] if k not in ("id", "n_units", "ablations")]
    means = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    means["max_abs_knockout_vs_original_positions"] = max(r["max_abs_knockout_vs_original_positions"] for r in rows)
    result = {"model": args.model, "granularity": args.granularity, "sample": args.sample, "summary": means,
              "examples": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(means, indent=1))


if __name__ == "__main__":
    main()
