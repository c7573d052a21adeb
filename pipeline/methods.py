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

What each method runs per row, nothing run (``row_cost``: forward and backward passes, tokens, calls, from each
method's code and settings) is the one count ``atman plan`` estimates a non-atman job with and the worker's
markers report (``unit_passes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from pipeline.atman.config import AtManConfig
from pipeline.errors import MethodUnsupported
from pipeline.eval_methods import UNIT_FIELDS, atman_family, variant_of, variant_settings

DEFAULT = "atman"


class MethodRefused(ValueError):
    """This method cannot score this request as configured (e.g. ContextCite with fewer ablations than units, an
    image for a text-only method): the row is skipped with this message, the run goes on."""


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


# --- what a method runs per row ---------------------------------------------------------------------------------

BACKWARD_FORWARDS = 2
"""A backward pass counted as forward passes, by convention: about two forwards (the usual FLOP count, a gradient
per matmul for its input and one for its weight). These methods ask for the inputs' gradients only, so it is a
convention, not a measurement; a job runs one method, whose share of backwards per row hardly varies, so the
convention moves the seconds per pass the plan fits, not its estimate."""


@dataclass(frozen=True)
class RowCost:
    """What explaining one planned row runs on the model (planning, e.g. generating a missing target, is apart):
    ``forwards`` and ``backwards`` in sequences (a call over B sequences counts B); ``tokens``, forward-pass
    equivalent tokens (a forward sequence's tokens once, a backward's ``BACKWARD_FORWARDS`` times); ``calls``, the
    model's forward and backward calls; ``exact`` False where part of it depends on what the method computes and
    is counted as a ceiling (``row_cost`` names which)."""

    forwards: int = 0
    backwards: int = 0
    tokens: int = 0
    calls: float = 0.0
    exact: bool = True

    @property
    def passes(self) -> int:
        """Forward-pass equivalents: forwards + ``BACKWARD_FORWARDS`` x backwards."""
        return self.forwards + BACKWARD_FORWARDS * self.backwards

    def __add__(self, other: RowCost) -> RowCost:
        return RowCost(
            self.forwards + other.forwards,
            self.backwards + other.backwards,
            self.tokens + other.tokens,
            self.calls + other.calls,
            self.exact and other.exact,
        )


def forwards(rows: int, length: int, calls: int | None = None) -> RowCost:
    """``rows`` sequences of ``length`` tokens run forward, in ``calls`` calls (default: one each)."""
    return RowCost(rows, 0, rows * length, rows if calls is None else calls)


def forwards_backwards(rows: int, length: int, calls: int | None = None) -> RowCost:
    """``rows`` sequences of ``length`` tokens run forward and back, in ``calls`` calls each way (default: one
    sequence a call)."""
    calls = rows if calls is None else calls
    return RowCost(rows, rows, (1 + BACKWARD_FORWARDS) * rows * length, 2 * calls)


def row_cost(name: str, planned, config: AtManConfig) -> RowCost:
    """What method ``name`` runs to explain ``planned`` (a ``Planned``) under ``config``, nothing run: its own
    passes (``COSTS``: each rule's docstring, read from the method's code and settings) and, for every method but
    ``atman``, ``base_ce``'s forward of the whole row. ValueError naming ``method.name`` for a method without a
    rule (``tests/test_methods_cost.py`` checks every method has one, and the rules against the model's passes)."""
    if name not in COSTS:
        raise ValueError(f"method.name: {name!r} has no cost rule (pipeline.methods.COSTS)")
    cost = COSTS[name](planned, config)
    return cost if name == DEFAULT else cost + forwards(1, len(planned.sweep_input.input_ids))


def _sweep(seq, config: AtManConfig) -> RowCost:
    """The engine's sweep of one ``SweepInput`` alone: its unperturbed pass and a pass per multiplier row that
    suppresses anything, packed and prefix-reused as the sweep does (``sweep_cost``)."""
    from pipeline.atman.sweep import sweep_cost

    (tokens,), (passes,), (calls,) = sweep_cost([seq], config, config.batch_size)
    return RowCost(passes, 0, tokens, calls)


def _sweeps(planned, config: AtManConfig, unit_sets: list) -> RowCost:
    """``Explainer.suppressed_rise`` of ``unit_sets`` (sets of unit indices): nothing for none, else a sweep."""
    from pipeline.atman.explainer import suppressed_input

    return _sweep(suppressed_input(planned, unit_sets, config.factor), config) if len(unit_sets) else RowCost()


def _atman(planned, config: AtManConfig) -> RowCost:
    """``atman``: its sweep of this row alone, the unperturbed pass and one per unit (prompt, image and, under
    ``target_units``, target units). In a job its rows share forward calls, which the plan counts per batch."""
    return _sweep(planned.sweep_input, config)


def _n(planned) -> int:
    """The row's tokens: prompt and target."""
    return len(planned.sweep_input.input_ids)


def _occlusion(planned, config: AtManConfig) -> RowCost:
    """``occlusion`` (Captum ``FeatureAblation``): the unablated row, then every unit ablated, whole rows,
    ``perturbations_per_eval`` of them a call; nothing without units."""
    from pipeline.peers import peer_settings

    units = len(planned.units)
    if not units:
        return RowCost()
    per_call = peer_settings("occlusion")["perturbations_per_eval"]
    return forwards(1, _n(planned)) + forwards(units, _n(planned), math.ceil(units / per_call))


def _contextcite(planned, config: AtManConfig) -> RowCost:
    """``contextcite``: ``num_ablations`` ablated prompts with the target, ``batch_size`` a call (the library's
    ``get_masks_and_logit_probs``); nothing without units. Not exact: each ablated prompt is tokenized anew by
    the library, so its tokens are known only then; counted at the whole row's (a ceiling: an ablation drops text)."""
    from pipeline.peers import peer_settings

    if not planned.units:
        return RowCost()
    settings = peer_settings("contextcite")
    rows = settings["num_ablations"]
    cost = forwards(rows, _n(planned), math.ceil(rows / settings["batch_size"]))
    return replace(cost, exact=False)


def _one_gradient(planned, config: AtManConfig) -> RowCost:
    """``attnlrp`` and ``ixg``: one forward and one backward of the whole row."""
    return forwards_backwards(1, _n(planned))


def _integrated(planned, config: AtManConfig) -> RowCost:
    """``ig`` (Captum ``IntegratedGradients``): ``steps`` points, ``IG_BATCH`` a call, forward and back."""
    from pipeline.evaluate import IG_BATCH
    from pipeline.peers import peer_settings

    steps = peer_settings("ig")["steps"]
    return forwards_backwards(steps, _n(planned), math.ceil(steps / IG_BATCH))


def _rollout(planned, config: AtManConfig) -> RowCost:
    """``rollout``: one forward of the whole row (its attention weights)."""
    return forwards(1, _n(planned))


def _gradient(steps: int, planned) -> RowCost:
    """``steps`` forwards and backwards of the row but its last token (``suppression_gradient``); none without units."""
    return forwards_backwards(steps, _n(planned) - 1) if planned.units else RowCost()


def _grad(planned, config: AtManConfig) -> RowCost:
    """``atman:grad``: one suppression gradient."""
    return _gradient(1, planned)


def _grad_path(planned, config: AtManConfig) -> RowCost:
    """``atman:grad-path``: one suppression gradient per path point (``steps``)."""
    return _gradient(variant_settings("grad-path")["steps"], planned)


def _coarse(planned, config: AtManConfig) -> RowCost:
    """``atman:coarse``: a sweep of the sentences, then one of the units of the top ``refine_share`` of them (those
    of more than one unit). Which sentences score highest is known only then: unless every sentence is refined,
    the second sweep is counted for the sentences with the most units (a ceiling on its passes; its tokens as
    those sentences' passes would run)."""
    from pipeline.atman.variants import sentence_groups

    groups = sentence_groups(planned)
    top = max(1, math.ceil(variant_settings("coarse")["refine_share"] * len(groups))) if groups else 0
    largest = sorted(groups, key=len, reverse=True)[:top]
    refined = [[i] for g in largest if len(g) > 1 for i in g]
    exact = top == len(groups) or not any(len(g) > 1 for g in groups)
    cost = _sweeps(planned, config, groups) + _sweeps(planned, config, refined)
    return replace(cost, exact=exact)


def _joint(planned, config: AtManConfig, variant: str = "joint") -> RowCost:
    """``atman:joint``: a sweep of its random subsets (drawn from the row's tokens: known before running), then one
    of its single units. Which units the first fit ranks highest is known only then: the single passes are counted
    for the units that start earliest (their count is exact; their tokens and calls a ceiling: an earlier unit's
    pass runs more of the row)."""
    from pipeline.atman.variants import joint_masks

    settings, n = variant_settings(variant), len(planned.units)
    budget = n if settings["budget"] is None else settings["budget"]
    n_single = min(n, round(settings["single_share"] * budget))
    masks = joint_masks(planned, budget - n_single) if n else []
    singles = sorted(range(n), key=lambda i: min(planned.units[i].positions))[:n_single]
    cost = _sweeps(planned, config, [np.flatnonzero(m) for m in masks]) + _sweeps(
        planned, config, [[i] for i in singles]
    )
    return replace(cost, exact=n_single in (0, n))


COSTS = {
    DEFAULT: _atman,
    "atman:coarse": _coarse,
    "atman:joint": _joint,
    "atman:joint-knockout": partial(_joint, variant="joint-knockout"),
    "atman:grad": _grad,
    "atman:grad-path": _grad_path,
    "attnlrp": _one_gradient,
    "occlusion": _occlusion,
    "contextcite": _contextcite,
    "ixg": _one_gradient,
    "ig": _integrated,
    "rollout": _rollout,
}
"""Method name -> the rule of what it runs per row, ``(planned, config) -> RowCost`` (``row_cost`` adds the peers'
and variants' ``base_ce``)."""


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

    def refuse(self, planned) -> None:
        """``MethodRefused`` when a peer cannot score this planned request as configured (``peers.refusal``)."""
        from pipeline.peers import refusal

        problem = None if atman_family(self.name) else refusal(self.name, planned)
        if problem is not None:
            raise MethodRefused(problem)

    def cost(self, planned) -> RowCost:
        """``row_cost`` of ``planned`` under this method, nothing run; ``MethodRefused`` where ``scores`` would
        refuse it."""
        self.refuse(planned)
        return row_cost(self.name, planned, self.explainer.config)

    def scores(self, planned) -> np.ndarray:
        """One score per planned unit, whole target, higher = more relevant; ``MethodRefused`` when the method
        cannot score this request as configured."""
        from pipeline.peers import peer_scores

        if self.variant is not None:
            from pipeline.atman.variants import VARIANTS

            return np.asarray(VARIANTS[self.variant](self.explainer, planned), dtype=np.float64)
        self.refuse(planned)
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
            factor=0.0 if peer else _variant_factor(self.variant, cfg),
            granularity=cfg.granularity,
            conceptual_threshold=None,
            chat=planned.prepared.chat,
            chat_reason=planned.prepared.chat_reason or None,
            n_prompt_tokens=len(planned.prepared.prompt_ids),
            params=self.params(),
        )


def _variant_factor(variant: str, config: AtManConfig) -> float:
    """The factor a variant's passes run at: its own ``factor`` setting where it fixes one, else the run's."""
    own = variant_settings(variant).get("factor")
    return config.factor if own is None else own


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
