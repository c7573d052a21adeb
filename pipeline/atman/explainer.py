"""The public entry point: ``Explainer(lm, AtManConfig()).explain(prompt, target)``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.atman import attention
from pipeline.atman.config import AtManConfig
from pipeline.atman.explanation import Explanation
from pipeline.atman.plan import embedding_cosine, unit_multipliers
from pipeline.atman.prompts import (
    PreparedPrompt,
    context_length,
    generate_target,
    normalize_spans,
    prepare_prompt,
    tokenize_target,
)
from pipeline.atman.reference import reference_sweep
from pipeline.atman.sweep import SweepInput, SweepOutput, sweep
from pipeline.atman.units import Span, Unit, build_units


@dataclass(frozen=True)
class _Planned:
    prepared: PreparedPrompt
    target_ids: torch.Tensor
    units: list[Unit]
    sweep_input: SweepInput


class Explainer:
    """Explains a causal LM's predictions with AtMan. ``lm`` is anything with ``.model`` and ``.tokenizer``
    (``pipeline.load_model`` returns one)."""

    def __init__(self, lm, config: AtManConfig | None = None) -> None:
        self.lm = lm
        self.model, self.tokenizer = lm.model, lm.tokenizer
        self.config = config or AtManConfig()
        self._embeddings = self.model.get_input_embeddings().weight
        self._context = context_length(self.model, self.tokenizer)
        self.check_supported()

    def check_supported(self) -> None:
        """Refuse a model AtMan cannot explain exactly, before any request: one tiny sweep (3 tokens, one unit)
        must reach every attention layer through AtMan with the masks the model means. Raises
        ``UnsupportedModelError`` (a ValueError naming the model class and the reason). Every later forward
        pass is checked the same way, so a model that passes here still cannot return unperturbed scores."""
        probe = SweepInput(torch.tensor([0, 1, 2]), 1, torch.tensor([[self.config.factor, 1.0, 1.0]]))
        self.run([probe])

    def explain(
        self,
        prompt: str,
        target: str | None = None,
        *,
        generate: int | None = None,
        explain_span: Span | list[Span] | None = None,
        chat: bool | None = None,
    ) -> Explanation:
        """Explain ``target`` (or a greedy continuation of ``generate`` tokens) given ``prompt``.

        Raises ValueError naming the parameter for empty prompt/target, over-long input, spans outside
        the prompt. ``explain_span``: character range(s) of the prompt to explain (default all of it).
        """
        return self.explain_batch([prompt], [target], generate=generate, explain_spans=[explain_span], chat=chat)[0]

    def explain_batch(
        self,
        prompts: Sequence[str],
        targets: Sequence[str | None] | None = None,
        *,
        generate: int | None = None,
        explain_spans: Sequence[Span | list[Span] | None] | None = None,
        chat: bool | None = None,
    ) -> list[Explanation]:
        """Explain many prompts; their suppression passes are batched together on the device."""
        targets = list(targets) if targets is not None else [None] * len(prompts)
        spans = list(explain_spans) if explain_spans is not None else [None] * len(prompts)
        if not (len(targets) == len(spans) == len(prompts)):
            raise ValueError("targets: explain_batch needs as many targets and explain_spans as prompts")
        planned = [
            self.plan(p, t, generate=generate, explain_span=s, chat=chat)
            for p, t, s in zip(prompts, targets, spans, strict=True)
        ]
        outputs = self.run([p.sweep_input for p in planned])
        return [self.explanation(p, o) for p, o in zip(planned, outputs, strict=True)]

    def plan(
        self,
        prompt: str,
        target: str | None = None,
        *,
        generate: int | None = None,
        explain_span: Span | list[Span] | None = None,
        chat: bool | None = None,
    ) -> _Planned:
        """Validate and tokenize one request and decide every suppression pass (no forward pass but generation)."""
        cfg = self.config
        prepared = prepare_prompt(self.tokenizer, prompt, chat)
        spans = normalize_spans(prompt, explain_span)
        if target is not None and generate is not None:
            raise ValueError("generate: give either a target or generate=N, not both")
        if target is None:
            budget = generate if generate is not None else cfg.generate_max_tokens
            if self._context is not None:
                budget = min(budget, self._context - len(prepared.prompt_ids))
            self._check_length(len(prepared.prompt_ids) + 1)
            target_ids = generate_target(self.model, self.tokenizer, prepared.prompt_ids, budget)
        else:
            target_ids = tokenize_target(self.tokenizer, target)
        self._check_length(len(prepared.prompt_ids) + len(target_ids))
        ids = torch.cat([prepared.prompt_ids, target_ids])
        units = build_units(prompt, prepared.token_spans, spans, cfg.granularity, cfg.delimiter)
        cosine = None
        if cfg.conceptual_threshold is not None:
            cosine = embedding_cosine(self._embeddings.detach(), ids.to(self._embeddings.device)).cpu()
        mult = unit_multipliers(len(ids), units, cfg.factor, cosine, cfg.conceptual_threshold)
        return _Planned(prepared, target_ids, units, SweepInput(ids, len(target_ids), mult))

    def run(self, inputs: list[SweepInput], batch_size: int | None = None) -> list[SweepOutput]:
        """The suppression sweeps of planned requests, batched together; ``batch_size`` overrides the config's
        forward batch (the job halves it on CUDA out-of-memory). The model's attention is routed through AtMan
        for this call only. Raises ``UnsupportedModelError`` (a ValueError naming the model class and the reason)
        when suppression cannot reach every attention layer."""
        cfg = self.config
        with attention.activated(self.model):
            if cfg.engine == "reference":
                return reference_sweep(self.model, inputs, mode=cfg.mode)
            return sweep(
                self.model,
                inputs,
                mode=cfg.mode,
                prefix_reuse=cfg.prefix_reuse,
                batch_size=batch_size or cfg.batch_size,
                max_batch_tokens=cfg.max_batch_tokens,
                padding_side=cfg.padding_side,
            )

    def _check_length(self, n: int) -> None:
        if self._context is not None and n > self._context:
            raise ValueError(
                f"prompt: prompt + target is {n} tokens, longer than the model's context of {self._context}; "
                "shorten the prompt or the target"
            )

    def explanation(self, planned: _Planned, out: SweepOutput) -> Explanation:
        """Scores of one planned request from its sweep output (postprocess and normalize applied)."""
        cfg = self.config
        delta = (out.ce - out.base_ce[None]).numpy().astype(np.float32)  # [U, T], positive = supported
        terms = delta**2 if cfg.aggregate == "sum_of_squares" else delta
        scores = terms.sum(axis=1)
        per_target = terms if cfg.keep_per_target else None
        if cfg.postprocess == "abs":
            scores, per_target = np.abs(scores), None if per_target is None else np.abs(per_target)
        elif cfg.postprocess == "square":
            scores, per_target = scores**2, None if per_target is None else per_target**2
        if cfg.normalize:
            scores = _unit_max(scores)
            per_target = None if per_target is None else _unit_max(per_target)
        tok = self.tokenizer
        return Explanation(
            prompt=planned.prepared.prompt,
            target=tok.decode(planned.target_ids),
            target_tokens=[tok.decode([t]) for t in planned.target_ids.tolist()],
            base_target_ce=float(out.base_ce.sum()),
            base_ce_per_token=out.base_ce.tolist(),
            units=[(u.text, u.start, u.length) for u in planned.units],
            scores=scores.astype(np.float32),
            per_target=None if per_target is None else per_target.astype(np.float32),
            mode=cfg.mode,
            factor=cfg.factor,
            granularity=cfg.granularity,
            conceptual_threshold=cfg.conceptual_threshold,
            chat=planned.prepared.chat,
            n_prompt_tokens=len(planned.prepared.prompt_ids),
            params=cfg.model_dump(),
        )


def _unit_max(x: np.ndarray) -> np.ndarray:
    peak = float(np.abs(x).max()) if x.size else 0.0
    return x / peak if peak > 0 else x
