"""Choosing AtMan's defaults on more than one model: the factor x kappa sweeps of several models, pooled.

Reads the per-example records of `atman eval sweep --records FILE` (one file per model; the first SmolLM2 sweep's
older records, with a "cells" map keyed "mode,factor,kappa", are read too) and prints a Markdown table: every
setting's mAP per model, the pooled mAP (every model weighs the same: the mean of the models' mAPs), and the pooled
mAP of each setting minus the library defaults' (AtManConfig()) with a 95 % bootstrap interval, resampling the
examples of each model (paired: the same examples for every setting of a model). Only settings every model ran are
compared.

    python bench/pool_sweeps.py smollm2-135m-instruct=bench/eval/sweep-sample16-log_additive.jsonl \\
        bench/eval/sweep-sample16-gemma3.records.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pipeline.atman.config import AtManConfig
from pipeline.evaluate import setting_name


def read(arg: str) -> tuple[str, dict[str, np.ndarray]]:
    """(model, {setting name: AP (0-100) per example, in the file's example order}) of ``[LABEL=]PATH``; the model
    is LABEL, else the records' own (the first sweep's records do not name it: the file's name then); the last line
    per id wins."""
    label, _, path = arg.rpartition("=")
    model, per_id = None, {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "cells" in record:  # the first sweep's records: {"mode,factor,kappa": numbers}
            cells = {}
            for key, numbers in record["cells"].items():
                _, factor, kappa = key.split(",")
                cells[setting_name(float(factor), None if kappa == "None" else float(kappa))] = numbers
            record = {**record, "methods": cells}
        model = record.get("model", model) or Path(path).stem
        per_id[record["id"]] = {name: numbers["AP"] for name, numbers in record["methods"].items()}
    names = set.intersection(*(set(m) for m in per_id.values()))
    return label or model, {name: np.array([m[name] for m in per_id.values()]) for name in sorted(names, key=_order)}


def _parts(name: str) -> tuple[str, str]:
    """("0.1", "off") of ``setting_name``'s "factor=0.1 kappa=off"."""
    factor, kappa = (part.split("=")[1] for part in name.split())
    return factor, kappa


def _order(name: str) -> tuple[float, float]:
    factor, kappa = _parts(name)
    return float(factor), -1.0 if kappa == "off" else float(kappa)


def pooled(models: dict[str, dict[str, np.ndarray]], resamples: int = 10_000, seed: int = 0) -> list[dict]:
    """Per setting: each model's mAP, the pooled mAP, and pooled minus the defaults' with a 95 % interval."""
    defaults = AtManConfig()
    reference = setting_name(defaults.factor, defaults.conceptual_threshold)
    common = [n for n in next(iter(models.values())) if all(n in m for m in models.values())]
    if reference not in common:
        raise SystemExit(f"the defaults ({reference}) are not in every sweep")
    rng = np.random.default_rng(seed)
    n = {model: len(ap[reference]) for model, ap in models.items()}
    draws = {model: rng.integers(0, n[model], (resamples, n[model])) for model in models}
    rows = []
    for name in common:
        per_model = {model: float(ap[name].mean()) for model, ap in models.items()}
        gains = {model: ap[name] - ap[reference] for model, ap in models.items()}
        boot = np.mean([gain[draws[model]].mean(1) for model, gain in gains.items()], axis=0)
        rows.append(
            {
                "setting": name,
                "per_model": per_model,
                "pooled": float(np.mean(list(per_model.values()))),
                "minus_defaults": float(np.mean([gain.mean() for gain in gains.values()])),
                "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                "defaults": name == reference,
            }
        )
    return rows


def markdown(models: dict[str, dict[str, np.ndarray]], rows: list[dict]) -> str:
    head = "| factor | κ | " + " | ".join(f"mAP {m} (n={len(next(iter(a.values())))})" for m, a in models.items())
    lines = [head + " | pooled mAP | pooled − defaults (95 % CI) |", "|---:|---|" + "---:|" * (len(models) + 2)]
    for r in rows:
        factor, kappa = _parts(r["setting"])
        lo, hi = r["ci95"]
        diff = "defaults" if r["defaults"] else f"{r['minus_defaults']:+.1f} ({lo:+.1f}, {hi:+.1f})"
        cells = [f"{v:.1f}" for v in r["per_model"].values()] + [f"{r['pooled']:.1f}", diff]
        lines.append(f"| {factor} | {kappa} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="+", help="Records files of `atman eval sweep --records`, one per model.")
    parser.add_argument("--out", help="Also write the table (Markdown) to this file.")
    args = parser.parse_args()
    models = dict(read(path) for path in args.records)
    if len(models) != len(args.records):
        raise SystemExit("two records files are of the same model")
    text = markdown(models, pooled(models))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
