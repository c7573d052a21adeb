"""pipeline.layout: the one place that spells run paths, partitions and URLs (no server, no job)."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from pipeline.layout import (
    RunPaths,
    audit_dir,
    filesystem,
    local_root,
    parse_run_dir,
    partition_pattern,
    run_glob,
    scratch_dir,
    url,
)


def test_run_glob_and_parse_run_dir_agree():
    path = run_glob("/out/", "HuggingFaceTB--SmolLM2", "2024-05-01", "r1")
    assert path == "/out/model=HuggingFaceTB--SmolLM2/run_date=2024-05-01/run_id=r1"
    assert parse_run_dir(path) == ("HuggingFaceTB--SmolLM2", "2024-05-01", "r1")
    assert run_glob("bucket/out") == "bucket/out/model=*/run_date=*/run_id=*"
    assert parse_run_dir("/out/model=m/run_date=d") is None
    assert parse_run_dir(f"{path}/part-s000000.parquet") is None, "a file in a run is not a run directory"


def test_partition_patterns_read_a_parts_path():
    part = "s3://b/out/model=m1/run_date=2024-05-01/run_id=r1/part-s000003.parquet"
    assert re.search(partition_pattern("model"), part).group(1) == "m1"
    assert re.search(partition_pattern("run_date"), part).group(1) == "2024-05-01"
    assert re.search(partition_pattern("run_id"), part).group(1) == "r1"
    with pytest.raises(ValueError, match="^partition: 'day' is not one of model, run_date, run_id"):
        partition_pattern("day")


def test_url_keeps_local_paths_and_prefixes_remote_ones(tmp_path):
    local, path = filesystem(str(tmp_path))
    assert url(local, path) == str(tmp_path)
    s3 = filesystem("s3://bucket/out")[0]  # s3fs builds its client lazily: nothing is contacted
    assert url(s3, "bucket/out/x") == "s3://bucket/out/x"
    run = RunPaths("s3://bucket/out", "m", "2024-05-01", "r1")
    assert run.url == "s3://bucket/out/model=m/run_date=2024-05-01/run_id=r1"


def test_locate_finds_an_existing_run_by_its_date(tmp_path):
    root = str(tmp_path / "out")
    (tmp_path / "out" / "model=m" / "run_date=2024-01-02" / "run_id=r1").mkdir(parents=True)
    assert RunPaths.locate(root, "m", "r1").run_date == "2024-01-02"
    assert RunPaths.locate(root, "m", "r2", today=dt.date(2024, 3, 4)).run_date == "2024-03-04"


def test_root_level_paths(tmp_path):
    assert local_root("file:///tmp/x") == "/tmp/x" and local_root("s3://b/x") is None
    assert local_root("rel") == str(tmp_path.cwd() / "rel")
    assert audit_dir("b/out/", "m", "r1", "m", "r2") == "b/out/_audits/m.r1__m.r2"
    assert scratch_dir("/o", "r1") == "/o/_scratch/r1"
