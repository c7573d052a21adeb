"""Writes the synthetic box set (``boxes.jsonl`` and its PNGs) of `atman eval boxes`: on a grey 64 x 48 image, one
coloured square (red, green or blue, 16 px) at a different place each; question "What colour is the square?", target
the colour, ground-truth box the square. Deterministic: ``python pipeline/data/boxes/make.py`` rewrites the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent
COLOURS = {"red": (220, 20, 20), "green": (20, 180, 20), "blue": (20, 40, 220)}
PLACES = [(4, 4), (44, 4), (4, 28), (44, 28), (24, 16), (12, 20), (36, 8), (30, 30)]  # top-left corners (x, y)
SIDE, WIDTH, HEIGHT = 16, 64, 48


def main() -> None:
    names = list(COLOURS)
    rows = []
    for i, (x, y) in enumerate(PLACES):
        colour = names[i % len(names)]
        pixels = np.full((HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
        pixels[y : y + SIDE, x : x + SIDE] = COLOURS[colour]
        name = f"square-{i}.png"
        Image.fromarray(pixels).save(HERE / name, optimize=True)
        rows.append({"id": f"square-{i}", "image": name, "question": "What colour is the square?",
                     "target": f" {colour}", "boxes": [[x, y, x + SIDE, y + SIDE]]})  # fmt: skip
    (HERE / "boxes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
