"""A naive, independent port of the AtMan authors' own research code, as a test oracle for the engine's paper preset.

Source: the public repository Aleph-Alpha/AtMan, folder ``atman-magma/atman_magma/`` (read at commit cacb9ccc).
Their language model is GPT-J 6B run through a fork of finetuneanon's GPT-Neo (``gpt_neo/modeling_gpt_neo.py`` with
``config.jax = True``, ``config.py:get_gptj_config``); the AtMan parts are

- ``explainer.py`` (``Explainer``): which positions are suppressed, one pass per position, plus an unsuppressed pass;
- ``conceptual_suppression.py`` (``ConceptualSuppression``): neighbours by input-embedding cosine;
- ``gpt_neo/modeling_gpt_neo.py`` (``GPTNeoForCausalLM.get_modified_causal_attention_mask``,
  ``GPTNeoAttentionMixin._attn``) and ``manipulate_attention.py`` (``manipulate_attention_scores``): the factor
  matrix and how it is applied to the raw scores;
- ``logit_parsing.py`` (``get_delta_cross_entropies``): per-target-token delta CE, base - suppressed;
- ``openimages_eval.py`` (``calculate_eval_scores_from_result_folder``) and ``document_qa_explainer.py``
  (``run`` + ``postprocess``): the evaluation's aggregation, sum over target tokens of the squared deltas.

Only what a text-only causal LM needs is ported; the model is a transformers ``GPTJForCausalLM`` in eager attention,
whose attention function is swapped, for the duration of a call only, for a re-implementation of their ``_attn``.
Nothing is batched and nothing is reused across passes: one full forward pass per suppressed position.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import transformers.models.gptj.modeling_gptj as _gptj

PAPER_FACTOR = 0.1  # their Explainer(suppression_factor=0.1) default and config.yml; it IS the multiplier m
_FILL = -10000.0  # manipulate_attention.py: masked_fill_ value; modeling_gpt_neo.py _attn: the clamp floor
_MASKED_BIAS = -1e9  # modeling_gpt_neo.py GPTNeoSelfAttention: masked_bias buffer


@dataclass
class PaperPortResult:
    """One explanation, in the authors' conventions.

    ``positions[r]`` is the input position whose pass is row r: prompt positions 0..p-1, then the target tokens that
    are inputs, p..p+t-2 (the last target token is never an input). ``delta[r, j]`` is their
    ``delta_cross_entropies_matrix`` (``square_outputs=False``): CE_base[j] - CE_suppressed[r, j] (positive when the
    suppression made target j MORE likely). ``explained[r, j]`` says whether row r is listed in their explanation of
    target j (``logit_parsing.py``: ``prompt_explain_indices + target_token_indices[:j]``). ``score[r]`` is the
    evaluation's per-position value: the sum over listed targets j of ``delta[r, j] ** 2``.
    """

    positions: list[int]
    prompt_len: int
    target_ids: list[int]
    base_ce: np.ndarray  # [t] float32
    suppressed_ce: np.ndarray  # [n, t] float32
    delta: np.ndarray  # [n, t] float32, base - suppressed
    explained: np.ndarray  # [n, t] bool
    score: np.ndarray  # [n] float64
    factors: list[dict[int, float]]  # per row: input position -> multiplier of that pass (their config)

    def explanation(self, j: int, square: bool = False) -> list[tuple[int, float]]:
        """Their per-target list for target j (``get_delta_cross_entropies(...).data[j]['explanation']``)."""
        rows = np.nonzero(self.explained[:, j])[0]
        return [(self.positions[r], float(self.delta[r, j]) ** (2 if square else 1)) for r in rows]


def suppression_configs(
    embeddings: torch.Tensor,
    positions: Sequence[int],
    factor: float,
    conceptual_threshold: float | None,
    modify_factor_by_cossim: bool = True,
) -> list[dict[int, float]]:
    """One {position: multiplier} per pass, in pass order, the unsuppressed pass first ({}).

    Reproduces ``explainer.py:Explainer.get_default_configs_for_forward_passes`` (each position alone at
    ``factor``) and ``conceptual_suppression.py:ConceptualSuppression.modify_configs``: cosine over ALL input positions
    (prompt and target inputs) of their input embeddings (``.float()``, each row divided by max(norm, 1e-8), then
    clipped to [-1, 1]); every other position with cos >= threshold joins the pass with multiplier
    ``(1 - factor) * (1 - cos) + factor`` computed in float32 (1.0 if cos is outside [0, 1]; ``factor`` itself when
    ``modify_factor_by_cossim`` is False). ``embeddings``: [seq, d].
    """
    configs: list[dict[int, float]] = [{}]
    for pos in positions:
        configs.append({int(pos): float(factor)})
    if conceptual_threshold is None:
        return configs
    if not 0 <= conceptual_threshold <= 1:
        raise ValueError(f"conceptual_threshold: {conceptual_threshold} is not in [0, 1] (their assertion)")
    emb = embeddings.detach().float()
    norm = emb.norm(dim=1)[:, None]
    unit = emb / torch.max(norm, 1e-8 * torch.ones_like(norm))
    sim = (unit @ unit.T).clip(-1, 1)
    for config in configs[1:]:
        (pos,) = config
        row = sim[pos]
        for other in (row >= conceptual_threshold).nonzero().view(-1).tolist():
            if other == pos:
                continue
            cos = row[other]
            if not modify_factor_by_cossim:
                mult = torch.tensor(factor)
            elif 0 <= cos.item() <= 1.0:
                mult = (1 - factor) * (1 - cos) + factor
            else:
                mult = torch.tensor([1.0])
            config[other] = float(mult.item())
    return configs


def factor_matrix(seq_len: int, config: dict[int, float]) -> torch.Tensor:
    """[1, 1, seq, seq] float32 of ones with column k set to ``config[k]`` in EVERY row (every query, the diagonal
    and the rows that cannot see k included); broadcast over heads. Reproduces
    ``gpt_neo/modeling_gpt_neo.py:GPTNeoForCausalLM.get_modified_causal_attention_mask`` (``use_log=False``)."""
    mat = torch.ones(1, 1, seq_len, seq_len, dtype=torch.float32)
    for k, m in config.items():
        mat[0, :, :, k] = torch.tensor(m)
    return mat


def _manipulate(scores: torch.Tensor, causal: torch.Tensor, mat: torch.Tensor, row_min: str) -> torch.Tensor:
    """``manipulate_attention.py:manipulate_attention_scores`` (multiplicative=True): subtract the row minimum taken
    over the WHOLE row of raw scores (future, causally hidden keys included; in the scores' dtype), multiply by the
    factor matrix, then fill the causally hidden entries with -10000. The minimum is never added back.
    ``row_min="visible"`` is not theirs: it takes the minimum over visible keys only, for diffing against our form."""
    if row_min == "full":
        low = scores.min(-1).values.unsqueeze(3)
    elif row_min == "visible":
        low = scores.masked_fill(~causal, float("inf")).min(-1).values.unsqueeze(3)
    else:
        raise ValueError(f"row_min: {row_min!r} is not one of full, visible")
    out = (scores - low) * mat.to(scores.device)
    return out.masked_fill(~causal.to(scores.device), _FILL)


class _Patch:
    """Holds what the swapped-in attention needs during one forward pass."""

    def __init__(self, mat: torch.Tensor | None, after_scaling: bool, layers: Sequence[int] | None, row_min: str):
        self.mat, self.after_scaling, self.row_min = mat, after_scaling, row_min
        self.layers = None if layers is None else set(layers)
        self.calls: list[int] = []

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """``gpt_neo/modeling_gpt_neo.py:GPTNeoAttentionMixin._attn`` for GPT-J (``config.jax``: scale_attn =
        sqrt(head_dim), divided after the raw product), with ``attention_mask=None`` as their explainer passes it:
        raw q.k (float32 only if the inputs are bfloat16), manipulation (before scaling by default), scaling,
        causal mask (-1e9), clamp at -10000, softmax. Returns what transformers' eager GPT-J attention returns."""
        self.calls.append(module.layer_idx)
        q_len, k_len = query.shape[-2], key.shape[-2]
        causal = torch.ones(k_len, k_len, dtype=torch.bool, device=query.device).tril()[k_len - q_len :, :]
        causal = causal[None, None]
        if attention_mask is not None:  # the model's own mask must be plain causal: no padding, no cache
            if attention_mask.dtype == torch.bool:
                seen = attention_mask.expand(-1, -1, q_len, k_len)
            else:
                seen = attention_mask.expand(-1, -1, q_len, k_len) > _MASKED_BIAS
            if not torch.equal(seen, causal.expand_as(seen)):
                raise ValueError("paper_port: the model's attention mask is not plain causal (padding or cache?)")
        mat = self.mat
        if mat is not None and self.layers is not None and module.layer_idx not in self.layers:
            mat = None  # modeling_gpt_neo.py GPTNeoModel.forward: manipulate_layers
        if mat is not None:
            mat = mat[:, :, k_len - q_len : k_len, :k_len]
        if query.dtype is torch.bfloat16:
            scores = torch.matmul(query.float(), key.transpose(-1, -2).float())
        else:
            scores = torch.matmul(query, key.transpose(-1, -2))
        if mat is not None and not self.after_scaling:
            scores = _manipulate(scores, causal, mat, self.row_min)
        scores = scores / torch.sqrt(torch.tensor(module.head_dim).float()).to(scores.device)
        if mat is not None and self.after_scaling:
            scores = _manipulate(scores, causal, mat, self.row_min)
        scores = torch.where(causal, scores, torch.tensor(_MASKED_BIAS, dtype=scores.dtype, device=scores.device))
        scores[scores < _FILL] = _FILL
        weights = torch.softmax(scores, dim=-1).to(value.dtype)
        weights = F.dropout(weights, p=dropout, training=module.training)
        if value.dtype is torch.bfloat16:
            out = torch.matmul(weights.float(), value.float()).to(value.dtype)
        else:
            out = torch.matmul(weights, value).to(value.dtype)
        return out.transpose(1, 2).contiguous(), weights


@contextlib.contextmanager
def their_attention(
    model, mat: torch.Tensor | None, after_scaling: bool = False, layers=None, row_min: str = "full"
) -> Iterator[_Patch]:
    """Inside the block, every GPT-J attention of ``model`` runs :meth:`_Patch.attention` (factor matrix ``mat``,
    None = their unmanipulated path). Restores transformers' eager function on exit."""
    if not isinstance(model, _gptj.GPTJForCausalLM):
        raise TypeError(f"paper_port: expected a GPTJForCausalLM, got {type(model).__name__}")
    if model.config._attn_implementation != "eager":
        raise ValueError(f"paper_port: needs eager attention, got {model.config._attn_implementation!r}")
    patch = _Patch(mat, after_scaling, layers, row_min)
    original = _gptj.eager_attention_forward
    _gptj.eager_attention_forward = patch.attention
    try:
        yield patch
    finally:
        _gptj.eager_attention_forward = original


@torch.no_grad()
def _target_ce(model, input_ids: torch.Tensor, prompt_len: int, target: torch.Tensor, patch_args: dict) -> np.ndarray:
    """One forward pass; ``logit_parsing.py:get_delta_cross_entropies``: CE (reduction none, float32 logits) of
    target j read off the logits at position prompt_len - 1 + j."""
    with their_attention(model, **patch_args) as patch:
        logits = model(input_ids=input_ids[None]).logits[0].float()
    n_layer = model.config.n_layer
    if sorted(patch.calls) != list(range(n_layer)):
        raise RuntimeError(f"paper_port: attention ran for layers {patch.calls}, expected each of {n_layer} once")
    rows = logits[prompt_len - 1 : prompt_len - 1 + len(target)]
    return F.cross_entropy(rows, target.to(rows.device), reduction="none").cpu().numpy()


def paper_atman(
    model: _gptj.GPTJForCausalLM,
    prompt_ids: torch.Tensor,
    target_ids: torch.Tensor,
    factor: float = PAPER_FACTOR,
    conceptual_threshold: float | None = None,
    *,
    modify_factor_by_cossim: bool = True,
    after_scaling: bool = False,
    layers: Sequence[int] | None = None,
    row_min: str = "full",
) -> PaperPortResult:
    """The authors' AtMan on a transformers GPT-J: ``explainer.py:Explainer.collect_logits_by_manipulating_attention``
    followed by ``logit_parsing.py:get_delta_cross_entropies`` and the evaluation's sum of squares.

    ``factor`` is their ``suppression_factor``, the multiplier itself (0.1 = the paper's m = 0.1; 1.0 = no change).
    Input = prompt + target[:-1]. Pass 0 is unsuppressed but still goes through their manipulation with an all-ones
    factor matrix (as their config ``{suppression_token_index: [-1], suppression_factor: [1.0]}`` does); then one
    pass per prompt position and per target-input position, each with its conceptual neighbours when
    ``conceptual_threshold`` is set. Keywords mirror their other knobs at their defaults (``row_min`` is ours: see
    :func:`_manipulate`).
    """
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).cpu()
    target = torch.as_tensor(target_ids, dtype=torch.long).cpu()
    if prompt.dim() != 1 or target.dim() != 1 or len(prompt) == 0 or len(target) == 0:
        raise ValueError("paper_port: prompt_ids and target_ids must be non-empty 1-D")
    p, t = len(prompt), len(target)
    device = next(model.parameters()).device
    input_ids = torch.cat([prompt, target[:-1]]).to(device)
    seq = len(input_ids)
    positions = list(range(p)) + list(range(p, p + t - 1))
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(input_ids)
    configs = suppression_configs(embeddings, positions, factor, conceptual_threshold, modify_factor_by_cossim)
    common = dict(after_scaling=after_scaling, layers=layers, row_min=row_min)
    ces = [_target_ce(model, input_ids, p, target, dict(common, mat=factor_matrix(seq, c))) for c in configs]
    base, suppressed = ces[0], np.stack(ces[1:]) if positions else np.zeros((0, t), np.float32)
    delta = (torch.from_numpy(base)[None] - torch.from_numpy(suppressed)).numpy()
    explained = np.ones((len(positions), t), dtype=bool)
    for r, pos in enumerate(positions):
        if pos >= p:
            explained[r, : pos - p + 1] = False  # target input j' explains only targets j > j'
    score = np.array(
        [sum(float(delta[r, j]) ** 2 for j in range(t) if explained[r, j]) for r in range(len(positions))],
        dtype=np.float64,
    )
    return PaperPortResult(
        positions=positions,
        prompt_len=p,
        target_ids=target.tolist(),
        base_ce=base,
        suppressed_ce=suppressed,
        delta=delta,
        explained=explained,
        score=score,
        factors=configs[1:],
    )


def tiny_gptj(seed: int = 0, vocab_size: int = 100) -> _gptj.GPTJForCausalLM:
    """The 2-layer, d=64 random GPT-J of the coverage table (init 0.25 so attention is peaked), eager, float32."""
    from tiny_models import tiny_model

    return tiny_model("gptj", vocab_size, seed=seed, attn_implementation="eager")


if __name__ == "__main__":  # a demo: python tests/paper_port.py
    np.set_printoptions(precision=5, suppress=True, linewidth=140)
    model = tiny_gptj()
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(0, 100, (10,), generator=g)
    prompt_ids[7] = prompt_ids[2]  # a repeated token, so conceptual suppression has a neighbour
    target_ids = torch.tensor([int(prompt_ids[2]), 41, 17])
    print("prompt", prompt_ids.tolist(), "target", target_ids.tolist())
    for kappa in (None, 0.7):
        res = paper_atman(model, prompt_ids, target_ids, factor=PAPER_FACTOR, conceptual_threshold=kappa)
        print(f"\nconceptual_threshold={kappa}  base CE {res.base_ce}")
        print("factors with neighbours:", [c for c in res.factors if len(c) > 1])
        for pos, d, e, s in zip(res.positions, res.delta, res.explained, res.score, strict=True):
            print(f"pos {pos:2d}  delta {d}  explained {e.astype(int)}  score {s:.6g}")
    plain = paper_atman(model, prompt_ids, target_ids, row_min="visible")
    theirs = paper_atman(model, prompt_ids, target_ids)
    print("\nmax |delta(full-row min) - delta(visible min)|:", np.abs(theirs.delta - plain.delta).max())
