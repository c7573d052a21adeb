"""Suppression inside attention, plugged into transformers' AttentionInterface (no per-model patch).

One attention function named ``atman`` is registered. A forward pass that carries an ``atman=<context>``
keyword hands every attention call to that context (the fast ``SweepAttention`` or the naive
``ReferenceAttention``); without it the model runs plain SDPA, so generation and ordinary use are unchanged.
The mask interface is registered as ``eager_mask`` so the attention function always receives the model's
explicit float mask (padding, causal, sliding window); without that registration transformers passes
``attention_mask=None`` and padding is silently ignored.

The three suppression forms (../shared/ATMAN.md, paper Eq. 4), for the pre-softmax score H_qk of a key k
with multiplier m_k (1 = untouched):
- multiplicative: (H_qk - min_q) * m_k + min_q, min over the keys the query can see;
- log_additive:   H_qk + log m_k;
- scale:          H_qk * m_k, identical to scaling key vector k by m_k.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

ATTN_NAME = "atman"
LOG_FLOOR = math.log(1e-30)
"""log m for m = 0 in log_additive: the limit m -> 0+. A key is removed unless every key a query sees is
suppressed, where renormalisation keeps the row as it was (instead of 0/0)."""


class AttentionContext(Protocol):
    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """query [B, H, Lq, d], key/value [B, KV, Lq, d] -> output [B, H, Lq, d]."""


def log_multiplier(m: torch.Tensor) -> torch.Tensor:
    return torch.log(m).clamp_min(LOG_FLOOR)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, KV, L, d] -> [B, KV * n_rep, L, d] (grouped-query attention)."""
    if n_rep == 1:
        return x
    b, kv, length, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, length, d).reshape(b, kv * n_rep, length, d)


def _atman_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    ctx: AttentionContext | None = kwargs.pop("atman", None)
    if ctx is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    unsupported = [k for k in ("softcap", "s_aux", "position_bias") if kwargs.get(k) is not None]
    if unsupported:
        raise NotImplementedError(f"AtMan attention does not support {', '.join(unsupported)} (model {module})")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = ctx.attend(module, query, key, value, attention_mask, scaling, kwargs.get("sliding_window"))
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the ``atman`` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_NAME, _atman_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)


def enable(model: torch.nn.Module) -> None:
    """Route ``model``'s attention through ``atman`` (plain SDPA when no context is passed)."""
    register()
    if getattr(model.config, "_attn_implementation", None) == ATTN_NAME:
        return
    try:
        model.set_attn_implementation(ATTN_NAME)
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(
            f"model: {type(model).__name__} does not use transformers' attention interface, "
            "so AtMan cannot suppress its attention"
        ) from err


def suppress_scores(scores: torch.Tensor, visible: torch.Tensor, mult: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply one suppression form to explicit scores.

    Args:
        scores: pre-softmax scores [B, H, Lq, Lk], float32.
        visible: bool [B, 1, Lq, Lk], the keys each query may attend to.
        mult: multipliers broadcastable to scores (1 = untouched).
    Returns: scores with invisible keys at -inf.
    """
    if mode == "multiplicative":
        row_min = scores.masked_fill(~visible, torch.inf).amin(dim=-1, keepdim=True)
        scores = torch.where(mult != 1, (scores - row_min) * mult + row_min, scores)
    elif mode == "log_additive":
        scores = scores + log_multiplier(mult)
    elif mode == "scale":
        scores = scores * mult
    else:
        raise ValueError(f"mode: {mode!r} is not one of multiplicative, log_additive, scale")
    return scores.masked_fill(~visible, -torch.inf)
