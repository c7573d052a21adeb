"""Vision-language models: a request with images, as the language model sees it.

AtMan suppresses attention in the language model only (the paper's MAGMA and BLIP explanations do the same: the
image encoder runs unperturbed and its outputs are inputs like text tokens). The image encoder, projector and
merging of image features into the token sequence are each model's own code, so they are not reimplemented: the
model's forward runs once, unperturbed, and a hook on its language model records what it was handed:

- ``inputs_embeds``: text embeddings with the image features scattered in (LLaVA, Idefics3 / SmolVLM, Qwen2-VL,
  Gemma 3: each its own projector, pixel shuffle or patch merger);
- ``position_ids``: where the model computes its own (Qwen2-VL / Qwen2.5-VL's M-RoPE: three rows, temporal /
  height / width, with text positions resuming after an image at its largest index); absent = 0..n-1;
- ``attention_mask``: where the model builds a non-causal one (Gemma 3: the tokens of one image see each other in
  both directions). The mask is read, never assumed: a mask that is causal plus contiguous bidirectional blocks
  becomes ``blocks``; any other pattern is refused.

The sweep then runs the language model from these embeddings (``SweepInput.embeds``), and its unperturbed pass must
reproduce the target CE of this forward (``SweepInput.base_ce``), which checks positions, blocks and embeddings
together on every request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pipeline.atman.attention import UnsupportedModelError


@dataclass(frozen=True)
class Lifted:
    """What the language model receives for one request (batch of one, prompt + target): see the module docstring."""

    embeds: torch.Tensor  # [n, d]
    positions: torch.Tensor | None  # [n] or [k, n]
    blocks: torch.Tensor | None  # [n], -1 outside a block
    base_ce: torch.Tensor  # [T]


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack a VLM hands its merged embeddings to (``get_decoder()``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, torch.nn.Module) or decoder is model:
        raise UnsupportedModelError(
            f"model: {type(model).__name__} has no separate language model (get_decoder()); AtMan explains images "
            "through vision-language models whose language side is a transformers decoder"
        )
    return decoder


@torch.inference_mode()
def lift(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], n_target: int) -> Lifted:
    """Run ``model(**inputs)`` once (``inputs``: a processor's output for prompt + target, batch of one) and return
    what its language model was handed, with the unperturbed CE of the last ``n_target`` tokens."""
    ids = inputs["input_ids"]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"inputs: expected input_ids of one request [1, n], got {tuple(ids.shape)}")
    seen: dict = {}

    def record(_module, _args, kwargs):
        seen.update(kwargs)

    handle = language_model(model).register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = model(**inputs, use_cache=False)
    finally:
        handle.remove()
    n = ids.shape[1]
    embeds = seen.get("inputs_embeds")
    if embeds is None or tuple(embeds.shape[:2]) != (1, n):
        raise UnsupportedModelError(
            f"model: {type(model).__name__} did not hand its language model one embedding per token "
            f"(got {None if embeds is None else tuple(embeds.shape)} for {n} tokens)"
        )
    positions = seen.get("position_ids")
    if positions is not None:
        positions = positions[..., 0, :] if positions.dim() == 3 else positions[0]  # [k, 1, n] -> [k, n]; [1, n]
    logprobs = torch.log_softmax(out.logits[0, n - n_target - 1 : n - 1].float(), dim=-1)
    base_ce = -logprobs.gather(-1, ids[0, n - n_target :, None].to(logprobs.device))[:, 0]
    return Lifted(
        embeds=embeds[0].detach(),
        positions=None if positions is None else positions.detach().cpu(),
        blocks=blocks_from_mask(seen.get("attention_mask"), n, type(model).__name__),
        base_ce=base_ce.cpu(),
    )


def _visible(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.detach().cpu()
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def blocks_from_mask(mask, n: int, name: str = "model") -> torch.Tensor | None:
    """Bidirectional blocks ([n], -1 outside) from the mask(s) a model built for one request (None, a [1, 1, n, n]
    tensor, or a dict of them per layer type), or None when it is causal. Refuses any other pattern."""
    masks = [m for m in (mask.values() if isinstance(mask, Mapping) else [mask]) if torch.is_tensor(m)]
    masks = [m for m in masks if m.dim() == 4 and tuple(m.shape[-2:]) == (n, n)]
    if not masks:
        return None
    seen = torch.zeros(n, n, dtype=torch.bool)
    for m in masks:
        seen |= _visible(m)[0, 0]
    later = seen & torch.ones(n, n, dtype=torch.bool).triu(1)  # query q sees a key k > q
    if not later.any():
        return None
    reach = torch.where(later.any(dim=1), (later * torch.arange(n)).amax(dim=1), torch.arange(n))
    blocks = torch.full((n,), -1, dtype=torch.long)
    start, block = 0, 0
    while start < n:
        end = int(reach[start])
        i = start
        while i <= end:
            end = max(end, int(reach[i]))
            i += 1
        if end > start:
            blocks[start : end + 1] = block
            block += 1
        start = end + 1
    same = (blocks[:, None] >= 0) & (blocks[:, None] == blocks[None, :])
    expected_later = same & torch.ones(n, n, dtype=torch.bool).triu(1)
    if not torch.equal(later, expected_later):
        raise UnsupportedModelError(
            f"model: {name}: its attention mask lets tokens see later tokens in a pattern that is not causal with "
            "contiguous bidirectional blocks; AtMan cannot reproduce it"
        )
    return blocks
