"""The engine stands alone: no module of ``pipeline/atman`` imports from the pipeline above it (its views of an
Explanation are registered from above: pipeline/atman/views.py). And no two of pipeline's modules import each other,
however indirectly: a loop works only in the import order that happens to run first, and hides which module is the
lower one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "pipeline"
ENGINE = PACKAGE / "atman"


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


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under ``root`` (a package: ``a/b/__init__.py`` is ``a.b``)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _runtime_nodes(node: ast.AST):
    """Every node below ``node`` but those under ``if TYPE_CHECKING:`` (never run, so they close no loop); imports
    inside functions are walked too: a lazy import is a loop put off, not a loop undone."""
    for child in ast.iter_child_nodes(node):
        for kept in child.orelse if _type_checking(child) else [child]:
            yield kept
            yield from _runtime_nodes(kept)


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that module ``name`` imports: ``from a import b`` is module ``a.b`` where there is
    one, else ``a`` (a name defined in ``a``). A package a module sits in is not counted: Python imports it first,
    and it finishes before the module does."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and (source := _source(name, path, node)) in modules:
            found |= {f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names}
    return found - {name}


def _source(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The dotted module ``from ... import`` reads from, relative imports (``from .x import y``) resolved."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = ".".join(package[: len(package) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _loops(root: Path) -> list[list[str]]:
    """The import loops among the modules under ``root``: each strongly connected set of the import graph with more
    than one module (Tarjan), sorted."""
    modules = _modules(root)
    graph = {name: _edges(name, path, modules) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            members = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(members) > 1:
                loops.append(sorted(members))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(loops)


def test_no_module_of_pipeline_imports_itself_through_others():
    assert _loops(PACKAGE) == [], "import loops among pipeline's modules"


def test_the_loop_finder_sees_a_lazy_loop_and_not_a_type_checking_one(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from pkg import high\n")  # the attention <-> families shape
    (package / "high.py").write_text("from .low import f\n")
    (package / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.plain\n")
    (package / "plain.py").write_text("import pkg.typed\n")
    assert _loops(package) == [["pkg.high", "pkg.low"]]
