"""AtMan's engine vs Captum occlusion at the same number of forward passes, on the same SQuAD examples and units.

    .venv/bin/python bench/bench_peers.py --examples 8 --out bench/peers.json
    .venv/bin/python bench/bench_peers.py --examples 1 --model DIR --data squad.jsonl

Both are exact per-unit perturbations: one pass per unit of the example plus the unperturbed one. AtMan
(``SquadEval.atman_scores`` under ``AtManConfig()``: its fast engine, ``batch_size`` rows per forward, prefix
reuse, target-only logits) suppresses the unit's attention columns; occlusion (``pipeline.peers.occlusion``,
Captum ``FeatureAblation``) replaces the unit's tokens by a space token and reruns the whole sequence,
``--batch`` ablated rows per forward (``perturbations_per_eval``; default 16, the engine's batch; 1 is the plain
``LLMAttribution`` path, which cannot batch). Units are the evaluation's (the context's words,
``SquadEval(lm).prepare``). Both run once on a short warm-up example first (untimed: the engine's support probe,
Captum's import), then alternate which goes first on each example, in one process and the same torch threads.
Wall time and the process's CPU time (all threads) are both reported: on a shared host the CPU time is the steadier
figure (``--threads 1`` steadier still: no thread waits for a descheduled sibling).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import captum
import numpy as np
import torch
import transformers

from pipeline import AtManConfig, load_model
from pipeline.data import SQUAD_DEV
from pipeline.evaluate import Example, SquadEval, load_squad
from pipeline.models import DEFAULT_MODEL
from pipeline.peers import occlusion

WARM_UP = Example(
    "warm-up",
    "The Eiffel Tower is in Paris. It was finished in 1889 and is made of iron.",
    "When was the Eiffel Tower finished?",
    [{"text": "1889", "answer_start": 49}],
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=8, help="the first N examples of --data")
    parser.add_argument("--data", default=str(SQUAD_DEV), help="SQuAD JSONL (default: the bundled dev subset)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded alias, Hugging Face id or directory")
    parser.add_argument("--batch", type=int, default=occlusion.BATCH, help="Captum perturbations_per_eval")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model, device="cpu")
    ev, cfg = SquadEval(lm), AtManConfig()
    methods = {
        "atman": lambda planned: ev.atman_scores(planned, cfg),
        "occlusion": lambda planned: occlusion.unit_scores(lm, planned, perturbations_per_eval=args.batch),
    }
    warm, _ = ev.prepare(WARM_UP)
    for score in methods.values():
        score(warm)

    load_before = os.getloadavg()
    rows = []
    for i, ex in enumerate(load_squad(args.data, limit=args.examples)):
        planned, _ = ev.prepare(ex)
        row = {"id": ex.id, "tokens": len(planned.sweep_input.input_ids), "units": len(planned.units)}
        row["passes"] = row["units"] + 1  # one per unit plus the unperturbed pass, for both
        for name in sorted(methods, reverse=i % 2 == 1):  # alternate the order: drift on a shared host hits both
            start, cpu = time.perf_counter(), time.process_time()
            scores = methods[name](planned)
            row[f"{name}_s"] = round(time.perf_counter() - start, 3)
            row[f"{name}_cpu_s"] = round(time.process_time() - cpu, 3)
            assert scores.shape == (len(planned.units),) and np.isfinite(scores).all()
        rows.append(row)
        print(f"{ex.id}: {row['units']} units, {row['tokens']} tokens: atman {row['atman_s']:.2f} s "
              f"(CPU {row['atman_cpu_s']:.1f}), occlusion {row['occlusion_s']:.2f} s "
              f"(CPU {row['occlusion_cpu_s']:.1f})",
              flush=True)  # fmt: skip

    atman = float(np.mean([r["atman_s"] for r in rows]))
    occl = float(np.mean([r["occlusion_s"] for r in rows]))
    atman_cpu = float(np.mean([r["atman_cpu_s"] for r in rows]))
    occl_cpu = float(np.mean([r["occlusion_cpu_s"] for r in rows]))
    passes = float(np.mean([r["passes"] for r in rows]))
    report = {
        "examples": len(rows),
        "data": args.data,
        "model": lm.model_id,
        "granularity": ev.granularity,
        "atman": {"config": "AtManConfig()", "batch_size": cfg.batch_size},
        "occlusion": {
            "captum": captum.__version__,
            "perturbations_per_eval": args.batch,
            "baseline_token": occlusion.baseline_token(lm.tokenizer),
        },
        "passes_per_example": passes,
        "atman_s_per_example": round(atman, 3),
        "occlusion_s_per_example": round(occl, 3),
        "occlusion_over_atman": round(occl / atman, 3),
        "atman_cpu_s_per_example": round(atman_cpu, 3),
        "occlusion_cpu_s_per_example": round(occl_cpu, 3),
        "occlusion_over_atman_cpu": round(occl_cpu / atman_cpu, 3),
        "atman_ms_per_pass": round(1000 * atman / passes, 2),
        "occlusion_ms_per_pass": round(1000 * occl / passes, 2),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "torch": torch.__version__,
        "per_example": rows,
    }
    print(f"{len(rows)} examples, {passes:.0f} passes each: atman {atman:.2f} s/example, occlusion {occl:.2f} "
          f"s/example, occlusion / atman = {occl / atman:.2f}x wall, {occl_cpu / atman_cpu:.2f}x CPU time")  # fmt: skip
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
