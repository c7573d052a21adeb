"""atman-pipeline: AtMan explanations of causal LMs, at corpus scale.

Names are imported on first use: the job driver, the CLI's parser and the query tools do not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.atman import (
        AtManConfig,
        Explainer,
        ExplainRequest,
        Explanation,
        ScoredUnit,
        UnitSpan,
        UnsupportedModelError,
    )
    from pipeline.models import DEFAULT_MODEL, LoadedModel, load_model

from pipeline import atman as _atman  # itself lazy: no torch yet
from pipeline.atman import views as _views  # the engine's Explanation shows itself through views registered here

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
    "ExplainRequest",
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


def _terminal_view(explanation, console=None, top_k: int = 5) -> None:
    from pipeline.render import render_explanation

    render_explanation(explanation, console=console, top_k=top_k)


def _html_view(explanation) -> str:
    from pipeline.report import explanation_html

    return explanation_html(explanation)


_views.VIEWS.update(terminal=_terminal_view, html=_html_view)
