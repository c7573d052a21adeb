"""Self-contained HTML pages (no network fetch: CSS and JS inline): the run report and the audit summary."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.atman.units import top_order, top_units

if TYPE_CHECKING:
    from pipeline.atman.explanation import Explanation
    from pipeline.parts import Run

PAGE_SIZE = 25
MAX_PROMPTS = 1000

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f4f4f4}
.prompt{border:1px solid #ddd;border-radius:6px;padding:10px 14px;margin:12px 0}
.prompt h3{font-size:14px;margin:0 0 6px}.text{white-space:pre-wrap;font-family:ui-monospace,monospace;line-height:1.9}
.u{border-radius:3px;padding:1px 0}.meta{color:#555;font-size:13px}.note{background:#fff8dc;padding:6px 10px}
.status-error{color:#b00}.status-skipped{color:#a60}.pager button{margin:0 4px}.drift{background:#fde8e8}
.image-map{max-width:480px;height:auto;image-rendering:pixelated;border:1px solid #ddd}
"""

# first in <head>: counts uncaught errors and console.error calls (the page exposes the count as data-errors)
ERRORS_JS = """
window.__errors = [];
window.addEventListener('error', function(e){ window.__errors.push(String(e.message)); });
(function(){ var original = console.error;
  console.error = function(){ window.__errors.push([].join.call(arguments, ' ')); original.apply(console, arguments); };
})();
"""

PAGER_JS = """
(function(){
  var size = %d, items = Array.prototype.slice.call(document.querySelectorAll('.prompt')), page = 0;
  var pages = Math.max(1, Math.ceil(items.length / size)), label = document.getElementById('page-label');
  function show(p){
    page = Math.min(Math.max(p, 0), pages - 1);
    items.forEach(function(el, i){ el.style.display = (i >= page * size && i < (page + 1) * size) ? '' : 'none'; });
    if (label) label.textContent = 'page ' + (page + 1) + ' of ' + pages;
  }
  document.querySelectorAll('[data-page]').forEach(function(b){
    b.addEventListener('click', function(){ show(page + parseInt(b.getAttribute('data-page'), 10)); });
  });
  show(0);
  document.body.setAttribute('data-prompts', String(items.length));
  document.body.setAttribute('data-errors', String(window.__errors.length));
  document.body.setAttribute('data-ready', '1');
})();
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width'><title>{_e(title)}</title><style>{CSS}</style>"
        f"<script>{ERRORS_JS}</script></head>"
        f"<body>{body}<script>{PAGER_JS % PAGE_SIZE}</script></body></html>"
    )


def table_html(header: list[str] | None, rows: list[list], row_class=None) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join(
        f"<tr class='{row_class(r) if row_class else ''}'>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>"
        for r in rows
    )
    return f"<table>{head}{body}</table>"


def _colour(score: float, scale: float) -> str:
    x = 0.0 if scale == 0 else max(-1.0, min(1.0, score / scale))
    return f"rgba(220,30,30,{abs(x):.2f})" if x >= 0 else f"rgba(30,80,220,{abs(x):.2f})"


def heatmap_html(prompt: str, units: Sequence[Sequence], scores: Sequence[float]) -> str:
    """The prompt with each unit shaded by its score (red supports the target, blue opposes); score on hover.
    ``units`` are (text, start, length) items. The one HTML heatmap: the run report and ``Explanation`` in a
    notebook (``explanation_html``) both draw it, so a prompt looks the same in both."""
    scores = [float(x) for x in scores]
    scale = max((abs(s) for s in scores), default=0.0)
    out, pos = [], 0
    for (_, start, length), score in sorted(zip(units, scores, strict=True), key=lambda x: x[0][1]):
        out.append(_e(prompt[pos:start]))
        out.append(
            f"<span class='u' style='background:{_colour(score, scale)}' title='score {score:+.4f}'"
            f" data-score='{score:.6f}'>{_e(prompt[start : start + length])}</span>"
        )
        pos = start + length
    out.append(_e(prompt[pos:]))
    return "".join(out)


def _prompt_html(row: dict, top_k: int = 5) -> str:
    head = f"<h3>{_e(row['prompt_id'])} <span class='status-{_e(row['status'])}'>{_e(row['status'])}</span></h3>"
    if row["status"] != "ok":
        return (
            f"<section class='prompt' data-id='{_e(row['prompt_id'])}'>{head}"
            f"<div class='text'>{_e(row['prompt'])}</div><p class='meta'>{_e(row['error'])}</p></section>"
        )
    units = list(zip(row["unit_text"], row["unit_start"], row["unit_length"], strict=True))
    return (
        f"<section class='prompt' data-id='{_e(row['prompt_id'])}'>{head}"
        f"<div class='text'>{heatmap_html(row['prompt'], units, row['scores'])}</div>"
        f"<p class='meta'>target <b>{_e(repr(row['target']))}</b> · base CE {row['base_target_ce']:.3f} nats over "
        f"{len(row['target_tokens'])} tokens · {len(units)} {_e(row['granularity'])} units · "
        f"{row['latency_ms']:.0f} ms</p>"
        f"<p class='meta'>top units: {top_html(units, row['scores'], top_k)}</p>{_image_html(row, top_k)}</section>"
    )


def _image_html(row: dict, top_k: int) -> str:
    """A row's image map (an inline PNG: the page stays self-contained) and its top image units; '' for text rows."""
    if row.get("image_scores") is None:
        return ""
    import base64
    import io

    from pipeline.overlay import row_overlay

    picture, why = row_overlay(row)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    scores = row["image_scores"]
    order = top_order(scores, top_k)
    top = ", ".join(f"<b>[{', '.join(f'{v:.0f}' for v in row['image_box'][i])}]</b> {scores[i]:+.3f}" for i in order)
    note = f"<p class='meta'>boxes only: {_e(why)}</p>" if why else ""
    width = max(int(row["image_width"]), 320)  # small images drawn larger (pixelated), large ones capped by CSS
    height = round(int(row["image_height"]) * width / int(row["image_width"]))
    return (
        f"<p class='meta'>image {_e(row['image'])} ({row['image_width']}x{row['image_height']})</p>{note}"
        f"<img class='image-map' alt='image units of {_e(row['prompt_id'])}' src='data:image/png;base64,{data}'"
        f" width='{width}' height='{height}'>"
        f"<p class='meta'>top image units: {top}</p>"
    )


def top_html(units: Sequence[Sequence], scores: Sequence[float], k: int = 5) -> str:
    """The ``k`` highest-scoring units, highest first (``top_units``, the rule the terminal uses too)."""
    return ", ".join(f"<b>{_e(u.text)}</b> {u.score:+.3f}" for u in top_units(units, scores, k))


NOTEBOOK_CSS = (
    ".atman .text{white-space:pre-wrap;font-family:ui-monospace,monospace;line-height:1.9}"
    ".atman .u{border-radius:3px;padding:1px 0}.atman .meta{color:#555;font-size:13px;margin:4px 0}"
)


def explanation_html(e: Explanation, top_k: int = 5) -> str:
    """One explanation as an HTML fragment (``Explanation._repr_html_``): the report's heatmap and top units, the
    target and settings, and a note when the chat template was applied automatically. Inline CSS only."""
    from pipeline.render import chat_note

    note = chat_note(e)
    note = f"<p class='meta'>{_e(note)}</p>" if note else ""
    return (
        f"<div class='atman'><style>{NOTEBOOK_CSS}</style>{note}"
        f"<div class='text'>{heatmap_html(e.prompt, e.units, e.scores)}</div>"
        f"<p class='meta'>target <b>{_e(repr(e.target))}</b> · base CE {e.base_target_ce:.3f} nats over "
        f"{len(e.target_tokens)} tokens · {len(e.units)} {_e(e.granularity)} units · mode {_e(e.mode)} · "
        f"factor {e.factor:g}</p><p class='meta'>top units: {top_html(e.units, e.scores, top_k)}</p></div>"
    )


def pick_run(root: str, run_id: str | None) -> Run:
    from pipeline.query import list_runs

    runs = list_runs(root, include_incomplete=run_id is not None)
    if run_id is not None:
        runs = [r for r in runs if r.run_id == run_id]
    if not runs:
        raise ValueError(f"run_id: no {'run ' + repr(run_id) if run_id else 'complete run'} under {root}")
    return runs[-1]


def run_report(root: str, run_id: str | None = None, max_prompts: int = MAX_PROMPTS) -> tuple[str, int]:
    """The HTML report of one run (default: the latest complete one) and the number of prompts it shows."""
    from pipeline.layout import filesystem
    from pipeline.query import connect

    run = pick_run(root, run_id)
    manifest = run.manifest(filesystem(root)[0])
    con = connect(root, runs=[run])
    sel = "FROM explanations WHERE run_id = $r AND model = $m"
    args = {"r": run.run_id, "m": run.model}
    total = con.execute(f"SELECT count(*) {sel}", args).fetchall()[0][0]
    counts = dict(con.execute(f"SELECT status, count(*) {sel} GROUP BY 1 ORDER BY 1", args).fetchall())
    cur = con.execute(f"SELECT * {sel} ORDER BY prompt_id LIMIT {int(max_prompts)}", args)
    names = [d[0] for d in cur.description]
    rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    problems = con.execute(
        f"SELECT prompt_id, status, error, source {sel} AND status <> 'ok' ORDER BY status, prompt_id", args
    ).fetchall()

    method = manifest.get("method_params") or (json.loads(rows[0]["method_params"]) if rows else {})
    model_id = manifest.get("model", {}).get("id", run.model)
    summary = [
        ["run", run.run_id],
        ["model", f"{model_id} (revision {rows[0]['model_revision'] if rows else '?'})"],
        ["run date", run.run_date],
        ["location", run.url],
        ["complete", "yes (_SUCCESS)" if run.complete else "no: incomplete run"],
        ["rows", total],
        *[[f"status {k}", v] for k, v in counts.items()],
        ["started", manifest.get("started_at", "?")],
        ["finished", manifest.get("finished_at", "?")],
        ["config hash", manifest.get("config_hash", "?")],
    ]  # fmt: skip
    params = [[k, json.dumps(v)] for k, v in sorted(method.items())]
    note = ""
    if total > len(rows):
        note = (
            f"<p class='note'>Showing the first {len(rows)} of {total} prompts (by prompt id); "
            f"use <code>--max-prompts</code> or <code>atman query</code> for the rest.</p>"
        )
    body = (
        f"<h1>AtMan run {_e(run.run_id)}</h1><h2>Summary</h2>{table_html(None, summary)}"
        f"<h2>Method</h2>{table_html(['parameter', 'value'], params)}"
        f"<h2>Prompts ({len(rows)})</h2>{note}"
        "<p class='pager'><button data-page='-1'>previous</button><span id='page-label'></span>"
        "<button data-page='1'>next</button></p>"
        + "".join(_prompt_html(r) for r in rows)
        + f"<h2>Errors and skipped rows ({len(problems)})</h2>"
        + table_html(["prompt_id", "status", "message", "source"], [list(p) for p in problems])
    )
    return page(f"AtMan run {run.run_id}", body), len(rows)
