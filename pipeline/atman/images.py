"""Image units: each image token of a vision-language model mapped back to the box of the original image it shows.

A processor resizes (and crops, tiles or pads) an image, cuts it into patches, and the model merges neighbouring
patches into one token (LLaVA: none; Qwen2-VL: 2 x 2; Gemma 3: 4 x 4 average pooling; Idefics3 / SmolVLM: pixel
shuffle). A token therefore shows a rectangle of the processed image, which maps back to a rectangle of the
original through the processor's own geometry, per family:

- ``llava``: CLIP preprocessing: the shorter edge resized to ``size["shortest_edge"]`` (the longer one truncated
  to an int), a centre crop of ``crop_size``; the vision tower's ``patch_size`` grid, row-major;
- ``qwen2_vl`` / ``qwen2_5_vl``: ``smart_resize`` to multiples of ``patch_size * merge_size`` (the processor's
  ``image_grid_thw``); one token per ``merge_size`` x ``merge_size`` patches, row-major;
- ``gemma3``: resized to ``size`` (aspect not kept); ``mm_tokens_per_image`` tokens in a square grid, row-major;
- ``idefics3`` / ``smolvlm``: resized and split into ``rows x cols`` tiles of ``max_image_size`` plus the whole
  image as a global view, each ``(tile / patch_size / scale_factor)`` squared tokens, row-major; tiles first
  (row-major), then the global view.

Boxes are (x0, y0, x1, y1) in the original image's pixels, x to the right, y down; a box can be fractional.
``tests/test_images.py`` checks every family through its real image processor on images whose pixels encode their
own coordinates: the pixels the processor puts into each token's block come from that token's box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.atman.errors import UnsupportedModelError  # torch-free: this module stays light

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm")


@dataclass(frozen=True)
class ImagePatch:
    """The part of one image an image token shows. ``view``: "" for the image itself, "tile r,c" (0-based) for a
    tile of a split image, "global" for the downscaled whole image next to its tiles."""

    image: int
    x0: float
    y0: float
    x1: float
    y1: float
    view: str = ""

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class ImageUnit:
    """One image unit of a request: the box it covers (the union of its tokens' boxes) and its token positions."""

    patch: ImagePatch
    positions: tuple[int, ...]


def image_units(
    patches: list[list[ImagePatch]],
    positions: list[int],
    grid: tuple[int, int] | None,
    sizes: list[tuple[int, int]],
) -> list[ImageUnit]:
    """Units over the image tokens at ``positions`` (in sequence order, one per patch of ``patches`` flattened):
    each token alone, or with ``grid = (rows, cols)`` the tokens whose box centre falls in one cell of a rows x cols
    grid over the whole image (``sizes``: each image's width and height) together, across views (a region is
    suppressed wherever the image shows it); the unit's box is then its cell. A cell no token's centre falls in
    (outside a centre crop) has no unit."""
    flat = [p for per_image in patches for p in per_image]
    if len(flat) != len(positions):
        raise ValueError(
            f"images: the processor made {len(positions)} image tokens, the image geometry {len(flat)} patches"
        )
    if grid is None:
        return [ImageUnit(p, (pos,)) for p, pos in zip(flat, positions, strict=True)]
    rows, cols = grid
    cells: dict[tuple[int, int, int], list[tuple[ImagePatch, int]]] = {}
    for p, pos in zip(flat, positions, strict=True):
        w, h = sizes[p.image]
        r = min(int((p.y0 + p.y1) / 2 / h * rows), rows - 1)
        c = min(int((p.x0 + p.x1) / 2 / w * cols), cols - 1)
        cells.setdefault((p.image, r, c), []).append((p, pos))
    units = []
    for (image, r, c), members in sorted(cells.items()):
        w, h = sizes[image][0] / cols, sizes[image][1] / rows
        box = ImagePatch(image, c * w, r * h, (c + 1) * w, (r + 1) * h)
        units.append(ImageUnit(box, tuple(sorted(pos for _, pos in members))))
    return units


def _grid(image: int, width: float, height: float, rows: int, cols: int, left: float = 0.0, top: float = 0.0,
          view: str = "") -> list[ImagePatch]:  # fmt: skip
    """rows x cols equal cells over [left, left + width] x [top, top + height], row-major."""
    w, h = width / cols, height / rows
    return [
        ImagePatch(image, left + c * w, top + r * h, left + (c + 1) * w, top + (r + 1) * h, view)
        for r in range(rows)
        for c in range(cols)
    ]


def _value(x, key: str):
    return x[key] if isinstance(x, dict) else getattr(x, key)


def token_patches(
    model, image_processor, sizes: list[tuple[int, int]], processed: dict | None = None
) -> list[list[ImagePatch]]:
    """For each image (original ``(width, height)`` in ``sizes``), the patches its image tokens show, in the order
    of its tokens in the model's sequence. ``processed``: the processor's outputs for these images where the
    geometry is read from them (``image_grid_thw``; Idefics3's ``rows`` / ``cols``)."""
    kind = model.config.model_type
    if kind == "llava":
        return [_llava(i, size, model, image_processor) for i, size in enumerate(sizes)]
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        grids = processed["image_grid_thw"].tolist()
        merge = image_processor.merge_size
        return [_qwen(i, size, grid, merge) for i, (size, grid) in enumerate(zip(sizes, grids, strict=True))]
    if kind == "gemma3":
        if getattr(image_processor, "do_pan_and_scan", False):
            raise UnsupportedModelError("image: Gemma 3's pan-and-scan crops are not mapped to boxes yet; disable it")
        side = math.isqrt(int(model.config.mm_tokens_per_image))
        return [_grid(i, w, h, side, side) for i, (w, h) in enumerate(sizes)]
    if kind in ("idefics3", "smolvlm"):
        rows, cols = processed["rows"], processed["cols"]
        return [
            _idefics(i, size, rows[0][i] if isinstance(rows[0], list) else rows[i],
                     cols[0][i] if isinstance(cols[0], list) else cols[i], model, image_processor)
            for i, size in enumerate(sizes)
        ]  # fmt: skip
    raise _unsupported(model)


def _unsupported(model) -> Exception:
    return UnsupportedModelError(
        f"model: {type(model).__name__} ({model.config.model_type}): its image tokens are not mapped to boxes; "
        f"supported: {', '.join(FAMILIES)}"
    )


MAX_PROCESSED_PIXELS = 16_000_000
"""The most pixels one image may become inside the model's processor (a 4,000 x 4,000 image; 192 MB as float32
RGB). A shortest-edge resize (LLaVA's CLIP processor) makes a thin image huge before its centre crop: 1 x 100,000
becomes 336 x 33,600,000."""


def check_processed_size(model, image_processor, size: tuple[int, int]) -> None:
    """Refuse an image of ``size`` that the model's processor would blow up, from the processor's settings and
    before it runs: a ValueError naming the size when LLaVA's shortest-edge resize would make it over
    ``MAX_PROCESSED_PIXELS`` or when Qwen2-VL's processor would refuse its aspect ratio (over 200:1);
    ``UnsupportedModelError`` for a family whose geometry is not known. The other families' processors only
    shrink an image to a size of their own (Qwen2-VL's ``max_pixels``, Gemma 3's fixed size, Idefics3's longest
    edge), so the image as loaded (at most ``multimodal.MAX_PIXELS``) is the most they hold."""
    kind = model.config.model_type
    width, height = size
    if kind not in FAMILIES:
        raise _unsupported(model)
    if kind in ("qwen2_vl", "qwen2_5_vl") and max(size) > 200 * min(size):
        raise ValueError(f"{width}x{height}: Qwen2-VL's processor takes aspect ratios up to 200:1")
    if kind == "llava" and image_processor.do_resize:
        w, h = _shortest_edge(image_processor, width, height)
        if w * h > MAX_PROCESSED_PIXELS:
            raise ValueError(
                f"{width}x{height}: the model's processor would make it {w}x{h}, over {MAX_PROCESSED_PIXELS:,} "
                "pixels; crop or pad it to a less extreme shape"
            )


def _shortest_edge(ip, width: int, height: int) -> tuple[int, int]:
    """CLIP's resize: the shorter edge to ``size["shortest_edge"]``, the longer one scaled and truncated to an int."""
    short = _value(ip.size, "shortest_edge")
    return (short, int(short * height / width)) if width <= height else (int(short * width / height), short)


def _llava(image: int, size: tuple[int, int], model, ip) -> list[ImagePatch]:
    width, height = size
    if model.config.vision_feature_select_strategy != "default":
        raise UnsupportedModelError("image: LLaVA's 'full' feature strategy adds a class token without a box")
    new_w, new_h = float(width), float(height)
    if ip.do_resize:
        new_w, new_h = _shortest_edge(ip, width, height)
    left = top = 0
    crop_w, crop_h = new_w, new_h
    if ip.do_center_crop:
        crop_w, crop_h = _value(ip.crop_size, "width"), _value(ip.crop_size, "height")
        left, top = (new_w - crop_w) // 2, (new_h - crop_h) // 2
    patch = model.config.vision_config.patch_size
    sx, sy = width / new_w, height / new_h
    cells = _grid(image, crop_w, crop_h, int(crop_h) // patch, int(crop_w) // patch, left, top)
    return [ImagePatch(image, p.x0 * sx, p.y0 * sy, p.x1 * sx, p.y1 * sy) for p in cells]


def _qwen(image: int, size: tuple[int, int], grid: list[int], merge: int) -> list[ImagePatch]:
    t, gh, gw = grid
    if t != 1:
        raise UnsupportedModelError("image: a video's frames are not mapped to boxes")
    width, height = size
    return _grid(image, width, height, gh // merge, gw // merge)


def _idefics(image: int, size: tuple[int, int], rows: int, cols: int, model, ip) -> list[ImagePatch]:
    width, height = size
    tile = _value(ip.max_image_size, "longest_edge")
    side = tile // model.config.vision_config.patch_size // model.config.scale_factor
    out = []
    for r in range(rows):
        for c in range(cols):
            w, h = width / cols, height / rows
            out += _grid(image, w, h, side, side, c * w, r * h, view=f"tile {r},{c}")
    return out + _grid(image, width, height, side, side, view="global" if rows * cols else "")
