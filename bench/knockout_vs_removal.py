"""What separates AtMan's knockout (log_additive at factor 0: the units' keys out of attention in every layer and
head) from removal (their tokens dropped from the input, as the removal AOPC and ContextCite do), measured (issue
29: the sentence-unit gap to ContextCite). With every key of the units out of attention nothing of theirs reaches
a later token, so knockout should equal removal with the kept tokens at their original positions
(``position_ids``), and the whole difference from removal should be the later tokens' position shift.

Per ``--sample`` example, over ``--masks`` random ablations drawn as the evaluation's LDS draws them (each unit kept
with probability 1/2), the target CE's rise under three operations: knockout (``Explainer.suppressed_rise`` at
factor 0, the engine), removal (the evaluation's), and removal at the original positions. Reported: the largest
|knockout - removal at original positions| (nats; equal to the engine's precision if the reasoning holds), and
Spearman's correlation and the mean |difference| between knockout's rises and removal's.

    .venv/bin/python bench/knockout_vs_removal.py --granularity sentence --sample 16 \\
        --out bench/eval/knockout-vs-removal-smollm2-sentence-sample16.json
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from pipeline.atman.config import AtManConfig  # noqa: E402
from pipeline.data import SQUAD_DEV  # noqa: E402
from pipeline.evaluate import LDS_KEEP, SquadEval, load_squad, spearman, target_logprob  # noqa: E402
from pipeline.models import load_model  # noqa: E402


def removed_ce(lm, ids: torch.Tensor, drop: set[int], n_target: int, keep_positions: bool) -> float:
    """Target CE with the ``drop`` positions' tokens removed; ``keep_positions``: the kept tokens at their original
    positions (``position_ids``), else renumbered 0.. as a plain shorter input."""
    keep = torch.tensor([i for i in range(len(ids)) if i not in drop], dtype=torch.long)
    kwargs = {"position_ids": keep[None].to(lm.device)} if keep_positions else {}
    kept = ids[keep].to(lm.device)
    with torch.no_grad():
        logits = lm.model(input_ids=kept[None], logits_to_keep=n_target + 1, **kwargs).logits
    return -float(target_logprob(logits, kept[-n_target:])[0])


def example(ev: SquadEval, lm, ex, n_masks: int) -> dict:
    planned, _ = ev.prepare(ex)
    n, ids, n_target = len(planned.units), planned.sweep_input.input_ids, planned.sweep_input.n_target
    rng = np.random.default_rng([0, zlib.crc32(ids.cpu().numpy().astype(np.int64).tobytes())])
    masks = rng.random((n_masks, n)) < LDS_KEEP
    sets = [np.flatnonzero(~m) for m in masks if (~m).any()]
    knockout = ev.explainer(AtManConfig(granularity=ev.granularity, factor=0.0)).suppressed_rise(planned, sets)
    base = removed_ce(lm, ids, set(), n_target, False)
    removal, at_positions = [], []
    for units in sets:
        drop = {p for u in units for p in planned.units[u].positions}
        removal.append(removed_ce(lm, ids, drop, n_target, False) - base)
        at_positions.append(removed_ce(lm, ids, drop, n_target, True) - base)
    removal, at_positions = np.array(removal), np.array(at_positions)
    return {
        "id": ex.id, "n_units": n, "ablations": len(sets),
        "max_abs_knockout_vs_original_positions": float(np.abs(knockout - at_positions).max()),
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
    ev = SquadEval(lm, args.granularity, lds_masks=0, precision="fp32")
    rows = []
    for ex in load_squad(args.data, sample=args.sample)[: args.limit]:
        rows.append(example(ev, lm, ex, args.masks))
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
