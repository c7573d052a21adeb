"""AtMan method parameters: one validated object that serialises into every run manifest."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Mode = Literal["multiplicative", "log_additive", "scale", "multiplicative_full_row"]
Granularity = Literal["token", "word", "sentence", "paragraph", "custom"]
Postprocess = Literal["none", "abs", "square"]
Aggregate = Literal["sum", "sum_of_squares"]
ConceptualCandidates = Literal["prompt", "prompt_and_target"]
Precision = Literal["auto", "bf16", "mixed_bf16", "mixed_fp16", "tf32", "fp32"]
Kernel = Literal["sdpa", "flex"]

MODES: tuple[str, ...] = Mode.__args__
PRECISIONS: tuple[str, ...] = Precision.__args__
GRANULARITIES: tuple[str, ...] = Granularity.__args__


class AtManConfig(BaseModel):
    """How to suppress, what to explain and how to score (docs/METHOD.md states the method exactly).

    Invalid values raise ``pydantic.ValidationError`` (a ``ValueError``) naming the field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    mode: Mode = "log_additive"
    """Suppression form: `multiplicative` (shift the score row so its minimum over the keys the query sees is 0,
    multiply the column), `log_additive` (hosted API: add log m to the column), `scale` (multiply the column ==
    scale the key), or `multiplicative_full_row` (the authors' research code: the minimum over the whole score row,
    causally hidden later keys included; see docs/METHOD.md)."""
    factor: float = Field(0.1, ge=0.0, allow_inf_nan=False)
    """Multiplier m applied to a suppressed unit's attention columns (paper: m = 1 - f = 0.1). 1 is the identity,
    > 1 amplifies. In `log_additive`, m = 0 is taken as the limit m -> 0+ (log m = log 1e-30). Must be finite: inf or
    nan would turn every score into nan or inf."""
    conceptual_threshold: float | None = Field(None, ge=0.0, le=1.0)
    """kappa of conceptual suppression (paper Eq. 6): tokens whose input-embedding cosine to a token of the unit is
    >= kappa are suppressed too, with m = 1 - (1 - factor) * cos. None (the default) switches it off: on SQuAD it
    cost 13-17 mAP points at every factor we measured (docs/EVAL.md); the paper's value is 0.7."""
    conceptual_candidates: ConceptualCandidates = "prompt"
    """Which tokens conceptual suppression may pull into a unit's pass: the prompt's units (`prompt`), or those and
    the target tokens that are inputs (`prompt_and_target`, the authors' code)."""
    target_units: bool = False
    """Also explain each target token but the last as a unit of its own, scored for the later target tokens only
    (the authors' code); reported in ``Explanation.target_units`` / ``target_scores``."""
    granularity: Granularity = "word"
    """Unit of explanation: token, word, sentence, paragraph, or `custom` (split on `delimiter`). `word` by default:
    on SQuAD it ties `token` on mAP and beats it on mAR and deletion AOPC, with fewer passes (docs/EVAL.md)."""
    delimiter: str | None = None
    """Separator for granularity `custom`, e.g. '|' or ';'. The delimiter itself belongs to no unit."""
    image_grid: str | None = Field(default=None, pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")
    """Image units (vision-language models): ROWSxCOLS cells per image (e.g. 8x8), the image tokens whose box centre
    falls in a cell suppressed together; null = every image token its own unit (hundreds per image)."""
    aggregate: Aggregate = "sum"
    """How a unit's per-target-token rises in CE combine into its score: `sum` (the whole target's ΔCE, signed) or
    `sum_of_squares` (each token's ΔCE squared, then summed: the paper's evaluation). ``per_target`` holds the
    summands, so ``scores == per_target.sum(1)`` before postprocess and normalize."""
    postprocess: Postprocess = "none"
    """Applied to the aggregated scores (and the per-target summands): none, abs or square."""
    normalize: bool = False
    """Divide scores (and per-target scores) by their largest magnitude: signed scores land in [-1, 1],
    abs/square scores in [0, 1]."""
    keep_per_target: bool = True
    """Keep the [units, target_tokens] matrix of score contributions, not only the whole-target sum."""
    prefix_reuse: bool = True
    """Take the positions before a pass's earliest suppressed token from the unperturbed pass (exact)."""
    batch_size: int = Field(16, ge=1)
    """Most suppression passes (rows) per forward pass."""
    max_batch_tokens: int = Field(8192, ge=1)
    """Most query tokens per forward pass (rows x padded suffix length); bounds activation memory."""
    padding_side: Literal["left", "right"] = "left"
    """Where a batch's shorter rows are padded. Results do not depend on it; left keeps target logits aligned."""
    generate_max_tokens: int = Field(16, ge=1)
    """New tokens generated greedily when no target is given (stops at EOS)."""
    precision: Precision = "auto"
    """How the sweep computes, apart from how the weights are stored (the model's dtype): `bf16` (everything in
    bfloat16), `mixed_bf16` / `mixed_fp16` (matrix products on 16-bit inputs with float32 accumulation; residual
    stream, norms and softmax in float32), `tf32` (float32 activations, TF32 products), `fp32` (float32 throughout,
    TF32 off). 16-bit weights are read as they are stored. `auto`: `fp32` for float32 weights on a CPU, else
    `mixed_fp16`, the cheapest policy measured to keep scores float32-grade (docs/PRECISION.md)."""
    attention_kernel: Kernel = "sdpa"
    """`sdpa` (PyTorch's scaled_dot_product_attention with a dense suppression mask) or `flex` (FlexAttention: the
    suppression applied inside the fused kernel as a score modification, no dense mask; compiled on CUDA)."""
    engine: Literal["fast", "reference"] = "fast"
    """`fast` (batched, prefix reuse, target-only logits) or `reference`, the naive method as docs/METHOD.md states it
    (one unit per pass, full recompute, eager attention): the oracle the fast engine is tested against."""

    @classmethod
    def paper(cls, **overrides) -> AtManConfig:
        """The AtMan authors' research code (Aleph-Alpha/AtMan, atman-magma) as a preset: the whole-row minimum,
        m = 0.1, conceptual suppression at the paper's kappa 0.7 over prompt and target inputs, earlier target tokens
        as units, per-target-token ΔCE squared then summed, token units. Scores keep our sign (suppressed - base:
        positive = supports); theirs is base - suppressed, which squaring removes. docs/METHOD.md lists each
        difference from our default form."""
        preset = dict(
            mode="multiplicative_full_row",
            factor=0.1,
            conceptual_threshold=0.7,
            conceptual_candidates="prompt_and_target",
            target_units=True,
            aggregate="sum_of_squares",
            granularity="token",
        )
        return cls(**{**preset, **overrides})

    @model_validator(mode="after")
    def _delimiter_matches_granularity(self) -> AtManConfig:
        if self.granularity == "custom" and not self.delimiter:
            raise ValueError("delimiter: granularity 'custom' needs a non-empty delimiter, e.g. delimiter='|'")
        if self.granularity != "custom" and self.delimiter is not None:
            raise ValueError(f"delimiter: only used with granularity 'custom' (got granularity {self.granularity!r})")
        return self
