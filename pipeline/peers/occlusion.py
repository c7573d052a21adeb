"""Occlusion (feature ablation) through Captum: the perturbation baseline that needs one forward pass per unit.

A unit's score is the drop of the target's log-probability (summed over its tokens, teacher-forced) when the
unit's tokens are ablated: ``log p(target | prompt) - log p(target | prompt with unit i ablated)``, so positive =
supports, like AtMan (whose score is the rise of the target's CE). Only the units' tokens are features; the rest
of the prompt (question, chat template) and the target are never ablated.

Ablation is what Captum's ``LLMAttribution`` does for token input: ``TextTokenInput`` replaces an ablated token
by a baseline token id, keeping the sequence length and every position (the token is not removed). The id is the
one choice made here: a plain space token (``baseline_token``), not Captum's default id 0 ("usually UNK"). In
SmolLM2's vocabulary id 0 is ``<|endoftext|>`` (also its unk token), a document separator: a unit replaced by it
starts a new document, the model drops the context before it, and every unit scores by its position, not its
content (on the first two bundled SQuAD examples AP 0.4 and 0.7 with id 0, below the 1.1 % answer share that
random scores reach, against 12.4 and 9.9 with the space token). Captum's docs name UNK or padding as the usual
choices; SmolLM2's padding, ``<|im_end|>``, ends a chat turn, no better. ``unit_scores(..., baseline=0)`` gives
Captum's default. The features are our units through Captum's own machinery: a ``TextTokenInput`` whose
interpretable tokens are the units' tokens (``itp_mask``) and a ``feature_mask`` that maps each of them to its unit,
given to ``FeatureAblation.attribute``.

Two paths, the same numbers (tests/test_peer_occlusion.py checks both against a hand computation):
- ``perturbations_per_eval=1``: ``LLMAttribution(FeatureAblation(model), tokenizer).attribute(...,
  forward_in_tokens=False)``, exactly as a Captum user writes it. ``forward_in_tokens=False`` is Captum's
  one-pass, teacher-forced target log-probability (its default decodes the target token by token with a KV cache,
  one forward per target token); LLMAttribution runs one perturbation per forward (its forward concatenates a
  single row of target tokens), so it cannot batch.
- ``perturbations_per_eval>1`` (the default, ``BATCH``): ``FeatureAblation`` with the same ``TextTokenInput``
  perturbation and a batched version of that forward (``BATCH`` ablated rows per forward pass, as AtMan's engine
  batches its passes; logits only at the target positions). What ``atman eval squad`` and bench/bench_peers.py run.
"""

from __future__ import annotations

import numpy as np
import torch
from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput

CAPTUM_DEFAULT_BASELINE = 0  # TextTokenInput's default baseline id
BATCH = 16  # perturbations_per_eval: ablated rows per forward pass (AtManConfig().batch_size, the engine's)
SETTINGS = {"occlusion": {"perturbations_per_eval": BATCH, "baseline": "the tokenizer's space token"}}
"""What ``method_params`` records for a run of this peer (``unit_scores``' defaults; ``baseline_token``)."""


class UnitTokenInput(TextTokenInput):
    """Captum's ``TextTokenInput`` over token ids already made (the evaluation's prompt, chat template included,
    not re-tokenized) whose interpretable tokens are the units' tokens; ``feature_mask`` [1, tokens] holds each
    interpretable token's unit index, so ``FeatureAblation`` ablates one whole unit per perturbation."""

    def __init__(self, prompt_ids: torch.Tensor, units, tokenizer, baselines: int = CAPTUM_DEFAULT_BASELINE) -> None:
        # TextTokenInput.__init__ tokenizes a string; this sets the same attributes from the given ids.
        unit_of: dict[int, int] = {}
        for index, unit in enumerate(units):
            for position in unit.positions:
                if position in unit_of or not 0 <= position < len(prompt_ids):
                    raise ValueError(f"units: position {position} is outside the prompt or in two units")
                unit_of[position] = index
        positions = sorted(unit_of)
        self.inp_tensor = prompt_ids[None].long()
        self.itp_mask = torch.zeros_like(self.inp_tensor, dtype=torch.bool)
        self.itp_mask[0, positions] = True
        self.itp_tensor = self.inp_tensor[self.itp_mask][None]
        self.skip_tokens = None
        self.tokenizer = tokenizer
        self.values = tokenizer.convert_ids_to_tokens(self.itp_tensor[0].tolist())
        self.n_itp_features = len(self.values)
        self.baselines = baselines
        self.feature_mask = torch.tensor([[unit_of[p] for p in positions]], dtype=torch.long)
        self.first = [positions.index(min(u.positions)) for u in units]  # a unit's score sits on each of its tokens


def baseline_token(tokenizer) -> int:
    """The id ablated tokens become: the tokenizer's single token for " " when it has one that is not a special
    token, else its unk token, else Captum's default 0."""
    ids = tokenizer(" ", add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and ids[0] not in set(tokenizer.all_special_ids):
        return int(ids[0])
    return CAPTUM_DEFAULT_BASELINE if tokenizer.unk_token_id is None else int(tokenizer.unk_token_id)


def unit_scores(lm, planned, perturbations_per_eval: int = BATCH, baseline: int | None = None) -> np.ndarray:
    """Each planned unit's drop of the target's log-probability when its tokens are replaced by ``baseline``
    (default ``baseline_token``; Captum ``FeatureAblation``): one forward pass per unit plus the unablated one."""
    ids = planned.sweep_input.input_ids
    n_target = planned.sweep_input.n_target
    if not planned.units:
        return np.zeros(0, dtype=np.float64)
    model, device = lm.model, lm.model.device
    baseline = baseline_token(lm.tokenizer) if baseline is None else baseline
    inp = UnitTokenInput(ids[:-n_target], planned.units, lm.tokenizer, baselines=baseline)
    target = ids[-n_target:].to(device)
    mask = inp.feature_mask.to(device)
    with torch.no_grad():
        if perturbations_per_eval == 1:
            attr = LLMAttribution(FeatureAblation(model), lm.tokenizer)
            seq = attr.attribute(inp, target=target, forward_in_tokens=False, feature_mask=mask).seq_attr
        else:
            ablation = FeatureAblation(_target_logprob(model, inp, target))
            seq = ablation.attribute(
                inp.to_tensor().to(device), feature_mask=mask, perturbations_per_eval=perturbations_per_eval
            )[0]
    return seq.detach().double().cpu().numpy()[inp.first]


def _target_logprob(model, inp: UnitTokenInput, target: torch.Tensor):
    """[B] log-probability of the whole target after each row of perturbed interpretable tokens [B, features]:
    LLMAttribution's one-pass forward (``forward_in_tokens=False``) for a batch of rows."""
    n_target = len(target)

    def forward(perturbed: torch.Tensor) -> torch.Tensor:
        prompt = inp.to_model_input(perturbed).to(target.device)
        ids = torch.cat([prompt, target[None].expand(len(prompt), -1)], dim=1)
        logits = model(input_ids=ids, logits_to_keep=n_target + 1).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, target[None, :, None].expand(len(ids), -1, 1))
        return logprobs[..., 0].sum(-1)

    return forward
