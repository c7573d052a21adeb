"""The part format: the Parquet files ``part-s<shard>.parquet`` a run writes, one row per prompt (README "Output
schema"). Everything that writes or reads a part goes through here, so the format has one definition: its schema,
the rows the worker writes (``ok_row``, ``skipped_row``, ``error_row``), their bytes (``encode``), the checksum a
part is trusted by (``sha256``: of the bytes as stored, written in the marker and the manifest), and reading a
part back (``read_part``).

Plain Arrow types only. v2 adds the image columns (null on text rows), nothing else: a v1 reader reads v2 parts,
and ``atman query`` reads v1 and v2 parts together (missing columns are null).
"""

from __future__ import annotations

import pyarrow as pa

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
