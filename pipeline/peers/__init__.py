"""The attribution methods the evaluation compares with AtMan, on AtMan's units: the peers users pick instead of
AtMan, each through its own well-kept library (one module per method, each exposing ``unit_scores``), and the
gradient and rollout baselines (``baselines.py``).

Every method is a function ``(lm, planned) -> np.ndarray``: one relevance per unit of ``planned.units`` (a
``pipeline.atman.explainer.Planned``: the evaluation's tokens, prompt and target, and units), higher = more relevant
to the target. The evaluation (``pipeline/evaluate.py``) scores every method on the same planned request, so every
method sees identical tokens and units; AtMan itself and ``random`` (the evaluation's own generator, no model) are
the evaluation's. Imported lazily: the libraries are heavy.

A job (``method.name``) and ``atman explain --method`` run them too (``pipeline.methods``): each module's
``SETTINGS`` (method name -> the settings it runs with) is what their ``method_params`` records, ``check_model``
refuses a model a method has no rules for (once per model), ``refusal`` a request it cannot score as configured.
"""

from __future__ import annotations

import importlib

import numpy as np

METHODS = {
    "attnlrp": "pipeline.peers.attnlrp:unit_scores",  # AttnLRP (Achtibat et al., ICML 2024), PyPI lxt
    "occlusion": "pipeline.peers.occlusion:unit_scores",  # Captum FeatureAblation: one forward pass per unit
    "contextcite": "pipeline.peers.contextcite:unit_scores",  # ContextCite (Cohen-Wang et al., 2024), context-cite
    "ixg": "pipeline.peers.baselines:input_x_gradient",
    "ig": "pipeline.peers.baselines:integrated_gradients",
    "rollout": "pipeline.peers.baselines:rollout",
}
"""Method name (``pipeline.eval_methods``) -> ``module:function`` scoring it."""


def peer_scores(name: str, lm, planned) -> np.ndarray:
    """``name``'s relevance of each planned unit (float64, one per unit); KeyError for a name not registered."""
    module, function = METHODS[name].split(":")
    scores = np.asarray(getattr(importlib.import_module(module), function)(lm, planned), dtype=np.float64)
    if scores.shape != (len(planned.units),):
        raise ValueError(f"{name}: {scores.shape} scores for {len(planned.units)} units")
    return scores


def _module(name: str):
    return importlib.import_module(METHODS[name].split(":")[0])


def peer_settings(name: str) -> dict:
    """The settings ``name`` runs with, as its module declares them (``SETTINGS``): what a run's ``method_params``
    records beside the name."""
    return dict(_module(name).SETTINGS[name])


def check_model(name: str, model) -> None:
    """Refuse a model ``name`` cannot explain, before any request: AttnLRP has lxt's rules for some architectures
    only (``attnlrp.AttnLRPUnavailable`` naming the class and those it supports). The others take any causal LM."""
    if name == "attnlrp":
        from pipeline.peers.attnlrp import check_model as check_attnlrp

        check_attnlrp(model)


def refusal(name: str, planned) -> str | None:
    """Why ``name`` cannot score this planned request as configured (None: it can). ContextCite fits a surrogate
    over the units from its random ablations: with fewer ablations than units it cannot separate them."""
    if name == "contextcite":
        from pipeline.peers.contextcite import ablation_problem

        return ablation_problem(len(planned.units))
    return None
