"""The part format: the Parquet files ``part-s<shard>.parquet`` a run writes, one row per prompt (README "Output
schema"). Everything that writes or reads a part goes through here, so the format has one definition: its schema,
the rows the worker writes (``ok_row``, ``skipped_row``, ``error_row``), their bytes (``encode``), the checksum a
part is trusted by (``sha256``: of the bytes as stored, written in the marker and the manifest), and reading a
part back (``read_part``).

Plain Arrow types only. v2 adds the image columns (null on text rows), nothing else: a v1 reader reads v2 parts,
and ``atman query`` reads v1 and v2 parts together (missing columns are null).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import pyarrow as pa

from pipeline.layout import parquet_bytes

SCHEMA_VERSION = 2
STATUSES = ("ok", "skipped", "error")

SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("model_revision", pa.string()),
        pa.field("method_params", pa.string()),  # JSON of the AtMan config
        pa.field("prompt", pa.string()),
        pa.field("target", pa.string()),
        pa.field("granularity", pa.string()),
        pa.field("unit_text", pa.list_(pa.string())),
        pa.field("unit_start", pa.list_(pa.int32())),
        pa.field("unit_length", pa.list_(pa.int32())),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("per_target", pa.list_(pa.list_(pa.float32()))),
        pa.field("target_tokens", pa.list_(pa.string())),
        pa.field("base_target_ce", pa.float32()),
        pa.field("n_prompt_tokens", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("latency_ms", pa.float32()),
        pa.field("written_at", pa.timestamp("us", tz="UTC"), nullable=False),
        # beyond v1's minimum: where the row came from, and the input's pass-through columns
        pa.field("source", pa.string()),
        pa.field("chat", pa.bool_()),
        pa.field("metadata", pa.string()),  # JSON object of the job's metadata_columns
        # v2: the row's image (input.image_column), its size and image units: box [x0, y0, x1, y1] in its pixels
        pa.field("image", pa.string()),  # the path or URI as the input gave it; "<bytes>" for inline bytes
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("image_box", pa.list_(pa.list_(pa.float32()))),
        pa.field("image_view", pa.list_(pa.string())),
        pa.field("image_scores", pa.list_(pa.float32())),
    ]
)
V2_COLUMNS = ("image", "image_width", "image_height", "image_box", "image_view", "image_scores")
"""The columns v2 added: a v1 part lacks them."""


# --- rows: what the worker writes for each request ---------------------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    """What every row of a part repeats: the run, the model as loaded, the method's parameters (JSON, precision
    resolved) and the unit granularity."""

    run_id: str
    model_id: str
    model_revision: str | None
    method_params: str
    granularity: str


def _row(by: Provenance, request: dict, status: str, error: str | None) -> dict:
    """A row of ``status`` for ``request`` (INPUT_SCHEMA), every column of SCHEMA present, nothing explained."""
    row = dict.fromkeys(SCHEMA.names)
    row.update(
        prompt_id=request["prompt_id"],
        run_id=by.run_id,
        model_id=by.model_id,
        model_revision=by.model_revision,
        method_params=by.method_params,
        prompt=request.get("prompt"),
        target=request.get("target"),
        granularity=by.granularity,
        status=status,
        error=error,
        written_at=dt.datetime.now(dt.timezone.utc),
        source=request.get("source"),
        chat=request.get("chat"),
        metadata=request.get("metadata"),
        image=request.get("image_ref") or ("<bytes>" if request.get("image_bytes") is not None else None),
    )
    return row


def skipped_row(by: Provenance, request: dict, reason: str) -> dict:
    """The request cannot be explained (a reader problem, an empty prompt, too long, a bad span or image)."""
    return _row(by, request, "skipped", reason)


def error_row(by: Provenance, request: dict, message: str) -> dict:
    """Explaining failed at run time (``message``: the exception's type and text)."""
    return _row(by, request, "error", message)


def ok_row(by: Provenance, request: dict, explanation, latency_s: float) -> dict:
    """The row of an explained request: its units and scores, and with an image its image units. ``explanation``
    is the engine's ``Explanation`` (read by attribute: this module does not import the engine)."""
    e, row = explanation, _row(by, request, "ok", None)
    row.update(
        target=e.target,
        unit_text=[u[0] for u in e.units],
        unit_start=[u[1] for u in e.units],
        unit_length=[u[2] for u in e.units],
        scores=e.scores.tolist(),
        per_target=None if e.per_target is None else e.per_target.tolist(),
        target_tokens=list(e.target_tokens),
        base_target_ce=e.base_target_ce,
        n_prompt_tokens=e.n_prompt_tokens,
        chat=e.chat,
        latency_ms=1000.0 * latency_s,
    )
    if e.image_units is not None:
        ((width, height),) = e.images
        row.update(
            image_width=width,
            image_height=height,
            image_box=[list(u.box) for u in e.image_units],
            image_view=[u.view for u in e.image_units],
            image_scores=e.image_scores.tolist(),
        )
    return row


# --- bytes and checksum: a part is trusted by the sha256 of its bytes as stored ------------------------------------


def encode(rows: list[dict], compression: str) -> tuple[pa.Table, bytes]:
    """``rows`` (SCHEMA) as a table and as the bytes of its part (``compression``: the job's output.compression)."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return table, parquet_bytes(table, compression)


def sha256(data: bytes) -> str:
    """The checksum of a part's bytes, as its marker and the run's manifest record it."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(fs, path: str) -> str:
    """The checksum of the part at ``path`` as stored (read in chunks; OSError where it cannot be read)."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
