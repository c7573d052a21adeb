"""``atman run``: read the input, explain what is not yet written (Ray actors), publish the run.

Guarantees (tested in tests/test_job*.py):
- every input row ends as exactly one output row (ok / skipped / error), checked before ``_SUCCESS``;
- parts are published whole and named by the ids they hold, so a retried batch replaces its own part;
- rerunning a run id processes only ids not yet written (``retry_errors`` also redoes ``error`` rows);
  rows written twice (a retried error, a batch that raced its retry) are reduced to the newest one;
- ``_manifest.json`` then ``_SUCCESS`` are written last; ``_SUCCESS`` is removed before a run adds rows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atman.attention import UnsupportedModelError
from pipeline.jobspec import JobSpec, JobSpecError
from pipeline.layout import RunPaths, new_run_id, storage_error, valid_run_id
from pipeline.models import check_model
from pipeline.reader import read_input
from pipeline.schema import SCHEMA_VERSION, STATUSES
from pipeline.worker import ExplainWorker, parquet_bytes, part_name, publish

log = logging.getLogger(__name__)

LIBRARIES = ("atman-pipeline", "torch", "transformers", "ray", "pyarrow", "datasets", "s3fs")


class RunIncomplete(RuntimeError):
    """The run stopped before every input id was written (it is not marked _SUCCESS); the message says how to
    resume it."""


@dataclass
class RunSummary:
    run_id: str
    location: str
    counts: dict[str, int]
    rows: int
    processed: int
    """Rows explained by this invocation (the rest were already written by an earlier one)."""
    seconds: float
    unit_passes: int
    files: int
    deduplicated: int = 0
    not_in_input: int = 0
    preview: list[dict] = field(default_factory=list)

    @property
    def prompts_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def passes_per_s(self) -> float:
        return self.unit_passes / self.seconds if self.seconds > 0 else 0.0


def run_job(
    spec: JobSpec,
    run_id: str | None = None,
    *,
    address: str = "local",
    retry_errors: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    on_start: Callable[[RunPaths, int, int], None] | None = None,
) -> RunSummary:
    """Run (or resume) a job. ``address``: ``local`` (embedded Ray), ``auto`` / ``ray://...`` (a cluster), or
    ``inline`` (no Ray: one in-process worker; for debugging and benchmarks). ``on_start(paths, rows, pending)``
    is called once the input is read; ``on_progress(done, pending)`` after each batch."""
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc)
    run_id = valid_run_id(run_id) if run_id else new_run_id()
    try:
        paths = RunPaths.locate(spec.output.root, spec.model.id, run_id)
        written = _written(paths)
    except Exception as err:
        if not storage_error(err):
            raise
        raise JobSpecError(
            f"output.root: {spec.output.root!r}: cannot read it ({type(err).__name__}: {_first_line(err)})"
        ) from None
    fs = paths.fs
    requests = read_input(spec.input)
    if address in ("local", "inline"):  # a cluster may see models this machine does not
        try:
            check_model(spec.model.id, spec.model.revision, spec.model.trust_remote_code)
        except ValueError as err:
            raise JobSpecError(f"model.id: {str(err).removeprefix('model: ')}") from None
    redo = {"error"} if retry_errors else set()
    pending = [
        i
        for i, pid in enumerate(requests.column("prompt_id").to_pylist())
        if pid not in written or written[pid] in redo
    ]
    if pending and fs.exists(paths.success):
        fs.rm(paths.success)  # the run is about to change: it is not complete until finalize says so
    fs.makedirs(paths.dir, exist_ok=True)
    if on_start:
        on_start(paths, requests.num_rows, len(pending))
    processed, passes = 0, 0
    try:
        processed, passes = _explain_pending(spec, paths, requests, pending, address, on_progress)
    except Exception as err:
        reason = _unsupported_model(err)
        if reason is not None:  # the model, not the data: every worker refuses it before writing a row
            raise JobSpecError(f"model.id: {spec.model.id!r} cannot be explained exactly: {reason}") from None
        raise RunIncomplete(
            f"the run stopped ({type(err).__name__}: {_first_line(err)}); rows written so far are kept: "
            f"rerun with --run-id {run_id} to finish it"
        ) from err
    summary = finalize(spec, paths, requests, started_at)
    summary.processed, summary.unit_passes = processed, passes
    summary.seconds = time.perf_counter() - started
    return summary


def _first_line(err: BaseException) -> str:
    """The line that names the cause; for a Ray task error, the user's exception inside it (no colour codes)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).strip().splitlines()]
    cause = [
        line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b", line) and not line.startswith("ray.")
    ]
    return (cause[-1] if cause else lines[0] if lines else "")[:500]


def _unsupported_model(err: BaseException) -> str | None:
    """The reason when ``err`` is (or, through Ray, wraps) the engine's refusal of the model; else None."""
    name = UnsupportedModelError.__name__
    if isinstance(err, UnsupportedModelError):
        message = str(err)
    else:
        cause = _first_line(err)
        if not re.match(rf"(?:[\w.]+\.)?{name}: ", cause):
            return None
        message = cause.split(": ", 1)[1]
    return message.removeprefix("model: ")


def _explain_pending(spec, paths, requests, pending, address, on_progress) -> tuple[int, int]:
    processed, passes = 0, 0
    if pending:
        todo = requests.take(pending)
        # similar lengths in one batch pad little; each block is one actor call (= one part)
        lengths = pc.utf8_length(pc.fill_null(todo.column("prompt"), ""))
        todo = todo.take(pc.sort_indices(lengths))
        rows = spec.resources.batch_rows
        blocks = [todo.slice(i, rows) for i in range(0, todo.num_rows, rows)]
        for result in _execute(spec, paths, blocks, address):
            processed += result.num_rows
            statuses = result.column("status").to_pylist()
            passes += sum(
                n + 1 for n, s in zip(result.column("n_units").to_pylist(), statuses, strict=True) if s == "ok"
            )
            if on_progress:
                on_progress(processed, todo.num_rows)
    return processed, passes


def _written(paths: RunPaths) -> dict[str, str]:
    """prompt_id -> status of every row already published in this run (newest wins)."""
    index = _index(paths)
    return dict(zip(index["prompt_id"], index["status"], strict=True)) if index else {}


def _index(paths: RunPaths) -> dict[str, list] | None:
    tables = []
    for part in paths.parts():
        t = pq.read_table(part, columns=["prompt_id", "status", "written_at"], filesystem=paths.fs)
        tables.append(t.append_column("part", pa.array([part] * t.num_rows, pa.string())))
    if not tables:
        return None
    index = pa.concat_tables(tables).sort_by([("written_at", "ascending"), ("part", "ascending")])
    return index.to_pydict()


# --- execution ---------------------------------------------------------------------------------------------------


def _execute(spec: JobSpec, paths: RunPaths, blocks: list[pa.Table], address: str):
    run = dataclasses.asdict(paths)
    if address == "inline":
        worker = ExplainWorker(spec.model_dump_json(), run)
        for block in blocks:
            yield worker(block)
        return
    yield from _execute_ray(spec, run, blocks, address)


def _execute_ray(spec: JobSpec, run: dict, blocks: list[pa.Table], address: str):
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    res = spec.resources
    scratch = None
    started_here = not ray.is_initialized()
    if started_here:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if address == "local":
            scratch = _scratch_dir(spec, run["run_id"])
            ray.init(
                num_cpus=max(os.cpu_count() or 1, int(res.actors * res.cpus_per_actor + 0.999) + 1),
                include_dashboard=False,
                _temp_dir=scratch,
                logging_level=logging.WARNING,
                configure_logging=True,
            )
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    try:
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # our own progress bar and summary replace its
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # The restart/retry cap has no named parameter in Ray 2.60 (only the deprecated **ray_remote_args;
        # Ray Data's default is to restart forever): keep the cap and silence the notice.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ray.data.from_arrow(blocks).map_batches(
            ExplainWorker,
            fn_constructor_kwargs={"spec_json": spec.model_dump_json(), "run": run},
            compute=ActorPoolStrategy(size=res.actors),
            num_gpus=res.gpus_per_actor or None,
            num_cpus=res.cpus_per_actor,
            batch_size=res.batch_rows,
            batch_format="pyarrow",
            zero_copy_batch=True,
            max_restarts=res.max_restarts,
            max_task_retries=res.max_restarts,
        )
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    finally:
        if started_here:
            ray.shutdown()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _scratch_dir(spec: JobSpec, run_id: str) -> str:
    """Ray's session directory for a local run, removed afterwards: ``ROOT/_scratch/<run_id>`` for a local root
    whose path is short enough for Ray's Unix sockets (~107 bytes in all), else ``$TMPDIR/atman-ray-<hash>``.
    It is the same for every attempt of a run, so a rerun after a killed driver finds (and stops) the Ray
    helper processes that the killed driver left running."""
    root = spec.output.root
    path = None
    if "://" not in root or root.startswith("file://"):
        path = os.path.abspath(os.path.join(root.removeprefix("file://"), "_scratch", run_id))
    if path is None or len(path) > 40:
        key = hashlib.sha256(f"{root}\n{spec.model.id}\n{run_id}".encode()).hexdigest()[:12]
        path = os.path.join(tempfile.gettempdir(), f"atman-ray-{key}")
    _stop_orphans(path)
    os.makedirs(path, exist_ok=True)
    return path


def _stop_orphans(scratch: str) -> None:
    """Kill Ray processes orphaned by an earlier driver of this run (SIGKILLed drivers leave Ray's dashboard and
    runtime-env agents running): orphans (parent pid 1) named ``ray::...`` with files open in ``scratch``."""
    import psutil

    for proc in psutil.process_iter(["ppid", "cmdline"]):
        try:
            if proc.info["ppid"] != 1 or not (proc.info["cmdline"] or [""])[0].startswith("ray::"):
                continue
            if any(f.path.startswith(scratch + os.sep) for f in proc.open_files()):
                log.warning(
                    "stopping %s (pid %d) left by an earlier driver of this run", proc.info["cmdline"][0], proc.pid
                )
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


# --- publishing ----------------------------------------------------------------------------------------------------


def finalize(spec: JobSpec, paths: RunPaths, requests: pa.Table, started_at: dt.datetime) -> RunSummary:
    """Reduce duplicates to the newest row, check every input id is written once, write manifest then _SUCCESS."""
    fs = paths.fs
    deduplicated = _deduplicate(paths)
    index = _index(paths) or {"prompt_id": [], "status": [], "part": []}
    written = dict(zip(index["prompt_id"], index["status"], strict=True))
    wanted = requests.column("prompt_id").to_pylist()
    missing = [pid for pid in wanted if pid not in written]
    if missing:
        raise RunIncomplete(
            f"{len(missing)} of {len(wanted)} input rows have no output row (e.g. {missing[:3]}); "
            f"rerun with --run-id {paths.run_id} to finish it"
        )
    extra = len(set(written) - set(wanted))
    counts = Counter(written.values())
    counts = {s: counts.get(s, 0) for s in STATUSES}
    files = []
    for part in paths.parts():
        info = fs.info(part)
        files.append({"name": part.rsplit("/", 1)[-1], "bytes": info.get("size")})
    finished_at = dt.datetime.now(dt.timezone.utc)
    previous = json.loads(fs.cat_file(paths.manifest)) if fs.exists(paths.manifest) else {}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "job": spec.name,
        "run_id": paths.run_id,
        "run_date": paths.run_date,
        "model": {"id": spec.model.id, "revision": spec.model.revision, "slug": paths.model},
        "config": spec.model_dump(mode="json"),
        "config_hash": spec.config_hash(),
        "method_params": spec.method.atman_config().model_dump(mode="json"),
        "rows": len(written),
        "counts": counts,
        "not_in_input": extra,
        "files": files,
        "started_at": previous.get("started_at", started_at.isoformat()),  # the run's first attempt
        "attempts": previous.get("attempts", 0) + 1,
        "finished_at": finished_at.isoformat(),
        "libraries": {"python": platform.python_version(), **_versions()},
    }
    publish(fs, paths.manifest, json.dumps(manifest, indent=2).encode())
    publish(fs, paths.success, b"")
    return RunSummary(
        run_id=paths.run_id,
        location=paths.url,
        counts=counts,
        rows=len(written),
        processed=0,
        seconds=0.0,
        unit_passes=0,
        files=len(files),
        deduplicated=deduplicated,
        not_in_input=extra,
    )


def _deduplicate(paths: RunPaths) -> int:
    """Keep the newest row of each prompt_id; parts holding older copies are rewritten without them."""
    index = _index(paths)
    if not index:
        return 0
    newest = {}
    for i, pid in enumerate(index["prompt_id"]):  # sorted oldest first: the last one wins
        newest[pid] = i
    stale = Counter(index["part"][i] for i in range(len(index["prompt_id"])) if newest[index["prompt_id"][i]] != i)
    fs = paths.fs
    for part in stale:
        keep = {
            index["prompt_id"][i]
            for i, p in enumerate(index["part"])
            if p == part and newest[index["prompt_id"][i]] == i
        }
        table = pq.read_table(part, filesystem=fs)
        table = table.filter(pc.is_in(table.column("prompt_id"), pa.array(sorted(keep), pa.string())))
        if table.num_rows:
            name = paths.part(part_name(table.column("prompt_id").to_pylist()))
            publish(fs, name, parquet_bytes(table, _compression(part, fs)))  # a new name: it holds fewer ids
            if name == part:  # the same ids after all: the part was just rewritten, never delete it
                continue
        fs.rm(part)
    return sum(stale.values())


def _compression(part: str, fs) -> str:
    meta = pq.ParquetFile(part, filesystem=fs).metadata
    codec = meta.row_group(0).column(0).compression.lower() if meta.num_row_groups else "zstd"
    return "none" if codec == "uncompressed" else codec


def _versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
