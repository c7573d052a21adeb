"""Image units: one pass per image token vs an image grid, on a small random LLaVA (shapes decide the cost, not the
weights: no VLM weights can be fetched here).

    .venv/bin/python bench/bench_images.py --out bench/images.json
    .venv/bin/python bench/bench_images.py --image-size 64 --repeats 1 --out /tmp/images.json   (quick)

The model: a CLIP vision tower (``--image-size`` px, 14 px patches: 256 image tokens at 224 px) and a Llama
language model (4 layers, d=256, the embedded model's tokenizer). Each setting explains the same prompt, image and
target ``--repeats`` times after one untimed warm-up; reported: units, passes, median seconds, and each grid's
speed-up over one unit per token, measured in the same process.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import numpy as np
import torch
import transformers as tf
from PIL import Image

from pipeline import AtManConfig, Explainer
from pipeline.models import DEFAULT_MODEL, converted_dir

PROMPT = "What is shown in the picture? Answer in one word."
TARGET = " a cat"


def build(image_size: int):
    tokenizer = copy.deepcopy(tf.AutoTokenizer.from_pretrained(converted_dir(DEFAULT_MODEL)))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=14,
        ),
        text_config=tf.LlamaConfig(
            hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
        ),
        image_token_id=image_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(config).eval()
    image_processor = tf.CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = tf.LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--grids", default="8x8,4x4", help="Comma-separated ROWSxCOLS grids to compare.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, processor = build(args.image_size)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8))
    explainer = Explainer(model, processor, AtManConfig())
    settings = [None, *args.grids.split(",")]
    results = {}
    for grid in settings:
        name = grid or "every token"
        explainer.explain(PROMPT, TARGET, images=[picture], chat=False, image_grid=grid)  # warm-up
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            e = explainer.explain(PROMPT, TARGET, images=[picture], chat=False, image_grid=grid)
            seconds.append(time.perf_counter() - start)
        units = len(e.units) + len(e.image_units)
        results[name] = {
            "image_units": len(e.image_units),
            "text_units": len(e.units),
            "passes": units + 1,
            "median_s": statistics.median(seconds),
            "seconds": seconds,
        }
        print(f"{name}: {len(e.image_units)} image units, {units + 1} passes, {statistics.median(seconds):.2f} s")
    base = results["every token"]["median_s"]
    for r in results.values():
        r["speedup_vs_every_token"] = base / r["median_s"]
    report = {
        "model": "random LLaVA: CLIP 2 layers d=128, Llama 4 layers d=256",
        "image_size": args.image_size,
        "prompt": PROMPT,
        "target": TARGET,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
        "torch": torch.__version__,
        "results": results,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
