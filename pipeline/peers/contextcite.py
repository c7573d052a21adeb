"""ContextCite (Cohen-Wang et al., 2024) through its own library (PyPI ``context-cite``), on AtMan's units.

ContextCite ablates random subsets of the context's sources (each kept with probability 1/2, 64 ablations by
default), runs the model on each ablated prompt with the response fixed, and fits a sparse linear surrogate (LASSO
on the kept/dropped masks) to the response's logit-probability, log(p / (1 - p)) of the whole response. A source's
score is its surrogate weight: the rise in that logit-probability when the source is kept, so positive = supports
the response.

Mapped onto the evaluation's planned request:

* sources = ``planned.units``: ``UnitPartitioner`` is a ContextCite partitioner over the user's prompt whose
  sources are the units' character spans. An ablated unit loses exactly its characters, together with the
  whitespace that joins it to the kept text before it (after it, for the first kept source), as the library's
  own sentence partitioner drops a sentence with its separator. Text outside the units (the question) always stays.
* prompt = the planned request's: the chat template (a single user turn, generation prompt added) exactly when
  ``planned.prepared.chat``, else the raw prompt, encoded without added special tokens. With every unit kept the
  ids are ``planned.sweep_input.input_ids`` minus the target (checked on every call).
* response = ``planned.target_ids``, never generated: the cached output is set to prompt + target, as the
  maintainers advise for a given response (MadryLab/context-cite#4), and the response ids are the target's
  own ids (re-tokenizing prompt + target could merge tokens across the boundary). The attribution is for the
  whole response: the range ``get_attributions()`` resolves to without a selection.

The library's defaults otherwise: ``num_ablations=64``, ``ablation_keep_prob=0.5``, ``LassoRegression(0.01)``,
``batch_size=1`` (no padding), seeds 0..63 for the masks (so repeatable). Its forward passes run under
``torch.cuda.amp.autocast()``: a no-op on CPU, half precision on a CUDA device.
"""

from __future__ import annotations

import functools

import numpy as np

from pipeline.atman.prompts import leading_special_ids

SETTINGS = {"contextcite": {"num_ablations": 64, "ablation_keep_prob": 0.5, "batch_size": 1}}
"""The library's defaults, given explicitly (so a run records them, ``method_params``); its LASSO solver stays its
default ``LassoRegression(0.01)``."""


def ablation_problem(n_units: int, num_ablations: int | None = None) -> str | None:
    """Why ContextCite cannot attribute ``n_units`` units with ``num_ablations`` random ablations (default
    ``SETTINGS``): a surrogate fitted on fewer ablations than units is underdetermined, its weights are decided by
    the LASSO penalty, not the model. None when there are enough."""
    num_ablations = SETTINGS["contextcite"]["num_ablations"] if num_ablations is None else num_ablations
    if n_units <= num_ablations:
        return None
    return (
        f"contextcite: {n_units} units but {num_ablations} ablations; its surrogate needs at least as many ablations "
        "as units: use a coarser method.granularity (sentence) or an explain span"
    )


def _import_context_cite():
    """``context_cite`` without its import-time ``nltk.download("punkt_tab")`` (a network call that prints to stderr
    and waits on offline machines; the punkt sentence splitter is its own partitioner's, which is not used here)."""
    import nltk

    download = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        from context_cite import ContextCiter
        from context_cite.context_partitioner import BaseContextPartitioner
    finally:
        nltk.download = download
    return ContextCiter, BaseContextPartitioner


@functools.cache
def _citer_class():
    """(UnitPartitioner, PlannedCiter): the library's classes, subclassed once it is imported (it is heavy)."""
    ContextCiter, BaseContextPartitioner = _import_context_cite()  # noqa: N806 (classes)
    return _unit_partitioner(BaseContextPartitioner), _planned_citer(ContextCiter)


def _unit_partitioner(base: type) -> type:
    class UnitPartitioner(base):
        """ContextCite sources = the given units (``(start, end)`` character spans of ``context``, in order)."""

        def __init__(self, context: str, spans: list[tuple[int, int]]) -> None:
            super().__init__(context)
            if any(a >= b or a < prev for prev, (a, b) in zip([0, *(e for _, e in spans)], spans, strict=False)):
                raise ValueError("units: spans must be non-empty, ordered and disjoint")
            self.spans = spans

        @property
        def num_sources(self) -> int:
            return len(self.spans)

        def split_context(self) -> None:  # the spans are given
            pass

        def get_source(self, index: int) -> str:
            a, b = self.spans[index]
            return self.context[a:b]

        def get_context(self, mask=None) -> str:
            keep = np.ones(self.num_sources, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
            return _ablated(self.context, self.spans, keep)

    return UnitPartitioner


def _ablated(context: str, spans: list[tuple[int, int]], keep: np.ndarray) -> str:
    """``context`` with the sources ``keep`` drops removed. Text that is not a source's stays, except the whitespace
    gap before a dropped source, and before a kept one that would start the text or follow other whitespace (so
    dropping "B." from "A. B. C." gives "A. C.", as the library's partitioner does)."""
    out, pos, prev_kept = "", 0, True
    for k, (a, b) in zip(keep, spans, strict=True):
        gap = context[pos:a]
        if pos == 0 or gap.strip() or (k and (prev_kept or (out and not out[-1].isspace()))):
            out += gap
        if k:
            out += context[a:b]
        pos, prev_kept = b, bool(k)
    return out + context[pos:]


def _planned_citer(base: type) -> type:
    class PlannedCiter(base):
        """ContextCiter with the planned request's prompt format and its fixed target as the response."""

        def __init__(self, model, tokenizer, partitioner, chat: bool, response_ids: list[int], **kwargs) -> None:
            self.chat = chat
            self.fixed_response_ids = list(response_ids)
            super().__init__(
                model,
                tokenizer,
                partitioner.context,
                "",
                prompt_template="{context}",
                partitioner=partitioner,
                **kwargs,
            )
            _, prompt = self._get_prompt_ids(return_prompt=True)
            self._cache["output"] = prompt + tokenizer.decode(self.fixed_response_ids)  # never generate

        def _get_prompt_ids(self, mask=None, return_prompt: bool = False):
            prompt = self.prompt_template.format(context=self.partitioner.get_context(mask), query=self.query)
            if self.chat:  # the library's own formatting
                prompt = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            if not self.chat:  # as the planned request: raw text starts with the tokenizer's BOS, if any
                ids = leading_special_ids(self.tokenizer) + ids
            return (ids, prompt) if return_prompt else ids

        @property
        def _response_ids(self) -> list[int]:
            return self.fixed_response_ids

    return PlannedCiter


def build_citer(lm, planned, **kwargs):
    """The ``ContextCiter`` of one planned request (nothing run yet); ``kwargs`` go to ``ContextCiter``."""
    unit_partitioner, planned_citer = _citer_class()
    spans = [(u.start, u.start + u.length) for u in planned.units]
    partitioner = unit_partitioner(planned.prepared.prompt, spans)
    target = planned.target_ids.tolist()
    kwargs = SETTINGS["contextcite"] | kwargs
    citer = planned_citer(lm.model, lm.tokenizer, partitioner, planned.prepared.chat, target, **kwargs)
    ids = planned.sweep_input.input_ids.tolist()
    if citer._get_prompt_ids() + target != ids:
        raise ValueError("contextcite: its prompt tokens differ from the planned request's")
    return citer


def unit_scores(lm, planned, **kwargs) -> np.ndarray:
    """ContextCite's surrogate weight of each unit for the whole target (positive = supports it)."""
    if not planned.units:
        return np.zeros(0)
    pad = lm.tokenizer.pad_token  # the library sets a missing pad token to EOS on the shared tokenizer; undo it
    try:
        citer = build_citer(lm, planned, **kwargs)
        weight, _bias = citer._get_attributions_for_ids_range(0, len(citer._response_ids))  # the whole target
    finally:
        if pad is None:
            lm.tokenizer.pad_token = None
    return np.asarray(weight, dtype=np.float64)
