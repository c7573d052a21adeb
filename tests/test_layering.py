"""The engine stands alone: no module of ``pipeline/atman`` imports from the pipeline above it (its views of an
Explanation are registered from above: pipeline/atman/views.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).parent.parent / "pipeline" / "atman"


def _imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):  # imports inside functions count too: they are the ones that hide
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_the_engine_imports_nothing_from_above_it():
    upward = [
        f"{path.relative_to(ENGINE.parent.parent)}: {name}"
        for path in sorted(ENGINE.rglob("*.py"))
        for name in _imported(ast.parse(path.read_text()))
        if (name == "pipeline" or name.startswith("pipeline.")) and not name.startswith("pipeline.atman")
    ]
    assert not upward, f"pipeline/atman imports from above it: {upward}"


def test_an_explanation_shows_itself_through_the_registered_views():
    from pipeline.atman import views

    assert set(views.VIEWS) == {"terminal", "html"}, "import pipeline registers both"
