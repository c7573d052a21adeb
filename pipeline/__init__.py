"""atman-pipeline: AtMan explanations of causal LMs, at corpus scale.

Names are imported on first use: the job driver, the CLI's parser and the query tools do not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.atman import AtManConfig, Explainer, Explanation, ScoredUnit, UnitSpan, UnsupportedModelError
    from pipeline.models import DEFAULT_MODEL, LoadedModel, load_model

from pipeline import atman as _atman  # itself lazy: no torch yet

_WHERE = {
    **_atman._WHERE,
    "DEFAULT_MODEL": "pipeline.models",
    "LoadedModel": "pipeline.models",
    "load_model": "pipeline.models",
}

__all__ = [
    "AtManConfig",
    "DEFAULT_MODEL",
    "Explainer",
    "Explanation",
    "LoadedModel",
    "load_model",
    "ScoredUnit",
    "UnitSpan",
    "UnsupportedModelError",
]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
