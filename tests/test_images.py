"""Image tokens -> boxes of the original image (pipeline/atman/images.py), checked through each family's real image
processor: the image's pixels encode their own coordinates (red = x, green = y), so the pixels the processor puts
into a token's block say where in the original they came from, and that must be the token's box."""

from __future__ import annotations

import numpy as np
import pytest
import transformers as tf
from PIL import Image

from pipeline.atman.attention import UnsupportedModelError
from pipeline.atman.images import ImagePatch, token_patches

SIZES = [(200, 150), (120, 230)]  # landscape and portrait, both edges < 256 so a channel holds a coordinate


def coordinate_image(width: int, height: int) -> Image.Image:
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8))


def decode(ip, block: np.ndarray) -> np.ndarray:
    """Processed pixel values [3, h, w] -> original 0-255 values [3, h, w]."""
    mean, std = np.asarray(ip.image_mean)[:, None, None], np.asarray(ip.image_std)[:, None, None]
    return (block * std + mean) / ip.rescale_factor


class Model:  # token_patches reads only the config
    def __init__(self, config) -> None:
        self.config = config


def llava():
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(patch_size=14, image_size=224))
    ip = tf.CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})

    def blocks(out, i):
        pv = out["pixel_values"][i].numpy()
        return [pv[:, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] for r in range(16) for c in range(16)]

    return Model(config), ip, blocks


def gemma3():
    config = tf.Gemma3Config(mm_tokens_per_image=64)
    ip = tf.Gemma3ImageProcessorPil(size={"height": 224, "width": 224})

    def blocks(out, i):
        pv = out["pixel_values"][i].numpy()
        return [pv[:, r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28] for r in range(8) for c in range(8)]

    return Model(config), ip, blocks


def qwen(config_cls):
    def build():
        ip = tf.Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2)

        def blocks(out, i):
            grids = out["image_grid_thw"].tolist()
            first = sum(t * h * w for t, h, w in grids[:i])
            _, gh, gw = grids[i]
            patches = out["pixel_values"][first : first + gh * gw].numpy().reshape(-1, 3, 2, 14, 14)[:, :, 0]
            out_blocks = []
            for j in range(gh * gw // 4):  # one token per 2 x 2 patches, stored consecutively
                quad = patches[4 * j : 4 * j + 4]
                top, bottom = np.concatenate(quad[:2], axis=2), np.concatenate(quad[2:], axis=2)
                out_blocks.append(np.concatenate([top, bottom], axis=1))
            return out_blocks

        return Model(config_cls()), ip, blocks

    return build


def idefics3():
    config = tf.Idefics3Config(vision_config=dict(patch_size=14, image_size=364), scale_factor=2)
    ip = tf.Idefics3ImageProcessorPil(size={"longest_edge": 728}, max_image_size={"longest_edge": 364})
    side, cell = 13, 28

    def blocks(out, i):  # one sample: every image's views in a row (its tiles, then its global view)
        counts = [r * c + 1 for r, c in zip(out["rows"][0], out["cols"][0], strict=True)]
        views = out["pixel_values"][0].numpy()
        return [
            views[v][:, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
            for v in range(sum(counts[:i]), sum(counts[: i + 1]))
            for r in range(side)
            for c in range(side)
        ]

    return Model(config), ip, blocks


FAMILIES = {
    "llava": llava,
    "gemma3": gemma3,
    "qwen2_vl": qwen(tf.Qwen2VLConfig),
    "qwen2_5_vl": qwen(tf.Qwen2_5_VLConfig),
    "idefics3": idefics3,
}


def process(name, ip, images):
    if name == "idefics3":  # one sample holding both images, with its tile layout
        return ip(images=[images], return_tensors="pt", return_row_col_info=True)
    return ip(images=images, return_tensors="pt")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_token_shows_its_box(name):
    model, ip, blocks = FAMILIES[name]()
    images = [coordinate_image(w, h) for w, h in SIZES]
    out = process(name, ip, images)
    per_image = token_patches(model, ip, SIZES, out)
    assert len(per_image) == len(SIZES)
    for i, ((width, height), patches) in enumerate(zip(SIZES, per_image, strict=True)):
        pixels = blocks(out, i)
        assert len(patches) == len(pixels), (name, i, len(patches), len(pixels))
        for patch, block in zip(patches, pixels, strict=True):
            assert patch.image == i and 0 <= patch.x0 < patch.x1 <= width + 1e-6
            assert 0 <= patch.y0 < patch.y1 <= height + 1e-6
            rgb = decode(ip, block)
            # one processed pixel spans this many original pixels: what resampling may blur across
            tol = 1.0 + max((patch.x1 - patch.x0) / block.shape[2], (patch.y1 - patch.y0) / block.shape[1])
            x, y = rgb[0].mean() + 0.5, rgb[1].mean() + 0.5  # a pixel's value is its index; its centre is +0.5
            assert abs(x - (patch.x0 + patch.x1) / 2) < tol, (name, patch, x)
            assert abs(y - (patch.y0 + patch.y1) / 2) < tol, (name, patch, y)
            assert abs(rgb[0].min() - patch.x0) < tol and abs(rgb[0].max() + 1 - patch.x1) < tol, (name, patch)
            assert abs(rgb[1].min() - patch.y0) < tol and abs(rgb[1].max() + 1 - patch.y1) < tol, (name, patch)


def test_unknown_families_are_refused():
    with pytest.raises(UnsupportedModelError, match="PaliGemma.*not mapped to boxes; supported: llava"):
        token_patches(type("PaliGemma", (), {"config": tf.PaliGemmaConfig()})(), None, [(10, 10)])


def test_patch_box():
    assert ImagePatch(0, 1.0, 2.0, 3.0, 4.0).box == (1.0, 2.0, 3.0, 4.0)
