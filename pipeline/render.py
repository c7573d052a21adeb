"""Terminal rendering of explanations (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from pipeline.atman.explanation import Explanation


def _colour(score: float, scale: float) -> str:
    """Red for support, blue for opposition; intensity by |score| / scale."""
    x = 0.0 if scale == 0 else max(-1.0, min(1.0, score / scale))
    level = int(round(abs(x) * 200))
    return f"rgb(255,{255 - level},{255 - level})" if x >= 0 else f"rgb({255 - level},{255 - level},255)"


def heat_text(prompt: str, units: list[tuple[str, int, int]], scores: list[float]) -> Text:
    scale = max((abs(s) for s in scores), default=0.0)
    text, pos = Text(), 0
    for (_, start, length), score in sorted(zip(units, scores, strict=True), key=lambda x: x[0][1]):
        if start > pos:
            text.append(prompt[pos:start])
        text.append(prompt[start : start + length], style=f"black on {_colour(score, scale)}")
        pos = start + length
    text.append(prompt[pos:])
    return text


def render_explanation(e: Explanation, console: Console | None = None, top_k: int = 5) -> None:
    console = console or Console()
    console.print(heat_text(e.prompt, e.units, e.scores.tolist()))
    console.print(
        f"target: {e.target!r}   base CE: {e.base_target_ce:.3f} nats over {len(e.target_tokens)} tokens   "
        f"mode: {e.mode}  factor: {e.factor}  granularity: {e.granularity}"
    )
    table = Table("rank", "unit", "start", "score")
    for rank, (text, start, _, score) in enumerate(e.top(top_k), 1):
        table.add_row(str(rank), repr(text), str(start), f"{score:+.4f}")
    console.print(table)
