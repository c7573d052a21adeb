"""The evaluation's baselines on AtMan's units (``pipeline/evaluate.py``): Captum's InputXGradient (``ixg``) and
IntegratedGradients (``ig``) on the input embeddings, and attention rollout (``rollout``, Abnar & Zuidema 2020).
Each scores the planned request's tokens, summed per unit over the unit's tokens: registered with the peers
(``pipeline.peers.METHODS``) so that the evaluation looks every method up in one place."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.atman import attention
from pipeline.evaluate import IG_STEPS, gradient_scores, target_logprob, unit_sums

SETTINGS = {
    "ixg": {"explained": "log-probability of the target"},
    "ig": {"explained": "log-probability of the target", "steps": IG_STEPS, "baseline": "zeroed prompt embeddings"},
    "rollout": {"residual_weight": 0.5, "heads": "mean"},
}
"""What ``method_params`` records for a run of each baseline."""
ROLLOUT_RESIDUAL = SETTINGS["rollout"]["residual_weight"]


def input_x_gradient(lm, planned) -> np.ndarray:
    return unit_sums(_gradient(lm, planned, integrated=False), planned.units)


def integrated_gradients(lm, planned) -> np.ndarray:
    return unit_sums(_gradient(lm, planned, integrated=True), planned.units)


def rollout(lm, planned) -> np.ndarray:
    return unit_sums(_rollout(lm, planned), planned.units)


def _ids(lm, planned) -> tuple[torch.Tensor, int, int]:
    ids = planned.sweep_input.input_ids
    n_target = planned.sweep_input.n_target
    return ids.to(lm.device)[None], len(ids) - n_target, n_target


def _gradient(lm, planned, integrated: bool) -> np.ndarray:
    ids, n_prompt, n_target = _ids(lm, planned)
    embeds = lm.model.get_input_embeddings()(ids).detach()

    def forward(e: torch.Tensor) -> torch.Tensor:
        return target_logprob(lm.model(inputs_embeds=e, logits_to_keep=n_target + 1).logits, ids[0, n_prompt:])

    return gradient_scores(forward, embeds, n_prompt, integrated)


def _rollout(lm, planned) -> np.ndarray:
    ids, n_prompt, _ = _ids(lm, planned)
    with attention.implementation(lm.model, "eager"), torch.no_grad():  # weights need explicit softmax
        attentions = lm.model(input_ids=ids, output_attentions=True).attentions
    n = ids.shape[1]
    rollout = torch.eye(n, dtype=torch.float64)
    for layer in attentions:
        a = layer[0].double().mean(0).cpu()
        a = (1 - ROLLOUT_RESIDUAL) * a + ROLLOUT_RESIDUAL * torch.eye(n, dtype=torch.float64)
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    rows = rollout[n_prompt - 1 : n - 1]  # the positions that predict the target tokens
    return rows.mean(0).numpy()
