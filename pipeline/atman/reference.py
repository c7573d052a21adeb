"""The naive AtMan method, written as the paper states it (Eq. 4): the benchmark baseline and ``engine="reference"``.

One prompt, one suppression pass per unit, the whole sequence recomputed every time, eager attention with the
model's own mask where the model hands one over (else plain causal / sliding-window visibility), an explicit
[1, 1, n, n] factor matrix, full-vocabulary logits at every position. No batching, no prefix reuse. It shares the
attention routes (``attention.activated``) with the fast path, so the tests check both against an oracle that
runs the untouched model (tests/test_families.py).
"""

from __future__ import annotations

from collections import Counter

import torch

from pipeline.atman import attention, devices
from pipeline.atman.attention import LOG_FLOOR, eager_attend
from pipeline.atman.sweep import SweepInput, SweepOutput


class ReferenceAttention:
    """Eager attention with the factor matrix F[q, k] = m_k applied as the mode's formula (paper Eq. 4)."""

    def __init__(self, multipliers: torch.Tensor | None, mode: str) -> None:
        self.multipliers, self.mode = multipliers, mode
        self.calls: Counter = Counter()

    def attend(self, layer, query, key, value, **kwargs):
        self.calls[layer] += 1
        return eager_attend(query, key, value, suppress=None if self.multipliers is None else self._suppress, **kwargs)

    def _suppress(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Scores [1, H, n, n] with the mode's formula at F[q, k] = m_k (visible: bool [1, 1, n, n])."""
        n = scores.shape[-1]
        factor = self.multipliers.to(scores.device).float()[None, None, None, :].expand(1, 1, n, n)
        if self.mode in ("multiplicative", "multiplicative_full_row"):
            # shift each row so its minimum (over the visible keys, or the whole row) is 0, multiply the
            # columns, shift back
            over = visible if self.mode == "multiplicative" else torch.ones_like(visible)
            row_min = scores.masked_fill(~over, float("inf")).amin(dim=-1, keepdim=True)
            suppressed = (scores - row_min) * factor + row_min
            return torch.where(factor != 1, suppressed, scores)
        if self.mode == "log_additive":
            return scores + torch.log(factor).clamp_min(LOG_FLOOR)
        if self.mode == "scale":
            return scores * factor
        raise ValueError(f"mode: {self.mode!r} is not a suppression form")


def _target_ce(model, ids: torch.Tensor, n_target: int, ctx: ReferenceAttention) -> torch.Tensor:
    """The pass is the prompt and every target token but the last (which no position reads): [n - 1] inputs."""
    inputs = ids[:-1]
    logits = attention.forward(model, ctx, input_ids=inputs[None], use_cache=False).logits[0].float()  # [n-1, V]
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = ids[len(ids) - n_target :].to(logprobs.device)
    return -logprobs[len(inputs) - n_target :].gather(-1, targets[:, None])[:, 0]


@torch.inference_mode()
def reference_sweep(model: torch.nn.Module, inputs: list[SweepInput], *, mode: str) -> list[SweepOutput]:
    """Same contract as ``sweep.sweep``, computed the plain way, one prompt and one unit at a time. Call it
    inside ``attention.activated(model)``."""
    device = devices.input_device(model)
    outputs = []
    for seq in inputs:
        ids = seq.input_ids.to(device)
        base = _target_ce(model, ids, seq.n_target, ReferenceAttention(None, mode)).cpu()
        rows = [_target_ce(model, ids, seq.n_target, ReferenceAttention(m[:-1], mode)).cpu() for m in seq.multipliers]
        ce = torch.stack(rows) if rows else torch.zeros(0, seq.n_target)
        outputs.append(SweepOutput(base_ce=base, ce=ce))
    return outputs
