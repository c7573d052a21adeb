"""An oracle for AtMan scores that shares nothing with the engine: not its units, its multipliers, its attention
routes, its masks or its scoring.

It runs an untouched copy of the model, one full forward pass per unit, and changes only the pre-softmax
attention scores, intercepted where the model's own code hands them to the softmax (eager attention) or to
``F.scaled_dot_product_attention`` (recomputed here naively from the query, key, value and mask the model
passes). Which keys a query may see is read off the model's own mask in that tensor, never computed from
positions. A second, even plainer oracle for log_additive feeds a 4D additive mask (causal + log m on the
suppressed columns) to models that accept one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MASKED = -1e9  # anything below this in a score row is a key the model's mask hides
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for a float64 model (finite differences need its precision: tests/test_gradient.py)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _suppress(x: torch.Tensor, mult: torch.Tensor, mode: str) -> torch.Tensor:
    """x: pre-softmax scores plus the model's mask [..., q, k] (float32); mult [k]."""
    visible = x > MASKED
    m = mult.to(x.device)
    if mode == "log_additive":
        new = x + torch.log(torch.clamp(m, min=1e-30))
    elif mode == "scale":
        new = x * m
    elif mode == "multiplicative":
        row_min = torch.where(visible, x, torch.full_like(x, math.inf)).min(dim=-1, keepdim=True).values
        new = (x - row_min) * m + row_min
    else:
        raise ValueError(mode)
    return torch.where(visible & (m != 1), new, x)


class Suppressing(TorchFunctionMode):
    """Inside the block, every [.., n, n] attention softmax and every SDPA call of the model sees its scores
    suppressed: column k multiplied by ``mult[k]`` in the form of ``mode``."""

    def __init__(self, mult: torch.Tensor, mode: str) -> None:
        super().__init__()
        self.mult, self.mode, self.hits = mult, mode, 0
        self.n = len(mult)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SOFTMAX and args[0].dim() == 4 and args[0].shape[-2:] == (self.n, self.n):
            self.hits += 1
            x = args[0]
            if kwargs.get("dtype") is not None:  # eager attention's softmax in float32: float64 for a float64 model
                kwargs = {**kwargs, "dtype": torch.promote_types(kwargs["dtype"], x.dtype)}
            return func(_suppress(_wide(x), self.mult, self.mode).to(x.dtype), *args[1:], **kwargs)
        if func is F.scaled_dot_product_attention:
            self.hits += 1
            return self._sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        x = (_wide(q) @ _wide(k).transpose(-1, -2)) * scale
        lq, lk = x.shape[-2:]
        if is_causal:
            x = x.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=x.device).tril(), -math.inf)
        if attn_mask is not None:
            x = x.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else x + _wide(attn_mask)
        x = _suppress(x, self.mult, self.mode)
        return (torch.softmax(x, dim=-1) @ _wide(v)).to(q.dtype)


def _target_ce(logits: torch.Tensor, ids: torch.Tensor, n_target: int) -> torch.Tensor:
    n = len(ids)
    logprobs = torch.log_softmax(_wide(logits[0]), dim=-1)
    return -logprobs[n - n_target - 1 : n - 1].gather(-1, ids[n - n_target :, None])[:, 0]


def unit_multipliers(tokenizer, prompt: str, units, n_target: int, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (prompt as raw text with the special tokens the tokenizer adds itself, e.g. Gemma's <bos>, then
    the target) and [U, n] multipliers: a token gets ``factor`` in unit u's pass when its character span overlaps
    the unit's span (a special token's span is empty: never suppressed)."""
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    n = len(enc["input_ids"]) + n_target
    mult = torch.ones(len(units), n)
    for u, (_, start, length) in enumerate(units):
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            if a < start + length and start < b:
                mult[u, t] = factor
    return torch.tensor(enc["input_ids"]), mult


@torch.inference_mode()
def oracle_scores(model, ids: torch.Tensor, mult: torch.Tensor, n_target: int, mode: str) -> np.ndarray:
    """[U] whole-target scores: CE with each unit suppressed minus the unperturbed CE, summed over the target."""
    base = _target_ce(model(ids[None]).logits, ids, n_target)
    out = []
    for m in mult:
        with Suppressing(m, mode) as hook:
            ce = _target_ce(model(ids[None]).logits, ids, n_target)
        assert hook.hits >= 1, "the oracle intercepted no attention: it would compare unperturbed numbers"
        out.append(float((ce - base).sum()))
    return np.array(out)


@torch.inference_mode()
def mask4d_scores(model, ids: torch.Tensor, mult: torch.Tensor, n_target: int) -> np.ndarray:
    """log_additive through the model's own 4D-mask input: causal + log m on the suppressed columns."""
    n = len(ids)
    hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
    causal = torch.zeros(n, n).masked_fill(hidden, torch.finfo(torch.float32).min)
    base = _target_ce(model(ids[None], attention_mask=causal[None, None]).logits, ids, n_target)
    out = []
    for m in mult:
        mask = (causal + torch.log(m.clamp(min=1e-30))[None, :]).masked_fill(hidden, torch.finfo(torch.float32).min)
        ce = _target_ce(model(ids[None], attention_mask=mask[None, None]).logits, ids, n_target)
        out.append(float((ce - base).sum()))
    return np.array(out)


@torch.inference_mode()
def oracle_vlm_scores(model, inputs: dict, mult: torch.Tensor, n_target: int, mode: str) -> np.ndarray:
    """[U] whole-target scores of a vision-language model: its own full forward (vision tower, projector, masks,
    positions) once per unit, with the suppression active inside its language model only."""
    decoder = model.get_decoder()
    ids = inputs["input_ids"][0]

    def run(m):
        hook = Suppressing(m, mode) if m is not None else None
        handles = []
        if hook is not None:  # hooks return None: a value would replace the decoder's inputs / outputs
            handles.append(decoder.register_forward_pre_hook(lambda *_: (hook.__enter__(), None)[1]))
            handles.append(decoder.register_forward_hook(lambda *_: (hook.__exit__(None, None, None), None)[1]))
        try:
            ce = _target_ce(model(**inputs, use_cache=False).logits, ids, n_target)
        finally:
            for h in handles:
                h.remove()
        assert hook is None or hook.hits >= 1, "the oracle intercepted no attention"
        return ce

    base = run(None)
    return np.array([float((run(m) - base).sum()) for m in mult])
