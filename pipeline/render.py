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


def render_summary(summary, console: Console | None = None) -> None:
    """The end-of-run summary of ``atman run``: counts by status, throughput, where the output is."""
    console = console or Console()
    table = Table(title=f"run {summary.run_id}", show_header=False)
    table.add_row("rows", f"{summary.rows}  (explained now: {summary.processed})")
    for status, n in summary.counts.items():
        table.add_row(status, str(n))
    table.add_row("prompts/s", f"{summary.prompts_per_s:.2f}")
    table.add_row("unit passes/s", f"{summary.passes_per_s:.1f}")
    table.add_row("seconds", f"{summary.seconds:.1f}")
    if summary.deduplicated:
        table.add_row("duplicates removed", str(summary.deduplicated))
    if summary.not_in_input:
        table.add_row("rows not in the input", str(summary.not_in_input))
    console.print(table)
    console.print(f"output: {summary.location}", highlight=False, soft_wrap=True)


def render_preview(run_url: str, n: int, console: Console | None = None, top_k: int = 3) -> None:
    """The top units of the first ``n`` ok rows of a written run (read back from its Parquet files)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from pipeline.layout import filesystem

    fs, path = filesystem(run_url)
    table = ds.dataset(path, filesystem=fs, format="parquet").to_table()
    table = table.filter(pc.equal(table.column("status"), "ok")).sort_by("prompt_id").slice(0, n)
    for row in table.to_pylist():
        console = console or Console()
        console.rule(f"{row['prompt_id']}  target {row['target']!r}", style="dim")
        units = list(zip(row["unit_text"], row["unit_start"], row["unit_length"], strict=True))
        console.print(heat_text(row["prompt"], units, row["scores"]))
        top = sorted(zip(row["unit_text"], row["scores"], strict=True), key=lambda x: -x[1])[:top_k]
        console.print("top units: " + ", ".join(f"{t!r} {s:+.3f}" for t, s in top), highlight=False)
