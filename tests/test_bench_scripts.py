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
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert {r["mode"] for r in result["runs"]} == {"scale", "log_additive"}
    for run in result["runs"]:
        assert run["passes"] == 49 and run["engine_s"] > 0
        assert run["max_abs_score_diff"] <= 1e-4


def test_pipeline_bench_script_runs_on_a_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "pipeline.json"
    cmd = [sys.executable, str(ROOT / "bench/bench_pipeline.py"), "--prompts", "3", "--model", tiny_model_dir]
    cmd += ["--configs", "engine,inline", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["prompts"] == 3 and set(result["results"]) == {"engine", "inline"}
    assert result["results"]["inline"]["unit_passes_per_s"] > 0 and result["inline_over_engine"] > 0


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
    assert "| atman | 35.0 | 1.0 | 1.0 | 1.0 | 1.00 | 1.00 | 20.00 | reference |" in lines
    assert "| ixg | 15.0 | 1.0 | 1.0 | 1.0 | 1.00 | 1.00 | 1.50 | +20.0 (+12.5, +27.2) |" in lines


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
