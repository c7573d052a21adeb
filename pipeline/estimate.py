"""``atman plan JOB.yaml``: what a job will cost before it runs, and afterwards how the run compared.

Counted, from a sample of the input read with the job's own reader (bad rows count as skipped), as the worker
explains it: the shard's rows sorted by prompt length, in batches of ``batch_rows``, each batch's suppression passes
packed into forward passes by the sweep (``pipeline/atman/sweep.py``): one unperturbed pass per prompt, one pass per
unit recomputing only the positions from its first suppressed token on (prefix reuse). A forward pass over B rows
padded to L tokens runs B x L tokens; each row's share is L. Those are a row's forward-pass tokens.
A job of another method (``method.name``) is counted row by row by ``pipeline.methods.row_cost`` (what that method
runs: forward passes, backward passes counted as two forwards, their tokens), the method never run while counting;
where a method decides part of its work as it runs (``atman:coarse``'s passes, ``atman:joint``'s and ContextCite's
tokens) the counts are ceilings and the estimate says so (``counts_exact``).

Timed (the calibration): the model loaded once where an actor loads it (a Ray actor with the job's CPUs and GPUs, or
this process for ``inline``) and a few sample batches explained by the worker's own code, with the sweep (another
method: its scoring of each row) timed apart: seconds per forward-pass token, and per row the rest (planning,
generating missing targets, scoring, the output row). Fixed costs are measured where they are cheap to measure
(interpreter start, the model check, starting Ray, a first Ray task, starting an actor with its model, stopping Ray)
and modelled per row from measured parts where they scale with the input (reading and staging rows, settling ids,
publishing parts). Every figure says which.

The estimate is saved (``save``) in the run's directory (``--run-id``) or in ``ROOT/_estimates/<key>.json``, the key
being the job's config hash, resources and input listing; ``finalize`` adds ``estimate_block`` to the manifest.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.jobspec import InputSpec, JobSpec, JobSpecError, ResourcesSpec
from pipeline.layout import RunPaths, filesystem, parquet_bytes, publish, url
from pipeline.methods import DEFAULT, MethodRefused, RowCost
from pipeline.plan import Block, make_plan
from pipeline.reader import COMPRESSIONS, STAGED_SCHEMA, InputFile, InputListing, iter_requests, list_input
from pipeline.staging import BLOCK_ROWS

log = logging.getLogger(__name__)

ESTIMATE = "_estimate.json"
"""The estimate of a run planned with ``--run-id``, in that run's directory."""
ESTIMATES = "_estimates"
"""``ROOT/_estimates/<key>.json``: estimates of runs planned without a run id."""
SAMPLE_ROWS = 200
"""Rows sampled (spread over the files and over the rows read)."""
READ_ROWS = 100_000
"""Most rows read with the job's reader to draw the sample from (spread over the files)."""
COUNT_BYTES = 512 << 20
"""An input of JSONL/CSV files up to this size is counted exactly (streamed); larger ones are estimated."""
HEAD_BYTES = 1 << 20
"""Bytes read from the head of each JSONL/CSV file (up to ``HEAD_FILES`` files) to estimate rows per byte."""
HEAD_FILES = 16
CALIBRATE_S = 20.0
"""The calibration explains sample batches until this many seconds have passed (and at least ``MIN_BATCHES``)."""
MIN_BATCHES = 3
RAY_START_S = 5.0
"""Modelled start of Ray when it was already running here (so it could not be measured): DESIGN's ~5 s."""
VERSION = 1
_PAYLOAD = frozenset({"prompt", "target", "metadata", "image_bytes", "explain_span"})
"""Columns of a staged row that settling ids does not read (the sample keeps the others of every row read)."""


# --- the input: rows and a sample ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowCount:
    rows: int
    exact: bool
    how: str
    per_file: list[int]


def count_rows(spec: InputSpec, listing: InputListing) -> RowCount:
    """Rows of the input as the reader yields them: Parquet and saved datasets from their metadata, JSONL/CSV by a
    streamed count when the text files total at most ``COUNT_BYTES``, else from their sizes and the rows per byte
    of the first ``HEAD_BYTES`` of up to ``HEAD_FILES`` of them."""
    fs, _ = filesystem(spec.path)
    text = [i for i, f in enumerate(listing.files) if f.kind in ("jsonl", "csv")]
    cheap = sum(listing.files[i].size or 0 for i in text) <= COUNT_BYTES
    per_file = [0] * len(listing.files)
    for i, f in enumerate(listing.files):
        if f.kind == "parquet":
            import pyarrow.parquet as pq

            per_file[i] = pq.ParquetFile(f.path, filesystem=fs).metadata.num_rows
        elif f.kind == "hf":
            per_file[i] = _hf_rows(f)
    if cheap:
        for i in text:
            per_file[i] = _text_rows(fs, listing.files[i], None)[0]
        return RowCount(sum(per_file), True, "exact: streamed count", per_file)
    n = min(HEAD_FILES, len(text))
    heads = sorted({text[round(k * (len(text) - 1) / max(1, n - 1))] for k in range(n)})  # evenly spaced
    counted = {i: _text_rows(fs, listing.files[i], HEAD_BYTES) for i in heads}
    per_byte = sum(c[0] for c in counted.values()) / max(1, sum(c[1] for c in counted.values()))
    for i in text:
        rows, used, whole = counted.get(i, (0, 0, False))
        per_file[i] = rows if whole else round((listing.files[i].size or 0) * per_byte)
    how = f"estimated: file sizes x rows per byte of the first {HEAD_BYTES >> 20} MiB of {len(counted)} file(s)"
    return RowCount(sum(per_file), False, how, per_file)


def _hf_rows(file: InputFile) -> int:
    import datasets

    ds = datasets.load_from_disk(file.path)
    return len(ds[file.split]) if file.split is not None else len(ds)


def _text_rows(fs, file: InputFile, limit: int | None) -> tuple[int, int, bool]:
    """(rows, raw bytes read, whether the whole file was read) of a JSONL or CSV file, counted as the reader yields
    rows: a JSONL row per non-blank line, a CSV row per non-empty record after the header. ``limit``: stop after
    about that many raw (compressed) bytes, counting only complete rows."""
    from fsspec.compression import compr

    codec = next((c for s, c in COMPRESSIONS.items() if file.path.lower().endswith(s)), None)
    if codec is not None and compr.get(codec) is None:
        raise JobSpecError(f"input.path: {file.path}: {codec} is not readable here; install its codec or decompress")
    with fs.open(file.path, "rb") as raw:
        stream = raw if codec is None else compr[codec](raw, mode="rb")
        return (_jsonl_rows if file.kind == "jsonl" else _csv_rows)(stream, raw, limit)


def _jsonl_rows(stream, raw, limit: int | None) -> tuple[int, int, bool]:
    rows, rest, first = 0, b"", True
    while data := stream.read(8 << 20 if limit is None else min(limit, 8 << 20)):
        if first:
            data, first = data.removeprefix(b"\xef\xbb\xbf"), False
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        rows += sum(1 for line in lines if line.strip())
        if limit is not None and raw.tell() >= limit:
            return rows, raw.tell(), False
    return rows + (1 if rest.strip() else 0), max(1, raw.tell()), True


def _csv_rows(stream, raw, limit: int | None) -> tuple[int, int, bool]:
    import csv

    text = io.TextIOWrapper(io.BufferedReader(stream, 1 << 20), encoding="utf-8-sig", newline="", errors="replace")
    records = csv.reader(text)
    rows = -1  # the header
    for n, fields in enumerate(records):
        rows += 1 if fields or n == 0 else 0
        if limit is not None and n % 1000 == 0 and raw.tell() >= limit:
            return max(0, rows), raw.tell(), False
    return max(0, rows), max(1, raw.tell()), True  # (the wrappers close the file when they go)


@dataclass
class Sample:
    requests: list[dict]
    """STAGED_SCHEMA rows in input order."""
    rows_read: int
    read_s: float
    """Seconds the reader took for ``rows_read`` rows (the staging scan's cost per row)."""
    whole: bool
    """The sample is the whole input."""
    files: int
    ids: pa.Table = field(repr=False)
    """Every row read, without its payload (``_PAYLOAD``): what settling the ids reads."""


def read_sample(spec: InputSpec, listing: InputListing, counted: RowCount) -> Sample:
    """``SAMPLE_ROWS`` rows spread over the files (in proportion to their rows, at least one each, at most
    ``SAMPLE_ROWS`` files evenly spaced) and, within a file, drawn uniformly (seeded) from its first rows: the
    files share ``READ_ROWS`` rows read with the job's reader."""
    chosen = list(range(len(listing.files)))
    if len(chosen) > SAMPLE_ROWS:
        chosen = sorted({round(k * (len(chosen) - 1) / (SAMPLE_ROWS - 1)) for k in range(SAMPLE_ROWS)})
    weights = [max(1, counted.per_file[i]) for i in chosen]
    quota = [max(1, round(SAMPLE_ROWS * w / sum(weights))) for w in weights]
    budget = max(1, READ_ROWS // len(chosen))
    rng = random.Random(0)
    requests, ids = [], []
    started = time.perf_counter()
    for i, k in zip(chosen, quota, strict=True):
        kept: list[dict] = []
        for n, request in enumerate(iter_requests(spec, listing.files[i], i)):
            if n >= budget:
                break
            ids.append({k: v for k, v in request.items() if k not in _PAYLOAD})
            if len(kept) < k:
                kept.append(request)
            elif (j := rng.randrange(n + 1)) < k:
                kept[j] = request
        requests += [r | {"prompt_id": r["prompt_id"] or f"row-{r['ordinal']}"} for r in kept]  # as settled later
    read_s = time.perf_counter() - started
    requests.sort(key=lambda r: r["ordinal"])
    whole = counted.exact and len(requests) == counted.rows
    schema = pa.schema([f for f in STAGED_SCHEMA if f.name not in _PAYLOAD])
    return Sample(requests, len(ids), read_s, whole, len(chosen), pa.Table.from_pylist(ids, schema=schema))


def scan_tasks(listing: InputListing, split_bytes: int) -> int:
    """Tasks the staging scan runs: one per file, or per piece of about ``split_bytes`` for a plain file larger than
    that (``pipeline/pieces.py``)."""
    from pipeline.pieces import cuts

    return sum(max(1, math.ceil((f.size or 0) / split_bytes)) if cuts(f, split_bytes) else 1 for f in listing.files)


def shard_sizes(rows: int, res: ResourcesSpec) -> list[int]:
    """Rows per shard, cut by the plan's own rule (``plan.make_plan``)."""
    if rows == 0:
        return []
    plan = make_plan(InputListing([]), [Block("rows", rows, 0, rows - 1)], res.shard_rows, res.actors, res.batch_rows)
    return [plan.shard_rows_of(s) for s in range(len(plan.shards))]


def worker_batches(sample: Sample, res: ResourcesSpec) -> list[list[dict]]:
    """The sample's rows in the batches the worker explains them in: each shard sorted by prompt length (as
    ``explain_shard`` sorts it), cut into ``batch_rows``. A whole-input sample is cut into the job's shards; a partial
    one is one shard."""
    sizes = shard_sizes(len(sample.requests), res) if sample.whole else [len(sample.requests)]
    batches, at = [], 0
    for size in sizes:
        shard = sorted(sample.requests[at : at + size], key=lambda r: len(r["prompt"] or ""))
        at += size
        batches += [shard[i : i + res.batch_rows] for i in range(0, len(shard), res.batch_rows)]
    return batches


# --- what explaining runs, and how long it takes ---------------------------------------------------------------------


class Probe:
    """The job's worker (``ExplainWorker``: the model loaded as an actor loads it), used two ways: ``count`` what
    explaining batches would run, without running the method; ``time`` explaining batches exactly as the worker
    does. A Ray actor in a planned local run, an object in this process otherwise."""

    def __init__(self, spec_json: str, run: dict) -> None:
        from pipeline.worker import ExplainWorker

        started = time.perf_counter()
        self.worker = ExplainWorker(spec_json, run)
        self.load_s = time.perf_counter() - started

    def loaded(self) -> dict:
        return {"load_s": self.load_s, "compute": self.worker.compute}

    def count(self, batches: list[list[dict]]) -> list[list[dict]]:
        """Per request of each batch: status, units, passes (forward-pass equivalents), tokens, its share of forward
        calls and whether those are exact, as the worker plans the batch: atman's sweeps counted as the worker's
        groups would pack them (``sweep_cost``), any other method's rows by ``row_cost`` (a refused row skipped)."""
        from pipeline.atman.sweep import sweep_cost

        worker = self.worker

        def counted(row, cost: RowCost) -> dict:
            keys = {"passes": cost.passes, "tokens": cost.tokens, "calls": cost.calls, "exact": cost.exact}
            return {"status": "ok", "units": len(row.planned.units)} | keys

        def count_group(group, batch_size: int) -> None:  # stands in for the worker's sweep call: what it would run
            cost = sweep_cost([r.planned.sweep_input for r in group], worker.config, batch_size)
            for row, k, p, c in zip(group, *cost, strict=True):
                row.result = counted(row, RowCost(p, 0, k, c))

        def count_row(row) -> None:  # stands in for the worker's scoring of one row by another method
            try:
                row.result = counted(row, worker.method.cost(row.planned))
            except MethodRefused:
                row.result = {"status": "skipped"}

        stand_in = ("_explain", count_group) if worker.method.name == DEFAULT else ("_score", count_row)
        setattr(worker, *stand_in)  # this object's worker only
        try:
            out = [worker.explain_rows(batch) for batch in batches]
        finally:
            delattr(worker, stand_in[0])
        keys = ("units", "passes", "tokens", "calls")
        return [[{"status": r["status"], "exact": r.get("exact", True)} | {k: r.get(k, 0) for k in keys} for r in rows]
                for rows in out]  # fmt: skip

    def time(self, batches: list[list[dict]], budget_s: float) -> list[dict]:
        """Explain batches (in ``spread`` order) as the worker does until ``budget_s`` has passed, at least
        ``MIN_BATCHES``; per batch its rows, seconds, the method's own seconds (``sweep_s``: what ``_timed_part``
        names), its tokens and calls, and the seconds to build and compress its output rows as a part."""
        from pipeline.parts import encode

        worker = self.worker
        owner, name, count = self._timed_part()
        real = getattr(owner, name)
        spent = {"sweep_s": 0.0, "tokens": 0, "calls": 0.0, "count_s": 0.0}

        def timed(*args, **kwargs):
            started = time.perf_counter()
            tokens, calls = count(*args, **kwargs)
            spent["tokens"] += tokens
            spent["calls"] += calls
            spent["count_s"] += time.perf_counter() - started  # the worker does not count: left out below
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent["sweep_s"] += time.perf_counter() - started

        setattr(owner, name, timed)  # this object's only
        out, started = [], time.perf_counter()
        try:
            for n, i in enumerate(spread(len(batches))):
                spent.update(sweep_s=0.0, tokens=0, calls=0.0, count_s=0.0)
                t0 = time.perf_counter()
                rows = worker.explain_rows(batches[i])
                t1 = time.perf_counter()
                encode(rows, worker.spec.output.compression)
                publish_s = time.perf_counter() - t1
                seconds = t1 - t0 - spent.pop("count_s")
                out.append({"rows": len(rows), "seconds": seconds, "publish_s": publish_s, **spent})
                if n + 1 >= MIN_BATCHES and time.perf_counter() - started >= budget_s:
                    break
        finally:
            delattr(owner, name)
        return out

    def _timed_part(self) -> tuple[object, str, object]:
        """(object, attribute, counter) of the method's own work in the worker, timed apart: atman's sweep
        (``explainer.run``; its tokens and calls by ``sweep_cost``), any other method's scoring of one row (the
        worker's ``_score``; its ``row_cost``, nothing for a row it refuses)."""
        from pipeline.atman.sweep import sweep_cost

        worker, config = self.worker, self.worker.config
        if worker.method.name == DEFAULT:

            def sweep(inputs, batch_size: int | None = None) -> tuple[int, float]:
                tokens, _, calls = sweep_cost(inputs, config, batch_size or config.batch_size)
                return sum(tokens), sum(calls)

            return worker.explainer, "run", sweep

        def score(row) -> tuple[int, float]:
            try:
                cost = worker.method.cost(row.planned)
            except MethodRefused:
                return 0, 0.0
            return cost.tokens, cost.calls

        return worker, "_score", score


def spread(n: int) -> list[int]:
    """0..n-1 in an order that covers the range early (first, last, middle, quarters, ...): batches sorted by
    length, timed in this order, sample short and long prompts alike."""
    if n <= 1:
        return list(range(n))
    order, intervals = [0, n - 1], [(0, n - 1)]
    while intervals:
        lo, hi = intervals.pop(0)
        if hi - lo > 1:
            mid = (lo + hi) // 2
            order.append(mid)
            intervals += [(lo, mid), (mid, hi)]
    return order


def fit(timed: list[dict]) -> dict:
    """Rates from timed batches: the sweep's seconds per forward-pass token and per forward call (``sweep_rates``),
    and per row the rest of explaining (planning, generating missing targets, scoring, the output row) and building
    the part. With ``MIN_BATCHES`` or more, the first batch is left out of the rates and its excess over them is the
    actor's one-time warm-up."""
    steady = timed[1:] if len(timed) >= MIN_BATCHES else timed
    rows = sum(b["rows"] for b in steady) or 1
    per_token, per_call = sweep_rates(steady)
    per_row = sum(b["seconds"] - b["sweep_s"] for b in steady) / rows
    first = timed[0]
    predicted = first["tokens"] * per_token + first["calls"] * per_call + first["rows"] * per_row
    return {
        "batches": len(timed),
        "rows": sum(b["rows"] for b in timed),
        "tokens": sum(b["tokens"] for b in timed),
        "seconds": round(sum(b["seconds"] for b in timed), 3),
        "publish_s": round(sum(b["publish_s"] for b in timed), 3),
        "seconds_per_token": per_token,
        "seconds_per_call": per_call,
        "seconds_per_row": per_row,
        "publish_seconds_per_row": sum(b["publish_s"] for b in steady) / rows,
        "warmup_s": max(0.0, first["seconds"] - predicted) if len(timed) >= MIN_BATCHES else 0.0,
    }


def sweep_rates(batches: list[dict]) -> tuple[float, float]:
    """Seconds per forward-pass token and per forward call of the sweep: least squares of its seconds on the two
    (a call costs something whatever its size: launches, masks, Python), when the batches tell them apart and both
    come out non-negative; else all on the tokens (the ratio of the sums)."""
    t = [b["tokens"] for b in batches]
    c = [b["calls"] for b in batches]
    y = [b["sweep_s"] for b in batches]
    tt, cc, tc = (sum(a * b for a, b in zip(u, v, strict=True)) for u, v in ((t, t), (c, c), (t, c)))
    ty, cy = (sum(a * b for a, b in zip(u, y, strict=True)) for u in (t, c))
    det = tt * cc - tc * tc
    if len(batches) >= 2 and det > 0.01 * tt * cc:  # not (nearly) proportional
        per_token, per_call = (ty * cc - cy * tc) / det, (cy * tt - ty * tc) / det
        if per_token >= 0 and per_call >= 0:
            return per_token, per_call
    return sum(y) / max(1, sum(t)), 0.0


# --- measuring this machine ------------------------------------------------------------------------------------------


def startup_seconds() -> float:
    """A fresh interpreter importing what ``atman run`` imports before its work starts (the CLI, transformers)."""
    started = time.perf_counter()
    code = "import pipeline.cli, transformers; transformers.utils.logging.set_verbosity_error()"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
    return time.perf_counter() - started


def staging_costs(sample: Sample, compression: str) -> dict:
    """Seconds per row of staging, measured here: reading and validating (the sample's reading), writing blocks
    (a staged block of ``BLOCK_ROWS`` sample rows, published to a temporary folder), settling ids (DuckDB over the
    rows read)."""
    import duckdb

    from pipeline.reader import resolve_ids

    parquet_bytes(pa.Table.from_pylist(sample.requests[:1], schema=STAGED_SCHEMA), compression)  # imports
    block = (sample.requests * math.ceil(BLOCK_ROWS / max(1, len(sample.requests))))[:BLOCK_ROWS]
    started = time.perf_counter()
    data = parquet_bytes(pa.Table.from_pylist(block, schema=STAGED_SCHEMA), compression)
    with tempfile.TemporaryDirectory(prefix="atman-plan-") as tmp:
        publish(filesystem(tmp)[0], os.path.join(tmp, "block.parquet"), data)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    con = duckdb.connect(":memory:")
    con.register("ids", sample.ids)
    resolve_ids(con, "ids")
    con.close()
    return {
        "read_s_per_row": sample.read_s / max(1, sample.rows_read),
        "write_s_per_row": write_s / max(1, len(block)),
        "resolve_s_per_row": (time.perf_counter() - started) / max(1, sample.rows_read),
    }


def check_model(spec: JobSpec) -> float:
    """The run's model check (it fails fast the same way: ``model.id`` named); returns its seconds."""
    from pipeline.models import check_model as check

    started = time.perf_counter()
    try:
        check(spec.model.id, spec.model.revision, spec.model.trust_remote_code)
    except ValueError as err:
        raise JobSpecError(f"model.id: {str(err).removeprefix('model: ')}") from None
    return time.perf_counter() - started


def _first_task() -> int:
    """A Ray task as the scan's: a fresh worker importing the data plane (this module imports it)."""
    return os.getpid()


def measure_on_ray(spec: JobSpec, run: dict, batches: list[list[dict]], calibrate: bool) -> dict:
    """Start Ray as a local run does, run a first task, start one actor of the job's resources with the model (the
    ``Probe``), count (and time) the sample batches there, stop Ray; each step timed. A Ray already running here
    (a test session, a notebook) is used and left running; its start is then modelled (``RAY_START_S``)."""
    import ray

    res = spec.resources
    started_here, scratch = not ray.is_initialized(), None
    t0 = time.perf_counter()
    if started_here:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        scratch = tempfile.mkdtemp(prefix="atman-plan-")
        ray.init(
            num_cpus=max(os.cpu_count() or 1, int(res.actors * res.cpus_per_actor + 0.999) + 1),
            include_dashboard=False,
            _temp_dir=scratch,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    out = {"ray_s": time.perf_counter() - t0 if started_here else RAY_START_S, "ray_measured": started_here}
    try:
        t0 = time.perf_counter()
        ray.get(ray.remote(_first_task).options(num_cpus=1).remote())
        out["task_s"] = time.perf_counter() - t0
        actor = ray.remote(Probe).options(num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor or None)
        t0 = time.perf_counter()
        probe = actor.remote(spec.model_dump_json(), run)
        out |= ray.get(probe.loaded.remote())
        out["load_s"] = time.perf_counter() - t0  # the actor's process, imports and model, as the run waits for it
        out["counts"] = ray.get(probe.count.remote(batches))
        out["timed"] = ray.get(probe.time.remote(batches, CALIBRATE_S)) if calibrate else []
        ray.kill(probe)
    finally:
        t0 = time.perf_counter()
        if started_here:
            import shutil

            ray.shutdown()
            shutil.rmtree(scratch, ignore_errors=True)
        out["stop_s"] = time.perf_counter() - t0
    return out


def measure_here(spec: JobSpec, run: dict, batches: list[list[dict]], calibrate: bool) -> dict:
    """The ``Probe`` in this process (an ``inline`` run's worker, or counts only)."""
    probe = Probe(spec.model_dump_json(), run)
    out = probe.loaded() | {"counts": probe.count(batches)}
    out["timed"] = probe.time(batches, CALIBRATE_S) if calibrate else []
    return out


def no_calibration(spec: JobSpec) -> str | None:
    """Why this machine cannot time the job's actors (None: it can)."""
    gpus = spec.resources.gpus_per_actor
    if gpus == 0:
        return None
    import torch

    have = torch.cuda.device_count()
    if have == 0:
        return f"resources.gpus_per_actor is {gpus:g} and this machine has no GPU: run `atman plan` where the job runs"
    if gpus > have:
        return f"resources.gpus_per_actor is {gpus:g} and this machine has {have} GPU(s)"
    return None


# --- the estimate ----------------------------------------------------------------------------------------------------

ADDRESSES = ("local", "inline")


def plan_job(spec: JobSpec, *, address: str = "local", calibrate: bool = True) -> dict:
    """The estimate of running ``spec`` on this machine (``address`` local: embedded Ray; inline: this process), as
    a JSON-able dict: ``summary_rows`` says it in lines, ``save`` keeps it for the run's manifest. Raises JobSpecError
    (naming the field) for a job that cannot run, ValueError for a bad address."""
    if address not in ADDRESSES:
        raise ValueError(
            f"address: {address!r}: plan estimates a run on this machine; use local (embedded Ray) or inline"
        )
    listing = list_input(spec.input)
    check_s = check_model(spec)
    counted = count_rows(spec.input, listing)
    sample = read_sample(spec.input, listing, counted)
    batches = worker_batches(sample, spec.resources)
    why = no_calibration(spec) if calibrate else "--no-calibrate: counts only"
    fixed = {"check_s": check_s}
    if why is None:
        fixed |= {"startup_s": startup_seconds(), **staging_costs(sample, spec.output.compression)}
    with tempfile.TemporaryDirectory(prefix="atman-plan-") as tmp:
        run = dataclasses.asdict(RunPaths(tmp, "plan", "plan", "plan"))
        measure = measure_on_ray if address == "local" and why is None else measure_here
        measured = measure(spec, run, batches, why is None)
    counts = [c for batch in measured.pop("counts") for c in batch]
    est = _document(spec, listing, counted, sample, counts, address)
    if why is not None:
        return est | {"calibration": None, "not_calibrated": why}
    return est | _timing(spec, counted, counts, fixed | measured, address, scan_tasks(listing, spec.input.split_bytes))


def job_key(spec: JobSpec, fingerprint: list[dict]) -> str:
    """What an estimate is of: the config hash (model, method), the resources and the input's listing (sizes and
    versions), so a run matches the estimate of the same job on the same input only."""
    key = {"config_hash": spec.config_hash(), "resources": spec.resources.model_dump(), "input": fingerprint}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": 0.0, "p95": 0.0, "max": 0}
    p95 = statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]
    return {"mean": round(statistics.fmean(values), 2), "p95": round(p95, 1), "max": max(values)}


def _document(spec, listing, counted: RowCount, sample: Sample, counts: list[dict], address: str) -> dict:
    ok = [c for c in counts if c["status"] == "ok"]
    keys = ("units", "passes", "tokens")
    per_row = {k: _stats([c[k] for c in ok]) for k in keys}
    scale = counted.rows / max(1, len(counts))  # 1 when the sample is the whole input: the totals are exact
    return {
        "version": VERSION,
        "key": job_key(spec, listing.fingerprint()),
        "job": spec.name,
        "method": spec.method.name,
        "config_hash": spec.config_hash(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "address": address,
        "resources": spec.resources.model_dump(),
        "input": listing.fingerprint(),
        "rows": {"count": counted.rows, "exact": counted.exact, "how": counted.how},
        "shards": len(shard_sizes(counted.rows, spec.resources)),
        "sample": {
            "rows": len(counts),
            "rows_read": sample.rows_read,
            "files": sample.files,
            "whole_input": sample.whole,
            "skipped": sum(c["status"] == "skipped" for c in counts),
            "error": sum(c["status"] == "error" for c in counts),
        },
        "per_row": per_row,
        "totals": {k: round(scale * sum(c[k] for c in ok)) for k in keys},
        "counts_exact": all(c["exact"] for c in ok),
    }


def makespan(sizes: list[int], workers: int) -> int:
    """Rows on the busiest worker when shards (in order) go to whichever worker is free first."""
    load = [0] * max(1, workers)
    for n in sizes:
        load[load.index(min(load))] += n
    return max(load)


def _explaining(fitted: dict, counts: list[dict], rows: int, busiest: int, slow: float) -> tuple[float, float, str]:
    """Seconds of explaining and of publishing parts on the busiest actor, and how they were found: measured when
    the calibration explained the whole input (every batch of the job), else the rates scaled to its rows."""
    share = busiest / max(1, rows)
    if fitted["rows"] == rows:
        return fitted["seconds"] * share * slow, fitted["publish_s"] * share, "measured: every batch of the job timed"
    n = max(1, len(counts))
    tokens, calls = (sum(c[k] for c in counts) / n for k in ("tokens", "calls"))
    per_row = fitted["seconds_per_row"] + tokens * fitted["seconds_per_token"] + calls * fitted["seconds_per_call"]
    how = f"calibrated: {busiest:,} rows on the busiest actor x {per_row * 1e3:,.2f} ms per row"
    return busiest * per_row * slow + fitted["warmup_s"], busiest * fitted["publish_seconds_per_row"], how


def _timing(spec: JobSpec, counted: RowCount, counts: list[dict], m: dict, address: str, tasks: int) -> dict:
    """Seconds of each step of the run: measured here, modelled from measured per-row costs, or calibrated."""
    res, rows = spec.resources, counted.rows
    fitted = fit(m["timed"])
    sizes = shard_sizes(rows, res)
    actors = 1 if address == "inline" else max(1, min(res.actors, len(sizes)))
    threads = actors * max(1, int(res.cpus_per_actor))
    slow = max(1.0, threads / (os.cpu_count() or 1)) if res.gpus_per_actor == 0 else 1.0  # CPU actors share cores
    explain, publish_s, how = _explaining(fitted, counts, rows if counted.exact else -1, makespan(sizes, actors), slow)
    lanes = 1 if address == "inline" else max(1, min(tasks, os.cpu_count() or 1))  # scan tasks side by side
    stage = rows * (m["read_s_per_row"] + m["write_s_per_row"]) / lanes + rows * m["resolve_s_per_row"]
    parts = [("start", m["startup_s"], "measured: a fresh interpreter importing the CLI")]
    parts += [("model check", m["check_s"], "measured")]
    if address == "local":
        ray_how = "measured" if m["ray_measured"] else f"modelled: {RAY_START_S:g} s (Ray was already running here)"
        parts += [("Ray start", m["ray_s"], ray_how), ("first Ray task", m["task_s"], "measured")]
    parts += [
        ("staging", stage, "modelled: rows x reading, writing, id settling per row, measured on the sample"),
        ("actor start + model load" if address == "local" else "model load", m["load_s"], "measured"),
        ("explaining", explain, f"{how} ({actors} actor(s))"),
        ("publishing parts", publish_s, "modelled: rows x per-row cost measured"),
    ]
    if address == "local":
        parts.append(("Ray stop", m["stop_s"], "measured"))
    wall = sum(s for _, s, _ in parts)
    held = actors * (m["load_s"] + explain + publish_s) / 3600
    return {
        "compute": m["compute"],
        "calibration": fitted,
        "staging_s_per_row": {k: m[k] for k in ("read_s_per_row", "write_s_per_row", "resolve_s_per_row")},
        "seconds": [{"step": name, "s": round(s, 3), "how": how} for name, s, how in parts],
        "wall_s": round(wall, 1),
        "until_manifest_s": round(wall - m["startup_s"] - m.get("stop_s", 0.0), 1),
        "actor_hours": round(held, 4),
        "gpu_hours": round(held * res.gpus_per_actor, 4),
    }


# --- saved, and compared with the run ----------------------------------------------------------------------------


def estimate_path(spec: JobSpec, key: str, run_id: str | None) -> tuple[object, str]:
    """Where an estimate is kept: the run's directory (``run_id``), else ``ROOT/_estimates/<key>.json``."""
    if run_id:
        paths = RunPaths.locate(spec.output.root, spec.model.id, run_id)
        return paths.fs, f"{paths.dir}/{ESTIMATE}"
    fs, base = filesystem(spec.output.root)
    return fs, f"{base.rstrip('/')}/{ESTIMATES}/{key}.json"


def save(est: dict, spec: JobSpec, run_id: str | None = None) -> str:
    """Keep the estimate where ``finalize`` looks for it; returns its URL."""
    fs, path = estimate_path(spec, est["key"], run_id)
    publish(fs, path, json.dumps(est, indent=2).encode())
    return url(fs, path)


def estimate_block(spec: JobSpec, paths: RunPaths, plan, progress: dict, started_at, finished_at) -> dict | None:
    """The manifest's ``estimate``: the saved estimate of this run (same job key) beside what the run took, from
    the driver's start (of this attempt) to the manifest. None when no calibrated estimate matches; never raises
    (a damaged estimate file does not fail a finished run)."""
    try:
        key = job_key(spec, plan.input)
        for fs, path in ((paths.fs, f"{paths.dir}/{ESTIMATE}"), estimate_path(spec, key, None)):
            try:
                est = json.loads(fs.cat_file(path))
            except FileNotFoundError:
                continue
            if est.get("key") == key and est.get("until_manifest_s") is not None:
                return _compared(est, url(fs, path), plan, progress, (finished_at - started_at).total_seconds())
    except Exception as err:  # noqa: BLE001 - the comparison is a note on the run, never its failure
        log.warning("estimate: not compared with the run (%s: %s)", type(err).__name__, err)
    return None


def _compared(est: dict, where: str, plan, progress: dict, actual: float) -> dict:
    estimated = est["until_manifest_s"]
    return {
        "file": where,
        "estimated_at": est["created_at"],
        "estimated_s": estimated,
        "actual_s": round(actual, 2),
        "ratio": round(estimated / actual, 3) if actual > 0 else None,
        "estimated_wall_s": est["wall_s"],
        "rows_estimated": est["rows"]["count"],
        "rows": plan.rows,
        "passes_estimated": est["totals"]["passes"],
        "passes": sum(r.get("unit_passes", 0) for r in progress.values()),
    }


def summary_rows(est: dict) -> list[tuple[str, str]]:
    """The estimate as (label, text) lines for the terminal."""
    res, sample, per = est["resources"], est["sample"], est["per_row"]
    where = (
        "the whole input"
        if sample["whole_input"]
        else f"from {sample['rows_read']:,} rows of {sample['files']} file(s)"
    )
    lines = [
        (
            "job",
            f"{est['job']} (method {est['method']}, config {est['config_hash']}), {res['actors']} actor(s) x "
            f"{res['gpus_per_actor']:g} GPU, "
            f"{res['cpus_per_actor']:g} CPU, batch_rows {res['batch_rows']}, address {est['address']}",
        ),
        ("rows", f"{est['rows']['count']:,} ({est['rows']['how']})"),
        ("shards", f"{est['shards']:,}"),
        ("sample", f"{sample['rows']} rows ({where}): {sample['skipped']} skipped, {sample['error']} error"),
    ]
    for key, name in (("units", "units"), ("passes", "forward passes"), ("tokens", "forward-pass tokens")):
        s = per[key]
        lines.append((f"per row: {name}", f"{s['mean']:,.1f} mean, {s['p95']:,.0f} p95, {s['max']:,} max"))
    totals = est["totals"]
    lines.append(("job total", f"{totals['units']:,} units, {totals['passes']:,} passes, {totals['tokens']:,} tokens"))
    if not est["counts_exact"]:
        lines.append(("counts", f"ceilings: {est['method']} decides part of its work as it runs (methods.row_cost)"))
    fitted = est["calibration"]
    if fitted is None:
        return [*lines, ("time", f"not estimated: {est['not_calibrated']}")]
    c, f = est["compute"], fitted
    device = f"{c['device']}{' ' + c['gpu'] if c.get('gpu') else ''} ({c['dtype']}, {c['precision']})"
    rates = [f"{_short(f['seconds_per_token'])} per forward-pass token"]
    rates += [f"{_short(f['seconds_per_call'])} per forward call"] if f["seconds_per_call"] else []
    rates += [f"{_short(f['seconds_per_row'])} per row besides", f"warm-up {f['warmup_s']:.1f} s"]
    timed = f"{f['batches']} batches ({f['rows']} rows) timed"
    lines.append(("calibration", f"{device}: {timed}: {', '.join(rates)}"))
    lines += [(f"  {p['step']}", f"{p['s']:,.1f} s ({p['how']})") for p in est["seconds"]]
    hours = ("GPU-hours", est["gpu_hours"]) if res["gpus_per_actor"] else ("CPU actor-hours", est["actor_hours"])
    lines += [("wall time", f"{est['wall_s']:,.0f} s ({est['wall_s'] / 3600:.2f} h)"), (hours[0], f"{hours[1]:,.3f}")]
    return lines


def _short(seconds: float) -> str:
    """Seconds with three significant digits in a unit that suits them (us, ms, s)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-6:.3g} us"
