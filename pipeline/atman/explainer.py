"""The public entry point: ``Explainer(model, tokenizer, AtManConfig()).explain(prompt, target)`` (or
``.explain(ExplainRequest(prompt, target, ...))``: the same inputs as one object)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.atman import attention, devices, precision
from pipeline.atman.config import AtManConfig
from pipeline.atman.explanation import Explanation
from pipeline.atman.images import ImageUnit, image_units, token_patches
from pipeline.atman.plan import embedding_cosine, unit_multipliers
from pipeline.atman.prompts import (
    PreparedPrompt,
    context_length,
    generate_target,
    generation_kwargs,
    prepare_prompt,
    tokenize_target,
)
from pipeline.atman.reference import reference_sweep
from pipeline.atman.request import ExplainRequest
from pipeline.atman.sweep import SweepInput, SweepOutput, sweep
from pipeline.atman.units import Span, Unit, UnitSpan, build_units, normalize_spans

if TYPE_CHECKING:
    from transformers import GenerationConfig


class LowPrecisionWarning(UserWarning):
    """The sweep computes in bfloat16 throughout (precision ``bf16``): AtMan's scores carry rounding noise."""


def _warn_low_precision(name: str) -> None:
    """AtMan's scores are differences of cross-entropies between nearly equal forward passes; computed in bfloat16
    throughout, the rounding of each pass moves them by about as much as the small effects. Measured
    (docs/PRECISION.md): SmolLM2-135M on SQuAD words, bf16 against float32 with the same weights, rank correlation
    0.56 and mAP 39.9 -> 26.9 over 16 examples; the naive sweep moves the same way (an H200), so it is the
    arithmetic, not the engine. The other policies keep the residual stream in float32."""
    if name == "bf16":
        warnings.warn(
            "precision: the sweep computes in bfloat16 throughout; rounding moves AtMan's scores by about as much "
            "as small effects (SmolLM2-135M on SQuAD words: rank correlation with float32 0.56, mAP 39.9 -> 26.9). "
            "Use precision auto (float32-grade scores from the same bf16 weights) for scores you compare or audit",
            LowPrecisionWarning,
            stacklevel=3,
        )


@dataclass(frozen=True)
class Planned:
    """One request, tokenized, with every suppression pass decided: ``sweep_input.multipliers`` has one row per
    unit of ``units`` (the prompt's), then one per unit of ``target_units`` (target tokens as inputs, when the
    config asks for them)."""

    prepared: PreparedPrompt
    target_ids: torch.Tensor
    units: list[Unit]
    sweep_input: SweepInput
    target_units: list[Unit] = field(default_factory=list)
    image_units: list[ImageUnit] = field(default_factory=list)  # after the target units in the multipliers
    image_sizes: list[tuple[int, int]] = field(default_factory=list)


class Explainer:
    """Explains a causal LM's predictions with AtMan.

    ``Explainer(model, tokenizer)`` takes a Hugging Face causal LM and its (fast) tokenizer as they come from
    ``from_pretrained``, the way Inseq and Captum's LLMAttribution take them; ``Explainer(lm)`` takes what
    ``pipeline.load_model`` returns (anything with ``.model`` and ``.tokenizer``). ``config`` is the method
    (default ``AtManConfig()``); ``Explainer(lm, config)``, the original form, still works: an ``AtManConfig`` in
    the tokenizer's place is the config. The model is used as it is (device, dtype); it must be in eval mode.

    ``probe=False`` skips the support probe at construction (``check_supported``): for planning requests that another
    method scores (a peer needs AtMan's units, not its suppression). ``run`` still refuses a model suppression cannot
    reach, on every forward pass.
    """

    def __init__(self, model, tokenizer=None, config: AtManConfig | None = None, *, probe: bool = True) -> None:
        if isinstance(tokenizer, AtManConfig):  # Explainer(lm, config)
            if config is not None:
                raise TypeError("config: given twice (in the tokenizer's place and as config=); give it once")
            tokenizer, config = None, tokenizer
        if config is not None and not isinstance(config, AtManConfig):
            raise TypeError(f"config: expected an AtManConfig, got {type(config).__name__}; e.g. AtManConfig()")
        self.lm = None
        self.processor = None
        from pipeline.atman.multimodal import is_processor

        if not isinstance(model, torch.nn.Module) and hasattr(model, "model") and hasattr(model, "tokenizer"):
            if tokenizer is not None:
                raise TypeError(
                    f"tokenizer: {type(model).__name__} carries its own tokenizer; pass Explainer(lm) or "
                    "Explainer(lm.model, tokenizer)"
                )
            self.lm, model, tokenizer = model, model.model, model.tokenizer
            self.processor = getattr(self.lm, "processor", None)
        if is_processor(tokenizer):  # a vision-language model's processor: its tokenizer does the text
            self.processor, tokenizer = tokenizer, tokenizer.tokenizer
        _check_model(model)
        _check_tokenizer(tokenizer, model)
        self.model, self.tokenizer = model, tokenizer
        config = config or AtManConfig()
        self.device = devices.input_device(self.model)
        self.dtype = precision.weights_dtype(self.model)
        self.config = config
        self.precision = precision.resolve(config.precision, self.dtype, self.device)
        """The policy ``config.precision`` resolved to for this model: what the sweep runs and every output records."""
        self._embeddings = self.model.get_input_embeddings().weight
        self._context = context_length(self.model, self.tokenizer)
        if probe:
            self.check_supported()
        _warn_low_precision(self.precision)

    def check_supported(self) -> None:
        """Refuse a model AtMan cannot explain exactly, before any request: one tiny sweep (3 tokens, one unit)
        must reach every attention layer through AtMan with the masks the model means. Raises
        ``UnsupportedModelError`` (a ValueError naming the model class and the reason). Every later forward
        pass is checked the same way, so a model that passes here still cannot return unperturbed scores."""
        probe = SweepInput(torch.tensor([0, 1, 2]), 1, torch.tensor([[self.config.factor, 1.0, 1.0]]))
        self.run([probe])

    def explain(
        self,
        prompt: str | ExplainRequest,
        target: str | None = None,
        *,
        generate: int | Mapping[str, Any] | GenerationConfig | None = None,
        explain_span: Span | list[Span] | list[int] | None = None,
        chat: bool | None = None,
        images: list | None = None,
        image_grid: tuple[int, int] | str | None = None,
    ) -> Explanation:
        """Explain ``target`` given ``prompt``; without a target, explain what the model generates.

        prompt: the text, or an ``ExplainRequest`` holding every argument below (then give none of them).
        generate: how to generate the target when none is given. An int: that many new tokens at most, greedy (the
            default is ``config.generate_max_tokens``). A dict of ``model.generate`` keyword arguments or a
            ``transformers.GenerationConfig``: e.g. ``{"max_new_tokens": 8, "do_sample": True, "top_p": 0.9}``
            (seed torch for a repeatable target) or ``{"eos_token_id": ..., "stop_strings": [...]}``. Greedy unless
            the arguments say otherwise; ``max_new_tokens`` (default ``config.generate_max_tokens``) is capped by
            the context; the target is cut before the first EOS token (the arguments' ``eos_token_id`` if given,
            else the model's and tokenizer's), which is never explained.
        explain_span: character range(s) of the prompt to explain (default all of it): a (start, end) pair as a
            tuple or a list, as JSON gives it, or a list of such pairs. Overlapping ranges are merged. Tokens
            outside them are never suppressed.
        chat: whether the prompt is wrapped in the tokenizer's chat template. None (the default) applies the rule:
            the template is used when the tokenizer has one and the prompt ends in '?' (trailing spaces ignored),
            because a question to an instruct model is meant as a user turn; anything else is raw text to continue.
            True / False decide explicitly. The decision and why are in ``Explanation.chat`` / ``chat_reason``
            and ``to_dict()["chat"]``; only the user's text is ever explained, never the template's tokens.

        images: for a vision-language model (the explainer built with its processor): PIL images, paths or bytes,
            shown before the prompt (through the processor's chat template when the chat rule applies). Every image
            token is a unit too (``Explanation.image_units``: boxes in the original image's pixels, with
            ``image_scores``), suppressed in the language model's attention like text. Without a target, the
            model generates one from the prompt and the images (``generate`` as for text).
        image_grid: group the image tokens into ROWS x COLS cells per image (``(8, 8)`` or ``"8x8"``): one pass per
            cell instead of one per token (hundreds per image). Default: ``config.image_grid``.

        Raises ValueError naming the parameter for empty prompt/target, over-long input, spans outside the prompt,
        generation arguments ``model.generate`` refuses, unreadable images.
        """
        request = ExplainRequest.of(prompt, target, generate=generate, explain_span=explain_span, chat=chat,
                                    images=images, image_grid=image_grid)  # fmt: skip
        return self._explain_requests([request])[0]

    def explain_batch(
        self,
        prompts: Sequence[str | ExplainRequest],
        targets: Sequence[str | None] | None = None,
        *,
        generate: int | Mapping[str, Any] | GenerationConfig | None = None,
        explain_spans: Sequence[Span | list[Span] | list[int] | None] | None = None,
        chat: bool | None = None,
    ) -> list[Explanation]:
        """Explain many prompts; their suppression passes are batched together on the device. ``generate`` and
        ``chat`` apply to every prompt, as in ``explain``; ``explain_spans`` has one entry per prompt. ``prompts``
        may be ``ExplainRequest``s instead, each with its own inputs (then give nothing else)."""
        targets = list(targets) if targets is not None else [None] * len(prompts)
        spans = list(explain_spans) if explain_spans is not None else [None] * len(prompts)
        if not (len(targets) == len(spans) == len(prompts)):
            raise ValueError("targets: explain_batch needs as many targets and explain_spans as prompts")
        requests = [
            ExplainRequest.of(p, t, generate=generate, explain_span=s, chat=chat)
            for p, t, s in zip(prompts, targets, spans, strict=True)
        ]
        return self._explain_requests(requests)

    def _explain_requests(self, requests: Sequence[ExplainRequest]) -> list[Explanation]:
        """Plan every request, then sweep them together: requests given as token ids share forward batches, those
        given as embeddings (with images) share theirs."""
        for request in requests:
            if request.images is None and request.image_grid is not None:
                raise ValueError("image_grid: given without images")
        planned = [self.plan(request) for request in requests]
        outputs: dict[int, SweepOutput] = {}
        for embedded in (False, True):
            group = [i for i, p in enumerate(planned) if (p.sweep_input.embeds is not None) == embedded]
            if group:
                outputs.update(zip(group, self.run([planned[i].sweep_input for i in group]), strict=True))
        return [self.explanation(p, outputs[i]) for i, p in enumerate(planned)]

    def plan(
        self,
        prompt: str | ExplainRequest,
        target: str | None = None,
        *,
        generate: int | Mapping[str, Any] | GenerationConfig | None = None,
        explain_span: Span | list[Span] | list[int] | None = None,
        chat: bool | None = None,
        images: list | None = None,
        image_grid: tuple[int, int] | str | None = None,
    ) -> Planned:
        """Validate and tokenize one request and decide every suppression pass (no forward pass but generation;
        with images, one unperturbed forward of the whole model). ``prompt`` may be an ``ExplainRequest`` holding
        the other arguments (then give none of them)."""
        request = ExplainRequest.of(prompt, target, generate=generate, explain_span=explain_span, chat=chat,
                                    images=images, image_grid=image_grid)  # fmt: skip
        if request.images is not None:
            return self._plan_images(request)
        cfg = self.config
        prompt = request.prompt
        prepared = prepare_prompt(self.tokenizer, prompt, request.chat)
        spans = normalize_spans(prompt, request.explain_span)
        target_ids = self._target_ids(prepared.prompt_ids, request.target, request.generate)
        ids = torch.cat([prepared.prompt_ids, target_ids])
        units = build_units(prompt, prepared.token_spans, spans, cfg.granularity, cfg.delimiter)
        return self.passes(Planned(prepared, target_ids, units, SweepInput(ids, len(target_ids), torch.ones(0))))

    def _target_ids(self, prompt_ids: torch.Tensor, target, generate, inputs: dict | None = None) -> torch.Tensor:
        """The target's ids: ``target`` tokenized, or generated after ``prompt_ids`` (``inputs``: the model's other
        inputs, e.g. a VLM's pixel values) within the context; prompt + target must fit the context."""
        if target is not None and generate is not None:
            raise ValueError("generate: give either a target or generate=N, not both")
        if target is None:
            kwargs = generation_kwargs(generate, self.config.generate_max_tokens)
            self._check_length(len(prompt_ids) + 1)
            if self._context is not None:
                kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], self._context - len(prompt_ids))
            target_ids = generate_target(self.model, self.tokenizer, prompt_ids, kwargs, inputs)
        else:
            target_ids = tokenize_target(self.tokenizer, target)
        self._check_length(len(prompt_ids) + len(target_ids))
        return target_ids

    def _plan_images(self, request: ExplainRequest) -> Planned:
        from pipeline.atman.multimodal import load_images, model_inputs, prepare_with_images
        from pipeline.atman.vision import lift

        cfg = self.config
        if self.processor is None:
            from pipeline.atman.images import FAMILIES

            raise ValueError(
                f"images: {type(self.model).__name__} came with a tokenizer, not an image processor, so it takes "
                f"text only here; images need a vision-language model of a supported family ({', '.join(FAMILIES)}) "
                "with its processor (load_model does this; or Explainer(model, AutoProcessor.from_pretrained(name)))"
            )
        _check_image_config(cfg)
        grid = _image_grid(request.image_grid if request.image_grid is not None else cfg.image_grid)
        pil = load_images(request.images)
        prompt = request.prompt
        shown = prepare_with_images(self.processor, self.model, prompt, pil, request.chat)
        device, dtype = self.device, self._embeddings.dtype
        extras = None
        if request.target is None:  # what the model says about the images: generated with them, then explained
            extras = model_inputs(shown, torch.zeros(0, dtype=torch.long), device, dtype)
            extras.pop("input_ids")
        target_ids = self._target_ids(shown.prepared.prompt_ids, request.target, request.generate, extras)
        patches = token_patches(self.model, self.processor.image_processor, shown.sizes, shown.geometry)
        spans = normalize_spans(prompt, request.explain_span)
        units = build_units(prompt, shown.prepared.token_spans, spans, cfg.granularity, cfg.delimiter)
        lifted = lift(self.model, model_inputs(shown, target_ids, device, dtype), len(target_ids))
        ids = torch.cat([shown.prepared.prompt_ids, target_ids])
        sweep_input = SweepInput(
            ids, len(target_ids), torch.ones(0), lifted.embeds, lifted.positions, lifted.blocks, lifted.base_ce
        )
        planned = Planned(
            shown.prepared,
            target_ids,
            units,
            sweep_input,
            image_units=image_units(patches, shown.image_positions, grid, shown.sizes),
            image_sizes=shown.sizes,
        )
        return self.passes(planned)

    def passes(self, planned: Planned) -> Planned:
        """``planned`` with its suppression passes decided under this explainer's config (same tokens and prompt
        units): the target units the config asks for and every pass's key multipliers (paper Eq. 4 and 6)."""
        cfg = self.config
        ids, n_target = planned.sweep_input.input_ids, planned.sweep_input.n_target
        n_prompt = len(ids) - n_target
        if planned.image_units:
            _check_image_config(cfg)
        target_units = []
        if cfg.target_units:
            texts = [self.tokenizer.decode([t]) for t in planned.target_ids.tolist()]
            starts = np.cumsum([0, *map(len, texts)])  # character spans in the decoded target
            target_units = [Unit(texts[j], int(starts[j]), len(texts[j]), (n_prompt + j,)) for j in range(n_target - 1)]
        image_rows = [Unit("", 0, 0, u.positions) for u in planned.image_units]
        units = planned.units + target_units + image_rows
        cosine = candidates = None
        if cfg.conceptual_threshold is not None:
            from accelerate.utils import align_module_device

            with align_module_device(self.model.get_input_embeddings()):  # an offloaded table is loaded for this
                table = self.model.get_input_embeddings().weight.detach()
                cosine = embedding_cosine(table, ids.to(table.device)).cpu()
            candidates = sorted({p for u in planned.units for p in u.positions})
            if cfg.conceptual_candidates == "prompt_and_target":
                candidates += list(range(n_prompt, len(ids) - 1))  # the last target token is never an input
        mult = unit_multipliers(len(ids), units, cfg.factor, cosine, cfg.conceptual_threshold, candidates)
        return replace(planned, sweep_input=replace(planned.sweep_input, multipliers=mult), target_units=target_units)

    def score(self, planned: Planned) -> Explanation:
        """The explanation of a request planned by any explainer of the same model (same tokens and units) under
        this explainer's config: its passes, the sweep and the scoring. An evaluation plans each example once and
        scores it under several configs."""
        planned = self.passes(planned)
        return self.explanation(planned, self.run([planned.sweep_input])[0])

    def suppressed_rise(
        self, planned: Planned, unit_sets: Sequence[Sequence[int]], factor: float | None = None
    ) -> np.ndarray:
        """[len(unit_sets)] rise of the whole target's CE (nats) with each set of ``planned.units`` (indices)
        suppressed together in one pass, under this config's mode and ``factor`` (None: the config's) and without
        conceptual neighbours: the deletion curve of a ranking (its top-1, top-2, ... units)."""
        if len(unit_sets) == 0:
            return np.zeros(0, dtype=np.float64)
        factor = self.config.factor if factor is None else factor
        if not (math.isfinite(factor) and factor >= 0):
            raise ValueError(f"factor: {factor} is not a finite number >= 0")
        out = self.run([suppressed_input(planned, unit_sets, factor)])[0]
        return (out.ce - out.base_ce[None]).sum(dim=1).double().numpy()

    def run(self, inputs: list[SweepInput], batch_size: int | None = None) -> list[SweepOutput]:
        """The suppression sweeps of planned requests, batched together; ``batch_size`` overrides the config's
        forward batch (the job halves it on CUDA out-of-memory). The model's attention is routed through AtMan
        for this call only. Raises ``UnsupportedModelError`` (a ValueError naming the model class and the reason)
        when suppression cannot reach every attention layer."""
        cfg = self.config
        with attention.activated(self.model), precision.computing(self.model, self.precision):
            if cfg.engine == "reference":
                return _finite(reference_sweep(self.model, inputs, mode=cfg.mode), self.precision)
            return _finite(
                sweep(
                    self.model,
                    inputs,
                    mode=cfg.mode,
                    prefix_reuse=cfg.prefix_reuse,
                    batch_size=batch_size or cfg.batch_size,
                    max_batch_tokens=cfg.max_batch_tokens,
                    padding_side=cfg.padding_side,
                    attention_kernel=cfg.attention_kernel,
                ),
                self.precision,
            )

    def params(self) -> dict:
        """The method as it ran: the config, with ``precision`` as resolved for this model (never ``auto``)."""
        return self.config.model_dump() | {"precision": self.precision}

    def _check_length(self, n: int) -> None:
        if self._context is not None and n > self._context:
            raise ValueError(
                f"prompt: prompt + target is {n} tokens, longer than the model's context of {self._context}; "
                "shorten the prompt or the target"
            )

    def explanation(self, planned: Planned, out: SweepOutput) -> Explanation:
        """Scores of one planned request from its sweep output (aggregate, postprocess and normalize applied).
        A target unit (target token j' as an input) is scored for the later target tokens j > j' only."""
        cfg = self.config
        delta = (out.ce - out.base_ce[None]).numpy().astype(np.float32)  # [U + U_target, T], positive = supported
        n = len(planned.units)
        for i in range(len(planned.target_units)):
            delta[n + i, : i + 1] = 0.0  # not an input of these targets (non-zero only through conceptual neighbours)
        terms = delta**2 if cfg.aggregate == "sum_of_squares" else delta
        scores = terms.sum(axis=1)
        per_target = terms
        if cfg.postprocess == "abs":
            scores, per_target = np.abs(scores), np.abs(per_target)
        elif cfg.postprocess == "square":
            scores, per_target = scores**2, per_target**2
        if cfg.normalize:  # prompt and target units share one scale
            scores, per_target = _unit_max(scores), _unit_max(per_target)
        scores, per_target = scores.astype(np.float32), per_target.astype(np.float32)
        n_text = n + len(planned.target_units)
        images = planned.image_sizes or None
        tok = self.tokenizer
        return Explanation(
            prompt=planned.prepared.prompt,
            target=tok.decode(planned.target_ids),
            target_tokens=[tok.decode([t]) for t in planned.target_ids.tolist()],
            base_target_ce=float(out.base_ce.sum()),
            base_ce_per_token=out.base_ce.tolist(),
            units=[UnitSpan(u.text, u.start, u.length) for u in planned.units],
            scores=scores[:n],
            per_target=per_target[:n] if cfg.keep_per_target else None,
            mode=cfg.mode,
            factor=cfg.factor,
            granularity=cfg.granularity,
            conceptual_threshold=cfg.conceptual_threshold,
            chat=planned.prepared.chat,
            chat_reason=planned.prepared.chat_reason or None,
            n_prompt_tokens=len(planned.prepared.prompt_ids),
            params=self.params(),
            target_units=[UnitSpan(u.text, u.start, u.length) for u in planned.target_units]
            if cfg.target_units
            else None,
            target_scores=scores[n:n_text] if cfg.target_units else None,
            target_per_target=per_target[n:n_text] if cfg.target_units and cfg.keep_per_target else None,
            images=images,
            image_units=[u.patch for u in planned.image_units] if images else None,
            image_scores=scores[n_text:] if images else None,
        )


def suppressed_input(planned: Planned, unit_sets: Sequence[Sequence[int]], factor: float) -> SweepInput:
    """``planned``'s sweep input with one pass per set of ``planned.units`` (indices) suppressed together at
    ``factor``, no conceptual neighbours: what ``Explainer.suppressed_rise`` sweeps."""
    groups = [
        Unit("", 0, 0, tuple(sorted({p for i in unit_set for p in planned.units[i].positions})))
        for unit_set in unit_sets
    ]
    mult = unit_multipliers(len(planned.sweep_input.input_ids), groups, factor)
    return replace(planned.sweep_input, multipliers=mult)


def _finite(outputs: list[SweepOutput], name: str) -> list[SweepOutput]:
    """Refuse a sweep whose cross-entropies are not finite (e.g. float16 products overflowing at 65,504): such
    numbers would become scores that look like any other."""
    for out in outputs:
        if not (torch.isfinite(out.base_ce).all() and torch.isfinite(out.ce).all()):
            raise FloatingPointError(
                f"precision: the sweep under {name!r} produced a non-finite cross-entropy (an overflow or NaN in a "
                "forward pass); use precision fp32 or tf32 for this model"
            )
    return outputs


def _check_model(model) -> None:
    """Refuse what is not a Hugging Face causal LM before anything else touches it, with the fix in the message."""
    if isinstance(model, str):
        raise TypeError(
            f"model: got the name {model!r}; load it first: Explainer(pipeline.load_model({model!r})), or "
            "Explainer(AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name))"
        )
    if not isinstance(model, torch.nn.Module) or not all(
        hasattr(model, a) for a in ("config", "generate", "get_input_embeddings")
    ):
        raise TypeError(
            f"model: expected a Hugging Face causal LM (a PreTrainedModel from AutoModelForCausalLM) or a "
            f"LoadedModel from pipeline.load_model, got {type(model).__name__}"
        )
    if model.training:  # dropout would make every pass, and so every score, random
        raise ValueError("model: is in training mode (dropout makes the scores random); call model.eval() first")


def _check_tokenizer(tokenizer, model) -> None:
    if tokenizer is None:
        raise TypeError(
            f"tokenizer: {type(model).__name__} has no tokenizer; pass it: Explainer(model, tokenizer) with "
            "tokenizer = AutoTokenizer.from_pretrained(<the model's name>), or use pipeline.load_model"
        )
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise TypeError(f"tokenizer: expected a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer: {type(tokenizer).__name__} is a slow tokenizer; units are located through character "
            "offsets, which only fast tokenizers give: AutoTokenizer.from_pretrained(name, use_fast=True)"
        )


def _check_image_config(cfg: AtManConfig) -> None:
    if cfg.conceptual_threshold is not None:  # every image token has one id: all would be each other's neighbours
        raise ValueError("conceptual_threshold: conceptual suppression is not defined for image tokens; use None")


def _image_grid(grid) -> tuple[int, int] | None:
    """``image_grid``: None (every image token its own unit), (rows, cols), or "ROWSxCOLS"."""
    if grid is None:
        return None
    try:
        rows, cols = (int(x) for x in grid.lower().split("x")) if isinstance(grid, str) else (int(x) for x in grid)
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"image_grid: {grid!r} is not ROWSxCOLS (e.g. 8x8) or a (rows, cols) pair") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"image_grid: {grid!r} needs at least one row and one column")
    return rows, cols


def _unit_max(x: np.ndarray) -> np.ndarray:
    peak = float(np.abs(x).max()) if x.size else 0.0
    return x / peak if peak > 0 else x
