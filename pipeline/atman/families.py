"""Adapters for model families whose attention modules do not use transformers' AttentionInterface.

Each adapter is the attention module's forward with the score/softmax part handed to the active AtMan context:
the family's own projections, head layout, rotary embedding and output projection, then
``ctx.attend(layer, q, k, v, ...)``. They are installed on the module instances only while
``attention.activated`` runs, and fall back to the module's own forward when no context is active.
Everything model-specific in the engine is in this file; ``ADAPTERS`` lists it.

The engine never trusts an adapter to be complete: ``attention.forward`` counts the calls per layer, and
tests/test_families.py checks each family against an oracle that runs the untouched model.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch

from pipeline.atman.attention import active


def _alibi_slopes(module: torch.nn.Module, num_heads: int) -> torch.Tensor:
    """[H] ALiBi slopes exactly as the family's own ``build_alibi_tensor`` makes them (Falcon rounds them to
    bfloat16): the bias it builds for two unpadded tokens is 0 at position 0 and the slope at position 1."""
    return _slopes(type(module).__module__, num_heads, next(module.parameters()).device)


@functools.cache
def _slopes(family_module: str, num_heads: int, device: torch.device) -> torch.Tensor:
    """Computed once per family, head count and device, not in every layer of every forward pass."""
    ones = torch.ones(1, 2, dtype=torch.long, device=device)
    return sys.modules[family_module].build_alibi_tensor(ones, num_heads, torch.float32).reshape(num_heads, 2)[:, 1]


def _gpt_neo(module, ctx, hidden_states, attention_mask=None, layer_past=None, use_cache=False, **kwargs):
    """GPTNeoSelfAttention: separate q/k/v projections, no 1/sqrt(d) scaling, `local` layers see the last
    ``config.window_size`` positions."""
    heads, d = module.num_heads, module.head_dim
    q, k, v = (
        module._split_heads(proj(hidden_states), heads, d) for proj in (module.q_proj, module.k_proj, module.v_proj)
    )
    window = module.config.window_size if module.attention_type == "local" else None
    out = ctx.attend(module.layer_id, q, k, v, scaling=1.0, sliding_window=window)
    out = module._merge_heads(out, heads, d)
    return module.resid_dropout(module.out_proj(out)), None


def _bloom(module, ctx, hidden_states, residual, alibi=None, attention_mask=None, layer_past=None, **kwargs):
    """BloomAttention: fused q/k/v, scores QK^T / sqrt(d) + ALiBi, the residual added inside the module."""
    q, k, v = module._reshape(module.query_key_value(hidden_states))  # [B, H, L, d]
    out = ctx.attend(
        module.layer_idx,
        q,
        k,
        v,
        scaling=module.inv_norm_factor,
        alibi=module.beta * _alibi_slopes(module, module.num_heads),
    )
    b, h, length, d = out.shape
    context = out.transpose(1, 2).reshape(b, length, h * d)
    if module.pretraining_tp > 1 and module.slow_but_exact:
        step = module.hidden_size / module.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(module.pretraining_tp):
            cols = slice(int(i * step), int((i + 1) * step))
            output = output + torch.nn.functional.linear(context[:, :, cols], module.dense.weight[:, cols])
    else:
        output = module.dense(context)
    output = torch.nn.functional.dropout(output, p=module.hidden_dropout, training=module.training)
    return residual + output, None


def _falcon(module, ctx, hidden_states, alibi=None, attention_mask=None, position_ids=None, layer_past=None,
            use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):  # fmt: skip
    """FalconAttention, every variant: multi-query, grouped (new decoder architecture) or multi-head; rotary, or
    ALiBi with H = (QK^T + slope * position) / sqrt(d) (Falcon-RW, as its SDPA path computes it)."""
    q, k, v = module._split_heads(module.query_key_value(hidden_states))  # [B, L, heads, d]
    b, length = q.shape[:2]
    kv_heads = module.num_heads if module.new_decoder_architecture else module.num_kv_heads
    q = q.transpose(1, 2).reshape(b, module.num_heads, length, module.head_dim)
    k = k.transpose(1, 2).reshape(b, kv_heads, length, module.head_dim)
    v = v.transpose(1, 2).reshape(b, kv_heads, length, module.head_dim)
    slopes = None
    if alibi is None:
        cos, sin = position_embeddings
        q, k = sys.modules[type(module).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    else:
        slopes = _alibi_slopes(module, module.num_heads) * module.inv_norm_factor
    out = ctx.attend(module.layer_idx, q, k, v, scaling=module.inv_norm_factor, alibi=slopes)
    out = out.transpose(1, 2).reshape(b, length, module.num_heads * module.head_dim)
    return module.dense(out), None


ADAPTERS: dict[str, Callable] = {
    "GPTNeoSelfAttention": _gpt_neo,
    "BloomAttention": _bloom,
    "FalconAttention": _falcon,
}
"""Attention module class name (or a base class's) -> adapter(module, ctx, *forward args)."""


def _adapter_for(module: torch.nn.Module) -> Callable | None:
    return next((ADAPTERS[c.__name__] for c in type(module).__mro__ if c.__name__ in ADAPTERS), None)


def _dispatch(module, adapter, own_forward, *args, **kwargs):
    ctx = active()
    if ctx is None:
        return own_forward(*args, **kwargs)
    return adapter(module, ctx, *args, **kwargs)


def install(model: torch.nn.Module) -> list[tuple[torch.nn.Module, Callable | None]]:
    """Put adapters on every matching attention module of ``model``; returns what ``uninstall`` needs (empty when
    no module matched: the model then goes through the attention interface)."""
    patched = []
    for module in model.modules():
        adapter = _adapter_for(module)
        if adapter is not None:
            patched.append((module, module.__dict__.get("forward")))  # an instance-level forward (accelerate hooks)
            module.forward = functools.partial(_dispatch, module, adapter, module.forward)
    return patched


def uninstall(patched: list[tuple[torch.nn.Module, Callable | None]]) -> None:
    for module, own in patched:
        if own is None:
            del module.forward
        else:
            module.forward = own
