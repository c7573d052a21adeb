"""The benchmark scripts still run (tiny shapes; the real figures come from `make bench` and a GPU host)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_gpu_bench_script_runs_on_a_tiny_shape(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench/bench_gpu.py"),
        "--shape",
        "tiny",
        "--lengths",
        "48",
        "--reference",
        "--kappa",
        "0.2",
        "--precision-check",
        "--profile",
        str(tmp_path / "profile.txt"),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert {r["mode"] for r in result["runs"]} == {"scale", "log_additive"}
    for run in result["runs"]:
        assert run["passes"] == 49 and run["engine_s"] > 0
        assert run["max_abs_score_diff"] <= 1e-4
    precision = result["precision"]  # on a CPU both "precisions" are fp32: every gap is float rounding
    assert precision["prompt_tokens"] == 48 and precision["naive32_score_abs_max"] > 0
    for key in ("engine32_vs_naive32", "engine16_vs_naive32", "naive16_vs_naive32", "engine16_vs_naive16"):
        assert precision[f"max_abs_{key}"] <= 1e-4, key
    assert "aten::mm" in (tmp_path / "profile.txt").read_text()


def test_pipeline_bench_script_runs_on_a_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "pipeline.json"
    cmd = [sys.executable, str(ROOT / "bench/bench_pipeline.py"), "--prompts", "3", "--model", tiny_model_dir]
    cmd += ["--configs", "engine,inline", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["prompts"] == 3 and set(result["results"]) == {"engine", "inline"}
    assert result["results"]["inline"]["unit_passes_per_s"] > 0 and result["inline_over_engine"] > 0


def test_precision_bench_script_runs_on_a_tiny_model(tmp_path, tiny_model_dir):
    out, data = tmp_path / "precision.json", tmp_path / "squad.jsonl"
    context = "Paris is the capital of France. Rome is the capital of Italy."  # the tiny model's context is short
    examples = [
        {"id": f"e{i}", "context": context, "question": f"What is the capital of {country}?",
         "answers": [{"text": city, "answer_start": context.index(city)}]}
        for i, (city, country) in enumerate([("Paris", "France"), ("Rome", "Italy")])
    ]  # fmt: skip
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    cmd = [sys.executable, str(ROOT / "bench/bench_precision.py"), "--model", tiny_model_dir, "--data", str(data)]
    subprocess.run([*cmd, "--policies", "mixed_fp16,fp32", "--out", str(out)], check=True, capture_output=True,
                   timeout=300)  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["policies"]) == {"mixed_fp16", "fp32"}
    for name, policy in result["policies"].items():
        assert policy["summary"]["examples"] == len(policy["examples"]) == 2
        for row in policy["examples"]:
            assert row["units"] > 1 and row["ref_std"] > 0 and row["max_abs_diff"] >= row["rms_diff"] >= 0
            assert -1 <= row["spearman"] <= 1 and 0 <= row["top5_overlap"] <= 1
        if name == "fp32":  # the same bf16 values computed in float32: only the storage rounding is left
            assert policy["summary"]["mean_spearman"] > 0.9
    table = subprocess.run([*cmd[:2], "--table", str(out)], check=True, capture_output=True, text=True).stdout
    assert "| mixed_fp16 | 2 |" in table and "auto (cheapest" in table


def _on_one_example(tmp_path: Path, script: str, model_dir: str, context: str, args: list[str]) -> dict:
    """``bench/<script>`` on one SQuAD example (``context``, the question about Italy's capital, answer "Rome") with
    ``args`` and ``--sample 1``; its ``--out`` JSON."""
    data, out = tmp_path / "squad.jsonl", tmp_path / "out.json"
    example = {"id": "e0", "context": context, "question": "What is the capital of Italy?",
               "answers": [{"text": "Rome", "answer_start": context.index("Rome")}]}  # fmt: skip
    data.write_text(json.dumps(example) + "\n")
    cmd = [sys.executable, str(ROOT / "bench" / script), "--model", model_dir, "--data", str(data), "--sample", "1"]
    done = subprocess.run([*cmd, *args, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_joint_budget_script_spends_each_budget_and_pairs_against_records(tmp_path, tiny_model_dir):
    against = tmp_path / "against.json"
    theirs = {"AP": 50.0, "AR": 100.0, "aopc": 1.0, "aopc_removal": 1.0}
    against.write_text(json.dumps({"examples": [{"id": "e0", "methods": {"contextcite": theirs}}]}))
    context = "Paris is the capital of France. Rome is the capital of Italy. Bern is in Switzerland."
    args = ["--multiples", "1,2", "--floor", "8", "--against", str(against)]
    result = _on_one_example(tmp_path, "joint_budget.py", tiny_model_dir, context, args)
    (record,) = result["examples"]
    assert record["n_units"] == 3 and {k: v["passes"] for k, v in record["methods"].items()} == {
        "joint x1": 3, "joint x2": 8}  # fmt: skip
    ap, low, high = result["paired"]["joint x2 - contextcite"]["AP"]
    assert ap == low == high == record["methods"]["joint x2"]["AP"] - 50.0  # one example: no spread


def test_grad_tangent_script_nears_exact_atman_as_the_factor_nears_one(tmp_path, tiny_model_dir):
    """At factor 0.999 a unit's rise is the gradient's first-order term (log m = -0.001): the gradient ranks the
    units as that rise does; the factors' correlations are recorded per example and summarized."""
    context = "Paris is the capital of France. Rome is the capital of Italy and of its many old towns. Bern is small."
    result = _on_one_example(tmp_path, "grad_tangent.py", tiny_model_dir, context, ["--factors", "0.1,0.999"])
    (record,) = result["examples"]
    assert record["n_units"] > 10 and set(record["spearman"]) == {"0.1", "0.999"}
    assert record["spearman"]["0.999"] > 0.95, record
    assert result["summary"]["0.1"]["mean"] == record["spearman"]["0.1"]


def test_knockout_equals_removal_at_the_original_positions(tmp_path, tiny_model_dir):
    """The engine's knockout (factor 0) against a plain forward of the model with the units' tokens dropped and the
    rest at their original ``position_ids``: the same CE rise (to 1e-4), where plain removal differs."""
    context = "Paris is the capital of France. Rome is the capital of Italy. Bern is small. Oslo is cold."
    (record,) = _on_one_example(tmp_path, "knockout_vs_removal.py", tiny_model_dir, context, ["--masks", "8"])[
        "examples"
    ]
    assert record["ablations"] >= 4 and record["max_abs_knockout_vs_original_positions"] < 1e-4, record
    assert record["mean_abs_knockout_minus_removal"] > 1e-3, "renumbered positions change the CE"


def test_cli_bench_script_and_the_light_entry_points(tmp_path):
    """bench_cli runs; and `import pipeline` and `atman --help` import none of the heavy libraries (the CLI's start
    time is measured there, not asserted here)."""
    out = tmp_path / "cli.json"
    cmd = [sys.executable, str(ROOT / "bench/bench_cli.py"), "--repeats", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"atman --help", "atman explain --help", "atman query --help", "import pipeline"}
    for name, r in results.items():
        assert r["median_s"] > 0 and r["heavy"] == [], (name, r["heavy"])


def test_eval_plot_has_a_point_per_method_and_model(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from plot_eval import markdown, points

    def result(model, maps):
        metrics = dict.fromkeys(("mAR", "mAP_IQ", "mAR_IQ", "aopc", "aopc_removal"), 1.0)
        methods = {m: {**metrics, "mAP": v, "seconds_per_example": s} for m, (v, s) in maps.items()}
        return {"model": model, "granularity": "word", "n": 2, "methods": methods}

    a = result("m1", {"atman": (40.0, 10.0), "random": (3.0, 0.0)})
    b = result("m2", {"atman": (35.0, 20.0), "ixg": (15.0, 1.5)})
    b["methods"]["ixg"] |= {"lds": 0.25, "lds_removal": -0.125}  # a result made before the LDS has none
    assert sorted(p[1:] for p in points([a, b])) == [
        ("atman", 10.0, 40.0), ("atman", 20.0, 35.0), ("ixg", 1.5, 15.0), ("random", 0.0, 3.0)
    ]  # fmt: skip
    files = []
    for r in (a, b):
        files.append(tmp_path / f"{r['model']}.json")
        files[-1].write_text(json.dumps(r))
    out, tables = tmp_path / "plot.png", tmp_path / "tables.md"
    cmd = [sys.executable, str(ROOT / "bench/plot_eval.py"), *map(str, files), "--out", str(out)]
    subprocess.run([*cmd, "--markdown", str(tables)], check=True, capture_output=True, timeout=120)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000

    b["differences"] = {"atman - ixg": {"mAP": 20.0, "ci95": [12.5, 27.25]}}
    lines = markdown([a, b]).splitlines()
    assert (
        lines[0] == "**m1**, word units, n = 2"
        and tables.read_text().splitlines() == markdown([a, {**b, "differences": {}}]).splitlines()
    )
    assert "| atman | 35.0 | 1.0 | 1.0 | 1.0 | 1.00 | 1.00 | — | — | 20.00 | reference |" in lines
    assert "| ixg | 15.0 | 1.0 | 1.0 | 1.0 | 1.00 | 1.00 | 0.250 | -0.125 | 1.50 | +20.0 (+12.5, +27.2) |" in lines


def test_pooled_sweeps_weigh_each_model_the_same(tmp_path):
    """bench/pool_sweeps.py: the first sweep's records ("cells") and `atman eval sweep --records` lines read alike;
    a setting's pooled mAP is the mean of the models' mAPs, its gain over the defaults the mean of the models'
    paired gains; settings one model lacks are left out."""
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({"id": i, "cells": {
        "log_additive,0.1,None": {"AP": ap}, "log_additive,0.3,None": {"AP": ap + 10},
        "log_additive,0.3,0.7": {"AP": 1},
    }}) + "\n" for i, ap in (("a", 20.0), ("b", 40.0))))  # fmt: skip
    new = tmp_path / "new.jsonl"
    rows = [("x", 50.0, 45.0), ("y", 70.0, 55.0), ("z", 60.0, 50.0), ("x", 30.0, 20.0)]  # the last x replaces the first
    new.write_text("".join(json.dumps({"id": i, "model": "g", "granularity": "word", "sweep": "log_additive",
        "methods": {"factor=0.1 kappa=off": {"AP": d}, "factor=0.3 kappa=off": {"AP": f}}}) + "\n"
        for i, d, f in rows))  # fmt: skip
    out = subprocess.run([sys.executable, str(ROOT / "bench/pool_sweeps.py"), f"s={old}", str(new)],
                         check=True, capture_output=True, text=True, timeout=120).stdout.splitlines()  # fmt: skip
    assert out[0] == "| factor | κ | mAP s (n=2) | mAP g (n=3) | pooled mAP | pooled − defaults (95 % CI) |"
    assert out[2] == "| 0.1 | off | 30.0 | 53.3 | 41.7 | defaults |"
    # s gains +10 on each example, g -10, -15, -10 (mean -11.7): pooled -0.8. The interval: s's resamples are all
    # +10, g's means lie in [-15, -10] and all three -15 is 1 in 27 (> 2.5 %): pooled from -2.5 to 0
    assert out[3] == "| 0.3 | off | 40.0 | 41.7 | 40.8 | -0.8 (-2.5, +0.0) |"
    assert len(out) == 4, "κ 0.7 is in one sweep only"


def test_peers_bench_script_runs_on_a_tiny_model(tmp_path, tiny_model_dir):
    data = tmp_path / "squad.jsonl"  # short enough for the tiny model's 96-token context
    example = {"id": "e1", "context": "The Eiffel Tower is in Paris. It was finished in 1889 and is made of iron.",
               "question": "When was it finished?", "answers": [{"text": "1889", "answer_start": 49}]}  # fmt: skip
    data.write_text(json.dumps(example) + "\n")
    out = tmp_path / "peers.json"
    cmd = [sys.executable, str(ROOT / "bench/bench_peers.py"), "--examples", "1", "--model", tiny_model_dir]
    cmd += ["--data", str(data), "--batch", "4", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    (row,) = result["per_example"]
    assert result["examples"] == 1 and result["passes_per_example"] == row["units"] + 1 > 2
    assert row["atman_s"] > 0 and row["occlusion_s"] > 0 and result["occlusion_over_atman"] > 0
    assert result["occlusion"]["perturbations_per_eval"] == 4


def test_images_bench_script_runs(tmp_path):
    out = tmp_path / "images.json"
    cmd = [sys.executable, str(ROOT / "bench/bench_images.py"), "--image-size", "28", "--grids", "1x1"]
    subprocess.run([*cmd, "--repeats", "1", "--out", str(out)], check=True, capture_output=True, timeout=300)
    results = json.loads(out.read_text())["results"]
    assert results["every token"]["image_units"] == 4 and results["1x1"]["image_units"] == 1
    assert results["1x1"]["passes"] == results["every token"]["passes"] - 3
