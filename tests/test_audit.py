"""`atman diff` and `atman audit` on real pipeline output: identical runs do not drift, a perturbed model does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_query import PROMPTS, make_run
from tiny_models import tiny_model

from pipeline.audit import diff_runs, resolve_run
from pipeline.jobspec import AuditSpec

ATMAN = str(Path(sys.executable).parent / "atman")
AUDIT_PROMPTS = [
    {"id": "fr", "prompt": "The capital of France is Paris. The capital of Germany is", "target": " Berlin"},
    {"id": "list", "prompt": "Red, green, blue, yellow, purple and orange are all", "target": " colours"},
    {"id": "story", "prompt": "Anna took her umbrella because the sky was dark and the radio said", "target": " rain"},
    {"id": "count", "prompt": "One, two, three, four, five, six, seven, eight,", "target": " nine"},
]


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([ATMAN, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    """A model directory of our own, so the test can perturb its weights in place (same model id)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_diff_identical_and_partial_runs(tmp_path, tiny_model_dir):
    root = str(tmp_path / "out")
    make_run(tiny_model_dir, root, "base")
    make_run(tiny_model_dir, root, "same")
    make_run(tiny_model_dir, root, "fewer", PROMPTS[:2])
    out = _cli("diff", root, "--base", "base", "--new", "same")
    assert out.returncode == 0, out.stderr
    audit_dir = next(Path(root, "_audits").glob("*.base__*.same"))
    table = pq.read_table(audit_dir / "audit.parquet").to_pylist()
    both_ok = [r for r in table if r["status_base"] == r["status_new"] == "ok"]
    assert len(both_ok) == 3 and all(r["spearman"] == 1.0 and r["top5_overlap"] == 1.0 for r in both_ok)
    assert all(r["delta_ce"] == 0.0 for r in both_ok) and not any(r["drift"] for r in table)
    assert json.loads((audit_dir / "summary.json").read_text())["drifted"] == 0
    assert (audit_dir / "audit.html").read_text().startswith("<!DOCTYPE html>")

    out = _cli("diff", root, "--base", "base", "--new", "fewer")
    assert out.returncode == 0, out.stderr
    summary = json.loads(next(Path(root, "_audits").glob("*.base__*.fewer")).joinpath("summary.json").read_text())
    assert summary["compared"] == 2 and summary["only_in_base"] == 2 and summary["only_in_new"] == 0

    missing = _cli("diff", root, "--base", "base", "--new", "nope")
    assert missing.returncode == 2 and "run: no complete run 'nope'" in missing.stderr


def test_nightly_audit_exit_codes(tmp_path, model_copy, tokenizer):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(p) + "\n" for p in AUDIT_PROMPTS))
    (tmp_path / "job.yaml").write_text(
        f"name: nightly\nmodel: {{id: {model_copy}}}\ninput: {{path: in.jsonl}}\noutput: {{root: out}}\n"
        "method: {granularity: word, conceptual_threshold: null}\n"
        "audit: {min_spearman: 0.8, min_top5_overlap: 0.6}\n"
    )
    audit = ("audit", "job.yaml", "--address", "inline", "--date")
    first = _cli(*audit, "2026-11-01", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "2026-11-01 is the baseline" in first.stdout

    second = _cli(*audit, "2026-11-02", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "drifted           │ 0" in second.stdout and "mean spearman     │ 1.000" in second.stdout

    # the model changes under the same id (a new checkpoint published to the same place)
    tiny_model("llama", len(tokenizer), seed=1).save_pretrained(model_copy)
    third = _cli(*audit, "2026-11-03", cwd=tmp_path)
    assert third.returncode == 3, third.stdout + third.stderr
    assert "drift:" in third.stderr and "prompts past the thresholds of job 'nightly'" in third.stderr
    audits = sorted(p.name for p in (tmp_path / "out" / "_audits").iterdir())
    assert len(audits) == 2 and audits[-1].endswith(".2026-11-03") and ".2026-11-02__" in audits[-1]
    rows = pq.read_table(tmp_path / "out" / "_audits" / audits[-1] / "audit.parquet").to_pylist()
    assert any(r["drift"] for r in rows) and all(r["reason"] for r in rows if r["drift"])
    html = (tmp_path / "out" / "_audits" / audits[-1] / "audit.html").read_text()
    assert "drifted first" in html and "class='drift'" in html

    bad = _cli(*audit, "28/11/2026", cwd=tmp_path)
    assert bad.returncode == 2 and "date: '28/11/2026' is not YYYY-MM-DD" in bad.stderr


LENIENT = {"min_spearman": -1.0, "min_top5_overlap": 0.0}  # only the check under test can flag a prompt


def test_base_ce_threshold_flags_only_past_it(tmp_path, model_copy, tiny_model_dir, tokenizer):
    """`max_abs_delta_ce`: a prompt drifts when its base CE moves by more than the threshold, and only then."""
    root = str(tmp_path / "out")
    tiny_model("llama", len(tokenizer), seed=1).save_pretrained(model_copy)  # another model: other CEs
    make_run(tiny_model_dir, root, "before", PROMPTS[:3])
    make_run(str(model_copy), root, "after", PROMPTS[:3])
    base, new = resolve_run(root, "before"), resolve_run(root, "after")
    unchecked = diff_runs(root, base, new, AuditSpec(**LENIENT)).table.to_pylist()
    deltas = [abs(r["delta_ce"]) for r in unchecked]
    assert len(deltas) == 3 and min(deltas) > 1e-3 and not any(r["drift"] for r in unchecked)
    middle = sorted(deltas)[1]
    rows = diff_runs(root, base, new, AuditSpec(**LENIENT, max_abs_delta_ce=middle)).table.to_pylist()
    flagged = {r["prompt_id"] for r in rows if r["drift"]}
    assert flagged == {r["prompt_id"] for r in unchecked if abs(r["delta_ce"]) > middle} and len(flagged) == 1
    (row,) = [r for r in rows if r["drift"]]
    assert row["reason"] == f"|delta CE| {abs(row['delta_ce']):.3f} > {middle}"
    loose = diff_runs(root, base, new, AuditSpec(**LENIENT, max_abs_delta_ce=max(deltas) + 1))
    assert loose.drifted == 0


def test_units_that_differ_are_drift(tmp_path, tiny_model_dir):
    """The same prompts cut into other units (here: another granularity) cannot be compared unit by unit."""
    root = str(tmp_path / "out")
    words = make_run(tiny_model_dir, root, "words", PROMPTS[:1])
    tokens = make_run(tiny_model_dir, root, "tokens", PROMPTS[:1], granularity="token")
    n_words, n_tokens = (len(pq.read_table(r.location).column("unit_text")[0]) for r in (words, tokens))
    same = diff_runs(root, resolve_run(root, "words"), resolve_run(root, "words"), AuditSpec(**LENIENT))
    assert same.drifted == 0 and same.config_changed == []
    result = diff_runs(root, resolve_run(root, "words"), resolve_run(root, "tokens"), AuditSpec(**LENIENT))
    (row,) = result.table.to_pylist()
    assert row["drift"] and row["reason"] == f"units differ ({n_words} vs {n_tokens}, {row['n_units']} shared)"
    assert row["n_units"] < max(n_words, n_tokens)
    assert result.config_changed == ["method.granularity: 'word' -> 'token'"]


def test_a_precision_change_is_named_even_when_the_spec_says_auto_both_nights(tmp_path, tiny_model_dir):
    """`precision: auto` resolves per actor (fp32 for float32 weights on a CPU, the measured policy for bf16
    weights): the manifests record what ran, and the diff says the method changed, not only that scores moved."""
    from pipeline.atman.precision import AUTO
    from pipeline.job import run_job
    from pipeline.jobspec import JobSpec

    root, path = str(tmp_path / "out"), tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:2]))

    def night(run_id: str, dtype: str):
        spec = {"name": "p", "model": {"id": tiny_model_dir, "dtype": dtype}, "input": {"path": str(path)},
                "output": {"root": root}}  # fmt: skip
        summary = run_job(JobSpec.model_validate(spec), run_id, address="inline")
        return json.loads((Path(summary.location) / "_manifest.json").read_text())

    first, second = night("n1", "float32"), night("n2", "bfloat16")
    assert [c["precision"] for c in first["compute"]] == ["fp32"] and first["compute"][0]["dtype"] == "float32"
    assert [c["precision"] for c in second["compute"]] == [AUTO] and second["compute"][0]["device"] == "cpu"
    result = diff_runs(root, resolve_run(root, "n1"), resolve_run(root, "n2"))
    assert f"compute.precision: fp32 -> {AUTO} (the method changed)" in result.config_changed
    assert "compute.dtype: float32 -> bfloat16 (the method changed)" in result.config_changed
    assert "model.dtype: 'float32' -> 'bfloat16'" in result.config_changed
