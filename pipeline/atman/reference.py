"""The naive AtMan method, written as ../shared/ATMAN.md states it: the oracle for tests, the benchmark baseline.

One prompt, one suppression pass per unit, the whole sequence recomputed every time, eager attention with the
model's own mask, an explicit [1, 1, n, n] factor matrix, full-vocabulary logits at every position. No batching,
no prefix reuse, nothing shared with the fast path but the model and the multipliers.
"""

from __future__ import annotations

import torch

from pipeline.atman.attention import LOG_FLOOR, repeat_kv
from pipeline.atman.sweep import SweepInput, SweepOutput


class ReferenceAttention:
    """Eager attention with the factor matrix F[q, k] = m_k applied as the mode's formula (paper Eq. 4)."""

    def __init__(self, multipliers: torch.Tensor | None, mode: str) -> None:
        self.multipliers, self.mode = multipliers, mode

    def attend(self, module, query, key, value, attention_mask, scaling, sliding_window):
        n_rep = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, n_rep).float(), repeat_kv(value, n_rep).float()
        scores = torch.matmul(query.float(), key.transpose(2, 3)) * scaling  # H = Q K^T, [1, H, n, n]
        mask = attention_mask.float()  # the model's own mask: 0 = visible, dtype-min = hidden
        visible = mask == 0
        if self.multipliers is not None:
            n = scores.shape[-1]
            factor = self.multipliers.to(scores.device).float()[None, None, None, :].expand(1, 1, n, n)
            if self.mode == "multiplicative":
                # shift each row so its minimum over the visible keys is 0, multiply the columns, shift back
                row_min = scores.masked_fill(~visible, float("inf")).amin(dim=-1, keepdim=True)
                suppressed = (scores - row_min) * factor + row_min
                scores = torch.where(factor != 1, suppressed, scores)
            elif self.mode == "log_additive":
                scores = scores + torch.log(factor).clamp_min(LOG_FLOOR)
            elif self.mode == "scale":
                scores = scores * factor
            else:
                raise ValueError(f"mode: {self.mode!r} is not one of multiplicative, log_additive, scale")
        scores = scores + mask
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, value).to(query.dtype)


def _target_ce(model, ids: torch.Tensor, n_target: int, ctx: ReferenceAttention) -> torch.Tensor:
    logits = model(input_ids=ids[None], use_cache=False, atman=ctx).logits[0].float()  # [n, vocab]
    n = len(ids)
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = ids[n - n_target :]
    return -logprobs[n - n_target - 1 : n - 1].gather(-1, targets[:, None])[:, 0]


@torch.inference_mode()
def reference_sweep(model: torch.nn.Module, inputs: list[SweepInput], *, mode: str) -> list[SweepOutput]:
    """Same contract as ``sweep.sweep``, computed the plain way, one prompt and one unit at a time."""
    device = next(model.parameters()).device
    outputs = []
    for seq in inputs:
        ids = seq.input_ids.to(device)
        base = _target_ce(model, ids, seq.n_target, ReferenceAttention(None, mode)).cpu()
        rows = [_target_ce(model, ids, seq.n_target, ReferenceAttention(m, mode)).cpu() for m in seq.multipliers]
        ce = torch.stack(rows) if rows else torch.zeros(0, seq.n_target)
        outputs.append(SweepOutput(base_ce=base, ce=ce))
    return outputs
