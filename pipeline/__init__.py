"""atman-pipeline: AtMan explanations of causal LMs, at corpus scale."""

from pipeline.atman import AtManConfig, Explainer, Explanation, UnsupportedModelError
from pipeline.models import DEFAULT_MODEL, LoadedModel, load_model

__all__ = [
    "AtManConfig",
    "DEFAULT_MODEL",
    "Explainer",
    "Explanation",
    "LoadedModel",
    "load_model",
    "UnsupportedModelError",
]
