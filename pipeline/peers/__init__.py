"""The attribution methods users pick instead of AtMan, each through its own well-kept library, on AtMan's units.

One module per method; each exposes ``unit_scores(lm, planned) -> np.ndarray``: one relevance per unit of
``planned.units`` (a ``pipeline.atman.explainer.Planned``: the evaluation's tokens, prompt and target, and units),
higher = more relevant to the target. The evaluation (``pipeline/evaluate.py``) scores every method on the same
planned request, so every method sees identical tokens and units. Imported lazily: the libraries are heavy.
"""

from __future__ import annotations

import importlib

import numpy as np

PEERS = {
    "attnlrp": "pipeline.peers.attnlrp",  # AttnLRP (Achtibat et al., ICML 2024), PyPI lxt
    "occlusion": "pipeline.peers.occlusion",  # Captum FeatureAblation: one forward pass per unit
    "contextcite": "pipeline.peers.contextcite",  # ContextCite (Cohen-Wang et al., 2024), PyPI context-cite
}


def peer_scores(name: str, lm, planned) -> np.ndarray:
    """``name``'s relevance of each planned unit (float64, one per unit)."""
    module = importlib.import_module(PEERS[name])
    scores = np.asarray(module.unit_scores(lm, planned), dtype=np.float64)
    if scores.shape != (len(planned.units),):
        raise ValueError(f"{name}: {scores.shape} scores for {len(planned.units)} units")
    return scores
