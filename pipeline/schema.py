"""The output schema (v1; README "Output schema"): one row per (prompt, target), plain Arrow types only."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
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
    ]
)

# What the reader hands to the actors: one row per input row, problems already named.
INPUT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("target", pa.string()),
        pa.field("explain_span", pa.string()),  # JSON [[start, end], ...] or null
        pa.field("chat", pa.bool_()),
        pa.field("metadata", pa.string()),
        pa.field("source", pa.string()),
        pa.field("input_error", pa.string()),  # set: the row is written as 'skipped' with this reason
    ]
)
