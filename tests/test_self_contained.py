"""The repository stands alone: a clone has what the project needs, and nothing points outside it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pipeline.data import SQUAD_DEV
from pipeline.evaluate import load_squad

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = "../" + "shared"  # spelled in two pieces so this file does not match itself


def _repository_files() -> list[Path]:
    """Tracked files and new ones git would add (ignored build output excluded)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    return [ROOT / name for name in listed if name and (ROOT / name).is_file()]


def test_nothing_refers_outside_the_repository():
    files = _repository_files()
    assert len(files) > 50 and ROOT / "README.md" in files
    offenders = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (PNG, Parquet)
        offenders += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE in line]
    assert not offenders, f"references to {OUTSIDE}: {offenders}"


def test_the_bundled_squad_subset_is_whole_and_licensed():
    """76 examples from two articles, every answer where its offset says, and the licence notice beside them."""
    rows = [json.loads(line) for line in SQUAD_DEV.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 76 and len({r["id"] for r in rows}) == 76
    assert {r["title"] for r in rows} == {"Sky_(United_Kingdom)", "Victoria_(Australia)"}
    for r in rows:
        assert r["answers"], r["id"]
        for a in r["answers"]:
            assert r["context"][a["answer_start"] : a["answer_start"] + len(a["text"])] == a["text"], r["id"]
    notice = (SQUAD_DEV.parent / "README.md").read_text(encoding="utf-8")
    assert "CC BY-SA 4.0" in notice and "Rajpurkar" in notice and "creativecommons.org/licenses/by-sa/4.0" in notice
    assert len(load_squad(str(SQUAD_DEV), sample=16)) == 16


def test_the_method_is_written_down_here():
    """docs/METHOD.md states the suppression forms, the scores and the evaluation protocol the code implements."""
    text = (ROOT / "docs" / "METHOD.md").read_text(encoding="utf-8")
    for needle in ("log_additive", "multiplicative", "scale", "Δ_uj", "conceptual", "AP = ", "AR = ", "interquartile"):
        assert needle in text, needle
