"""The job spec (YAML): validated before anything starts; unknown keys and wrong types name the field.

Shape (../shared/DESIGN.md):

    name: demo
    model: {id: smollm2-135m-instruct, revision: null, dtype: auto}
    input: {path: jobs/examples/prompts.jsonl, format: auto, id_column: id, prompt_column: prompt, ...}
    method: {mode: log_additive, factor: 0.1, conceptual_threshold: null, granularity: word, ...}
    output: {root: out/, compression: zstd}
    resources: {actors: 1, gpus_per_actor: 0, batch_rows: 8}
    schedule: {cron: "0 2 * * *"}
    audit: {min_spearman: 0.8, min_top5_overlap: 0.6}
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.atman.config import Aggregate, AtManConfig, ConceptualCandidates, Mode
from pipeline.models import DEFAULT_MODEL


class JobSpecError(ValueError):
    """A job spec that cannot run; the message names the field (or file) and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ModelSpec(_Strict):
    id: str = DEFAULT_MODEL
    """Embedded alias, Hugging Face id or local directory (safetensors)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); recorded in every output row."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto = bfloat16 on GPU, float32 on CPU."""
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


_ENGINE = AtManConfig()  # the library defaults, chosen by the SQuAD evaluation (README, docs/EVAL.md)


class MethodSpec(_Strict):
    mode: Mode = _ENGINE.mode
    factor: float = Field(_ENGINE.factor, ge=0.0)
    conceptual_threshold: float | None = Field(_ENGINE.conceptual_threshold, ge=0.0, le=1.0)
    granularity: Literal["token", "word", "sentence", "paragraph", "custom"] = "word"
    delimiter: str | None = None
    generate_max_tokens: int = Field(16, ge=1)
    keep_per_target: bool = True
    conceptual_candidates: ConceptualCandidates = _ENGINE.conceptual_candidates
    """Tokens conceptual suppression may pull in: the prompt's units, or those and the target's input tokens."""
    aggregate: Aggregate = _ENGINE.aggregate
    """Per-target-token ΔCE combined by `sum` or `sum_of_squares` (the paper's evaluation)."""
    postprocess: Literal["none", "abs", "square"] = "none"
    normalize: bool = False

    def atman_config(self, **engine: Any) -> AtManConfig:
        return AtManConfig(**self.model_dump(), **engine)


class OutputSpec(_Strict):
    root: str = "out/"
    """Where runs are written: ROOT/model=<slug>/run_date=YYYY-MM-DD/run_id=<id>/; local or s3://."""
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"


class ResourcesSpec(_Strict):
    actors: int = Field(1, ge=1)
    """Model replicas (Ray actors), each pinned to its own GPU when gpus_per_actor > 0."""
    gpus_per_actor: float = Field(0, ge=0)
    batch_rows: int = Field(8, ge=1)
    """Prompts explained together; their suppression passes share forward batches."""
    shard_rows: int = Field(10_000, ge=1)
    """Most input rows per shard: the unit of an actor call, of an output part and of resume (a shard an actor
    loses is explained again whole). Small inputs get smaller shards, about four per actor."""
    cpus_per_actor: float = Field(1, gt=0)
    max_restarts: int = Field(3, ge=0)
    """How often a dead actor is restarted (and its tasks retried) before the run fails."""


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
        key = json.dumps({"model": self.model.model_dump(), "method": self.method.model_dump()}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        field = ".".join(str(x) for x in e["loc"]) or "spec"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see jobs/examples/demo.yaml)"
        parts.append(f"{field}: {msg}")
    return "; ".join(parts)


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
        raise JobSpecError(f"{path}: {_describe(err)}") from None
    return spec
