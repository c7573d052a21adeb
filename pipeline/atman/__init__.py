"""AtMan: attention-manipulation explanations for causal LMs (Deiseroth et al., NeurIPS 2023).

The method only: torch + transformers, no Ray, no file I/O. Names are imported on first use, so that importing
the configuration (``pipeline.atman.config``) does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.atman.attention import UnsupportedModelError
    from pipeline.atman.config import AtManConfig
    from pipeline.atman.explainer import Explainer
    from pipeline.atman.explanation import Explanation
    from pipeline.atman.request import ExplainRequest
    from pipeline.atman.units import ScoredUnit, UnitSpan

_WHERE = {
    "AtManConfig": "pipeline.atman.config",
    "Explainer": "pipeline.atman.explainer",
    "Explanation": "pipeline.atman.explanation",
    "ExplainRequest": "pipeline.atman.request",
    "UnsupportedModelError": "pipeline.atman.attention",
    "UnitSpan": "pipeline.atman.units",
    "ScoredUnit": "pipeline.atman.units",
}

__all__ = [
    "AtManConfig",
    "ExplainRequest",
    "Explainer",
    "Explanation",
    "ScoredUnit",
    "UnitSpan",
    "UnsupportedModelError",
]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'pipeline.atman' has no attribute {name!r}")
