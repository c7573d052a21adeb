"""The house stays walkable: no function of the package is longer than a screen (60 lines) or more complex than
ruff's C901 allows (12, pyproject.toml), and the lint and format checks of `make lint` hold. Import cycles are
tests/test_layering.py's."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "pipeline"
MAX_LINES = 60
RUFF = [sys.executable, "-m", "ruff"]


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_a_screen():
    long = [
        f"{path.relative_to(ROOT)}:{line} {name} ({lines} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, line, lines in _functions(path)
        if lines > MAX_LINES
    ]
    assert not long, f"functions over {MAX_LINES} lines: {long}"


def test_the_length_check_sees_a_long_function(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n" + "    x = 1\n" * MAX_LINES + "\n\ndef g():\n    pass\n")
    assert [(n, lines) for n, _, lines in _functions(path)] == [("f", MAX_LINES + 1), ("g", 2)]


def test_lint_and_complexity_hold():
    for args in (["check", "pipeline", "tests", "bench"], ["format", "--check", "pipeline", "tests", "bench"]):
        done = subprocess.run([*RUFF, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"ruff {' '.join(args)}:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"


def test_the_complexity_check_sees_a_branchy_function(tmp_path):
    body = "".join(f"    if x == {i}:\n        return {i}\n" for i in range(13))
    (tmp_path / "m.py").write_text(f"def f(x):\n{body}    return -1\n")
    done = subprocess.run([*RUFF, "check", "--config", str(ROOT / "pyproject.toml"), "m.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "C901" in done.stdout, done.stdout
