"""Requests with images: the model's processor lays out the images and the prompt, and each token of the
processor's sequence is traced back to the prompt's characters or to a box of an image.

Layout: the images come first, then the prompt (the usual visual question layout): through the processor's chat
template when the chat rule applies (a user turn whose content is the images, then the text), else the family's
image placeholder once per image, a newline, and the prompt. The processor expands each placeholder into the
image's tokens (hundreds, with tile and separator tokens for some families).

Text units: the templated text is tokenized by the processor's tokenizer with character offsets, without the
expansion; the expansion happens before the prompt, so the processor's sequence ends with the same tokens. Those
shared tokens carry the prompt's spans; a prompt token outside them (the processor tokenized differently around
the prompt) is refused. Image units: the tokens equal to the model's image token id, in order, one per patch of
``images.token_patches``.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.atman.attention import UnsupportedModelError
from pipeline.atman.images import check_processed_size
from pipeline.atman.prompts import PreparedPrompt, chat_decision
from pipeline.atman.request import check_prompt
from pipeline.atman.units import Span

MAX_PIXELS = 50_000_000  # a decompression bomb, not a photograph
_PLACEHOLDERS = {  # the text a family's processor expands into one image, where it is not its image token
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}


@dataclass(frozen=True)
class ImageRequest:
    """One prompt with its images, as the processor laid it out (target not included)."""

    prepared: PreparedPrompt  # prompt_ids: the processor's ids; token_spans: prompt spans of the text tokens
    extras: dict  # the processor's other outputs (pixel_values, image_grid_thw, token_type_ids, ...)
    sizes: list[tuple[int, int]]  # (width, height) of each original image
    image_positions: list[int]  # positions of the image tokens, in order
    geometry: dict  # what images.token_patches reads beyond ``extras`` (Idefics3's tile rows and columns)


def is_processor(obj) -> bool:
    """A multimodal processor (AutoProcessor of a VLM): a tokenizer and an image processor in one object."""
    return hasattr(obj, "image_processor") and hasattr(obj, "tokenizer") and callable(obj)


def load_images(images) -> list:
    """RGB PIL images from PIL images, paths or bytes, converted exactly as transformers' image processors convert
    them (``convert_to_rgb``: transparency composited onto white, every other mode to RGB), so the explained image
    is the one the model sees. A ValueError naming ``images[i]`` (and the path) for anything that is not a readable
    image of at most ``MAX_PIXELS`` pixels: one line, the same on every run."""
    if images is None or isinstance(images, (str, bytes, Path)) or not hasattr(images, "__iter__"):
        images = [images]
    out = [_load_one(image, f"images[{i}]") for i, image in enumerate(images)]
    if not out:
        raise ValueError("images: an empty list; leave images out to explain text only")
    return out


def _load_one(image, what: str):
    import warnings

    from PIL import Image, UnidentifiedImageError
    from transformers.image_transforms import convert_to_rgb

    if isinstance(image, (str, Path)):
        what = f"{what}: {image}"
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning (89-179 MP): refused below with our own line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(image, Image.Image):
                pil = image
            elif isinstance(image, (str, Path)):
                pil = Image.open(image)
            elif isinstance(image, (bytes, bytearray)):
                pil = Image.open(io.BytesIO(image))
            else:
                raise ValueError(f"{what}: expected a PIL image, a path or bytes, got {type(image).__name__}")
            if pil.width * pil.height > MAX_PIXELS:
                raise ValueError(f"{what}: {pil.width}x{pil.height} is over {MAX_PIXELS:,} pixels")
            return Image.fromarray(convert_to_rgb(pil, return_numpy=True))
    except FileNotFoundError:
        raise ValueError(f"{what} does not exist") from None
    except Image.DecompressionBombError as err:  # a header claiming over ~179 MP: Pillow refuses to open it
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "its size"
        raise ValueError(f"{what}: {size} is over {MAX_PIXELS:,} pixels") from None
    except UnidentifiedImageError:
        raise ValueError(f"{what}: not a readable image (no image format Pillow knows)") from None
    except (OSError, SyntaxError, struct.error, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith(what):
            raise
        raise ValueError(f"{what}: not a readable image ({type(err).__name__}: {_plain(err)})") from None


def _plain(err: Exception) -> str:
    """An error's text without object addresses (``<_io.BytesIO object at 0x7f...>``), so one bad image reads the
    same on every run (a nightly diff compares messages)."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the image", str(err))


def image_token_id(model) -> int:
    config = model.config
    token = getattr(config, "image_token_id", None)
    token = getattr(config, "image_token_index", None) if token is None else token
    if token is None:
        raise ValueError(f"model: {type(model).__name__}'s config names no image token id")
    return int(token)


def prepare_with_images(processor, model, prompt: str, images: list, chat: bool | None) -> ImageRequest:
    """Lay out ``images`` and ``prompt`` through ``processor`` (see the module docstring)."""
    check_prompt(prompt)
    kind = model.config.model_type
    tiles = kind in ("idefics3", "smolvlm")  # one list of images per text; a tile layout the geometry reads
    chat, reason = chat_decision(processor, prompt, chat)
    text = _with_images(processor, kind, prompt, len(images), chat)
    offset = text.rfind(prompt)
    if offset < 0:
        raise ValueError("chat: the chat template rewrites the prompt text, so units cannot be located; use chat=False")
    _check_sizes(model, processor, images)
    enc = processor(text=[text], images=[images] if tiles else images, return_tensors="pt")
    ids = enc["input_ids"][0]
    spans = _prompt_spans(processor, text, ids, prompt, offset)
    positions = (ids == image_token_id(model)).nonzero()[:, 0].tolist()
    extras = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    sizes = [image.size for image in images]
    geometry = dict(extras)
    if tiles:  # the tile layout the processor used (not one of its outputs)
        layout = processor.image_processor(images=[images], return_row_col_info=True)
        geometry.update(rows=layout["rows"], cols=layout["cols"])
    prepared = PreparedPrompt(prompt, chat, ids.clone(), spans, reason)
    return ImageRequest(prepared, extras, sizes, positions, geometry)


def _with_images(processor, kind: str, prompt: str, n_images: int, chat: bool) -> str:
    """The text the processor expands: the processor's chat template over one user turn of the images then the
    prompt, or without chat the family's image placeholders, a newline and the prompt."""
    if not chat:
        placeholder = _PLACEHOLDERS.get(kind) or getattr(processor, "boi_token", None) or processor.image_token
        return placeholder * n_images + "\n" + prompt
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    try:
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    except Exception as err:  # a text-only template (e.g. the tokenizer's) fails on image content
        raise ValueError(
            f"chat: the processor's chat template cannot lay out images ({type(err).__name__}: {err}); "
            "use chat=False (--no-chat)"
        ) from err


def _check_sizes(model, processor, images: list) -> None:
    """Each image bounded before the processor allocates anything: a ValueError naming ``images[i]``, except the
    refusal of a model whose geometry is not known (the model's fault, not the image's)."""
    for i, image in enumerate(images):
        try:
            check_processed_size(model, processor.image_processor, image.size)
        except UnsupportedModelError:  # the model, not this image
            raise
        except ValueError as err:
            raise ValueError(f"images[{i}]: {err}") from None


def _prompt_spans(processor, text: str, ids: torch.Tensor, prompt: str, offset: int) -> list[Span | None]:
    """Each token of ``ids`` (the processor's, images expanded) -> its character span in ``prompt`` (found at
    ``offset`` of ``text``), or None. Read from the tokenizer's offsets of ``text``, whose tokens after the images
    are the processor's last ones; a prompt token outside that shared tail is a ValueError naming ``images``."""
    tok = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    plain = tok["input_ids"]
    shared = 0
    while shared < min(len(plain), len(ids)) and plain[-1 - shared] == int(ids[-1 - shared]):
        shared += 1
    shift = len(ids) - len(plain)
    spans: list[Span | None] = [None] * len(ids)
    for t, (a, b) in enumerate(tok["offset_mapping"]):
        a, b = max(a, offset) - offset, min(b, offset + len(prompt)) - offset
        if a >= b:
            continue
        if t < len(plain) - shared:
            raise ValueError(
                "images: the processor tokenizes the text around the prompt differently from its tokenizer, so "
                "the prompt's units cannot be located"
            )
        spans[t + shift] = (a, b)
    return spans


def model_inputs(request: ImageRequest, target_ids: torch.Tensor, device, dtype: torch.dtype) -> dict:
    """The model's inputs for prompt + target: the processor's outputs, per-token ones (token type ids) extended
    over the target with 0 (text), pixel values in the model's dtype."""
    ids = torch.cat([request.prepared.prompt_ids, target_ids])
    n_prompt = len(request.prepared.prompt_ids)
    inputs = {"input_ids": ids[None].to(device)}
    for key, value in request.extras.items():
        if torch.is_tensor(value):
            if value.dim() == 2 and value.shape == (1, n_prompt):
                value = torch.cat([value, value.new_zeros(1, len(target_ids))], dim=1)
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        inputs[key] = value
    return inputs
