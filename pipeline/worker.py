"""The unit of work of a job: explain one shard of request rows and publish it as one Parquet part.

``ExplainWorker`` is what each Ray actor holds (the model is loaded once per actor); it has no Ray code, so
it runs in-process too (``inline``, benchmarks, tests). ``explain_shard`` reads the shard's staged rows, explains
them in batches of ``batch_rows`` (shortest prompts first: little padding), publishes the part whole and then the
shard's marker. Only the model's work holds the actor's lock: with two shards in flight, one shard's reading and
publishing overlap the other's explaining. Row outcomes:
- ``skipped``: the input cannot be explained (reader problem, empty prompt, longer than the context, bad span);
- ``error``: explaining failed at run time (message = exception type and text);
- ``ok``.
On CUDA out-of-memory a group of prompts is halved and retried; a single prompt that still does not fit
is retried with half the engine's forward batch, down to one row, before it is marked ``error``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

from pipeline.errors import UnsupportedModel
from pipeline.jobspec import JobSpec
from pipeline.layout import RunPaths, filesystem, part_name, publish
from pipeline.methods import DEFAULT, MethodRefused, MethodRunner
from pipeline.parts import Provenance, encode, error_row, ok_row, read_part, recorded_part, skipped_row
from pipeline.progress import marker, write_marker
from pipeline.staging import read_shard

log = logging.getLogger(__name__)
MAX_IMAGE_BYTES = 64 << 20  # an image file larger than this is refused before it is read


@dataclass
class _Row:
    request: dict
    planned: object | None = None
    plan_s: float = 0.0
    result: dict | None = None


def compute_record(explainer) -> dict:
    """How this actor computes, for the run manifest: device (and the GPU's name), weights' dtype, the precision
    policy ``auto`` resolved to, the attention kernel."""
    import torch

    device = explainer.device
    record = {"device": str(device), "dtype": str(explainer.dtype).removeprefix("torch.")}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record | {"precision": explainer.precision, "attention_kernel": explainer.config.attention_kernel}


class ExplainWorker:
    """Loads the job's model once; ``explain_shard`` explains one shard's rows (``explain_rows``) and publishes them
    as one part, then its marker."""

    def __init__(self, spec_json: str, run: dict) -> None:
        import torch
        import transformers

        from pipeline.models import load_model

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.spec = JobSpec.model_validate_json(spec_json)
        self.run = RunPaths(**run)
        self.fs = filesystem(self.run.root)[0]
        gpus = self.spec.resources.gpus_per_actor
        if gpus == 0:  # one torch thread per CPU Ray gave this actor
            torch.set_num_threads(max(1, int(self.spec.resources.cpus_per_actor)))
        m = self.spec.model
        # no GPU asked for: the CPU, even on a GPU node (Ray leaves such an actor every GPU visible, unscheduled);
        # more than one: the model is spread over those Ray gave this actor (the only ones it sees)
        device_map = "auto" if gpus > 1 else None
        self.lm = load_model(
            m.id, dtype=m.dtype, revision=m.revision, trust_remote_code=m.trust_remote_code, device_map=device_map,
            device="cpu" if gpus == 0 else "auto",
        )  # fmt: skip
        self.config = self.spec.method.atman_config()
        # the method (method.name): refused here, once per actor, when it cannot explain this model
        self.method = _refusing(MethodRunner, self.lm, self.spec.method.name, self.config)
        self.explainer = self.method.explainer
        self.method_params = json.dumps(self.method.params(), sort_keys=True)  # precision resolved
        self.provenance = Provenance(
            self.run.run_id, m.id, self.lm.revision, self.method_params, self.config.granularity
        )  # what every row of its parts repeats
        self.compute = compute_record(self.explainer)
        self._lock = threading.Lock()
        self._done: dict[int, int] = {}
        self.passes_run = 0
        """Forward-pass equivalents of every row this actor explained ok (``methods.row_cost``): the markers'
        ``unit_passes``."""

    def explain_shard(self, shard: int, segments: list[dict], retry_errors: bool = False) -> dict:
        """Explain a shard (its ``Plan.segments``) and publish it: part first, then its marker, which is returned."""
        started = time.perf_counter()
        requests = read_shard(self.run, segments).drop_columns(["ordinal"]).to_pylist()
        requests.sort(key=lambda r: len(r["prompt"] or ""))  # stable: input order among equal lengths
        kept: dict[str, dict] = {}
        if retry_errors:  # keep what an earlier attempt finished; explain its errors (and anything it lacks) again
            kept = {r["prompt_id"]: r for r in self._published(shard) if r["status"] != "error"}
        todo = [r for r in requests if r["prompt_id"] not in kept]
        explained: dict[str, dict] = {}
        self._done[shard] = 0
        with self._lock:  # the model: one shard at a time (so the passes run meanwhile are this shard's)
            before = self.passes_run
            rows = self.spec.resources.batch_rows
            for i in range(0, len(todo), rows):
                for row in self.explain_rows(todo[i : i + rows]):
                    explained[row["prompt_id"]] = row
                self._done[shard] = len(explained)
            passes = self.passes_run - before
        out = [kept.get(r["prompt_id"]) or explained[r["prompt_id"]] for r in requests]
        table, data = encode(out, self.spec.output.compression)
        publish(self.fs, self.run.part(part_name(shard)), data)
        record = marker(
            shard,
            table,
            data,
            explained=len(todo),
            unit_passes=passes,
            seconds=time.perf_counter() - started,
            compute=self.compute,
        )
        write_marker(self.run, record)
        self._done.pop(shard, None)
        return record

    def progress(self) -> dict[int, int]:
        """Rows explained so far of each shard this actor is working on (for the driver's progress line)."""
        return dict(self._done)

    def _published(self, shard: int) -> list[dict]:
        """The rows of the shard's part as published, where its bytes are those its progress record names; nothing
        of a part without a record or with other bytes is kept (``parts.recorded_part``)."""
        record = recorded_part(self.fs, self.run.dir, shard)
        if record is None:
            return []
        try:
            return read_part(self.fs, self.run.part(part_name(shard)), expected=record["sha256"]).to_pylist()
        except (ValueError, OSError):  # damaged (pyarrow.ArrowInvalid, PartChanged) or gone: nothing of it is kept
            return []

    # --- explaining ------------------------------------------------------------------------------------------

    def explain_rows(self, requests: list[dict]) -> list[dict]:
        """One output row (``pipeline.parts``: ok, skipped or error) per request, in request order."""
        rows = [_Row(r) for r in requests]
        todo = []
        # shortest first: similar lengths share forward batches with little padding
        for row in sorted(rows, key=lambda r: len(r.request.get("prompt") or "")):
            started = time.perf_counter()
            req = row.request
            if req.get("input_error"):
                row.result = skipped_row(self.provenance, req, req["input_error"])
                continue
            try:
                row.planned = self.method.plan(self._request(req))
            except ValueError as err:  # the request itself is unexplainable: named by the engine (or the method)
                row.result = skipped_row(self.provenance, req, _name_image(req, str(err)))
                continue
            except Exception as err:  # noqa: BLE001 - a row never takes the batch down
                row.result = error_row(self.provenance, req, _message(err))
                continue
            row.plan_s = time.perf_counter() - started
            todo.append(row)
        if self.method.name != DEFAULT:  # another method: one request at a time (pipeline/methods.py)
            for row in todo:
                self._score(row)
            return [r.result for r in rows]
        # rows given as embeddings (with an image) and as token ids do not share a forward batch
        self._explain([r for r in todo if r.planned.sweep_input.embeds is None], self.config.batch_size)
        self._explain([r for r in todo if r.planned.sweep_input.embeds is not None], self.config.batch_size)
        return [r.result for r in rows]

    def _score(self, row: _Row) -> None:
        """One planned row under a method other than atman: ok; skipped where the method refuses the request as
        configured (``MethodRefused``, e.g. ContextCite with fewer ablations than units); error where it fails."""
        import torch

        started = time.perf_counter()
        try:
            explanation = self.method.explain(row.planned)
        except MethodRefused as err:
            row.result = skipped_row(self.provenance, row.request, str(err))
            return
        except Exception as err:  # noqa: BLE001 - a row never takes the batch down
            if isinstance(err, torch.OutOfMemoryError):
                _free_cuda()
            row.result = error_row(self.provenance, row.request, _message(err))
            return
        latency = row.plan_s + time.perf_counter() - started
        self._ok(row, explanation, latency)

    def _request(self, req: dict):
        """What the row asks to explain: its prompt, target, explain span, chat choice and image (whose units
        follow the config's image_grid)."""
        from pipeline.atman.request import ExplainRequest

        spans = json.loads(req["explain_span"]) if req.get("explain_span") else None
        image = self._image(req)
        return ExplainRequest(
            req["prompt"],
            req.get("target"),
            explain_span=None if spans is None else [tuple(s) for s in spans],
            chat=req.get("chat"),
            images=None if image is None else [image],
        )

    def _image(self, req: dict):
        """The row's image (PIL), or None for a text row. A missing, unreadable, oversized or non-image file is a
        ValueError naming ``image`` and the path, so the row is skipped with that reason."""
        from pipeline.atman.multimodal import load_images
        from pipeline.layout import read_ref

        ref, data = req.get("image_ref"), req.get("image_bytes")
        if ref is None and data is None:
            return None
        if data is None:
            data = read_ref(ref, MAX_IMAGE_BYTES)
        elif len(data) > MAX_IMAGE_BYTES:
            raise ValueError(f"image: the inline image is {len(data):,} bytes, over {MAX_IMAGE_BYTES:,}")
        try:
            return load_images([data])[0]
        except ValueError as err:
            raise ValueError(_name_image(req, str(err))) from None

    def _explain(self, group: list[_Row], batch_size: int) -> None:
        import torch

        from pipeline.atman.attention import UnsupportedModelError

        if not group:
            return
        t0 = time.perf_counter()
        try:
            outputs = self.explainer.run([r.planned.sweep_input for r in group], batch_size=batch_size)
        except torch.OutOfMemoryError as err:
            _free_cuda()
            if len(group) > 1:
                half = len(group) // 2
                log.warning("CUDA out of memory with %d prompts; retrying in halves", len(group))
                self._explain(group[:half], batch_size)
                self._explain(group[half:], batch_size)
            elif batch_size > 1:
                log.warning("CUDA out of memory on one prompt; retrying with forward batch %d", batch_size // 2)
                self._explain(group, batch_size // 2)
            else:
                group[0].result = error_row(self.provenance, group[0].request, _message(err))
            return
        except UnsupportedModelError as err:  # the model, not the row: the run stops before writing anything
            raise UnsupportedModel(str(err)) from None  # light and typed: the driver tells it from others by type
        except Exception as err:  # noqa: BLE001
            if len(group) > 1:  # find the row that fails; the others still get explained
                for row in group:
                    self._explain([row], batch_size)
            else:
                group[0].result = error_row(self.provenance, group[0].request, _message(err))
            return
        elapsed = time.perf_counter() - t0
        total_units = sum(len(r.planned.units) for r in group) or 1
        for row, out in zip(group, outputs, strict=True):
            explanation = self.explainer.explanation(row.planned, out)
            share = elapsed * len(row.planned.units) / total_units
            self._ok(row, explanation, row.plan_s + share)

    def _ok(self, row: _Row, explanation, latency_s: float) -> None:
        """The row explained: its ok output row, and what explaining it ran counted in ``passes_run``."""
        row.result = ok_row(self.provenance, row.request, explanation, latency_s=latency_s)
        self.passes_run += self.method.cost(row.planned).passes


def _name_image(req: dict, message: str) -> str:
    """The engine names a row's image ``images[0]``; the row's message names it as the job does (its path, or the
    inline image)."""
    if not message.startswith("images[0]: "):
        return message
    return f"image: {req.get('image_ref') or 'the inline image'}: {message.removeprefix('images[0]: ')}"


def _refusing(make, *args):
    """``make(*args)``, the engine's refusal of the model raised as ``UnsupportedModel``: an error the driver can
    unpickle without torch, so it reaches ``run_job`` as itself (exit 2 naming model.id). A method's own refusal
    (``MethodUnsupported``) passes as it is (exit 2 naming method.name)."""
    from pipeline.atman.attention import UnsupportedModelError

    try:
        return make(*args)
    except UnsupportedModelError as err:
        raise UnsupportedModel(str(err)) from None


def _message(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:2000] if text else type(err).__name__


def _free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
