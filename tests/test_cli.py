"""The `atman` console script, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ATMAN = str(Path(sys.executable).parent / "atman")


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([ATMAN, *args], capture_output=True, text=True, env=env, timeout=300)


def test_help():
    out = run("--help")
    assert out.returncode == 0 and "explain" in out.stdout
    out = run("explain", "--help")
    assert out.returncode == 0 and "--granularity" in out.stdout


@pytest.mark.slow
def test_explain_json_offline():
    prompt = "The capital of France is Paris. The capital of Germany is"
    out = run("explain", "--prompt", prompt, "--target", " Berlin", "--granularity", "word", "--no-chat", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["prompt"] == prompt and d["target"] == " Berlin" and d["target_tokens"] == [" Berlin"]
    assert d["mode"] == "log_additive" and d["factor"] == 0.1 and d["granularity"] == "word"
    assert isinstance(d["base_target_ce"], float)
    assert [u["start"] for u in d["units"]] == sorted(u["start"] for u in d["units"])
    assert max(d["units"], key=lambda u: u["score"])["text"] == "Germany"
    assert len(d["per_target"]) == len(d["units"]) and len(d["per_target"][0]) == 1


@pytest.mark.slow
def test_explain_table():
    out = run("explain", "--prompt", "Paris is in France. Berlin is in", "--target", " Germany", "--no-chat")
    assert out.returncode == 0, out.stderr
    assert "Berlin" in out.stdout and "rank" in out.stdout


@pytest.mark.parametrize(
    "args, field",
    [
        (["--prompt", "", "--target", " x"], "prompt"),
        (["--prompt", "abc", "--target", ""], "target"),
        (["--prompt", "abc", "--target", " x", "--mode", "bogus"], "mode"),
        (["--prompt", "abc", "--target", " x", "--granularity", "clause"], "granularity"),
        (["--prompt", "abc", "--target", " x", "--factor", "-1"], "factor"),
        (["--prompt", "abc", "--target", " x", "--explain-span", "1:99"], "explain_span"),
        (["--prompt", "abc", "--target", " x", "--conceptual-threshold", "high"], "conceptual-threshold"),
        (["--prompt", "abc " * 9000, "--target", " x"], "prompt"),  # 9,001 tokens: past the 8,192-token context
    ],
)
def test_bad_input_exits_2_naming_the_field(args, field):
    out = run("explain", *args)
    assert out.returncode == 2, out.stderr
    assert f"{field}:" in out.stderr
