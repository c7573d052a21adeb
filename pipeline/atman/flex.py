"""The sweep's suppressed attention through FlexAttention (``AtManConfig.attention_kernel="flex"``).

The same numbers as ``SweepAttention.attend``'s sdpa / explicit-score branches, without a dense [B, 1, Lq, Lk] mask
or score matrix: the suppression is a ``score_mod`` applied inside the kernel to each (row, head, query, key) score,
and the visibility a ``mask_mod`` over the sweep's absolute positions, given to the kernel as a block-sparse mask.

score_mod, on the kernel's scaled QK^T s (in float32, as ``explicit_scores``), in this order:
- soft-capping (Gemma 2): s = tanh(s / cap) * cap;
- ALiBi (Bloom, Falcon-RW): s += slope_h * key position;
- the suppression of key k with multiplier m_k (1 = untouched): ``log_additive`` s + log m (``log_multiplier``, same
  floor), ``scale`` s * m, ``multiplicative`` / ``multiplicative_full_row`` (s - min_q) * m + min_q where m != 1.

The row minimum min_q of the multiplicative forms (over the keys q sees, or over every real key of the pass for
``_full_row``) cannot come out of one kernel pass, so it is computed first (``row_min``): QK^T of blocks of at most
``ROW_MIN_BLOCK`` scores (B x H x query chunk x key chunk), soft-capped, ALiBi added, masked, min-reduced into a
[B, H, Lq] float32 tensor the score_mod reads. The block mask is built the same way, one band of query blocks at a
time (``block_mask``), instead of ``create_block_mask``'s dense B x Lq x Lk visibility.

On CUDA the kernel is one ``torch.compile(flex_attention, dynamic=True)`` per process: batch size and lengths vary
from batch to batch, and static shapes would compile once per shape up to dynamo's recompile limit. Lengths are
padded up to a multiple of ``BUCKET`` as well (padded query slots see only themselves, padded keys nobody), so the
kernel's tiles are whole. The layers and batches of a sweep share one compiled kernel: the mask_mod always holds the
window (a tensor) and the block terms, and the unperturbed pass runs the same score_mod with every m = 1 (exact).
Elsewhere flex_attention runs eagerly (PyTorch's unfused reference, scores in float32): compiling it on a CPU costs
~17 s per shape. Only the kernel is compiled, never the model: the per-layer call count of ``SweepAttention.attend``
(the layer proof) runs in Python on every call.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from pipeline.atman.attention import explicit_scores, log_multiplier, repeat_kv

BUCKET = 128
"""Compiled kernels: query and key lengths are padded up to a multiple of this (fewer distinct shapes for the
compiler; the padding is masked)."""
MASK_BLOCK = 128
"""The block mask's tile (query and key): the kernel skips a tile nobody sees and skips the mask_mod on a full one."""
ROW_MIN_BLOCK = 1 << 24
"""At most this many float32 scores (64 MiB) exist at once while the multiplicative row minimum is computed."""
KEY_CHUNK = 1024
"""Keys per block of the row-minimum computation (fewer where B x H x KEY_CHUNK exceeds ``ROW_MIN_BLOCK``)."""
NO_WINDOW = 1 << 62
"""The window of a layer without one: wider than any distance between two positions."""
DEVICES = ("cuda", "cpu", "xpu", "hpu", "mps")
"""Device types flex_attention runs on."""


@dataclass(frozen=True)
class Layout:
    """A batch's absolute positions on one device, padded to the kernel's lengths (queries, then keys: the prefix,
    the suffix slots, padding); -1 marks a padded or hidden slot. ``own[j]`` is the key slot of query slot j (a
    padded query sees only that key)."""

    q_pos: torch.Tensor  # [B, lq]
    k_pos: torch.Tensor  # [B, lk]
    own: torch.Tensor  # [lq]
    mult: torch.Tensor  # [B, lk] float32 key multipliers (1 = untouched)
    log_mult: torch.Tensor  # [B, lk] log m, floored as log_additive floors it
    q_blk: torch.Tensor  # [B, lq] bidirectional block ids (-1: none)
    k_blk: torch.Tensor  # [B, lk]
    suffix: int  # the sweep's query slots (before padding)

    @property
    def lq(self) -> int:
        return self.q_pos.shape[1]

    @property
    def lk(self) -> int:
        return self.k_pos.shape[1]


def attend(ctx, query, key, value, *, scaling, sliding_window=None, softcap=None, alibi=None) -> torch.Tensor:
    """``SweepAttention.attend`` through flex_attention: query [B, H, Lq, d], key/value [B, KV, P + Lq, d] (the
    prefix already prepended) -> [B, H, Lq, d] in the query's dtype."""
    from torch._dynamo.exc import TorchDynamoException  # here, not at import: dynamo takes seconds to import

    device = query.device
    check(device)
    lay = layout(ctx, device)
    mask_mod, mask = _masks(ctx, lay, sliding_window, device)
    q, k, v = _pad(query, lay.lq), _pad(key, lay.lk), _pad(value, lay.lk)
    minimum = None
    if ctx.mode in ("multiplicative", "multiplicative_full_row"):
        if ctx.suppressing:
            over = mask_mod if ctx.mode == "multiplicative" else _real_keys(lay)
            minimum = row_min(q, k, scaling, softcap, alibi, lay.k_pos, over)
        else:  # every m is 1: the minimum is never read
            minimum = torch.zeros(q.shape[:3], device=device)
    kernel = _compiled() if device.type == "cuda" else flex_attention
    try:
        with _without_function_modes(), warnings.catch_warnings():
            # eager (off CUDA) is the exactness reference of the same arithmetic; its "unfused" advice is not news
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = kernel(
                q,
                k,
                v,
                score_mod=score_modification(lay, ctx.mode, minimum, softcap, alibi),
                block_mask=mask,
                scale=scaling,
                enable_gqa=query.shape[1] != key.shape[1],
            )
    except TorchDynamoException as err:  # tracing or compiling failed: refuse, never fall back
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"attention_kernel: 'flex' could not trace or compile the attention kernel on {device.type} "
            f"({type(err).__name__}: {first}); use attention_kernel 'sdpa'"
        ) from err
    return out[:, :, : lay.suffix].to(query.dtype)


@contextmanager
def _without_function_modes() -> Iterator[None]:
    """Inside the block no torch-function mode is active. flex_attention runs through dynamo, which traces the modes
    on the stack and cannot trace a precision policy's (``precision._Compute``, which leaves the attention kernel's
    arithmetic alone anyway: ``attention.in_kernel``); the modes are put back on exit."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode, _push_mode

    popped = [_pop_mode() for _ in _get_current_function_mode_stack()]
    try:
        yield
    finally:
        for mode in reversed(popped):
            _push_mode(mode)


def _masks(ctx, lay: Layout, window: int | None, device: torch.device) -> tuple[Callable, BlockMask]:
    """The mask_mod and block mask of ``window``, built once per pass and device: every layer with that window
    shares them."""
    key = ("mask", device, window)
    if key not in ctx.flex_cache:
        mask_mod = visibility(lay, window)
        ctx.flex_cache[key] = mask_mod, block_mask(mask_mod, lay.q_pos.shape[0], lay.lq, lay.lk, device)
    return ctx.flex_cache[key]


@functools.cache
def check(device: torch.device) -> None:
    """Refuse (``ValueError`` naming ``attention_kernel``) where flex_attention cannot run, rather than fall back to
    another kernel's numbers."""
    import torch._dynamo

    if device.type not in DEVICES:
        raise ValueError(
            f"attention_kernel: 'flex' runs on {', '.join(DEVICES)}, not on {device.type}; use attention_kernel 'sdpa'"
        )
    if not torch._dynamo.is_dynamo_supported():
        raise ValueError(
            "attention_kernel: 'flex' needs torch.compile (dynamo), which this Python / PyTorch does not support; "
            "use attention_kernel 'sdpa'"
        )


@functools.cache
def _compiled() -> Callable:
    """The compiled kernel, one per process: the attention kernel only, never the model."""
    return torch.compile(flex_attention, dynamic=True)


def _bucket(device: torch.device) -> int:
    """Lengths are padded to a multiple of this: ``BUCKET`` for the compiled kernel, 1 (none) for the eager one."""
    return BUCKET if device.type == "cuda" else 1


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, L, d] zero-padded along L to ``length``."""
    return x if x.shape[2] == length else F.pad(x, (0, 0, 0, length - x.shape[2]))


def layout(ctx, device: torch.device) -> Layout:
    """The batch's positions, blocks and multipliers on ``device``, padded to the kernel's lengths; cached on the
    context per device (every layer of the pass shares them)."""
    key = ("layout", device)
    if key not in ctx.flex_cache:
        suffix, prefix = ctx.q_pos.shape[1], ctx.prefix
        lq = _round_up(suffix, _bucket(device))
        lk = _round_up(prefix + lq, _bucket(device))

        def widen(x: torch.Tensor, length: int, fill) -> torch.Tensor:
            return F.pad(x.to(device), (0, length - x.shape[1]), value=fill)

        mult = widen(ctx.k_mult.float(), lk, 1.0)
        ctx.flex_cache[key] = Layout(
            q_pos=widen(ctx.q_pos, lq, -1),
            k_pos=widen(ctx.k_pos, lk, -1),
            own=torch.arange(prefix, prefix + lq, device=device),
            mult=mult,
            log_mult=log_multiplier(mult),
            q_blk=widen(ctx.q_blk, lq, -1),
            k_blk=widen(ctx.k_blk, lk, -1),
            suffix=suffix,
        )
    return ctx.flex_cache[key]


def visibility(lay: Layout, window: int | None) -> Callable:
    """``SweepAttention.visible`` as a mask_mod: key k is visible to query q when it is not later (or shares q's
    bidirectional block), both are real, and it is inside the window; a padded query sees only its own key slot.

    Written with tensor indexing only, so the same function runs inside the kernel (scalar indices) and on
    broadcast index tensors (``block_mask``, ``row_min``). Blocks and window are always in it (no blocks: ids -1;
    no window: ``NO_WINDOW``), the window a tensor: one compiled kernel serves every layer and batch of a sweep."""
    q_pos, k_pos, own, q_blk, k_blk = lay.q_pos, lay.k_pos, lay.own, lay.q_blk, lay.k_blk
    width = torch.tensor(NO_WINDOW if window is None else window, device=q_pos.device)

    def mask_mod(b, h, q, k):
        qp, kp, qb = q_pos[b, q], k_pos[b, k], q_blk[b, q]
        vis = (kp <= qp) | ((qb >= 0) & (qb == k_blk[b, k]))
        vis = vis & (kp >= 0) & (qp >= 0) & (torch.abs(qp - kp) < width)
        return vis | ((qp < 0) & (k == own[q]))

    return mask_mod


def _real_keys(lay: Layout) -> Callable:
    """The keys ``multiplicative_full_row`` takes its minimum over: every real key of the pass, hidden ones too."""
    k_pos = lay.k_pos

    def real(b, h, q, k):
        return k_pos[b, k] >= 0

    return real


def score_modification(
    lay: Layout, mode: str, minimum: torch.Tensor | None, softcap: float | None, alibi: torch.Tensor | None
) -> Callable:
    """The score_mod: soft-capping, ALiBi, then suppression form ``mode``, in the order of ``explicit_scores`` and
    ``suppress_scores``. ``minimum`` [B, H, lq]: the multiplicative forms' row minimum. An unperturbed pass (every m
    is 1) goes through the same function, exactly (+ log 1, * 1, or m != 1 nowhere), so it needs no kernel of its
    own."""
    if mode not in ("log_additive", "scale", "multiplicative", "multiplicative_full_row"):
        raise ValueError(f"mode: {mode!r} is not one of multiplicative, log_additive, scale, multiplicative_full_row")
    mult, log_mult, device = lay.mult, lay.log_mult, lay.k_pos.device
    # tensors, not Python floats: a dynamic-shape compile lifts a float to a tensor it reads back with .item()
    cap = torch.tensor(softcap, dtype=torch.float32, device=device) if softcap is not None else None
    slopes = alibi.to(device, torch.float32) if alibi is not None else None
    key_pos = lay.k_pos.float()

    def score_mod(s, b, h, q, k):
        if cap is not None:
            s = torch.tanh(s / cap) * cap
        if slopes is not None:
            s = s + slopes[h] * key_pos[b, k]
        if mode == "log_additive":
            s = s + log_mult[b, k]
        elif mode == "scale":
            s = s * mult[b, k]
        else:
            m, low = mult[b, k], minimum[b, h, q]
            s = torch.where(m != 1, (s - low) * m + low, s)
        return s

    return score_mod


def row_min(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    softcap: float | None,
    alibi: torch.Tensor | None,
    k_pos: torch.Tensor,
    over: Callable,
) -> torch.Tensor:
    """[B, H, Lq] float32: per query row, the minimum pre-softmax score (``explicit_scores``: scaled, soft-capped,
    ALiBi) over the keys ``over(b, h, q, k)`` admits. Computed in blocks of B x H x cq x ck <= ``ROW_MIN_BLOCK``
    scores (keys in chunks of at most ``KEY_CHUNK``), so the whole score matrix never exists."""
    b, h, lq, _ = query.shape
    lk, n_rep, device = key.shape[2], h // key.shape[1], query.device
    ck = max(1, min(lk, KEY_CHUNK, ROW_MIN_BLOCK // (b * h)))
    cq = max(1, min(lq, ROW_MIN_BLOCK // (b * h * ck)))
    rows = torch.arange(b, device=device)[:, None, None]
    out = torch.full((b, h, lq), math.inf, device=device)
    for q0 in range(0, lq, cq):
        qs = slice(q0, min(q0 + cq, lq))
        q_idx = torch.arange(qs.start, qs.stop, device=device)[None, :, None]
        low = out[:, :, qs]
        for k0 in range(0, lk, ck):
            ks = slice(k0, min(k0 + ck, lk))
            k_idx = torch.arange(ks.start, ks.stop, device=device)[None, None, :]
            scores = explicit_scores(
                query[:, :, qs], repeat_kv(key[:, :, ks], n_rep), scaling, softcap, alibi, k_pos[:, ks]
            )
            seen = over(rows, 0, q_idx, k_idx)[:, None]  # [B, 1, cq, ck]
            low = torch.minimum(low, scores.masked_fill(~seen, math.inf).amin(dim=-1))
        out[:, :, qs] = low
    return out


def block_mask(mask_mod: Callable, batch: int, lq: int, lk: int, device: torch.device) -> BlockMask:
    """The kernel's block-sparse mask of ``mask_mod``: per MASK_BLOCK x MASK_BLOCK tile, empty (skipped), full (no
    mask_mod) or partial. Evaluated one band of query tiles (and rows of the batch) at a time, at most
    ``ROW_MIN_BLOCK`` visibilities at once, instead of create_block_mask's dense B x lq x lk."""
    bs = MASK_BLOCK
    nq, nk = -(-lq // bs), -(-lk // bs)
    k_idx = torch.arange(nk * bs, device=device)[None, None, :]
    rows_per = max(1, ROW_MIN_BLOCK // (bs * nk * bs))
    seen = torch.zeros(batch, nq, nk, dtype=torch.bool, device=device)
    full = torch.zeros(batch, nq, nk, dtype=torch.bool, device=device)
    for t in range(nq):
        q_idx = torch.arange(t * bs, (t + 1) * bs, device=device)[None, :, None]
        inside = (q_idx < lq) & (k_idx < lk)
        for r0 in range(0, batch, rows_per):
            rows = torch.arange(r0, min(r0 + rows_per, batch), device=device)[:, None, None]
            vis = mask_mod(rows, 0, q_idx.clamp_max(lq - 1), k_idx.clamp_max(lk - 1)) & inside
            tiles = vis.view(len(rows), bs, nk, bs)
            seen[rows[:, 0, 0], t] = tiles.any(dim=3).any(dim=1)
            full[rows[:, 0, 0], t] = tiles.all(dim=3).all(dim=1)
    partial = (seen & ~full)[:, None]
    full = full[:, None]
    return BlockMask.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(lq, lk)
    )


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, 1, nq, nk] -> (tiles per query band, their key-tile indices first): the BlockMask layout."""
    count = tiles.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(tiles.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count, order
