"""Tunes ``atman:joint`` (pipeline/atman/variants.py) on the evaluation's ``--sample 16`` only (issue 29: tune on the
sample, measure on all 76), without a forward pass per setting.

Per example it measures once: every unit's single-unit rise (exact AtMan's passes), ``POOL`` x units random joint
passes (``joint_masks``: the estimator's own masks, so a budget's first joint passes are the pool's first rows), and
the evaluation's LDS ablations (by suppression; ``--removal`` adds the removal rises, one unbatched forward each,
which on 2 busy cores cost minutes per example). Every setting (budget share of single-unit passes, LASSO penalty)
is then the estimator's computation replayed on those numbers: the same masks, the same first fit choosing the
single-unit passes, the same final fit; its mAP and LDS are those ``atman eval`` would report.
The AOPCs need a forward pass per ranking, so they are left to the evaluation of the chosen setting.

    .venv/bin/python bench/tune_joint.py --granularity sentence --out bench/eval/tune-joint-sentence.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from pipeline.atman.config import AtManConfig  # noqa: E402
from pipeline.atman.variants import joint_masks, sparse_fit  # noqa: E402
from pipeline.data import SQUAD_DEV  # noqa: E402
from pipeline.evaluate import LDS_KEEP, Ablations, SquadEval, average_precision, load_squad, spearman  # noqa: E402
from pipeline.models import load_model  # noqa: E402

POOL = 1.0
"""Random joint passes measured per example, as a multiple of its unit count (a budget of n spends at most n)."""
SHARES = (0.0, 0.25, 0.5, 0.75)
ALPHAS = (0.001, 0.01, 0.03, 0.1)


def _suppression_ablations(ev: SquadEval, planned) -> Ablations:
    """``ev.ablations`` without the removal rises (one plain forward each, unbatched: most of the cost on a CPU)."""
    n = len(planned.units)
    ids = planned.sweep_input.input_ids.cpu().numpy().astype(np.int64)
    rng = np.random.default_rng([ev.seed, zlib.crc32(ids.tobytes())])
    masks = (rng.random((ev.lds_masks, n)) < LDS_KEEP).astype(np.float64)
    dropped = [np.flatnonzero(m == 0) for m in masks]
    some = [i for i, d in enumerate(dropped) if d.size]
    suppressed = np.zeros(ev.lds_masks)
    suppressed[some] = ev._remover().suppressed_rise(planned, [dropped[i] for i in some])
    return Ablations(masks, suppressed, np.full(ev.lds_masks, np.nan))


def measure(ev: SquadEval, ex, removal: bool) -> dict:
    """One example's numbers: truth, single-unit rises, the joint pool (masks, rises), the LDS ablations."""
    planned, truth = ev.prepare(ex)
    explainer = ev.explainer(AtManConfig(granularity=ev.granularity))
    n = len(planned.units)
    singles = explainer.suppressed_rise(planned, [[i] for i in range(n)])
    masks = joint_masks(planned, max(1, round(POOL * n)))
    rises = explainer.suppressed_rise(planned, [np.flatnonzero(m) for m in masks])
    lds = ev.ablations(planned) if removal else _suppression_ablations(ev, planned)
    return {"truth": truth, "singles": singles, "masks": masks, "rises": rises, "lds": lds}


def replay(data: dict, share: float, alpha: float) -> np.ndarray:
    """``joint_surrogate``'s scores at budget = units, from the measured numbers."""
    n = len(data["singles"])
    n_single = min(n, round(share * n))
    masks, rises = data["masks"][: n - n_single], data["rises"][: n - n_single]
    first = sparse_fit(masks, rises, alpha) if len(masks) else np.zeros(n)
    chosen = np.sort(np.argsort(-first, kind="stable")[:n_single])
    masks = np.vstack([masks, np.eye(n, dtype=bool)[chosen]])
    rises = np.concatenate([rises, data["singles"][chosen]])
    return sparse_fit(masks, rises, alpha)


def metrics(data: dict, scores: np.ndarray) -> dict:
    lds = data["lds"]
    predicted = (1.0 - lds.masks) @ scores
    return {
        "AP": 100 * average_precision(scores, data["truth"]),
        "lds": spearman(predicted, lds.suppressed),
        "lds_removal": spearman(predicted, lds.removed) if np.isfinite(lds.removed).all() else float("nan"),
    }


def table(examples: list[dict]) -> list[dict]:
    """Mean metrics of exact AtMan and of every (share, alpha) setting over the examples."""
    rows = [{"setting": "atman (exact)", **_mean([metrics(d, d["singles"]) for d in examples])}]
    for share, alpha in itertools.product(SHARES, ALPHAS):
        per = [metrics(d, replay(d, share, alpha)) for d in examples]
        rows.append({"setting": f"joint share={share} alpha={alpha}", "share": share, "alpha": alpha, **_mean(per)})
    return rows


def _mean(per: list[dict]) -> dict:
    return {k: float(np.mean([p[k] for p in per])) for k in per[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--granularity", default="word")
    parser.add_argument("--sample", type=int, default=16)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", help="the engine's precision policy (fp32: TF32 off)")
    parser.add_argument("--removal", action="store_true", help="also the LDS by removal (one forward per ablation)")
    args = parser.parse_args()
    lm = load_model(args.model, dtype="float32", device=args.device)
    ev = SquadEval(lm, args.granularity, precision=args.precision, lds_masks=32)
    start, examples = time.perf_counter(), []
    for ex in load_squad(str(SQUAD_DEV), sample=args.sample):
        examples.append(measure(ev, ex, args.removal))
        print(f"{len(examples)}/{args.sample} {time.perf_counter() - start:.0f} s", flush=True)
    rows = table(examples)
    for row in rows:
        print(f"{row['setting']:36s} mAP {row['AP']:5.1f}  LDS {row['lds']:.3f}  LDS removal {row['lds_removal']:.3f}")
    result = {"model": lm.model_id, "granularity": args.granularity, "sample": args.sample, "pool": POOL,
              "device": str(lm.device), "precision": args.precision,
              "removal": args.removal, "seconds": time.perf_counter() - start, "rows": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
