"""The picture a user decides by: mAP against seconds per example, one point per method and model.

Reads the JSON results of `atman eval squad --out FILE` (one file per model; several granularities may be given
too) and writes a PNG, and with ``--markdown FILE`` the tables of docs/EVAL.md (one per result: every metric, and
AtMan's mAP minus each method's with its 95 % paired bootstrap interval, as the result file holds them):

    python bench/plot_eval.py bench/eval/smollm2-word.json bench/eval/gemma3-word.json --out docs/eval-map-vs-time.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def points(results: list[dict]) -> list[tuple[str, str, float, float]]:
    """(model label, method, seconds per example, mAP) of every method in every result."""
    out = []
    for r in results:
        label = f"{r['model']} ({r.get('granularity', '?')} units, n={r['n']})"
        for method, m in r["methods"].items():
            out.append((label, method, m["seconds_per_example"], m["mAP"]))
    return out


def markdown(results: list[dict]) -> str:
    """One Markdown table per result: mAP, mAR, IQ means, both AOPCs, both LDSs (— for a result made before the
    LDS), seconds per example, and AtMan - method."""
    blocks = []
    for r in results:
        head = f"**{r['model']}**, {r.get('granularity', '?')} units, n = {r['n']}"
        rows = [
            head,
            "",
            "| method | mAP | mAR | mAP IQ | mAR IQ | AOPC (nats) | AOPC removal | LDS | LDS removal | s / example "
            "| AtMan − method, mAP (95 % CI) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        differences = {pair.split(" - ", 1)[1]: d for pair, d in r.get("differences", {}).items()}
        for method, m in r["methods"].items():
            d = differences.get(method)
            diff = f"{d['mAP']:+.1f} ({d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f})" if d else "reference"
            metrics = [f"{m[k]:.1f}" for k in ("mAP", "mAR", "mAP_IQ", "mAR_IQ")]
            metrics += [f"{m[k]:.2f}" for k in ("aopc", "aopc_removal")]
            metrics += ["—" if m.get(k) is None else f"{m[k]:.3f}" for k in ("lds", "lds_removal")]
            metrics += [f"{m['seconds_per_example']:.2f}"]
            rows.append(f"| {method} | " + " | ".join(metrics) + f" | {diff} |")
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks) + "\n"


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    markers = "osD^v<>"
    labels = sorted({p[0] for p in points(results)})
    for i, label in enumerate(labels):
        mine = [p for p in points(results) if p[0] == label]
        xs = [max(p[2], 1e-3) for p in mine]  # random takes ~0 s: keep it on the log axis
        ax.scatter(xs, [p[3] for p in mine], marker=markers[i % len(markers)], s=50, label=label)
        for (_, method, _, y), x in zip(mine, xs, strict=True):
            ax.annotate(method, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per example (log scale; same machine and setup, see docs/EVAL.md)")
    ax.set_ylabel("mAP (share of relevance on the answer, 0-100)")
    ax.set_title("SQuAD dev subset: plausibility against cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON files written by `atman eval squad --json --out`.")
    parser.add_argument("--out", required=True, help="PNG to write.")
    parser.add_argument("--markdown", help="Also write the results' tables (Markdown) to this file.")
    args = parser.parse_args()
    results = [json.loads(Path(f).read_text()) for f in args.results]
    plot(results, args.out)
    print(f"wrote {args.out}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(results), encoding="utf-8")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
