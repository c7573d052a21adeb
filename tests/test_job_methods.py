"""Every method at corpus scale (issue 29): ``method.name`` in a job and ``atman explain --method`` run the peers, the
baselines and AtMan's estimators through the job's pipeline into the same Parquet schema; each row's scores are
the method's own on the same planned request; the manifest names the method; refusals name what a method cannot do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from tiny_models import tiny_model

from pipeline import AtManConfig, Explainer, load_model
from pipeline.atman.request import ExplainRequest
from pipeline.atman.variants import VARIANTS
from pipeline.audit import diff_runs, resolve_run
from pipeline.job import run_job
from pipeline.jobspec import JobSpec, JobSpecError, load_job
from pipeline.layout import MANIFEST
from pipeline.parts import SCHEMA
from pipeline.peers import peer_scores

ATMAN = str(Path(sys.executable).parent / "atman")
ROWS = [
    {"id": "fr", "prompt": "The capital of France is Paris. The capital of Germany is", "target": " Berlin"},
    {"id": "span", "prompt": "Review: cold food, rude waiter. Sentiment:", "target": " bad", "span": [0, 31]},
    {"id": "gen", "prompt": "Alice is taller than Bob. Bob is taller than Carol. The shortest is"},  # generated
    {"id": "many", "prompt": "a " * 70 + "and", "target": " b"},  # 71 word units: more than ContextCite's 64
]
METHODS = ["attnlrp", "occlusion", "contextcite", "ig", "ixg", "rollout", "atman:coarse"]
THROUGH_RAY = "attnlrp"  # one method through Ray actors (the others inline: the same worker, no actor start)
GRANULARITY, GENERATE = "word", 3


def _spec(model_dir: str, root: Path, data: Path, name: str | None, **method) -> JobSpec:
    method = {"granularity": GRANULARITY, "generate_max_tokens": GENERATE, **method}
    if name is not None:
        method["name"] = name
    return JobSpec.model_validate(
        {
            "name": "methods",
            "model": {"id": model_dir},
            "input": {"path": str(data), "explain_span_column": "span"},
            "method": method,
            "output": {"root": str(root)},
            "resources": {"batch_rows": 4},
        }
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, ray_cluster):
    """One run per method (and the default atman) over ROWS, all under one root: run id = the method's name."""
    tmp = tmp_path_factory.mktemp("methods")
    data = tmp / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = {}
    for name in [None, *METHODS]:
        run_id = (name or "atman").replace(":", "-")
        address = "local" if name == THROUGH_RAY else "inline"
        summary = run_job(_spec(tiny_model_dir, tmp / "out", data, name), run_id, address=address)
        out[name or "atman"] = summary
    return str(tmp / "out"), out


def _rows(summary) -> dict[str, dict]:
    return {r["prompt_id"]: r for r in ds.dataset(summary.location, format="parquet").to_table().to_pylist()}


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    """The methods called directly, outside the job, on the same planned requests."""
    lm = load_model(tiny_model_dir, device="cpu")
    config = AtManConfig(granularity=GRANULARITY, generate_max_tokens=GENERATE)
    explainer = Explainer(lm, config)

    def scores(name: str, row: dict) -> np.ndarray:
        span = row.get("span")
        request = ExplainRequest(row["prompt"], row.get("target"), explain_span=None if span is None else [span])
        planned = explainer.plan(request)
        if name.startswith("atman:"):
            return VARIANTS[name.removeprefix("atman:")](explainer, planned)
        return peer_scores(name, lm, planned)

    return scores


@pytest.mark.cluster
@pytest.mark.parametrize("name", METHODS)
def test_each_method_runs_through_the_job_with_its_own_scores(runs, direct, name):
    _, summaries = runs
    summary = summaries[name]
    rows = _rows(summary)
    for part in Path(summary.location).glob("part-*.parquet"):
        assert pq.ParquetFile(part).schema_arrow.remove_metadata() == SCHEMA.remove_metadata()
    refused = {"many"} if name == "contextcite" else set()
    assert summary.counts == {"ok": len(ROWS) - len(refused), "skipped": len(refused), "error": 0}
    for source in ROWS:
        row = rows[source["id"]]
        if source["id"] in refused:
            continue
        assert row["status"] == "ok", row["error"]
        want = direct(name, source)
        assert len(row["scores"]) == len(row["unit_text"]) == len(want) > 0
        np.testing.assert_allclose(row["scores"], want.astype(np.float32), rtol=1e-4, atol=1e-6)
        assert row["per_target"] is None, "no per-target matrix: the column is null"
        assert row["base_target_ce"] > 0 and row["target_tokens"] and row["granularity"] == GRANULARITY
        assert json.loads(row["method_params"])["name"] == name
    span = rows["span"]
    assert max(s + n for s, n in zip(span["unit_start"], span["unit_length"], strict=True)) <= 31
    assert rows["gen"]["target"], "a generated target"


@pytest.mark.cluster
def test_the_default_atman_run_is_unchanged_and_named(runs):
    _, summaries = runs
    rows = _rows(summaries["atman"])
    assert all(r["status"] == "ok" for r in rows.values())
    fr = rows["fr"]
    assert len(fr["per_target"]) == len(fr["scores"]) and len(fr["per_target"][0]) == 1, "AtMan keeps its matrix"
    params = json.loads(fr["method_params"])
    assert params["name"] == "atman" and params["factor"] == 0.1 and params["precision"] == "fp32"
    manifest = json.loads((Path(summaries["atman"].location) / MANIFEST).read_text())
    assert manifest["method_params"]["name"] == "atman" and manifest["method_params"]["mode"] == "log_additive"
    assert "name" not in manifest["config"]["method"] or manifest["config"]["method"]["name"] == "atman"


@pytest.mark.cluster
def test_the_manifest_names_the_method_and_its_settings(runs):
    from pipeline.atman.variants import REFINE_SHARE
    from pipeline.evaluate import IG_STEPS

    _, summaries = runs

    def params(name):
        return json.loads((Path(summaries[name].location) / MANIFEST).read_text())["method_params"]

    cc = params("contextcite")
    assert cc["name"] == "contextcite" and cc["granularity"] == GRANULARITY
    assert cc["settings"] == {"num_ablations": 64, "ablation_keep_prob": 0.5, "batch_size": 1}
    assert "factor" not in cc and "mode" not in cc, "a peer records no AtMan setting it does not use"
    assert params("ig")["settings"]["steps"] == IG_STEPS
    coarse = params("atman:coarse")
    assert coarse["factor"] == 0.1 and coarse["settings"] == {"refine_share": REFINE_SHARE}
    row_params = json.loads(_rows(summaries["contextcite"])["fr"]["method_params"])
    assert row_params == cc


@pytest.mark.cluster
def test_contextcite_with_fewer_ablations_than_units_is_a_skipped_row(runs):
    _, summaries = runs
    row = _rows(summaries["contextcite"])["many"]
    assert row["status"] == "skipped" and row["scores"] is None
    assert row["error"].startswith("contextcite: 71 units but 64 ablations"), row["error"]


@pytest.mark.cluster
def test_an_audit_across_methods_says_so(runs):
    root, _ = runs
    across = diff_runs(root, resolve_run(root, "atman"), resolve_run(root, "attnlrp"))
    assert across.config_changed[0] == "method: atman -> attnlrp (the method changed; scores are not comparable)"
    assert across.summary()["method_changed"] and across.summary()["method"] == {"base": "atman", "new": "attnlrp"}
    assert across.table.num_rows == len(ROWS), "the prompts are still compared"
    same = diff_runs(root, resolve_run(root, "atman"), resolve_run(root, "atman"))
    assert not same.summary()["method_changed"] and same.config_changed == []
    out = subprocess.run([ATMAN, "diff", root, "--base", "atman", "--new", "rollout"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "warning: the runs ran different methods (atman -> rollout)" in " ".join(out.stdout.split())


def test_the_hash_of_an_atman_spec_is_the_one_from_before_method_name():
    spec = {"name": "h", "model": {"id": "some/model"}, "input": {"path": "in.jsonl"}}
    spec["method"] = {"granularity": "sentence", "factor": 0.3}
    before = "c1caa59af2bc72fa"  # this spec's hash before method.name existed
    assert JobSpec.model_validate(spec).config_hash() == before
    spec["method"]["name"] = "atman"
    assert JobSpec.model_validate(spec).config_hash() == before
    spec["method"]["name"] = "atman:coarse"
    assert JobSpec.model_validate(spec).config_hash() != before


def test_a_bad_method_name_names_the_field_and_the_names(tmp_path):
    (tmp_path / "job.yaml").write_text("name: m\ninput: {path: in.jsonl}\nmethod: {name: lime}\n")
    with pytest.raises(JobSpecError, match=r"method\.name: 'lime' is not a method; the names are atman, atman:coarse"):
        load_job(tmp_path / "job.yaml")
    with pytest.raises(JobSpecError, match=r"attnlrp uses only granularity, .* not factor: remove method\.factor"):
        load_job(tmp_path / "job.yaml", ["method.name=attnlrp", "method.factor=0.3"])
    assert load_job(tmp_path / "job.yaml", ["method.name=attnlrp", "method.factor=0.1"]).method.name == "attnlrp"
    # an estimator runs AtMan's mode and factor, but not what it never computes, nor the settings it fixes itself
    assert load_job(tmp_path / "job.yaml", ["method.name=atman:coarse", "method.factor=0.3"]).method.factor == 0.3
    assert load_job(tmp_path / "job.yaml", ["method.name=atman:joint", "method.factor=0.3"]).method.factor == 0.3
    for setting in ("conceptual_threshold=0.7", "aggregate=sum_of_squares", "normalize=true"):
        field = setting.split("=")[0]
        with pytest.raises(
            JobSpecError, match=rf"atman:joint does not use {field}: .* remove method\.{field}, or choose method atman"
        ):
            load_job(tmp_path / "job.yaml", ["method.name=atman:joint", f"method.{setting}"])
    with pytest.raises(JobSpecError, match=r"atman:joint-knockout does not use factor: .*factor 0\.0\)"):
        load_job(tmp_path / "job.yaml", ["method.name=atman:joint-knockout", "method.factor=0.3"])
    out = _cli("run", "job.yaml", "--set", "method.name=nope", cwd=tmp_path)
    assert out.returncode == 2 and "method.name: 'nope' is not a method" in " ".join(out.stderr.split())


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny GPT-2: an architecture lxt has no AttnLRP rules for."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_model("gpt2", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_attnlrp_refuses_an_architecture_without_rules_before_any_row(tmp_path, gpt2_dir):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(JobSpecError) as refused:
        run_job(_spec(gpt2_dir, tmp_path / "out", data, "attnlrp"), "r", address="inline")
    assert str(refused.value).startswith(
        "method.name: attnlrp cannot explain this model: GPT2LMHeadModel is not supported; this peer applies lxt's "
        "rules for LlamaForCausalLM, Gemma3ForCausalLM only"
    ), refused.value
    assert not list((tmp_path / "out").rglob("*.parquet")), "no row is written for a refused method"
    args = ("--model", gpt2_dir, "--prompt", "a b c", "--target", " d", "--no-chat")
    out = _explain(*args, "--method", "attnlrp")
    assert out.exit_code == 2 and "--method: attnlrp cannot explain this model: GPT2LMHeadModel" in out.stderr


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([ATMAN, *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def _explain(*args):
    """`atman explain ARGS` in this process (typer's CliRunner: exit code, stdout, stderr), offline: a fresh
    process would add only its imports; the entry point's own exit codes are checked in test_cli and test_refusal."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, ["explain", *args], env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def test_explain_method_attnlrp_prints_its_scores(tiny_model_dir, direct):
    row = ROWS[0]
    args = ("--prompt", row["prompt"], "--target", row["target"], "--granularity", GRANULARITY, "--no-chat")
    out = _explain("--model", tiny_model_dir, *args, "--method", "attnlrp", "--json")
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    assert d["method"] == "attnlrp" and d["params"]["name"] == "attnlrp" and d["per_target"] is None
    want = direct("attnlrp", row)
    np.testing.assert_allclose([u["score"] for u in d["units"]], want, rtol=1e-4, atol=1e-6)


def test_the_table_names_a_method_other_than_atman():
    from rich.console import Console

    from pipeline.atman.explanation import Explanation
    from pipeline.render import render_explanation

    common = dict(prompt="a b", target=" c", target_tokens=[" c"], base_target_ce=1.0, base_ce_per_token=[1.0],
                  units=[("a", 0, 1), ("b", 2, 1)], scores=np.array([0.5, -0.5], dtype=np.float32), per_target=None,
                  granularity="word", conceptual_threshold=None, chat=False, n_prompt_tokens=2)  # fmt: skip
    shown = {}
    for name, mode in (("attnlrp", "attnlrp"), ("atman:coarse", "log_additive"), (None, "log_additive")):
        console = Console(record=True, width=200)
        params = {} if name is None else {"name": name}
        render_explanation(Explanation(**common, mode=mode, factor=0.1, params=params), console)
        shown[name] = console.export_text()
    assert "method: attnlrp  granularity" in shown["attnlrp"] and "factor" not in shown["attnlrp"]
    assert "method: atman:coarse  mode: log_additive  factor: 0.1" in shown["atman:coarse"]
    assert "method:" not in shown[None] and "mode: log_additive  factor: 0.1" in shown[None]


def test_explain_method_refuses_bad_names_and_unused_options_before_loading():
    args = ("--prompt", "x", "--target", " y", "--model", "/no/such/model")
    out = _cli("explain", *args, "--method", "lime")
    assert out.returncode == 2
    assert "--method: 'lime' is not a method; the names are atman, atman:coarse" in " ".join(out.stderr.split())
    out = _cli("explain", *args, "--method", "ig", "--factor=0.3")
    assert out.returncode == 2 and "--factor: ig uses only granularity" in " ".join(out.stderr.split())
    out = _cli("explain", *args, "--method", "atman:joint", "--conceptual-threshold=0.7")
    assert out.returncode == 2
    assert "--conceptual-threshold: atman:joint does not use conceptual_threshold" in " ".join(out.stderr.split())
