"""The result of one explanation: units with character spans, signed scores, per-target-token matrix."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Explanation:
    """AtMan relevance of each unit of ``prompt`` for ``target``.

    ``scores[u]`` is the rise of the target's total cross-entropy (nats, summed over target tokens) when unit u
    is suppressed: positive = the unit supported the target. ``per_target[u, j]`` is the same for target token j.
    ``base_target_ce`` is the unperturbed total CE; ``base_ce_per_token`` its per-token parts. With
    ``AtManConfig.target_units``, ``target_units`` are the target tokens but the last ((text, start, length) in
    ``target``) scored as inputs of the later target tokens: ``target_scores``, ``target_per_target`` (zero for the
    target tokens at or before the unit).
    """

    prompt: str
    target: str
    target_tokens: list[str]
    base_target_ce: float
    base_ce_per_token: list[float]
    units: list[tuple[str, int, int]]
    scores: np.ndarray
    per_target: np.ndarray | None
    mode: str
    factor: float
    granularity: str
    conceptual_threshold: float | None
    chat: bool
    n_prompt_tokens: int
    params: dict = field(default_factory=dict)
    target_units: list[tuple[str, int, int]] | None = None
    target_scores: np.ndarray | None = None
    target_per_target: np.ndarray | None = None

    def top(self, k: int = 5) -> list[tuple[str, int, int, float]]:
        """The k units with the highest scores, highest first."""
        order = np.argsort(-self.scores, kind="stable")[:k]
        return [(*self.units[i], float(self.scores[i])) for i in order]

    def to_dict(self) -> dict:
        """JSON-able; the shape ``atman explain --json`` prints (../shared/DESIGN.md)."""
        return {
            "prompt": self.prompt,
            "target": self.target,
            "target_tokens": list(self.target_tokens),
            "base_target_ce": float(self.base_target_ce),
            "base_ce_per_token": [float(x) for x in self.base_ce_per_token],
            "mode": self.mode,
            "factor": float(self.factor),
            "conceptual_threshold": self.conceptual_threshold,
            "granularity": self.granularity,
            "chat": self.chat,
            "n_prompt_tokens": self.n_prompt_tokens,
            "units": [
                {"text": t, "start": s, "length": n, "score": float(x)}
                for (t, s, n), x in zip(self.units, self.scores.tolist(), strict=True)
            ],
            "per_target": None if self.per_target is None else self.per_target.astype(float).tolist(),
            "target_units": None
            if self.target_units is None
            else [
                {"text": t, "start": s, "length": n, "score": float(x)}
                for (t, s, n), x in zip(self.target_units, self.target_scores.tolist(), strict=True)
            ],
        }

    def show(self, console=None, top_k: int = 5) -> None:
        """Terminal heatmap: the prompt with each unit coloured by score (red supports, blue opposes)."""
        from pipeline.render import render_explanation

        render_explanation(self, console=console, top_k=top_k)
