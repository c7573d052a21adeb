"""The fast AtMan sweep: many suppression passes per forward, target-only logits, prefix reuse.

What one batch goes through (all exact, checked against ``reference.py`` in the tests):
1. Unperturbed pass per prompt: target cross-entropy, and the post-RoPE keys/values of every layer are kept.
2. Each suppression pass (a row: one prompt, one unit's key multipliers) only recomputes positions from its
   earliest suppressed token on; the keys/values before it are those of the unperturbed pass, because
   suppression never changes rows q < k (causal). Rows are sorted by suffix length and packed into batches;
   rows of one prompt in one batch share one prefix (no per-row copy).
3. Attention of the suffix queries over [prefix keys ; suffix keys] with a mask built from absolute positions
   (causal, sliding window, padding), so prompts of different lengths batch together with either padding side.
4. The LM head runs only at the positions that predict target tokens.

Vision-language requests (``pipeline/atman/vision.py``) come as the inputs the model's own forward handed its
language model: merged text and image embeddings, the rotary position ids (Qwen2-VL's M-RoPE: three rows), and
bidirectional blocks (Gemma 3: the tokens of one image see each other both ways). A block changes step 2: a
suppressed key k is seen by the rows q < k of its block, so a pass starts at the block's first position. The
model's own unperturbed target CE travels with such a request and the sweep's unperturbed pass must reproduce it.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from pipeline.atman import attention, devices, flex
from pipeline.atman.attention import UnsupportedModelError, explicit_scores, log_multiplier, repeat_kv, suppress_scores
from pipeline.atman.config import AtManConfig


@dataclass(frozen=True)
class SweepInput:
    """One prompt ready for the sweep.

    Attributes:
        input_ids: [n] prompt tokens followed by the target tokens.
        n_target: number of target tokens T at the end of ``input_ids``.
        multipliers: [U, n] key multipliers of each suppression pass (1 = untouched).
    """

    input_ids: torch.Tensor
    n_target: int
    multipliers: torch.Tensor
    embeds: torch.Tensor | None = None
    """[n, d] the input embeddings the model's language model receives (a VLM's text and image embeddings merged);
    None: the model embeds ``input_ids`` itself."""
    positions: torch.Tensor | None = None
    """[n] or [k, n] the position ids of its rotary embedding (Qwen2-VL's M-RoPE: k = 3); None: 0..n-1."""
    blocks: torch.Tensor | None = None
    """[n] int: positions sharing an id >= 0 see each other both ways (a bidirectional block); None: none."""
    base_ce: torch.Tensor | None = None
    """[T] the model's own unperturbed target CE (its plain forward); the sweep refuses unless it reproduces it."""

    def start(self, position: int) -> int:
        """The first position whose output can change when the key at ``position`` is suppressed: the position
        itself (causal), or the first position of its bidirectional block."""
        if self.blocks is None or int(self.blocks[position]) < 0:
            return position
        same = torch.nonzero(self.blocks == self.blocks[position])
        return int(same[0])


@dataclass(frozen=True)
class SweepOutput:
    """base_ce: [T] per-target-token CE of the unperturbed pass; ce: [U, T] with each unit suppressed."""

    base_ce: torch.Tensor
    ce: torch.Tensor


@dataclass(frozen=True)
class _Row:
    seq: int
    start: int  # first recomputed position; keys/values before it come from the unperturbed pass
    unit: int | None = None  # None: the unperturbed pass


class _KVStore:
    """Post-RoPE keys/values of the unperturbed pass: layer -> prompt -> [KV, n, d]."""

    def __init__(self) -> None:
        self.keys: dict[int, dict[int, torch.Tensor]] = {}
        self.values: dict[int, dict[int, torch.Tensor]] = {}


KERNELS = ("sdpa", "flex")
"""``attention_kernel``: PyTorch's scaled_dot_product_attention (dense masks), or FlexAttention (``flex.py``)."""


def _batch_kind(seqs: list[SweepInput]) -> tuple[bool, int | None]:
    """(whether the batch is given as embeddings, its number of position-id rows: None for 1-D positions); a batch
    that mixes either is a ValueError naming ``inputs``."""
    with_embeds = {seq.embeds is not None for seq in seqs}
    if len(with_embeds) > 1:
        raise ValueError("inputs: a batch mixes requests given as embeddings with requests given as token ids")
    rope_rows = {seq.positions.shape[0] for seq in seqs if seq.positions is not None and seq.positions.dim() == 2}
    if len(rope_rows) > 1:
        raise ValueError("inputs: requests with different numbers of position-id rows in one batch")
    return True in with_embeds, (rope_rows.pop() if rope_rows else None)


class _Batch(NamedTuple):
    """A batch's padded tensors, on the CPU: [B, L] per query position, [B, prefix + L] per key position (the
    shared prefix, then the queries); -1 marks padding, a prefix position a row does not see, and no image block."""

    input_ids: torch.Tensor
    embeds: torch.Tensor | None
    rope: torch.Tensor
    """Position ids: [B, L], or M-RoPE's [k, B, L]."""
    q_pos: torch.Tensor
    q_blk: torch.Tensor
    k_pos: torch.Tensor
    k_blk: torch.Tensor
    k_mult: torch.Tensor


def _lay_out(rows: list[_Row], seqs: list[SweepInput], lengths: list[int], offsets: list[int], prefix: int) -> _Batch:
    """The batch of ``rows`` (``seqs``: each row's request): each row's queries at its offset, its unit's
    multipliers on its keys."""
    with_embeds, k_rope = _batch_kind(seqs)
    b, length = len(rows), max(lengths)
    input_ids = torch.zeros(b, length, dtype=torch.long)
    q_pos = torch.full((b, length), -1, dtype=torch.long)
    q_blk = torch.full((b, length), -1, dtype=torch.long)
    k_blk = torch.full((b, prefix), -1, dtype=torch.long)
    rope = torch.zeros((k_rope, b, length) if k_rope else (b, length), dtype=torch.long)
    embeds = seqs[0].embeds.new_zeros(b, length, seqs[0].embeds.shape[-1]) if with_embeds else None
    k_mult = torch.ones(b, prefix + length, dtype=torch.float32)
    for i, (row, seq, n, off) in enumerate(zip(rows, seqs, lengths, offsets, strict=True)):
        sl = slice(row.start, row.start + n)
        input_ids[i, off : off + n] = seq.input_ids[sl]
        q_pos[i, off : off + n] = torch.arange(row.start, row.start + n)
        positions = seq.positions if seq.positions is not None else torch.arange(len(seq.input_ids))
        rope[..., i, off : off + n] = positions[..., sl]
        if embeds is not None:
            embeds[i, off : off + n] = seq.embeds[sl]
        if seq.blocks is not None:
            q_blk[i, off : off + n] = seq.blocks[sl]
            k_blk[i, : row.start] = seq.blocks[: row.start]
        if row.unit is not None:
            mult = seq.multipliers[row.unit]
            k_mult[i, : row.start] = mult[: row.start]
            k_mult[i, prefix + off : prefix + off + n] = mult[sl]
    prefix_pos = torch.arange(prefix).expand(b, -1)
    starts = torch.tensor([r.start for r in rows])[:, None]
    k_pos = torch.cat([prefix_pos.masked_fill(prefix_pos >= starts, -1), q_pos], dim=1)
    k_blk = torch.cat([k_blk, q_blk], dim=1).masked_fill(k_pos < 0, -1)
    return _Batch(input_ids, embeds, rope, q_pos, q_blk, k_pos, k_blk, k_mult)


class SweepAttention:
    """Attention context of one forward pass over a batch of rows (see module docstring)."""

    def __init__(
        self,
        rows: list[_Row],
        inputs: list[SweepInput],
        store: _KVStore,
        mode: str,
        padding_side: str,
        device: torch.device,
        kernel: str = "sdpa",
    ) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"attention_kernel: {kernel!r} is not one of {', '.join(KERNELS)}")
        self.rows, self.store, self.mode, self.kernel = rows, store, mode, kernel
        self.flex_cache: dict = {}  # flex.py's padded positions and block masks, per device
        self.calls: Counter = Counter()
        self.record = all(r.unit is None for r in rows)
        # the last target token is never an input that matters: no later position reads it
        lengths = [len(inputs[r.seq].input_ids) - 1 - r.start for r in rows]
        length = max(lengths)
        self.prefix = max(r.start for r in rows)
        self.lengths = lengths
        self.offsets = [length - n if padding_side == "left" else 0 for n in lengths]

        batch = _lay_out(rows, [inputs[r.seq] for r in rows], lengths, self.offsets, self.prefix)
        self.input_ids = batch.input_ids.to(device)
        self.inputs_embeds = batch.embeds.to(device) if batch.embeds is not None else None
        self.position_ids = batch.rope.to(device)
        self.blocks = bool((batch.q_blk >= 0).any())
        self.q_blk, self.k_blk = batch.q_blk.to(device), batch.k_blk.to(device)
        self.q_pos, self.k_pos = batch.q_pos.to(device), batch.k_pos.to(device)
        self.k_mult = batch.k_mult.to(device)
        self.suppressing = bool((batch.k_mult != 1).any())
        self._visible: dict[int | None, torch.Tensor] = {}
        self._bias: dict[int | None, torch.Tensor] = {}
        self._device, self._devices = self.k_mult.device, {}
        # one prompt and one start for the whole batch: the prefix is a view, broadcast over rows, and
        # (no padding) visibility is plain lower-right causal, which fused/flash kernels take without a mask
        self._shared_prefix = len({(r.seq, r.start) for r in rows}) == 1
        plain = self._shared_prefix and not self.blocks
        self._causal = causal_lower_right(length, self.prefix + length) if plain else None

    _ON_DEVICE = ("q_pos", "k_pos", "q_blk", "k_blk", "k_mult")
    """The batch tensors attention reads; ``_on`` keeps them, and the masks cached from them, per device."""

    def _on(self, device: torch.device) -> None:
        """Make the batch tensors and mask caches those on ``device``, the calling layer's. A model dispatched over
        several devices (``device_map``) runs its layers on each in turn: the batch is copied to a device once, for
        its first layer there, and every later layer there reuses it (and the masks built from it)."""
        if device == self._device:
            return
        names = (*self._ON_DEVICE, "_visible", "_bias")
        self._devices[self._device] = {name: getattr(self, name) for name in names}
        state = self._devices.get(device)
        if state is None:
            state = {name: getattr(self, name).to(device) for name in self._ON_DEVICE} | {"_visible": {}, "_bias": {}}
        for name, value in state.items():
            setattr(self, name, value)
        self._device = device

    def slot(self, i: int, position: int) -> int:
        """Query slot of absolute ``position`` in row ``i``."""
        return self.offsets[i] + position - self.rows[i].start

    def visible(self, window: int | None, blocks: bool = True) -> torch.Tensor:
        """bool [B, 1, Lq, P + Lq]: causal (and sliding-window) visibility from absolute positions; with
        ``blocks``, a bidirectional block's positions also see each other (inside the window: Gemma 3's
        AND(window, OR(causal, block)))."""
        if (window, blocks) not in self._visible:
            qp, kp = self.q_pos[:, :, None], self.k_pos[:, None, :]
            vis = kp <= qp
            if blocks and self.blocks:
                qb, kb = self.q_blk[:, :, None], self.k_blk[:, None, :]
                vis |= (qb >= 0) & (qb == kb)
            vis &= (kp >= 0) & (qp >= 0)
            if window is not None:
                vis &= (qp - kp).abs() < window
            # padded query slots see only themselves, so no row is empty (no NaN leaks through 0 * NaN)
            length = self.q_pos.shape[1]
            own = torch.zeros(length, self.prefix + length, dtype=torch.bool, device=vis.device)
            own[:, self.prefix :] = torch.eye(length, dtype=torch.bool, device=vis.device)
            vis |= (qp < 0) & own
            self._visible[(window, blocks)] = vis[:, None]
        return self._visible[(window, blocks)]

    def _prefix(self, layer: int, which: dict[int, dict[int, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
        per_seq = which[layer]
        if self._shared_prefix:
            row = self.rows[0]
            return per_seq[row.seq][None, :, : row.start].expand(len(self.rows), -1, -1, -1)
        b, kv, _, d = like.shape
        out = like.new_zeros(b, kv, self.prefix, d)
        for i, row in enumerate(self.rows):
            out[i, :, : row.start] = per_seq[row.seq][:, : row.start]
        return out

    def attend(self, layer, query, key, value, *, scaling, sliding_window=None, softcap=None, alibi=None, mask=None):
        self.calls[layer] += 1
        self._on(query.device)
        if self.record:
            ks, vs = self.store.keys.setdefault(layer, {}), self.store.values.setdefault(layer, {})
            for i, row in enumerate(self.rows):
                sl = slice(self.offsets[i], self.offsets[i] + self.lengths[i])
                ks[row.seq], vs[row.seq] = key[i, :, sl], value[i, :, sl]
            if mask is not None:
                self._check_mask(layer, mask, sliding_window)
        if self.prefix:
            key = torch.cat([self._prefix(layer, self.store.keys, key), key], dim=2)
            value = torch.cat([self._prefix(layer, self.store.values, value), value], dim=2)
        if self.kernel == "flex":
            return flex.attend(
                self, query, key, value, scaling=scaling, sliding_window=sliding_window, softcap=softcap, alibi=alibi
            )
        n_rep = query.shape[1] // key.shape[1]
        if softcap is not None or alibi is not None or (self.mode.startswith("multiplicative") and self.suppressing):
            # the row minimum, soft-capping and ALiBi need explicit score rows: float32
            vis = self.visible(sliding_window)
            scores = explicit_scores(query, repeat_kv(key, n_rep), scaling, softcap, alibi, self.k_pos)
            if self.suppressing:
                keys = (self.k_pos >= 0)[:, None, None, :]  # the pass's real keys, later ones included
                scores = suppress_scores(scores, vis, self.k_mult[:, None, None, :], self.mode, keys)  # masked too
            else:
                scores = scores.masked_fill(~vis, -torch.inf)
            probs = torch.softmax(scores, dim=-1)
            return torch.matmul(probs, repeat_kv(value, n_rep).float()).to(query.dtype)
        if self.mode == "scale" or not self.suppressing:  # H * m == scaled keys: any fused kernel works
            if self.suppressing:
                key = key * self.k_mult[:, None, :, None].to(key.dtype)
            if self._causal is not None and sliding_window is None:
                # CausalBias dispatches to flash / memory-efficient kernels, which want equal head counts
                key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
                return F.scaled_dot_product_attention(query, key, value, attn_mask=self._causal, scale=scaling)
            vis = self.visible(sliding_window)
            return F.scaled_dot_product_attention(query, key, value, attn_mask=vis, scale=scaling, enable_gqa=n_rep > 1)
        # log_additive: an additive float mask
        if sliding_window not in self._bias:
            vis = self.visible(sliding_window)
            bias = log_multiplier(self.k_mult)[:, None, None, :].expand_as(vis)
            self._bias[sliding_window] = bias.masked_fill(~vis, -torch.inf).to(query.dtype)
        bias = self._bias[sliding_window]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling, enable_gqa=n_rep > 1)

    def _check_mask(self, layer: int, mask: torch.Tensor, window: int | None) -> None:
        """The unperturbed pass: the model's own mask must agree with the visibility the sweep computes from
        positions (causal, sliding window) on every real token, or prefix reuse and batching would be wrong.
        Bidirectional blocks are not in it (given as embeddings, a VLM builds its causal mask); they are checked
        through the model's own unperturbed CE (``SweepInput.base_ce``)."""
        ours = self.visible(window, blocks=False)  # [B, 1, Lq, Lq]: the unperturbed pass has no prefix
        theirs = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        real = self.q_pos >= 0  # padding slots are the sweep's own business
        both = (real[:, :, None] & real[:, None, :])[:, None]
        if theirs.shape[-2:] != ours.shape[-2:] or bool(((ours != theirs) & both).any()):  # one sync per layer
            kind = f"causal with a sliding window of {window}" if window else "causal"
            raise UnsupportedModelError(
                f"attention layer {layer} masks keys differently from {kind} attention (chunked, "
                "bidirectional or prefix attention?); AtMan's prefix reuse and batching assume causal masks"
            )


def _target_ce(model, ctx: SweepAttention, inputs: list[SweepInput]) -> list[torch.Tensor]:
    """Run one forward pass; per row, the CE of each target token (LM head at target positions only)."""
    wanted = []
    for i, row in enumerate(ctx.rows):
        seq = inputs[row.seq]
        n, t = len(seq.input_ids), seq.n_target
        wanted.append([ctx.slot(i, p) for p in range(n - t - 1, n - 1)])
    keep, logits_to_keep = _logits_to_keep(model, sorted({s for w in wanted for s in w}), ctx.input_ids)
    index = {s: j for j, s in enumerate(keep)}
    kwargs = {"position_ids": ctx.position_ids} if _takes(type(model), "position_ids") else {}  # ALiBi models do not
    if ctx.inputs_embeds is not None:
        kwargs["inputs_embeds"] = ctx.inputs_embeds
    else:
        kwargs["input_ids"] = ctx.input_ids
    out = attention.forward(
        model,
        ctx,
        logits_to_keep=logits_to_keep,
        use_cache=False,
        **kwargs,
    )
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # [B, K, V]
    result = []
    for i, row in enumerate(ctx.rows):
        seq = inputs[row.seq]
        targets = seq.input_ids[len(seq.input_ids) - seq.n_target :].to(logprobs.device)
        cols = torch.tensor([index[s] for s in wanted[i]], device=logprobs.device)
        result.append(-logprobs[i, cols].gather(-1, targets[:, None])[:, 0].cpu())
    return result


def _logits_to_keep(model, keep: list[int], input_ids: torch.Tensor) -> tuple[list[int], torch.Tensor | int]:
    """The query slots the LM head runs at, and the model's ``logits_to_keep`` argument for them: their indices.
    On a dispatched model accelerate's top-level hook would move an index tensor to the first device while the
    model indexes the last layer's hidden states (on the last device) with it; there it is the number of trailing
    slots from the first one kept (the same slots with left padding, the default)."""
    if not devices.dispatched(model):
        return keep, torch.tensor(keep, device=input_ids.device)
    keep = list(range(keep[0], input_ids.shape[1]))
    return keep, len(keep)


def _check_base(model, expected: torch.Tensor, got: torch.Tensor) -> None:
    """The sweep's unperturbed pass must give the target CE of the model's own forward (a VLM's, vision tower and
    masks its own): else positions, blocks or embeddings were not what the model uses."""
    dtype = next(model.parameters()).dtype
    tol = 1e-3 if dtype == torch.float32 else 0.1  # half precision: kernels differ by more than float32's noise
    worst = float((expected.float().cpu() - got.float()).abs().max())
    if worst > tol:
        raise UnsupportedModelError(
            f"model: {type(model).__name__}: the unperturbed target CE through AtMan's attention differs from the "
            f"model's own forward by {worst:.2g} nats (tolerance {tol:g}); its masks or positions are not ones "
            "AtMan reproduces"
        )


@functools.cache
def _takes(model_cls: type, name: str) -> bool:
    return name in inspect.signature(model_cls.forward).parameters


def _batches(rows: list[_Row], inputs: list[SweepInput], batch_size: int, max_tokens: int) -> list[list[_Row]]:
    """Sort rows by suffix length (longest first) and pack them; one prompt's rows in a batch share a start."""

    def suffix(r: _Row) -> int:
        return len(inputs[r.seq].input_ids) - 1 - r.start

    rows = sorted(rows, key=lambda r: (-suffix(r), r.seq, r.unit or 0))
    batches: list[list[_Row]] = []
    for row in rows:
        batch = batches[-1] if batches else None
        if batch and len(batch) < batch_size and (len(batch) + 1) * suffix(batch[0]) <= max_tokens:
            batch.append(row)
        else:
            batches.append([row])
    shared = []
    for batch in batches:
        first = {}
        for r in batch:  # longest first, so the first row of each prompt has its earliest start
            first.setdefault(r.seq, r.start)
        shared.append([_Row(r.seq, first[r.seq], r.unit) for r in batch])
    return shared


def sweep_cost(inputs: list[SweepInput], config: AtManConfig, batch_size: int) -> tuple[list, list, list]:
    """Forward-pass tokens (int), passes (int) and forward calls (float) of each ``SweepInput`` as ``sweep`` runs
    them together under ``config`` (its ``prefix_reuse`` and ``max_batch_tokens``), nothing run: the unperturbed
    passes, then one pass per unit whose multipliers suppress anything, starting at its first suppressed token
    (``prefix_reuse``), packed by the sweep's own batching (``_batches``). A forward call over B rows padded to L
    tokens runs B x L tokens; each of its rows has L of them and 1/B of the call. tests/test_estimate.py checks
    these counts against the model's real passes."""
    tokens, passes, calls = [0] * len(inputs), [0] * len(inputs), [0.0] * len(inputs)
    rows = []
    for i, seq in enumerate(inputs):
        last_prompt = len(seq.input_ids) - seq.n_target - 1  # as sweep(): a pass starts no later than this
        for u, mult in enumerate(seq.multipliers):
            changed = torch.nonzero(mult != 1)
            if len(changed):
                start = min(seq.start(int(changed[0])), last_prompt) if config.prefix_reuse else 0
                rows.append(_Row(i, start, u))
    for group in ([_Row(i, 0) for i in range(len(inputs))], rows):
        for batch in _batches(group, inputs, batch_size, config.max_batch_tokens):
            length = max(len(inputs[r.seq].input_ids) - 1 - r.start for r in batch)
            for r in batch:
                tokens[r.seq] += length
                passes[r.seq] += 1
                calls[r.seq] += 1 / len(batch)
    return tokens, passes, calls


@torch.inference_mode()
def sweep(
    model: torch.nn.Module,
    inputs: list[SweepInput],
    *,
    mode: str,
    prefix_reuse: bool = True,
    batch_size: int = 16,
    max_batch_tokens: int = 8192,
    padding_side: str = "left",
    attention_kernel: str = "sdpa",
) -> list[SweepOutput]:
    """Target CE of every prompt, unperturbed and with each unit suppressed. Call it inside
    ``attention.activated(model)``. Rows whose multipliers are all 1 perturb nothing: their CE is the base CE.

    Raises ``UnsupportedModelError`` (a ValueError naming the model class) from the first forward pass whose attention
    did not go through AtMan in every layer, before any score exists."""
    device = devices.input_device(model)
    store = _KVStore()
    base: dict[int, torch.Tensor] = {}
    for batch in _batches([_Row(i, 0) for i in range(len(inputs))], inputs, batch_size, max_batch_tokens):
        ctx = SweepAttention(batch, inputs, store, mode, padding_side, device, attention_kernel)
        for row, ce in zip(batch, _target_ce(model, ctx, inputs), strict=True):
            base[row.seq] = ce
    for i, seq in enumerate(inputs):
        if seq.base_ce is not None:
            _check_base(model, seq.base_ce, base[i])

    rows = []
    for i, seq in enumerate(inputs):
        last_prompt = len(seq.input_ids) - seq.n_target - 1  # predicts the first target token
        for u, mult in enumerate(seq.multipliers):
            changed = torch.nonzero(mult != 1)
            if len(changed):
                start = min(seq.start(int(changed[0])), last_prompt) if prefix_reuse else 0
                rows.append(_Row(i, start, u))
    ce = {(i, u): base[i] for i, seq in enumerate(inputs) for u in range(len(seq.multipliers))}
    for batch in _batches(rows, inputs, batch_size, max_batch_tokens):
        ctx = SweepAttention(batch, inputs, store, mode, padding_side, device, attention_kernel)
        for row, row_ce in zip(batch, _target_ce(model, ctx, inputs), strict=True):
            ce[(row.seq, row.unit)] = row_ce
    return [
        SweepOutput(
            base_ce=base[i],
            ce=torch.stack([ce[(i, u)] for u in range(len(seq.multipliers))])
            if len(seq.multipliers)
            else torch.zeros(0, seq.n_target),
        )
        for i, seq in enumerate(inputs)
    ]
