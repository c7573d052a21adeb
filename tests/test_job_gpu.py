"""The job on GPU actors, the part a CPU can check: actors asking for a fraction of a GPU are scheduled together on
the test session's Ray, which declares one GPU with no device behind it (conftest's ``ray_cluster``); the actors
compute on the CPU. The GPU figures (one actor per GPU, two sharing one, an out-of-memory halving the batch) come
from bench/gpu_suite.py on a lent GPU; its smoke run (tests/test_gpu_suite.py) checks the halving on a CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.job import run_job
from pipeline.jobspec import JobSpec
from pipeline.layout import MANIFEST

ROWS = [
    {"id": f"p{i}", "prompt": f"Item {i} is red. Item {i + 1} is blue. The colour of item {i} is", "target": " red"}
    for i in range(8)
]


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_two_actors_with_half_a_gpu_each_share_the_one_gpu(tmp_path, tiny_model_dir, ray_cluster):
    import ray

    assert ray.cluster_resources().get("GPU") == 1.0, "the session's Ray declares one GPU"
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spec = JobSpec.model_validate(
        {
            "name": "gpu-share",
            "model": {"id": tiny_model_dir},
            "input": {"path": str(tmp_path / "in.jsonl")},
            "output": {"root": str(tmp_path / "out")},
            "resources": {"actors": 2, "gpus_per_actor": 0.5, "batch_rows": 2, "cpus_per_actor": 1},
        }
    )
    free = []  # Ray's unclaimed GPU at each progress report: 0 while both actors hold their half
    summary = run_job(spec, "share", on_progress=lambda *_: free.append(ray.available_resources().get("GPU", 0.0)))

    assert summary.counts == {"ok": len(ROWS), "skipped": 0, "error": 0} and summary.shards >= 2
    ids = ds.dataset(summary.location, format="parquet").to_table(columns=["prompt_id"]).column(0).to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in ROWS), "every row exactly once"
    assert free and min(free) == 0.0, f"both actors held half the GPU at once: {free}"
    assert _gpu_given_back(ray), "the actors gave their halves back"
    manifest = json.loads((Path(summary.location) / MANIFEST).read_text())
    (compute,) = manifest["compute"]  # both actors computed alike: one entry
    assert compute["device"] == "cpu" and compute["precision"] == "fp32" and compute["attention_kernel"] == "sdpa"


def _gpu_given_back(ray, timeout: float = 30.0) -> bool:
    """Whether Ray's whole GPU is free again within ``timeout`` s (the killed actors' resources come back
    asynchronously)."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("GPU") != 1.0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
