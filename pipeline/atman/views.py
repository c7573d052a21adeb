"""How an Explanation shows itself. The engine draws nothing: the package above it (``pipeline/__init__.py``)
registers a ``terminal`` view (``Explanation.show``) and an ``html`` view (``Explanation._repr_html_``), so
``pipeline/atman`` imports nothing from outside it. Importing any ``pipeline.atman`` module runs
``pipeline/__init__.py`` first, so the views are always registered when an Explanation exists."""

from __future__ import annotations

from collections.abc import Callable

VIEWS: dict[str, Callable] = {}


def view(name: str) -> Callable:
    """The registered view ``name``; a RuntimeError naming it when none is."""
    try:
        return VIEWS[name]
    except KeyError:
        raise RuntimeError(f"no {name!r} view of an Explanation is registered: `import pipeline` does") from None
