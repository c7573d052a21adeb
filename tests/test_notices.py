"""Messages that say what happened: a full disk names the path, a root that cannot be written says so (not "cannot
read it"), an input touched but not resized says it was modified, a lease taken over names its holder, a Ray head
without its job agent is a message with advice (not a traceback), and a failed write leaves no temporary file."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import RunIncomplete
from pipeline.job import run_job
from pipeline.jobspec import JobSpec, JobSpecError
from pipeline.layout import RunPaths

ROOT = Path(__file__).parent.parent


def _spec(model_dir: str, tmp_path: Path, n: int = 6) -> JobSpec:
    rows = [{"id": f"p{i}", "prompt": f"Prompt {i} talks about", "target": " cats"} for i in range(n)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return JobSpec.model_validate(
        {
            "name": "notices",
            "model": {"id": model_dir},
            "input": {"path": str(tmp_path / "in.jsonl")},
            "method": {"granularity": "word", "generate_max_tokens": 2},
            "output": {"root": str(tmp_path / "out")},
            "resources": {"batch_rows": 2, "shard_rows": 2},
        }
    )


def test_a_full_disk_names_the_path_and_leaves_no_temporary_file(tmp_path, tiny_model_dir, monkeypatch):
    spec = _spec(tiny_model_dir, tmp_path)
    paths = RunPaths.locate(str(tmp_path / "out"), tiny_model_dir, "f1")
    part = paths.part("part-s000001.parquet")
    fsync = os.fsync

    def full(fd: int) -> None:  # the disk fills while shard 1's part is written
        if os.readlink(f"/proc/self/fd/{fd}").endswith("-part-s000001.parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        with pytest.raises(RunIncomplete) as caught:
            run_job(spec, "f1", address="inline")
    message = str(caught.value)
    assert f"no space left on the device writing {part}: free space there" in message, message
    assert "rerun with --run-id f1" in message
    run_dir = Path(paths.dir)
    assert not list(run_dir.rglob(".tmp-*")), "the failed write removed its temporary file"

    stale = [run_dir / ".tmp-999999-abcdef-part-s000002.parquet", run_dir / "_progress" / ".tmp-999999-a-s1.json"]
    for path in stale:  # what a process killed mid-write leaves
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    again = run_job(spec, "f1", address="inline")
    assert again.counts["ok"] == 6 and (run_dir / "_SUCCESS").exists()
    assert not list(run_dir.rglob(".tmp-*")), "the successful rerun removed what interrupted writes left"


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (OSError(errno.EROFS, "Read-only file system"), "cannot be written (a read-only file system): make it"),
        (PermissionError(errno.EACCES, "Permission denied"), "cannot be written (permission denied)"),
        (FileNotFoundError(errno.ENOENT, "The specified bucket does not exist"), "does not exist and cannot be made"),
    ],
)
def test_an_output_root_that_cannot_be_written_says_so(tmp_path, tiny_model_dir, monkeypatch, error, said):
    from fsspec.implementations.local import LocalFileSystem

    def refuse(self, path, exist_ok=False):
        raise error

    spec = _spec(tiny_model_dir, tmp_path)
    monkeypatch.setattr(LocalFileSystem, "makedirs", refuse)
    with pytest.raises(JobSpecError) as caught:
        run_job(spec, "r1", address="inline")
    message = str(caught.value)
    assert message.startswith(f"output.root: {str(tmp_path / 'out')!r} {said}"), message
    assert "cannot read" not in message


def test_an_input_restored_with_a_new_mtime_is_said_to_be_modified(tmp_path, tiny_model_dir):
    spec = _spec(tiny_model_dir, tmp_path, n=2)
    run_job(spec, "m1", address="inline")
    path = tmp_path / "in.jsonl"
    before = path.stat()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))  # the same bytes, copied back
    with pytest.raises(JobSpecError) as caught:
        run_job(spec, "m1", address="inline")
    message = str(caught.value)
    assert f"{path} was modified (mtime/version changed: " in message, message
    assert f"size the same: {before.st_size})" in message and "->" in message and "size 0" not in message


def test_a_lease_taken_over_names_its_holder(tmp_path, tiny_model_dir):
    spec = _spec(tiny_model_dir, tmp_path, n=2)
    paths = RunPaths.locate(str(tmp_path / "out"), tiny_model_dir, "l1")
    os.makedirs(paths.dir)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    held = {"owner": "host-a:1:beef", "host": socket.gethostname(), "pid": gone.pid, "since": "2026-01-01T00:00:00"}
    Path(paths.lease).write_text(json.dumps(held | {"expires_at": "2999-01-01T00:00:00+00:00"}))
    notes: list[str] = []
    assert run_job(spec, "l1", address="inline", on_notice=notes.append).counts["ok"] == 2
    expected = (
        "run l1: took over the lease of an earlier driver, host-a:1:beef (since 2026-01-01T00:00:00): "
        f"its driver (pid {gone.pid} on this machine) is gone"
    )
    assert expected in notes, notes


class _NoAgent:
    """A Jobs API whose head answers but whose job agent never comes up."""

    def get_job_status(self, sid):
        raise RuntimeError(f"Job {sid} does not exist")

    def submit_job(self, **kwargs):
        raise RuntimeError("Request failed with status code 500: No available agent to submit job, please try again")


def test_submit_to_a_head_without_its_job_agent_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline import submit
    from pipeline.cli import app

    monkeypatch.setattr(submit, "client", lambda address: _NoAgent())
    monkeypatch.setattr(submit, "AGENT_WAIT_S", 0)
    args = ["submit", str(ROOT / "jobs/examples/demo.yaml"), "--address", "http://head:8265"]
    result = CliRunner().invoke(app, [*args, "--set", f"output.root={tmp_path}"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert "address: the Ray head at http://head:8265 answers, but its job agent was not up after 0 s" in text, text
    assert "wait a minute and run the same command again" in text and "Traceback" not in text
