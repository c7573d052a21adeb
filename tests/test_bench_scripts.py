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
