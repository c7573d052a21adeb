"""Which AtMan context receives the attention calls of the forward pass running now.

Both routes to a layer read it: transformers' attention function ``atman`` (``attention.py``) and the family
adapters (``families.py``). It lives below both so that neither imports the other for it (that was an import loop:
``attention.activated`` installs the adapters, the adapters read the context)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch

_ACTIVE: ContextVar[AttentionContext | None] = ContextVar("atman_attention_context", default=None)


class AttentionContext(Protocol):
    calls: Counter

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        scaling: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        alibi: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [B, H, Lq, d], key/value [B, KV, Lq, d] (post-RoPE) -> output [B, H, Lq, d].

        ``alibi``: per-head slopes [H]; the score of key position p gains slope * p. ``mask``: the model's own
        additive mask [B, 1, Lq, Lk] where the model supplies one."""


def active() -> AttentionContext | None:
    return _ACTIVE.get()


@contextmanager
def attending(ctx: AttentionContext) -> Iterator[None]:
    """Hand every attention call of the forward passes inside the block to ``ctx``."""
    token = _ACTIVE.set(ctx)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
