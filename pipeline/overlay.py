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
    if not explanation.image_units:
        raise ValueError("explanation: it has no image units (explain with images=[...] first)")
    if len(images) != len(explanation.images or []):
        raise ValueError(f"images: the explanation has {len(explanation.images)} images, got {len(images)}")
    scores = np.asarray(explanation.image_scores, dtype=np.float64)
    boxes = [(u.image, u.box) for u in explanation.image_units]
    return side_by_side(tint(images, boxes, scores))


def tint(images: list, boxes: list[tuple[int, tuple[float, float, float, float]]], scores) -> list:
    """Each image (PIL) with the summed scores of the boxes over it laid on; ``boxes``: (image index, box)."""
    from PIL import Image

    scores = np.asarray(scores, dtype=np.float64)
    heat = [np.zeros((im.height, im.width)) for im in images]
    for (index, (x0, y0, x1, y1)), score in zip(boxes, scores, strict=True):
        if np.isfinite(score):
            left, top = max(int(round(x0)), 0), max(int(round(y0)), 0)
            heat[index][top : int(round(y1)), left : int(round(x1))] += score
    peak = max(float(np.abs(h).max()) for h in heat) or 1.0
    out = []
    for image, h in zip(images, heat, strict=True):
        base = np.asarray(image.convert("RGB"), dtype=np.float64)
        colour = np.where(h[..., None] > 0, np.array([220.0, 30, 30]), np.array([30.0, 80, 220]))
        alpha = (MAX_ALPHA * np.abs(h) / peak)[..., None]
        out.append(Image.fromarray((base * (1 - alpha) + colour * alpha).round().astype(np.uint8)))
    return out


def side_by_side(images: list) -> object:
    from PIL import Image

    width = sum(im.width for im in images) + GAP * (len(images) - 1)
    canvas = Image.new("RGB", (width, max(im.height for im in images)), "white")
    left = 0
    for image in images:
        canvas.paste(image, (left, 0))
        left += image.width + GAP
    return canvas


def row_overlay(row: dict) -> tuple[object, str | None]:
    """The image map of an output row (schema v2): its image read from the row's ``image`` path or URI, tinted;
    where the image cannot be read (inline bytes are not stored in the output, or the file moved), a grey canvas
    of its size with the boxes tinted, and the reason as the second value."""
    from PIL import Image

    from pipeline.atman.multimodal import load_images
    from pipeline.layout import read_ref

    size = (int(row["image_width"]), int(row["image_height"]))
    image, why = None, None
    ref = row.get("image")
    if ref and ref != "<bytes>":
        try:  # a storage or image error: draw the boxes alone, and say why
            image = load_images([read_ref(ref)])[0]
            if image.size != size:
                image, why = None, f"{ref} is {image.width}x{image.height} now, not {size[0]}x{size[1]}"
        except ValueError as err:
            message = str(err)
            why = message.removeprefix("image: ") if message.startswith("image: ") else f"{ref}: {message}"
    elif ref == "<bytes>":
        why = "the image was inline bytes, which the output does not keep"
    if image is None:
        image = Image.new("RGB", size, (235, 235, 235))
    boxes = [(0, tuple(b)) for b in row["image_box"]]
    return tint([image], boxes, row["image_scores"])[0], why


def write_overlay(explanation, images: list, path: str | Path) -> Path:
    path = Path(path)
    overlay(explanation, images).save(path)
    return path
