"""Engine vs the naive reference on the embedded model (CPU), same prompt, same units, one process.

    make bench                      # 256-token prompt, 8 target tokens, token granularity, default config
    .venv/bin/python bench/bench_engine.py --prompt-tokens 128 --skip-reference

Prints both wall times, their ratio and the largest score difference (exactness at this size).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import transformers

from pipeline import AtManConfig, Explainer, load_model

TEXT = (
    "The river town of Alden grew up around a mill that ground wheat for three valleys. In spring the snowmelt "
    "raised the water until it touched the lowest beams of the bridge, and the miller's children counted the days "
    "until the first barges came down from the hills. Merchants brought salt, iron and wool; they left with flour, "
    "cheese and news. When the railway arrived, the barges stopped, the mill fell silent, and the town learned to "
    "live from its orchards instead. Today visitors come for the apple festival in October, when every house hangs "
    "a lantern in its window and the old mill is opened as a museum. The museum keeps the ledgers of the last "
    "miller, who wrote down the price of flour, the weather and the names of every bargeman who owed him money. "
    "Historians read those pages to understand how a small economy adjusted when the world around it changed, "
    "and schoolchildren read them to laugh at his complaints about the neighbours' goats. A retired engineer "
    "restored the waterwheel twelve years ago; on festival mornings it turns again, slowly, while a volunteer "
    "explains gears, sluices and millstones to anyone who will listen. North of the square, a bakery still uses "
    "a recipe for rye bread that appears on the first page of the ledger, although the owner admits she adds "
    "more honey than the miller ever could afford. Each autumn the council debates whether to widen the old "
    "bridge for buses, and each autumn the proposal fails by a handful of votes, because nobody wants to lose "
    "the view of the wheel from the water's edge. "
)
TARGET = " The festival draws thousands of visitors from the cities every year."


def fixed_length(tokenizer, text: str, n: int) -> str:
    """The first n tokens of ``text`` (natural prose, no repetition: repeats would inflate conceptual hits)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise ValueError(f"prompt-tokens: the benchmark text has only {len(ids)} tokens")
    ids = ids[:n]
    out = tokenizer.decode(ids)
    assert len(tokenizer(out, add_special_tokens=False)["input_ids"]) == n, "prompt does not round-trip to n tokens"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--target-tokens", type=int, default=8)
    parser.add_argument("--mode", default=AtManConfig().mode)
    parser.add_argument("--batch-size", type=int, default=AtManConfig().batch_size)
    parser.add_argument("--kappa", default=str(AtManConfig().conceptual_threshold), help="conceptual threshold or none")
    parser.add_argument("--skip-reference", action="store_true", help="time the engine only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    lm = load_model(device="cpu")
    prompt = fixed_length(lm.tokenizer, TEXT, args.prompt_tokens)
    target_ids = lm.tokenizer(TARGET, add_special_tokens=False)["input_ids"][: args.target_tokens]
    target = lm.tokenizer.decode(target_ids)
    kappa = None if args.kappa.lower() == "none" else float(args.kappa)
    cfg = dict(granularity="token", mode=args.mode, batch_size=args.batch_size, conceptual_threshold=kappa)

    def timed(engine: str):
        ex = Explainer(lm, AtManConfig(engine=engine, **cfg))
        start = time.perf_counter()
        e = ex.explain(prompt, target, chat=False)
        return e, time.perf_counter() - start

    fast, t_fast = timed("fast")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt_tokens": args.prompt_tokens,
        "target_tokens": len(target_ids),
        "units": len(fast.units),
        "config": cfg,
        "engine_s": round(t_fast, 2),
    }
    if not args.skip_reference:
        ref, t_ref = timed("reference")
        result |= {
            "reference_s": round(t_ref, 2),
            "speedup": round(t_ref / t_fast, 2),
            "max_abs_score_diff": float(np.abs(fast.scores - ref.scores).max()),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
