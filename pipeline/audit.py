"""Compare two runs prompt by prompt (``atman diff``) and the nightly audit (``atman audit``): run the job, diff it
against the latest earlier successful run of the same job and model, flag drift past the job's thresholds.

Per prompt present in both runs: Spearman rank correlation of the unit scores (units matched by their character
span), overlap of the top-5 units, change of the base CE, status change. Prompts in one run only are listed.

An audit compares runs of one method. Two runs of different methods (``method.name``: atman, attnlrp, ...) are still
compared, prompt by prompt (how far two methods' rankings agree is worth knowing), but the result says so first:
``config_changed`` starts with ``method: atman -> attnlrp (the method changed; scores are not comparable)``, the
summary's ``method_changed`` is true, and ``atman diff`` / ``atman audit`` print it as a warning. Scores of two
methods are on different scales; their drift is not a regression of either.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy.stats import spearmanr

from pipeline.integrity import BadManifest
from pipeline.jobspec import AuditSpec, JobSpec
from pipeline.layout import audit_dir, filesystem, model_slug, parquet_bytes, publish, url
from pipeline.parts import DamagedPart, Run
from pipeline.query import connect, list_runs
from pipeline.report import _e, page, table_html

TOP_K = 5
AUDIT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("in_base", pa.bool_()),
        ("in_new", pa.bool_()),
        ("status_base", pa.string()),
        ("status_new", pa.string()),
        ("n_units", pa.int32()),
        ("spearman", pa.float64()),
        ("top5_overlap", pa.float64()),
        ("base_ce_base", pa.float64()),
        ("base_ce_new", pa.float64()),
        ("delta_ce", pa.float64()),
        ("drift", pa.bool_()),
        ("reason", pa.string()),
    ]
)


@dataclass
class DiffResult:
    base: Run
    new: Run
    table: pa.Table
    location: str
    thresholds: AuditSpec
    config_changed: list[str] | None = None
    """Method/model settings that differ between the two runs' manifests (the comparison crosses them)."""
    methods: tuple[str, str] = ("atman", "atman")
    """The two runs' ``method.name`` (base, new); a run from before the name existed ran atman."""

    @property
    def method_changed(self) -> bool:
        return self.methods[0] != self.methods[1]

    @property
    def drifted(self) -> int:
        return sum(self.table.column("drift").to_pylist())

    def summary(self) -> dict:
        rows = self.table.to_pylist()
        both = [r for r in rows if r["in_base"] and r["in_new"]]
        rho = [r["spearman"] for r in both if r["spearman"] is not None]
        overlap = [r["top5_overlap"] for r in both if r["top5_overlap"] is not None]
        return {
            "base": f"{self.base.model}/{self.base.run_id}",
            "new": f"{self.new.model}/{self.new.run_id}",
            "compared": len(both),
            "only_in_base": sum(1 for r in rows if not r["in_new"]),
            "only_in_new": sum(1 for r in rows if not r["in_base"]),
            "mean_spearman": float(np.mean(rho)) if rho else None,
            "mean_top5_overlap": float(np.mean(overlap)) if overlap else None,
            "drifted": self.drifted,
            "config_changed": self.config_changed or [],
            "method": {"base": self.methods[0], "new": self.methods[1]},
            "method_changed": self.method_changed,
            "thresholds": self.thresholds.model_dump(),
            "location": self.location,
        }


def resolve_run(root: str, ref: str) -> Run:
    """``RUN_ID`` or ``MODEL_SLUG/RUN_ID`` -> the complete run it names (ValueError naming the problem)."""
    model, _, run_id = ref.rpartition("/")
    runs = [r for r in list_runs(root) if r.run_id == run_id and (not model or r.model == model)]
    if not runs:
        raise ValueError(f"run: no complete run {ref!r} under {root} (see `atman query {root} 'SELECT * FROM runs'`)")
    if len(runs) > 1:
        models = ", ".join(f"{r.model}/{r.run_id}" for r in runs)
        raise ValueError(f"run: {ref!r} names runs of several models ({models}); write MODEL/RUN_ID")
    return runs[0]


def diff_runs(root: str, base: Run, new: Run, thresholds: AuditSpec | None = None) -> DiffResult:
    thresholds = thresholds or AuditSpec()
    con = connect(root, runs=[base, new])
    cols = "prompt_id, status, unit_start, unit_length, scores, base_target_ce"
    sql = f"SELECT {cols} FROM explanations WHERE model = $m AND run_id = $r"
    base_rows = {r[0]: r for r in con.execute(sql, {"m": base.model, "r": base.run_id}).fetchall()}
    new_rows = {r[0]: r for r in con.execute(sql, {"m": new.model, "r": new.run_id}).fetchall()}
    out = []
    for pid in sorted(set(base_rows) | set(new_rows)):
        out.append(_compare(pid, base_rows.get(pid), new_rows.get(pid), thresholds))
    table = pa.Table.from_pylist(out, schema=AUDIT_SCHEMA)
    fs, path = filesystem(root)
    where = audit_dir(path, base.model, base.run_id, new.model, new.run_id)
    publish(fs, f"{where}/audit.parquet", parquet_bytes(table, "zstd"))
    manifests = base.manifest(fs), new.manifest(fs)
    methods = (method_name(manifests[0]), method_name(manifests[1]))
    result = DiffResult(base, new, table, url(fs, where), thresholds, _config_changes(*manifests), methods)
    publish(fs, f"{where}/audit.html", audit_html(result).encode())
    publish(fs, f"{where}/summary.json", json.dumps(result.summary(), indent=2).encode())
    return result


def method_name(manifest: dict) -> str:
    """The method a run ran (its spec's ``method.name``); ``atman`` for a run from before the name existed."""
    return manifest.get("config", {}).get("method", {}).get("name") or "atman"


def _config_changes(base_manifest: dict, new_manifest: dict) -> list[str]:
    a, b = base_manifest.get("config", {}), new_manifest.get("config", {})
    old_method, new_method = method_name(base_manifest), method_name(new_manifest)
    changes = []
    if old_method != new_method:  # first: every other difference matters less than this one
        changes.append(f"method: {old_method} -> {new_method} (the method changed; scores are not comparable)")
    for section in ("model", "method"):
        for key in sorted((set(a.get(section, {})) | set(b.get(section, {}))) - {"name"}):
            old, now = a.get(section, {}).get(key), b.get(section, {}).get(key)
            if old != now:
                changes.append(f"{section}.{key}: {old!r} -> {now!r}")
    for key in ("precision", "dtype", "attention_kernel"):  # as the actors resolved it: auto differs by device
        old, now = (sorted({c.get(key) for c in m.get("compute", [])}) for m in (base_manifest, new_manifest))
        if old and now and old != now:
            was, became = "/".join(map(str, old)), "/".join(map(str, now))
            changes.append(f"compute.{key}: {was} -> {became} (the method changed)")
    return changes


def _compare(pid: str, b, n, t: AuditSpec) -> dict:
    row = dict.fromkeys(AUDIT_SCHEMA.names)
    row.update(prompt_id=pid, in_base=b is not None, in_new=n is not None, drift=False)
    if b is None or n is None:
        row["reason"] = "only in the new run" if b is None else "only in the base run"
        row["status_base" if b is not None else "status_new"] = (b or n)[1]
        return row
    row.update(status_base=b[1], status_new=n[1])
    if b[1] != n[1]:
        row.update(drift=True, reason=f"status {b[1]} -> {n[1]}")
        return row
    if b[1] != "ok":
        return row
    base_units = {(s, ln): x for s, ln, x in zip(b[2], b[3], b[4], strict=True)}
    new_units = {(s, ln): x for s, ln, x in zip(n[2], n[3], n[4], strict=True)}
    common = sorted(set(base_units) & set(new_units))
    x = np.array([base_units[k] for k in common], dtype=np.float64)
    y = np.array([new_units[k] for k in common], dtype=np.float64)
    row["n_units"] = len(common)
    if len(common) >= 2:
        if np.allclose(x, y, rtol=0, atol=1e-6):
            row["spearman"] = 1.0
        else:
            rho = spearmanr(x, y).statistic
            row["spearman"] = None if rho is None or math.isnan(rho) else float(rho)
    k = min(TOP_K, len(base_units), len(new_units))
    if k:
        top_b = {u for u, _ in sorted(base_units.items(), key=lambda kv: (-kv[1], kv[0]))[:k]}
        top_n = {u for u, _ in sorted(new_units.items(), key=lambda kv: (-kv[1], kv[0]))[:k]}
        row["top5_overlap"] = len(top_b & top_n) / k
    row.update(base_ce_base=float(b[5]), base_ce_new=float(n[5]), delta_ce=float(n[5] - b[5]))
    reasons = []
    if row["spearman"] is not None and row["spearman"] < t.min_spearman:
        reasons.append(f"spearman {row['spearman']:.3f} < {t.min_spearman}")
    if row["top5_overlap"] is not None and row["top5_overlap"] < t.min_top5_overlap:
        reasons.append(f"top-5 overlap {row['top5_overlap']:.2f} < {t.min_top5_overlap}")
    if t.max_abs_delta_ce is not None and abs(row["delta_ce"]) > t.max_abs_delta_ce:
        reasons.append(f"|delta CE| {abs(row['delta_ce']):.3f} > {t.max_abs_delta_ce}")
    if len(common) < max(len(base_units), len(new_units)):
        reasons.append(f"units differ ({len(base_units)} vs {len(new_units)}, {len(common)} shared)")
    row.update(drift=bool(reasons), reason="; ".join(reasons) or None)
    return row


def previous_run(root: str, spec: JobSpec, current: Run) -> Run | None:
    """The latest complete run of the same job and model before ``current`` (by run id date, else start time)."""
    fs = filesystem(root)[0]
    slug = model_slug(spec.model.id)
    mine = _when(current, current.manifest(fs))
    candidates = []
    for run in list_runs(root):
        if run.model != slug or (run.run_id == current.run_id):
            continue
        try:
            manifest = run.manifest(fs)
        except BadManifest as err:  # one broken run must not stop every nightly audit after it
            warnings.warn(f"{err}; it is not a candidate baseline", DamagedPart, 2)
            continue
        if manifest.get("job") != spec.name:
            continue
        when = _when(run, manifest)
        if when < mine:
            candidates.append((when, run))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def _when(run: Run, manifest: dict) -> tuple[str, str]:
    """Audit runs are named by their date; other runs count from when they started."""
    day = run.run_id if re.fullmatch(r"\d{4}-\d{2}-\d{2}", run.run_id) else manifest.get("started_at", "")[:10]
    return day, manifest.get("started_at", "")


def audit_date(value: str | None) -> str:
    if value is None:
        return dt.datetime.now(dt.timezone.utc).date().isoformat()
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError(f"date: {value!r} is not YYYY-MM-DD") from None


def audit_html(result: DiffResult) -> str:
    s = result.summary()
    rows = sorted(result.table.to_pylist(), key=lambda r: (not r["drift"], r["prompt_id"]))
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else v)  # noqa: E731
    header = ["prompt_id", "drift", "reason", "spearman", "top5_overlap", "delta_ce", "status_base", "status_new"]
    warning = ""
    if result.method_changed:
        warning = f"<p class='note'>{_e(result.config_changed[0])}</p>"
    body = (
        f"<h1>AtMan audit: {_e(s['new'])} vs {_e(s['base'])}</h1>"
        + warning
        + table_html(None, [[k, json.dumps(v) if isinstance(v, (dict, list)) else fmt(v)] for k, v in s.items()])
        + f"<h2>Prompts ({len(rows)}; drifted first)</h2>"
        + table_html(header, [[fmt(r[h]) for h in header] for r in rows], lambda r: "drift" if r[1] else "")
    )
    return page(f"AtMan audit {s['new']} vs {s['base']}", body)
