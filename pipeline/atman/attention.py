"""How suppression reaches every attention layer, and the proof that it did.

Two routes hand a layer's query/key/value to the active context (the fast ``SweepAttention`` or the naive
``ReferenceAttention``), both chosen only for the duration of ``activated(model)``, so the caller's model is
left as it was found:
- models that use transformers' AttentionInterface are switched to the attention function ``atman``;
- families whose attention modules ignore that interface get a small adapter (``families.py``).
The context is not passed through ``model(**kwargs)`` (some decoder layers drop extra keyword arguments) but set
in a context variable around one forward pass. Each attention call is counted per layer; after every pass
``attention.forward`` refuses unless every layer was reached exactly once, so a model on a route we do not
control raises ``UnsupportedModelError`` instead of returning unperturbed numbers as scores.

The three suppression forms (paper Eq. 4; README "How the engine works"), for the pre-softmax score H_qk of a key k with
multiplier m_k (1 = untouched); H is everything a model adds before the softmax but the mask (scaled QK^T,
logit soft-capping, ALiBi):
- multiplicative: (H_qk - min_q) * m_k + min_q, min over the keys the query can see;
- log_additive:   H_qk + log m_k;
- scale:          H_qk * m_k (with no ALiBi or soft-capping: identical to scaling key vector k by m_k);
- multiplicative_full_row: as multiplicative, min over every key of the pass, later (hidden) keys included: the
  authors' research code.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from pipeline.atman import families
from pipeline.atman.context import AttentionContext, active, attending  # also still importable from here
from pipeline.atman.errors import UnsupportedModelError

ATTN_NAME = "atman"
LOG_FLOOR = math.log(1e-30)
"""log m for m = 0 in log_additive: the limit m -> 0+. A key is removed unless every key a query sees is
suppressed, where renormalisation keeps the row as it was (instead of 0/0)."""

_ATTEND_DTYPE: ContextVar[torch.dtype | None] = ContextVar("atman_attend_dtype", default=None)
_IN_KERNEL: ContextVar[bool] = ContextVar("atman_in_kernel", default=False)


@contextmanager
def attend_in(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside the block, attention computes on query/key/value cast to ``dtype`` and hands back its output in the
    caller's dtype; ``in_kernel()`` is true while it computes, so a precision policy's torch-function mode
    (``precision.py``) leaves the kernel's own arithmetic alone."""
    token = _ATTEND_DTYPE.set(dtype)
    try:
        yield
    finally:
        _ATTEND_DTYPE.reset(token)


class _CastAttention:
    """``ctx`` with its inputs cast to ``dtype`` (``attend_in``); counts into ``ctx.calls``, the layer proof."""

    def __init__(self, ctx: AttentionContext, dtype: torch.dtype) -> None:
        self.ctx, self.dtype, self.calls = ctx, dtype, ctx.calls

    def attend(self, layer, query, key, value, **kwargs):
        out_dtype = query.dtype
        query, key, value = (t.to(self.dtype) for t in (query, key, value))
        token = _IN_KERNEL.set(True)
        try:
            out = self.ctx.attend(layer, query, key, value, **kwargs)
        finally:
            _IN_KERNEL.reset(token)
        return out.to(out_dtype)


def in_kernel() -> bool:
    """Whether an attention call cast by ``attend_in`` is computing now."""
    return _IN_KERNEL.get()


def num_layers(model: torch.nn.Module) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def forward(model: torch.nn.Module, ctx: AttentionContext, **inputs):
    """One forward pass of ``model`` with every attention call handed to ``ctx``; refuses (``UnsupportedModelError``
    naming the model class) unless every attention layer was reached exactly once."""
    dtype = _ATTEND_DTYPE.get()
    try:
        with attending(ctx if dtype is None else _CastAttention(ctx, dtype)):
            out = model(**inputs)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"model: {type(model).__name__}: {err}") from None
    _verify(model, ctx.calls)
    return out


def _verify(model: torch.nn.Module, calls: Counter) -> None:
    n = num_layers(model)
    if sorted(calls) == list(range(n)) and set(calls.values()) == {1}:
        return
    reached = ", ".join(f"{layer}x{count}" for layer, count in sorted(calls.items())) or "none"
    if any(count > 1 for count in calls.values()):
        why = "a layer's attention ran more than once in one pass (shared or repeated layers)"
    else:
        why = (
            "its attention uses neither transformers' attention interface nor an AtMan adapter "
            f"(adapters: {', '.join(_adapter_names())})"
        )
    raise UnsupportedModelError(
        f"model: {type(model).__name__}: suppression reached attention layers [{reached}] of {n}; {why}"
    )


def _adapter_names() -> list[str]:
    return sorted(families.ADAPTERS)


def log_multiplier(m: torch.Tensor) -> torch.Tensor:
    return torch.log(m).clamp_min(LOG_FLOOR)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, KV, L, d] -> [B, KV * n_rep, L, d] (grouped-query attention)."""
    if n_rep == 1:
        return x
    b, kv, length, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, length, d).reshape(b, kv * n_rep, length, d)


_REFUSED_KWARGS = {
    "s_aux": "attention sinks (s_aux)",
    "position_bias": "a learned relative position bias",
}


def _atman_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    ctx = active()
    if ctx is None:  # an ordinary forward pass while activated (e.g. generation): plain SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    refused = [why for name, why in _REFUSED_KWARGS.items() if kwargs.get(name) is not None]
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        refused.append(f"attention module {type(module).__name__} has no layer_idx")
    if refused:
        raise UnsupportedModelError(f"AtMan cannot suppress attention with {', '.join(refused)}")
    out = ctx.attend(
        layer,
        query,
        key,
        value,
        scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
        sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
        mask=attention_mask,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the ``atman`` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_NAME, _atman_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)


@contextmanager
def implementation(model: torch.nn.Module, name: str) -> Iterator[bool]:
    """Switch ``model`` to transformers' attention implementation ``name`` inside the block and back to its own on
    exit; yields whether the switch happened (a model that cannot switch is left as it is)."""
    before = getattr(model.config, "_attn_implementation", None)
    switched = False
    if before != name:
        tf_logger = logging.getLogger("transformers")
        level = tf_logger.level
        tf_logger.setLevel(logging.ERROR)  # models that cannot switch only log it; callers check what they need
        try:
            model.set_attn_implementation(name)
            switched = True
        except (ValueError, KeyError, AttributeError, ImportError):
            pass
        finally:
            tf_logger.setLevel(level)
    try:
        yield switched or before == name
    finally:
        if switched and before is not None:
            model.set_attn_implementation(before)


@contextmanager
def activated(model: torch.nn.Module) -> Iterator[None]:
    """Route ``model``'s attention through AtMan inside the block; restore it exactly on exit.

    Families with an adapter get it on their attention modules; every other model is switched to the ``atman``
    attention function and back to its own implementation afterwards. Whether the route took effect is not
    trusted: ``forward`` checks every pass.
    """
    register()
    patched = families.install(model)
    try:
        if patched:
            yield
        else:
            with implementation(model, ATTN_NAME):
                yield
    finally:
        families.uninstall(patched)


def suppress_scores(
    scores: torch.Tensor, visible: torch.Tensor, mult: torch.Tensor, mode: str, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply one suppression form to explicit scores.

    Args:
        scores: pre-softmax scores [B, H, Lq, Lk], float32.
        visible: bool [B, 1, Lq, Lk], the keys each query may attend to.
        mult: multipliers broadcastable to scores (1 = untouched).
        keys: bool, broadcastable to scores: every key of the pass (no padding), for `multiplicative_full_row`'s
            minimum over the whole row, causally hidden keys included.
    Returns: scores with invisible keys at -inf.
    """
    if mode in ("multiplicative", "multiplicative_full_row"):
        over = visible if mode == "multiplicative" else keys
        row_min = scores.masked_fill(~over, torch.inf).amin(dim=-1, keepdim=True)
        # (H - min) m + min written as H + (m - 1)(H - min): an untouched column (m = 1) keeps H exactly, and the
        # form has its derivative in m at m = 1 (the suppression gradient, gradient.py)
        scores = scores + (mult - 1) * (scores - row_min)
    elif mode == "log_additive":
        scores = scores + log_multiplier(mult)
    elif mode == "scale":
        scores = scores * mult
    else:
        raise ValueError(f"mode: {mode!r} is not one of multiplicative, log_additive, scale, multiplicative_full_row")
    return scores.masked_fill(~visible, -torch.inf)


def explicit_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    softcap: float | None,
    alibi: torch.Tensor | None,
    key_positions: torch.Tensor,
) -> torch.Tensor:
    """H in float32 [B, H, Lq, Lk]: scaled QK^T, soft-capped (Gemma 2), plus ALiBi slope * key position.

    ``key`` is already repeated to the query heads; ``key_positions`` [B, Lk] (or [Lk]) are absolute positions.
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi is not None:
        pos = key_positions.float().reshape(-1, 1, 1, key_positions.shape[-1])
        scores = scores + alibi.float()[None, :, None, None] * pos
    return scores


def visible_keys(positions: torch.Tensor, window: int | None, mask: torch.Tensor | None) -> torch.Tensor:
    """bool [1, 1, n, n] for one unpadded sequence at ``positions`` [n]: the model's own mask where it hands one over
    (bool, or additive: 0 = visible), else causal and sliding-window visibility, as the engine's sweep takes it."""
    n = len(positions)
    if mask is not None:
        mask = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        return mask[..., -n:].reshape(1, 1, n, n)
    q, k = positions[:, None], positions[None, :]
    vis = k <= q
    if window is not None:
        vis &= q - k < window
    return vis[None, None]


def eager_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    suppress: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Eager attention of one unpadded sequence, no cache: query [1, H, n, d], key/value [1, KV, n, d] -> [1, H, n, d]
    in query's dtype. Explicit float32 scores (``explicit_scores``, key positions 0..n-1), then ``suppress(scores,
    visible)`` where given (scores [1, H, n, n], visible bool [1, 1, n, n] from ``visible_keys``), the hidden keys at
    -inf, softmax, the value product in float32. The naive reference and the suppression gradient run on it."""
    n_rep = query.shape[1] // key.shape[1]
    positions = torch.arange(key.shape[2], device=query.device)
    scores = explicit_scores(query, repeat_kv(key, n_rep), scaling, softcap, alibi, positions)
    visible = visible_keys(positions, sliding_window, mask)
    if suppress is not None:
        scores = suppress(scores, visible)
    probs = torch.softmax(scores.masked_fill(~visible, -torch.inf), dim=-1)
    return torch.matmul(probs, repeat_kv(value, n_rep).float()).to(query.dtype)
