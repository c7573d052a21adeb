"""The job spec (YAML): validated before anything starts; unknown keys and wrong types name the field.

Shape (every field, with its documentation: `atman run --help` and jobs/examples/demo.yaml):

    name: demo
    model: {id: smollm2-135m-instruct, revision: null, dtype: auto}
    input: {path: jobs/examples/prompts.jsonl, format: auto, id_column: id, prompt_column: prompt, ...}
    method: {name: atman, mode: log_additive, factor: 0.1, conceptual_threshold: null, granularity: word, ...}
    output: {root: out/, compression: zstd}
    resources: {actors: 1, gpus_per_actor: 0, batch_rows: 8}
    schedule: {cron: "0 2 * * *"}
    audit: {min_spearman: 0.8, min_top5_overlap: 0.6}
"""

from __future__ import annotations

import hashlib
import json
import re
from copy import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from pipeline.atman.config import AtManConfig
from pipeline.errors import BadInput
from pipeline.eval_methods import check_method, unused_message, unused_settings
from pipeline.messages import describe
from pipeline.models import DEFAULT_MODEL, DType


class JobSpecError(BadInput):
    """A job spec that cannot run; the message names the field (or file) and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ModelSpec(_Strict):
    id: str = DEFAULT_MODEL
    """Embedded alias, Hugging Face id or local directory (safetensors)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); recorded in every output row."""
    dtype: DType = "auto"
    """How the weights are stored: auto = bfloat16 on GPU, float32 on CPU. How the sweep computes on them is
    `method.precision` (auto keeps the scores float32-grade on bf16 weights; docs/PRECISION.md)."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (off unless you trust it)."""


class InputSpec(_Strict):
    path: str
    """A file, a directory, a glob, or a `datasets.save_to_disk` directory; local or s3://."""
    format: Literal["auto", "jsonl", "csv", "parquet", "hf"] = "auto"
    """auto: from the file extension (a directory with dataset_info.json is a saved Hugging Face dataset)."""
    id_column: str | None = "id"
    """Column with the prompt id; when the input lacks it, the id is a stable hash of prompt + target."""
    prompt_column: str = "prompt"
    target_column: str | None = "target"
    """Column with the target text; rows without one get a generated target."""
    explain_span_column: str | None = None
    """Optional column of [start, end] (or a list of them): the characters of the prompt to explain."""
    chat_column: str | None = None
    """Optional boolean column: wrap this row in the chat template (true), raw text (false), auto (null)."""
    metadata_columns: list[str] = Field(default_factory=list)
    """Input columns passed through, as JSON, into the output's `metadata` column."""
    image_column: str | None = None
    """Optional column with one image per row, shown before the prompt (vision-language models): a path (absolute,
    or relative to the input file's folder), an s3:// URI, or the image's bytes (a Parquet binary column). A null
    value makes a text-only row."""
    split_bytes: int = Field(64 << 20, ge=1 << 10)
    """Bytes of one input file that one task reads (at least 1024): a larger plain JSONL or CSV file is read in
    pieces of about this size, cut at line starts, a larger Parquet file in pieces of whole row groups, each by
    a task of its own. Rows, ids and messages are those of a whole-file read. Compressed files and saved datasets
    are read whole, as is a CSV whose quoted fields hold line breaks where a piece would start."""


METHOD_FIELDS = (
    "mode", "factor", "conceptual_threshold", "conceptual_candidates", "granularity", "delimiter", "image_grid",
    "aggregate", "postprocess", "normalize", "keep_per_target", "generate_max_tokens", "precision", "attention_kernel",
)  # fmt: skip
"""The AtManConfig fields a job spec's `method:` sets. The others tune the engine (batching, padding, prefix reuse)
or only matter in Python (`target_units`: jobs store the prompt's units)."""


class _Method(_Strict):
    name: str = "atman"
    """The method: atman (the default: one suppression pass per unit, batched), atman:<variant> (AtMan's estimators
    with fewer passes, pipeline.atman.variants), a peer (attnlrp, occlusion, contextcite) or a baseline (ixg, ig,
    rollout). Every method scores the same units (granularity, delimiter, explain span) into the same columns; a peer
    or a baseline uses no other field below, which must then keep its default."""

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_method(v)

    @model_validator(mode="after")
    def _used(self):
        """A field the method does not use, set to other than its default, would be silently ignored: refused."""
        unused = unused_settings(self.name, self.model_dump(exclude={"name"}))
        if unused:
            raise ValueError(unused_message(self.name, unused, [f"method.{k}" for k in unused]))
        return self

    def atman_config(self, **engine: Any) -> AtManConfig:
        """The AtMan config of the method's fields: the whole method for the AtMan family, the units for the others."""
        return AtManConfig(**self.model_dump(exclude={"name"}), **engine)


MethodSpec = create_model(
    "MethodSpec",
    __base__=_Method,
    __doc__="The job's AtMan method: AtManConfig's own fields, types, defaults and docs (one source of truth).",
    **{
        name: (AtManConfig.model_fields[name].annotation, copy(AtManConfig.model_fields[name]))
        for name in METHOD_FIELDS
    },
)


class OutputSpec(_Strict):
    root: str = "out/"
    """Where runs are written: ROOT/model=<slug>/run_date=YYYY-MM-DD/run_id=<id>/; local or s3://."""
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"


class ResourcesSpec(_Strict):
    actors: int = Field(1, ge=1)
    """Model replicas (Ray actors), each pinned to its own GPU when gpus_per_actor > 0."""
    gpus_per_actor: float = Field(0, ge=0)
    """GPUs per actor. At most 1: the model on one GPU (a fraction lets actors share it: 0.5, two per GPU). Above 1,
    a whole number: the model is spread over the actor's GPUs (device_map auto), for models larger than one GPU."""
    batch_rows: int = Field(8, ge=1)
    """Prompts explained together; their suppression passes share forward batches."""
    shard_rows: int = Field(10_000, ge=1)
    """Most input rows per shard: the unit of an actor call, of an output part and of resume (a shard an actor
    loses is explained again whole). Small inputs get smaller shards, about four per actor."""
    cpus_per_actor: float = Field(1, gt=0)
    max_restarts: int = Field(3, ge=0)
    """How often Ray restarts a lost actor (its process killed, its node lost), where there is room for it. Its
    shards go to a live actor meanwhile; a shard lost with its actor more often than this stops the run."""

    @field_validator("gpus_per_actor")
    @classmethod
    def _whole_gpus(cls, v: float) -> float:
        """Above 1 the model is split over the actor's GPUs (``device_map``), which come whole."""
        if v > 1 and v != int(v):
            raise ValueError(
                f"{v:g} GPUs: above 1 an actor's model is spread over whole GPUs; use a whole number "
                f"({int(v)} or {int(v) + 1}), or at most 1 to share a GPU between actors"
            )
        return v


class ScheduleSpec(_Strict):
    cron: str
    """Five-field cron expression for nightly audits."""
    time_zone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"cron: {v!r} is not a five-field cron expression like '0 2 * * *'")
        return v


class AuditSpec(_Strict):
    """Drift thresholds of `atman audit`: a prompt drifts when it falls below / rises above any of them."""

    min_spearman: float = Field(0.8, ge=-1.0, le=1.0)
    """Least Spearman rank correlation of a prompt's unit scores between the previous run and this one."""
    min_top5_overlap: float = Field(0.6, ge=0.0, le=1.0)
    """Least share of the previous run's top-5 units that are still in the top 5."""
    max_abs_delta_ce: float | None = Field(None, ge=0.0)
    """Largest change of the target's base cross-entropy (nats); null = not checked."""


class JobSpec(_Strict):
    name: str
    """Job name: letters, digits, '-', '_' (it names submissions and audits)."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    input: InputSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    schedule: ScheduleSpec | None = None
    audit: AuditSpec = Field(default_factory=AuditSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}", v):
            raise ValueError(f"{v!r} must be 1-63 letters, digits, '-' or '_'")
        return v

    def config_hash(self) -> str:
        """Hash of what determines the results (model, method), for lineage and audits."""
        unset = {"image_grid"} if self.method.image_grid is None else set()  # text jobs keep their earlier hash
        if self.method.name == "atman":  # as do AtMan jobs: the hash of a spec from before method.name is unchanged
            unset.add("name")
        method = self.method.model_dump(exclude=unset)
        key = json.dumps({"model": self.model.model_dump(), "method": method}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def _apply_override(data: dict, assignment: str) -> None:
    """``--set method.factor=0.3``: a dotted key and a YAML value."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise JobSpecError(f"--set: {assignment!r} is not key=value (e.g. method.factor=0.3)")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise JobSpecError(f"--set: {key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw else None


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read and validate a job spec; raises JobSpecError naming the file or field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobSpecError(f"{path}: no such job spec file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise JobSpecError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise JobSpecError(f"{path}: a job spec is a YAML mapping with at least `name` and `input`")
    for assignment in overrides:
        _apply_override(data, assignment)
    try:
        spec = JobSpec.model_validate(data)
        spec.method.atman_config()  # cross-field checks (delimiter vs granularity)
    except ValidationError as err:
        raise JobSpecError(f"{path}: {describe(err, 'check the spelling; see jobs/examples/demo.yaml')}") from None
    return spec
