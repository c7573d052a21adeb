"""Adapters for model families whose attention modules do not use transformers' AttentionInterface.

Each adapter is the attention module's forward with the score/softmax part handed to the active AtMan context:
the family's own projections, head layout, rotary embedding and output projection, then
``ctx.attend(layer, q, k, v, ...)``. They are installed on the module instances only while
``attention.activated`` runs, and fall back to the module's own forward when no context is active. On a model
dispatched by accelerate (``device_map``) an adapter goes inside the module's hook, which still moves its inputs
to the module's device and loads offloaded weights; the ALiBi slopes are made on each query's device.
Everything model-specific in the engine is in this file; ``ADAPTERS`` lists it.

Adapters read the head layout from the model's config and the module's weights and call only the family's public,
module-level functions (``apply_rotary_pos_emb``, ``build_alibi_tensor``), never a module's private methods:
transformers changes those between minor releases (5.25 removed ``FalconAttention._split_heads``). A probe at
install time finds what each adapter reads; a module that lacks it, or whose projections do not match its config,
refuses the model with ``UnsupportedModelError`` naming the class and what is missing, never a traceback.
Dropout is left out: the explainer refuses a model in training mode.

The engine never trusts an adapter to be complete: ``attention.forward`` counts the calls per layer, and
tests/test_families.py checks each family against an oracle that runs the untouched model.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.atman.context import active
from pipeline.atman.errors import UnsupportedModelError


class _Missing(Exception):
    """A piece of the module or its config that an adapter reads is not there (or not the shape it expects)."""


def _cfg(config, *names: str):
    """``config``'s fields ``names`` (text config of the model); ``_Missing`` naming the first absent one."""
    values = []
    for name in names:
        if getattr(config, name, None) is None:
            raise _Missing(f"config.{name}")
        values.append(getattr(config, name))
    return values[0] if len(values) == 1 else values


def _linear(module: torch.nn.Module, name: str, out_features: int) -> torch.nn.Module:
    """The projection submodule ``name`` of ``module``, checked to produce ``out_features`` (the head layout the
    config implies): a module whose weights no longer match its config is refused, never split wrongly."""
    proj = getattr(module, name, None)
    weight = getattr(proj, "weight", None)
    if not isinstance(proj, torch.nn.Module) or not torch.is_tensor(weight) or weight.dim() != 2:
        raise _Missing(f"a linear projection {name}")
    if weight.shape[0] != out_features:
        raise _Missing(f"{name} with {out_features} outputs (it has {weight.shape[0]})")
    return proj


def _family_function(module: torch.nn.Module, name: str) -> Callable:
    """A module-level function of the family's modeling file (``build_alibi_tensor``, ``apply_rotary_pos_emb``)."""
    fn = getattr(sys.modules[type(module).__module__], name, None)
    if not callable(fn):
        raise _Missing(f"the function {name} in {type(module).__module__}")
    return fn


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, heads * d] -> [B, heads, L, d]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, d] -> [B, L, H * d]."""
    return x.transpose(1, 2).flatten(-2)


@functools.cache
def _slopes(build_alibi: Callable, num_heads: int, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """[H] ALiBi slopes (times ``scale``) exactly as the family's own ``build_alibi_tensor`` makes them (Falcon
    rounds them to bfloat16): the bias it builds for two unpadded tokens is 0 at position 0 and the slope at
    position 1. Computed once per family, head count and device, not in every layer of every forward pass; asked
    for on the query's device, since a dispatched model's layers compute on several devices (and an offloaded
    layer's own weights are on ``meta`` between calls)."""
    ones = torch.ones(1, 2, dtype=torch.long, device=device)
    return build_alibi(ones, num_heads, torch.float32).reshape(num_heads, 2)[:, 1] * scale


def _alibi(layer: _Layer, query: torch.Tensor) -> torch.Tensor | None:
    """The layer's ALiBi slopes on ``query``'s device (None without ALiBi)."""
    if "alibi" not in layer.extra:
        return None
    build, scale = layer.extra["alibi"]
    return _slopes(build, layer.heads, query.device, scale)


def _alibi_probe(module: torch.nn.Module, heads: int, scale: float = 1.0) -> tuple[Callable, float]:
    """What ``_alibi`` needs, with the family's ``build_alibi_tensor`` run once on the CPU at install time, so a
    family whose function changed is refused before any pass."""
    build = _family_function(module, "build_alibi_tensor")
    _slopes(build, heads, torch.device("cpu"), scale)
    return build, scale


@dataclass(frozen=True)
class _Layer:
    """What an adapter reads of one attention module, found once by the probe (``install``) from the model's
    config and the module's weights: its layer, head layout and projections, never the module's private methods."""

    index: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv: tuple[torch.nn.Module, ...]  # one fused projection, or q, k, v
    out: torch.nn.Module
    extra: dict


def _gpt_neo_layer(module, config, index) -> _Layer:
    """GPTNeoSelfAttention: separate q/k/v projections of ``num_heads`` heads; ``config.attention_layers`` says
    which layers are ``local`` (a window of ``config.window_size`` positions)."""
    hidden, heads, kinds = _cfg(config, "hidden_size", "num_heads", "attention_layers")
    qkv = tuple(_linear(module, name, hidden) for name in ("q_proj", "k_proj", "v_proj"))
    window = _cfg(config, "window_size") if kinds[index] == "local" else None
    return _Layer(index, heads, heads, hidden // heads, qkv, _linear(module, "out_proj", hidden), {"window": window})


def _gpt_neo(layer: _Layer, ctx, hidden_states, *args, **kwargs):
    """Unscaled scores (GPT-Neo has no 1/sqrt(d)); ``local`` layers see a sliding window."""
    q, k, v = (_split(proj(hidden_states), layer.heads) for proj in layer.qkv)
    out = ctx.attend(layer.index, q, k, v, scaling=1.0, sliding_window=layer.extra["window"])
    return layer.out(_merge(out)), None


def _bloom_layer(module, config, index) -> _Layer:
    """BloomAttention: fused q/k/v laid out per head as [heads, 3, d]; ALiBi slopes from ``build_alibi_tensor``."""
    hidden, heads = _cfg(config, "hidden_size", "n_head")
    tp = (getattr(config, "pretraining_tp", 1) or 1) if getattr(config, "slow_but_exact", False) else 1
    alibi = _alibi_probe(module, heads)
    qkv = _linear(module, "query_key_value", 3 * hidden)
    return _Layer(
        index, heads, heads, hidden // heads, (qkv,), _linear(module, "dense", hidden), {"tp": tp, "alibi": alibi}
    )


def _bloom(layer: _Layer, ctx, hidden_states, residual, *args, **kwargs):
    """Scores QK^T / sqrt(d) + ALiBi; the residual is added inside the module; ``pretraining_tp`` slices summed
    without the bias where the config asks for ``slow_but_exact``, as Bloom does."""
    fused = layer.qkv[0](hidden_states).unflatten(-1, (layer.heads, 3, layer.head_dim)).transpose(1, 2)
    q, k, v = fused.unbind(3)  # [B, H, L, d] each
    out = _merge(ctx.attend(layer.index, q, k, v, scaling=layer.head_dim**-0.5, alibi=_alibi(layer, q)))
    tp = layer.extra["tp"]
    if tp > 1:
        from accelerate.utils import align_module_device

        step = out.shape[-1] / tp
        cols = [slice(int(i * step), int((i + 1) * step)) for i in range(tp)]
        with align_module_device(layer.out):  # its weight is read, not called: an offloaded one is loaded for this
            weight = layer.out.weight
            return residual + sum(torch.nn.functional.linear(out[..., c], weight[:, c]) for c in cols), None
    return residual + layer.out(out), None


def _falcon_layer(module, config, index) -> _Layer:
    """FalconAttention, every variant, by its config: the new decoder architecture (grouped: per kv head its
    queries, then its key and value), multi-query (all queries, one key, one value) or multi-head (per head q, k,
    v); rotary (``apply_rotary_pos_emb``), or ALiBi (``build_alibi_tensor``) for Falcon-RW."""
    hidden, heads = _cfg(config, "hidden_size", "num_attention_heads")
    if getattr(config, "new_decoder_architecture", False):
        kv, layout = _cfg(config, "num_kv_heads"), "grouped"
    elif getattr(config, "multi_query", False):
        kv, layout = 1, "multi_query"
    else:
        kv, layout = heads, "per_head"
    d = hidden // heads
    qkv = _linear(module, "query_key_value", (heads + 2 * kv) * d)
    extra = {"layout": layout}
    if getattr(config, "alibi", False):
        extra["alibi"] = _alibi_probe(module, heads, d**-0.5)
    else:
        extra["rotary"] = _family_function(module, "apply_rotary_pos_emb")
    return _Layer(index, heads, kv, d, (qkv,), _linear(module, "dense", hidden), extra)


def _falcon(layer: _Layer, ctx, hidden_states, *args, position_embeddings=None, **kwargs):
    """Scores QK^T / sqrt(d), plus slope * position / sqrt(d) with ALiBi (Falcon-RW, as its SDPA path)."""
    fused = layer.qkv[0](hidden_states).unflatten(-1, (-1, layer.head_dim))  # [B, L, heads + 2 kv, d]
    layout = layer.extra["layout"]
    if layout == "grouped":
        grouped = fused.unflatten(-2, (layer.kv_heads, -1))
        q, k, v = grouped[..., :-2, :].flatten(-3, -2), grouped[..., -2, :], grouped[..., -1, :]
    elif layout == "multi_query":
        q, k, v = fused.split([layer.heads, 1, 1], dim=-2)
    else:
        q, k, v = fused.unflatten(-2, (layer.heads, 3)).unbind(-2)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, heads or kv, L, d]
    if "rotary" in layer.extra:
        if position_embeddings is None:
            raise _Missing("the rotary position embeddings (position_embeddings) in the call")
        q, k = layer.extra["rotary"](q, k, *position_embeddings)
    out = ctx.attend(layer.index, q, k, v, scaling=layer.head_dim**-0.5, alibi=_alibi(layer, q))
    return layer.out(_merge(out)), None


ADAPTERS: dict[str, tuple[Callable, Callable]] = {
    "GPTNeoSelfAttention": (_gpt_neo_layer, _gpt_neo),
    "BloomAttention": (_bloom_layer, _bloom),
    "FalconAttention": (_falcon_layer, _falcon),
}
"""Attention module class name (or a base class's) -> (probe(module, text config, layer) -> _Layer,
adapter(layer, ctx, *forward args))."""


def _adapter_for(module: torch.nn.Module) -> tuple[Callable, Callable] | None:
    return next((ADAPTERS[c.__name__] for c in type(module).__mro__ if c.__name__ in ADAPTERS), None)


def _dispatch(module, layer, adapter, own_forward, *args, **kwargs):
    ctx = active()
    if ctx is None:
        return own_forward(*args, **kwargs)
    try:
        return adapter(layer, ctx, *args, **kwargs)
    except (_Missing, AttributeError, TypeError) as err:  # the family's call changed shape: refuse, never crash
        raise _refusal(module, str(err)) from None


def _refusal(module: torch.nn.Module, what: str) -> Exception:
    from transformers import __version__

    return UnsupportedModelError(
        f"{type(module).__name__} (transformers {__version__}) lacks what AtMan's adapter for it reads: {what}"
    )


def install(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, Callable | None]]:
    """Put adapters on every matching attention module of ``model`` (the n-th such module is layer n); returns what
    ``uninstall`` needs (empty when no module matched: the model then goes through the attention interface).

    Each module is probed first: a config field, a projection of the expected shape or a family function that is
    not there refuses the model (``UnsupportedModelError`` naming the class and what is missing), with nothing
    installed."""
    config = model.config.get_text_config()
    found = [(m, pair) for m in model.modules() if (pair := _adapter_for(m)) is not None]
    layers = []
    for index, (module, (probe, _)) in enumerate(found):
        try:
            layers.append(probe(module, config, index))
        except (_Missing, IndexError, TypeError) as err:
            raise UnsupportedModelError(f"model: {type(model).__name__}: {_refusal(module, str(err))}") from None
    patched = []
    for (module, (_, adapter)), layer in zip(found, layers, strict=True):
        slot = _slot(module)
        patched.append((module, slot, module.__dict__.get(slot)))  # None: the class's own forward
        setattr(module, slot, functools.partial(_dispatch, module, layer, adapter, getattr(module, slot)))
    return patched


def _slot(module: torch.nn.Module) -> str:
    """The attribute an adapter replaces: ``forward``, or, on a module accelerate placed (``device_map``), the
    ``_old_forward`` its ``AlignDevicesHook`` calls after moving the inputs to the module's device and loading its
    offloaded weights, so the adapter runs inside the hook and both still happen."""
    return "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"


def uninstall(patched: list[tuple[torch.nn.Module, str, Callable | None]]) -> None:
    for module, slot, own in patched:
        if own is None:
            delattr(module, slot)
        else:
            setattr(module, slot, own)
