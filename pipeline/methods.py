"""Every method a job (``method.name``) and ``atman explain --method`` run, by the names of ``pipeline.eval_methods``,
through one pipeline and into one result: the engine's ``Explanation`` (so the same Parquet row, the same JSON).

- ``atman`` (the default) is the engine itself: one suppression pass per unit, the passes of many prompts batched
  together (the worker's ``_explain``; ``atman explain``'s ``Explainer.explain``). Nothing here changes it.
- every other method scores one planned request at a time (``MethodRunner.explain``): ``atman:<variant>`` through
  ``pipeline.atman.variants.VARIANTS`` under the run's AtMan config (its mode and factor), the peers and the
  baselines through ``pipeline.peers.peer_scores``. All plan their requests with the run's ``Explainer`` (its
  granularity, delimiter and the row's explain span decide the units; a missing target is generated), so every
  method scores the same units of the same tokens.

What those methods give is a score per unit, for the whole target: the result's ``per_target`` is None (the
column is null) and its ``base_target_ce`` is the unperturbed model's, from one plain forward pass. A peer has no
suppression: its ``mode`` is its name and its ``factor`` 0. Images are AtMan's only (the other methods score the
prompt's text units): a row with an image is refused by name.
"""

from __future__ import annotations

import inspect

import numpy as np

from pipeline.atman.config import AtManConfig
from pipeline.errors import MethodUnsupported
from pipeline.eval_methods import UNIT_FIELDS, atman_family

DEFAULT = "atman"


class MethodRefused(ValueError):
    """This method cannot score this request as configured (e.g. ContextCite with fewer ablations than units, an
    image for a text-only method): the row is skipped with this message, the run goes on."""


def variant_of(name: str) -> str | None:
    """``atman:<variant>`` -> the variant (a key of ``VARIANTS``); None for any other name."""
    from pipeline.atman.variants import VARIANTS

    variant = name.removeprefix("atman:")
    return variant if name.startswith("atman:") and variant in VARIANTS else None


def variant_settings(variant: str) -> dict:
    """An estimator's own settings: the defaults of its keyword parameters after ``(explainer, planned)`` (e.g.
    ``coarse``'s ``refine_share``), read from its signature, so a new variant needs no entry here."""
    from pipeline.atman.variants import VARIANTS

    parameters = list(inspect.signature(VARIANTS[variant]).parameters.values())[2:]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def method_params(name: str, config: AtManConfig, resolved: dict | None = None) -> dict:
    """What a run records as its method (``method_params``): the name; for the AtMan family the AtMan config
    (``resolved``: ``Explainer.params()``, precision as resolved on the actor) and a variant's settings; for a peer
    or a baseline the unit fields it uses and its module's ``SETTINGS``."""
    if atman_family(name):
        params = {"name": name} | (resolved or config.model_dump(mode="json"))
        variant = variant_of(name)
        return params | ({"settings": variant_settings(variant)} if variant else {})
    from pipeline.peers import peer_settings

    return {"name": name, **{k: getattr(config, k) for k in UNIT_FIELDS}, "settings": peer_settings(name)}


class MethodRunner:
    """One method on one loaded model: plans requests with the run's ``Explainer`` and, for every method but
    ``atman``, scores them one at a time (``explain``). Built once per model (a job's actor): a model the method
    cannot explain is refused here, before any request (``MethodUnsupported``)."""

    def __init__(self, lm, name: str, config: AtManConfig) -> None:
        from pipeline.atman.explainer import Explainer

        self.lm, self.name, self.variant = lm, name, variant_of(name)
        if not atman_family(name):
            from pipeline.peers import check_model

            try:
                check_model(name, lm.model)
            except RuntimeError as err:  # e.g. AttnLRPUnavailable: no rules for this architecture, lxt missing
                raise MethodUnsupported(
                    f"{name} cannot explain this model: {str(err).removeprefix(f'{name}: ')}; choose another method "
                    "or a model it supports"
                ) from None
        # AtMan's probe refuses what suppression cannot reach; a peer only needs the planned units
        self.explainer = Explainer(lm, config, probe=atman_family(name))

    def params(self) -> dict:
        """``method_params`` as this model runs it (the AtMan family's precision resolved)."""
        resolved = self.explainer.params() if atman_family(self.name) else None
        return method_params(self.name, self.explainer.config, resolved)

    def plan(self, request):
        """The engine's plan of ``request`` (an ``ExplainRequest``); a request with images is refused for every
        method but ``atman`` before anything is computed."""
        if self.name != DEFAULT and request.images is not None:
            raise MethodRefused(f"image: {self.name} scores the prompt's text only; images need method atman")
        return self.explainer.plan(request)

    def scores(self, planned) -> np.ndarray:
        """One score per planned unit, whole target, higher = more relevant; ``MethodRefused`` when the method
        cannot score this request as configured."""
        from pipeline.peers import peer_scores, refusal

        if self.variant is not None:
            from pipeline.atman.variants import VARIANTS

            return np.asarray(VARIANTS[self.variant](self.explainer, planned), dtype=np.float64)
        problem = refusal(self.name, planned)
        if problem is not None:
            raise MethodRefused(problem)
        return peer_scores(self.name, self.lm, planned)

    def explain(self, planned):
        """The ``Explanation`` of one planned request under this method (not ``atman``: its sweeps are batched by
        the caller): the scores, no per-target matrix, the unperturbed model's base CE."""
        from pipeline.atman.explanation import Explanation
        from pipeline.atman.units import UnitSpan

        if self.name == DEFAULT:
            raise ValueError("method: atman is explained by Explainer.run / explain, batched")
        scores = self.scores(planned).astype(np.float32)
        base = base_ce(self.lm.model, planned)
        cfg, tok = self.explainer.config, self.explainer.tokenizer
        peer = self.variant is None
        return Explanation(
            prompt=planned.prepared.prompt,
            target=tok.decode(planned.target_ids),
            target_tokens=[tok.decode([t]) for t in planned.target_ids.tolist()],
            base_target_ce=float(base.sum()),
            base_ce_per_token=base.tolist(),
            units=[UnitSpan(u.text, u.start, u.length) for u in planned.units],
            scores=scores,
            per_target=None,
            mode=self.name if peer else cfg.mode,
            factor=0.0 if peer else cfg.factor,
            granularity=cfg.granularity,
            conceptual_threshold=None,
            chat=planned.prepared.chat,
            chat_reason=planned.prepared.chat_reason or None,
            n_prompt_tokens=len(planned.prepared.prompt_ids),
            params=self.params(),
        )


def base_ce(model, planned) -> np.ndarray:
    """[target tokens] cross-entropy of each target token under the unperturbed model (one forward pass, logits at
    the target's positions only), float32 log-softmax."""
    import torch

    ids = planned.sweep_input.input_ids
    n_target = planned.sweep_input.n_target
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        logits = model(input_ids=ids[None].to(device), logits_to_keep=n_target + 1).logits[0, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits, ids[-n_target:].to(logits.device), reduction="none")
    return ce.cpu().numpy().astype(np.float64)
