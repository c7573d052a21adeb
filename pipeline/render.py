"""Terminal rendering of explanations (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pipeline.atman.units import top_units

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


def chat_note(e: Explanation, raw_text_hint: str = "chat=False") -> str | None:
    """The line that tells the user the chat template was applied by the automatic rule (a prompt ending in '?'),
    or None where the template was not applied or was asked for explicitly. ``raw_text_hint``: how to turn it off
    where the user is (``--no-chat`` on the command line)."""
    if not e.chat_auto_applied:
        return None
    return f"chat template: applied automatically (the prompt ends in '?'; {raw_text_hint} for raw text)"


def _method_text(e: Explanation) -> str:
    """AtMan's mode and factor; another method's name (``params["name"]``, pipeline/methods.py), and its mode and
    factor for an AtMan estimator."""
    name = e.params.get("name", "atman")
    suppression = f"mode: {e.mode}  factor: {e.factor}"
    if name == "atman":
        return suppression
    return f"method: {name}  {suppression}" if name.startswith("atman:") else f"method: {name}"


def render_explanation(
    e: Explanation, console: Console | None = None, top_k: int = 5, raw_text_hint: str = "chat=False"
) -> None:
    """The prompt as a heatmap, the target and settings, and the top units; first, when the chat template was
    applied automatically, a line saying so (``chat_note``)."""
    console = console or Console()
    note = chat_note(e, raw_text_hint)
    if note:
        console.print(note, style="yellow", highlight=False, markup=False, soft_wrap=True)
    console.print(heat_text(e.prompt, e.units, e.scores.tolist()))
    console.print(
        f"target: {e.target!r}   base CE: {e.base_target_ce:.3f} nats over {len(e.target_tokens)} tokens   "
        f"{_method_text(e)}  granularity: {e.granularity}"
    )
    table = Table("rank", "unit", "start", "score")
    for rank, (text, start, _, score) in enumerate(e.top(top_k), 1):
        table.add_row(str(rank), repr(text), str(start), f"{score:+.4f}")
    console.print(table)
    if e.image_units:
        rows = [(u.image, u.box, u.view) for u in e.image_units]
        console.print(image_table(rows, e.image_scores, top_k))


def image_table(units: list[tuple[int, tuple, str]], scores, top_k: int = 5) -> Table:
    """The ``top_k`` image units, highest score first (ties in order): (image, box, view) with their scores."""
    from pipeline.atman.units import top_order

    values = [float(x) for x in scores]
    table = Table("rank", "image", "box (x0, y0, x1, y1)", "view", "score", title="image units")
    for rank, i in enumerate(top_order(values, top_k), 1):
        image, box, view = units[i]
        table.add_row(str(rank), str(image), ", ".join(f"{v:.0f}" for v in box), view or "-", f"{values[i]:+.4f}")
    return table


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
    table.add_row("shards / parts", f"{summary.shards} / {summary.files}")
    for line in summary.redone:
        table.add_row("redone", line)
    console.print(table)
    console.print(f"output: {summary.location}", highlight=False, soft_wrap=True)


def render_preview(run_url: str, n: int, console: Console | None = None, top_k: int = 3) -> None:
    """The top units of the first ``n`` ok rows of a written run, read back from its parts as queries read them
    (verified against the manifest; a part left out is named in a warning line first)."""
    import warnings

    import pyarrow.compute as pc

    from pipeline.parts import DamagedPart, read_run

    console = console or Console()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DamagedPart)
        table = read_run(run_url)
    for w in caught:
        console.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)
    table = table.filter(pc.equal(table.column("status"), "ok")).sort_by("prompt_id").slice(0, n)
    for row in table.to_pylist():
        console.rule(f"{row['prompt_id']}  target {row['target']!r}", style="dim")
        render_row(row, console, top_k=top_k, header=False)


def render_row(row: dict, console: Console | None = None, top_k: int = 5, header: bool = True) -> None:
    """One output row in the terminal: heatmap of the prompt, target, base CE, status, top units; with an image
    (schema v2), the top image units."""
    console = console or Console()
    if header:
        head = f"[bold]{row['prompt_id']}[/]  run {row['run_id']}  model {row['model_id']}"
        console.print(f"{head}  status [bold]{row['status']}[/]")
    if row["status"] != "ok":
        console.print(Text(row["prompt"] or ""))
        console.print(f"{row['status']}: {row['error']}", highlight=False, markup=False)
        return
    units = list(zip(row["unit_text"], row["unit_start"], row["unit_length"], strict=True))
    console.print(heat_text(row["prompt"], units, row["scores"]))
    if header:
        console.print(
            f"target: {row['target']!r}   base CE: {row['base_target_ce']:.3f} nats over "
            f"{len(row['target_tokens'])} tokens   granularity: {row['granularity']}",
            highlight=False,
        )
    top = top_units(units, row["scores"], top_k)
    console.print("top units: " + ", ".join(f"{u.text!r} {u.score:+.3f}" for u in top), highlight=False)
    if row.get("image_scores") is not None:
        console.print(f"image: {row['image']} ({row['image_width']}x{row['image_height']})", highlight=False)
        units = [(0, tuple(b), v) for b, v in zip(row["image_box"], row["image_view"], strict=True)]
        console.print(image_table(units, row["image_scores"], top_k))


def print_table(table, fmt: str, console: Console | None = None) -> None:
    """An Arrow table as a rich table, a JSON array of row objects, or CSV (stdout)."""
    import csv
    import json
    import sys

    rows = table.to_pylist()
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, ensure_ascii=False, default=str) + "\n")
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(table.column_names)
        writer.writerows([_cell(r[c]) for c in table.column_names] for r in rows)
    else:
        out = Table(*table.column_names)
        for r in rows:
            out.add_row(*[str(_cell(r[c])) for c in table.column_names])
        (console or Console()).print(out)


def _cell(value):
    import json

    return json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, (list, dict)) else value
