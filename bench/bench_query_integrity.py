"""What verifying parts costs a query (``atman query``: each part checked against its manifest's sha256, the check
remembered per file until the file changes).

    .venv/bin/python bench/bench_query_integrity.py                          # 10^5 and 10^6 rows
    .venv/bin/python bench/bench_query_integrity.py --rows 100000 --out bench/query-integrity.json

For each size, a complete run is written here (no model: the real schema, rows shaped like bench_scale.py's corpus
explained at word granularity, zstd parts of the default 10,000 rows, a manifest as the job's ``finalize`` writes
it). Measured, each the median of ``--repeat`` tries, with the file cache warm (the run was just written):

- ``atman query ROOT "SELECT count(*) FROM explanations"`` (a subprocess, as a user runs it): the first query (an
  empty verified-parts cache: every part is hashed) and a repeated one (cache warm: nothing is read but the
  listing, the manifest and the cache file);
- in-process: ``connect()`` + the same count, first and repeated; against it the same count without any check
  (list the run, read its manifest, DuckDB's count over the parts: what a query did before); and the bare hashing
  of every part (sha256, 4 threads, as ``connect`` does);
- the alternative, Parquet page checksums (``write_page_checksum``): a full read of the same rows with pyarrow's
  ``page_checksum_verification``, against the same read without it. DuckDB does not check page checksums, and a
  ``count(*)`` reads no page at all, so they would guard only reads that go through pyarrow.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ATMAN = str(Path(sys.executable).parent / "atman")
SHARD_ROWS = 10_000
WORDS = ["red", "blue", "green", "small", "large", "old", "new", "fast", "slow", "round"]
COUNT = "SELECT count(*) AS n FROM explanations"


def shard_table(first: int, n: int, run_id: str):
    """``n`` ok rows shaped like an explained bench_scale prompt ('Item {i} is {a} and', 5 word units)."""
    import pyarrow as pa

    from pipeline.parts import SCHEMA

    rng = random.Random(first)  # scores as a model gives them: float32 noise, which zstd cannot shrink
    rows = []
    for i in range(first, first + n):
        a, b = WORDS[i % 10], WORDS[(i // 10) % 10]
        prompt = f"Item {i} is {a} and"
        words = prompt.split(" ")
        starts = [sum(len(w) + 1 for w in words[:k]) for k in range(len(words))]
        scores = [rng.gauss(0, 0.1) for _ in words]
        now = dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=rng.randrange(10**10))
        rows.append(
            {"prompt_id": f"r{i}", "run_id": run_id, "model_id": "tiny", "model_revision": "main",
             "method_params": '{"granularity": "word"}', "prompt": prompt, "target": f" {b}", "granularity": "word",
             "unit_text": words, "unit_start": starts, "unit_length": [len(w) for w in words], "scores": scores,
             "per_target": [scores], "target_tokens": [f" {b}"], "base_target_ce": rng.uniform(0, 8),
             "n_prompt_tokens": 6, "status": "ok", "latency_ms": rng.uniform(5, 50), "written_at": now,
             "source": "in.jsonl", "chat": False}
        )  # fmt: skip
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_run(root: Path, rows: int, page_checksums: bool = False) -> Path:
    """A complete run of ``rows`` rows in parts of SHARD_ROWS (zstd); with ``page_checksums`` the parts carry Parquet
    page CRCs (and the run is only read by pyarrow)."""
    import pyarrow.parquet as pq

    from pipeline.layout import MANIFEST, SUCCESS, part_name, run_glob

    run_id = "bench"
    run = Path(run_glob(str(root), "tiny", "2024-01-02", run_id))
    run.mkdir(parents=True)
    files = []
    for shard, first in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - first)
        path = run / part_name(shard)
        pq.write_table(shard_table(first, n, run_id), path, compression="zstd", write_page_checksum=page_checksums)
        data = path.read_bytes()
        counts = {"ok": n, "skipped": 0, "error": 0}
        digest = hashlib.sha256(data).hexdigest()
        files.append(
            {"name": path.name, "bytes": len(data), "sha256": digest, "rows": n, "counts": counts, "shard": shard}
        )
    manifest = {"run_id": run_id, "run_date": "2024-01-02", "rows": rows, "shards": len(files), "files": files}
    (run / MANIFEST).write_text(json.dumps(manifest))
    (run / SUCCESS).write_text("")
    return run


def median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 3)


def cli_seconds(root: Path, cache: Path, repeat: int) -> tuple[float, float]:
    """The first query (cache emptied before each try) and a repeated one, as `atman query` runs them."""
    env = {**os.environ, "ATMAN_CACHE_DIR": str(cache)}
    cmd = [ATMAN, "query", str(root), COUNT, "--format", "json"]

    def first():
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        subprocess.run(cmd, env=env, check=True, capture_output=True)

    def again():
        subprocess.run(cmd, env=env, check=True, capture_output=True)

    return median_s(first, repeat), median_s(again, repeat)


def in_process_seconds(root: Path, run: Path, cache: Path, repeat: int) -> dict:
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import fsspec

    from pipeline.parts import sha256_of
    from pipeline.query import connect

    os.environ["ATMAN_CACHE_DIR"] = str(cache)

    def count():
        assert connect(str(root)).execute(COUNT).fetchall()[0][0] > 0

    def first():
        shutil.rmtree(cache, ignore_errors=True)
        count()

    fs = fsspec.filesystem("file")
    parts = sorted(str(p) for p in run.glob("part-*.parquet"))

    def hash_all():
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda p: sha256_of(fs, p), parts))

    def bare():  # what a query read before parts were verified: the listing, the manifest, DuckDB's count
        import duckdb

        from pipeline.query import list_runs

        (found,) = list_runs(str(root))
        json.loads(fs.cat_file(f"{found.path}/_manifest.json"))
        files = ", ".join(f"'{p}'" for p in fs.glob(f"{found.path}/part-*.parquet"))
        assert duckdb.connect().execute(f"SELECT count(*) FROM read_parquet([{files}])").fetchall()[0][0] > 0

    return {
        "unverified_count_s": median_s(bare, repeat),
        "connect_count_first_s": median_s(first, repeat),
        "connect_count_again_s": median_s(count, repeat),
        "sha256_all_parts_s": median_s(hash_all, repeat),
    }


def page_checksum_seconds(work: Path, rows: int, repeat: int) -> dict:
    import pyarrow.parquet as pq

    run = write_run(work / "crc", rows, page_checksums=True)
    parts = sorted(run.glob("part-*.parquet"))

    def read(verify: bool):
        for p in parts:
            pq.read_table(p, page_checksum_verification=verify)

    return {
        "pyarrow_full_read_s": median_s(lambda: read(False), repeat),
        "pyarrow_full_read_page_crc_s": median_s(lambda: read(True), repeat),
    }


def measure(rows: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-qi-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        run = write_run(work / "out", rows)
        written = time.perf_counter() - started
        size = sum(p.stat().st_size for p in run.glob("part-*.parquet"))
        cli_first, cli_again = cli_seconds(work / "out", work / "cache", repeat)
        result = {
            "rows": rows,
            "parts": len(list(run.glob("part-*.parquet"))),
            "bytes": size,
            "write_s": round(written, 1),
            "cli_count_first_s": cli_first,
            "cli_count_again_s": cli_again,
            **in_process_seconds(work / "out", run, work / "cache", repeat),
            **page_checksum_seconds(work, rows, repeat),
        }
        result["sha256_mb_per_s"] = round(size / 1e6 / max(result["sha256_all_parts_s"], 1e-9), 1)
        print(json.dumps(result), flush=True)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", help="Write the figures here (JSON).")
    args = parser.parse_args()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    results = {"machine": machine, "command": " ".join(["bench/bench_query_integrity.py", *sys.argv[1:]]),
               "results": [measure(n, args.repeat) for n in args.rows]}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
