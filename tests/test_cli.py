"""The `atman` console script, run as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import errors

ATMAN = str(Path(sys.executable).parent / "atman")


def run(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env_extra or {})}
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
    """The table shows the explanation: its units ranked by score, with their offsets and scores (the prompt alone
    contains none of that), the same as --json reports."""
    args = ("explain", "--prompt", "Paris is in France. Berlin is in", "--target", " Germany", "--no-chat")
    out = run(*args)
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^│ (\d+) +│ '(.*?)' +│ (\d+) +│ ([+-]\d+\.\d{4}) +│$", out.stdout, re.M)
    d = json.loads(run(*args, "--json").stdout)
    ranked = sorted(d["units"], key=lambda u: -u["score"])[: len(rows)]
    assert len(rows) >= 3 and [int(r[0]) for r in rows] == list(range(1, len(rows) + 1)), out.stdout
    assert [(text, int(start)) for _, text, start, _ in rows] == [(u["text"], u["start"]) for u in ranked]
    assert [float(r[3]) for r in rows] == pytest.approx([u["score"] for u in ranked], abs=1e-4)
    assert "target: ' Germany'" in out.stdout and f"base CE: {d['base_target_ce']:.3f} nats" in out.stdout


@pytest.mark.parametrize(
    "args, field",
    [
        (["--prompt", "", "--target", " x"], "prompt:"),
        (["--prompt", "abc", "--target", ""], "target:"),
        (["--prompt", "abc", "--target", " x", "--mode", "bogus"], "'--mode'"),
        (["--prompt", "abc", "--target", " x", "--granularity", "clause"], "'--granularity'"),
        (["--prompt", "abc", "--target", " x", "--postprocess", "cube"], "'--postprocess'"),
        (["--prompt", "abc", "--target", " x", "--granularity", "custom"], "delimiter:"),
        (["--prompt", "abc", "--target", " x", "--delimiter", "|"], "delimiter:"),
        (["--prompt", "abc", "--target", " x", "--factor", "-1"], "factor:"),
        (["--prompt", "abc", "--target", " x", "--factor", "inf"], "factor:"),
        (["--prompt", "abc", "--target", " x", "--explain-span", "1:99"], "explain_span:"),
        (["--prompt", "abc", "--target", " x", "--conceptual-threshold", "high"], "conceptual-threshold:"),
        (["--prompt", "abc", "--target", " x", "--conceptual-threshold", "1.5"], "conceptual_threshold:"),
        (["--prompt", "abc " * 9000, "--target", " x"], "prompt:"),  # 9,001 tokens: past the 8,192-token context
        (["--prompt", "abc", "--target", " x", "--precision", "fp8"], "'--precision'"),
        (["--prompt", "abc", "--target", " x", "--dtype", "float32", "--precision", "bf16"], "precision: 'bf16'"),
    ],
)
def test_bad_input_exits_2_naming_the_field(args, field):
    """The option's own name (choices typer checks) or the config field it sets; never a traceback."""
    out = run("explain", *args)
    assert out.returncode == 2, out.stderr
    assert field in " ".join(out.stderr.split()) and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize(
    "args, field",
    [(["--prompt", " ", "--target", " x"], "prompt:"), (["--prompt", "abc", "--target", ""], "target:"),
     (["--prompt", "abc", "--target", " x", "--explain-span", "2:9"], "explain_span:")],
)  # fmt: skip
def test_a_bad_request_is_refused_before_any_model_loads(tmp_path, args, field):
    """The request is checked first: with a model that cannot load, the request's field is what is named."""
    out = run("explain", *args, "--model", str(tmp_path / "no-such-model"))
    assert out.returncode == 2 and field in out.stderr and "no-such-model" not in out.stderr, out.stderr


def test_run_precision_sets_the_specs_method_precision():
    bad = run("run", "jobs/examples/demo.yaml", "--precision", "fp8")
    assert bad.returncode == 2 and "'--precision'" in bad.stderr, bad.stderr
    bad = run("run", "jobs/examples/demo.yaml", "--set", "method.precision=fp8")
    assert bad.returncode == 2 and "method.precision" in bad.stderr, bad.stderr


def test_method_options_come_from_atman_config():
    """`atman explain --help` shows AtManConfig's choices and defaults, and the job spec's method keys are
    AtManConfig's fields with its defaults: one source of truth for every entry point."""
    from pipeline.atman.config import MODES, AtManConfig
    from pipeline.jobspec import METHOD_FIELDS, MethodSpec

    out = run("explain", "--help", env_extra={"COLUMNS": "250"})
    text = " ".join(out.stdout.split())
    engine = AtManConfig()
    assert out.returncode == 0 and f"<{'|'.join(MODES)}>" in text, text
    for option, value in (("--granularity", engine.granularity), ("--mode", engine.mode), ("--factor", engine.factor)):
        assert re.search(rf"{option} [^\[]*\[default: {value}\]", text), option
    spec = MethodSpec()
    assert set(MethodSpec.model_fields) == {"name", *METHOD_FIELDS} and spec.name == "atman"  # name: which method
    assert {k: getattr(spec, k) for k in METHOD_FIELDS} == {k: getattr(engine, k) for k in METHOD_FIELDS}
    for name in METHOD_FIELDS:
        assert MethodSpec.model_fields[name].description == AtManConfig.model_fields[name].description, name


def test_explain_out_of_memory_is_a_message_not_a_traceback(monkeypatch, tiny_model_dir):
    """A device out of memory during `atman explain` exits 1 with what to change, not a traceback."""
    import torch
    from typer.testing import CliRunner

    from pipeline.atman.explainer import Explainer
    from pipeline.cli import app

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Explainer, "explain", out_of_memory)
    result = CliRunner().invoke(app, ["explain", "--prompt", "abc", "--target", " x", "--model", tiny_model_dir])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "device: out of memory while explaining" in text, text
    assert "Tried to allocate 2.00 GiB" in text and "Traceback" not in text


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.BadInput("x: bad"), 2),
        (ValueError("x: bad"), 2),  # pydantic's ValidationError too
        (FileNotFoundError("x: bad"), 2),
        (FileExistsError("x: bad"), 2),  # a submission that exists already
        (ConnectionError("x: bad"), 1),
        (RuntimeError("x: bad"), 1),  # torch.OutOfMemoryError too
        (errors.AnswerWithheld("x: bad"), 3),
        (errors.RunIncomplete("x: bad", 130), 130),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_an_error_a_command_expects_exits_with_the_code_errors_py_gives_it(error, code, capsys):
    """Every command ends on an error through pipeline/cli/common.py's ``reported``: its one line on stderr and the
    code of pipeline.errors.exit_code, the one mapping; a ``fail`` inside passes through as it is."""
    import typer

    from pipeline.cli.common import fail, reported

    assert errors.exit_code(error) == code
    with pytest.raises(typer.Exit) as ended, reported(type(error)):
        raise error
    assert ended.value.exit_code == code and "error: x: bad" in capsys.readouterr().err
    with pytest.raises(typer.Exit) as ended, reported(type(error), RuntimeError):
        fail("y: bad", 4)
    assert ended.value.exit_code == 4
    with pytest.raises(typer.Exit) as ended, reported(Exception, say={type(error): lambda e: f"z: {e}"}):
        raise error
    assert ended.value.exit_code == code and "error: z: x: bad" in capsys.readouterr().err
