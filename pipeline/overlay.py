"""The image half of an explanation as a picture: each image drawn with its units' scores laid over it.

Each pixel gets the sum of the scores of the units whose box covers it (a pixel that several views show, e.g.
Idefics3's tile and global view, sums them). Red = supported the target (suppressing it raised the target's CE),
blue = worked against it; the opacity is |sum| over the largest |sum| of all the images (so one picture compares
regions, and the strongest is the most opaque). Several images are drawn side by side, in order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_ALPHA = 0.65
GAP = 8  # pixels between images


def overlay(explanation, images: list) -> object:
    """A PIL image: ``images`` (PIL, in the explanation's order) side by side, each unit's box tinted by its score."""
    from PIL import Image

    if not explanation.image_units:
        raise ValueError("explanation: it has no image units (explain with images=[...] first)")
    if len(images) != len(explanation.images or []):
        raise ValueError(f"images: the explanation has {len(explanation.images)} images, got {len(images)}")
    scores = np.asarray(explanation.image_scores, dtype=np.float64)
    heat = [np.zeros((im.height, im.width)) for im in images]
    for unit, score in zip(explanation.image_units, scores, strict=True):
        if np.isfinite(score):
            x0, y0 = max(int(round(unit.x0)), 0), max(int(round(unit.y0)), 0)
            heat[unit.image][y0 : int(round(unit.y1)), x0 : int(round(unit.x1))] += score
    peak = max(float(np.abs(h).max()) for h in heat) or 1.0
    width = sum(im.width for im in images) + GAP * (len(images) - 1)
    canvas = Image.new("RGB", (width, max(im.height for im in images)), "white")
    left = 0
    for image, h in zip(images, heat, strict=True):
        base = np.asarray(image.convert("RGB"), dtype=np.float64)
        colour = np.where(h[..., None] > 0, np.array([220.0, 30, 30]), np.array([30.0, 80, 220]))
        alpha = (MAX_ALPHA * np.abs(h) / peak)[..., None]
        tinted = (base * (1 - alpha) + colour * alpha).round().astype(np.uint8)
        canvas.paste(Image.fromarray(tinted), (left, 0))
        left += image.width + GAP
    return canvas


def write_overlay(explanation, images: list, path: str | Path) -> Path:
    path = Path(path)
    overlay(explanation, images).save(path)
    return path
