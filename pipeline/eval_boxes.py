"""`atman eval boxes`: the paper's image protocol (its Open Images evaluation) for vision-language models: how much
of a method's relevance over the image lands inside the ground-truth boxes.

Data: JSONL, one example per line: ``{"id", "image" (a path, relative to the file's folder), "question", "target",
"boxes": [[x0, y0, x1, y1], ...]}`` in the original image's pixels. The bundled synthetic set
(``pipeline.data.BOXES``: a coloured square on grey, "What colour is the square?") is the default.

Per example the prompt is the question with the image before it (the processor's layout, ``Explainer.plan``), the
target the given answer; the units are the image's units (every image token, or the cells of ``image_grid``), the
same for every method. A unit's ground truth y is the share of its box inside the union of the example's boxes (0-1).
With relevance x over the units: AP = sum(|x| * y) / sum(|x|) (the share of the relevance mass inside the boxes),
AR = sum(|x| / max|x| * y) / sum(y); means and interquartile means over the examples, 0-100, as for SQuAD.

Methods: ``atman`` (the library defaults), ``atman:<mode>`` / ``+squares`` (``pipeline.eval_methods``), ``ixg`` and
``ig`` (Captum's InputXGradient and IntegratedGradients on the embeddings the language model receives, image
features included: the same tokens AtMan suppresses; a unit's score sums its tokens'), ``random``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.atman.config import AtManConfig
from pipeline.atman.explainer import Explainer, Planned
from pipeline.eval_methods import method_config
from pipeline.evaluate import (
    gradient_scores,
    method_results,
    plausibility,
    read_examples,
    run_examples,
    target_logprob,
    unit_sums,
)

METHODS = ("atman", "ixg", "ig", "random")


@dataclass(frozen=True)
class BoxExample:
    id: str
    image: Path
    question: str
    target: str
    boxes: list[tuple[float, float, float, float]]


def load_boxes(path: str | Path, limit: int | None = None) -> list[BoxExample]:
    """The examples of a box JSONL file (ValueError naming ``data`` and the line for a malformed one)."""
    path = Path(path)

    def parse(row: dict) -> BoxExample:
        boxes = [tuple(float(v) for v in box) for box in row["boxes"]]
        if not boxes or any(len(b) != 4 or b[0] >= b[2] or b[1] >= b[3] for b in boxes):
            raise ValueError(f"boxes must be non-empty [x0, y0, x1, y1] with x0 < x1, y0 < y1: {row['boxes']}")
        return BoxExample(str(row["id"]), path.parent / row["image"], row["question"], row["target"], boxes)

    return read_examples(path, parse, "a box", limit)


def unit_truth(planned: Planned, boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Per image unit, the share of its box's pixels inside the union of ``boxes`` (pixel grid of the image)."""
    width, height = planned.image_sizes[0]
    inside = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside[int(round(y0)) : int(round(y1)), int(round(x0)) : int(round(x1))] = True
    out = []
    for unit in planned.image_units:
        p = unit.patch
        x0, y0 = max(int(round(p.x0)), 0), max(int(round(p.y0)), 0)
        cell = inside[y0 : max(int(round(p.y1)), y0 + 1), x0 : max(int(round(p.x1)), x0 + 1)]
        out.append(float(cell.mean()) if cell.size else 0.0)
    return np.asarray(out)


class BoxEval:
    """Runs the methods on box examples with one loaded vision-language model; every method sees the same units."""

    def __init__(self, lm, image_grid: str | tuple[int, int] | None = None) -> None:
        self.lm, self.image_grid = lm, image_grid
        self.base = Explainer(lm, AtManConfig())
        self._explainers: dict[AtManConfig, Explainer] = {}

    def prepare(self, ex: BoxExample) -> tuple[Planned, np.ndarray]:
        planned = self.base.plan(ex.question, ex.target, images=[ex.image], image_grid=self.image_grid)
        return planned, unit_truth(planned, ex.boxes)

    def describe(self, planned: Planned, truth: np.ndarray) -> dict:
        """What an example's record says of its units: how many image units, and the boxes' mean share of them."""
        return {"n_units": len(planned.image_units), "box_share": float(truth.mean())}

    def measure(self, planned: Planned, truth: np.ndarray, scores: np.ndarray, seconds: float) -> dict:
        """One example's numbers for one method: AP and AR (0-100) over the image units."""
        return plausibility(scores, truth) | {"seconds": seconds}

    def complete(self, numbers: dict | None) -> bool:
        return numbers is not None

    def scores(self, name: str, planned: Planned, rng: np.random.Generator) -> np.ndarray:
        if name.startswith("atman"):
            cfg = method_config(name, AtManConfig().granularity)
            if cfg not in self._explainers:
                self._explainers[cfg] = Explainer(self.lm, cfg)
            return self._explainers[cfg].score(planned).image_scores.astype(np.float64)
        if name == "random":
            return rng.random(len(planned.image_units))
        if name in ("ixg", "ig"):
            return unit_sums(self._gradient(planned, integrated=name == "ig"), planned.image_units)
        raise ValueError(f"methods: {name!r} is not one of atman, atman:<mode>[+conceptual][+squares], ixg, ig, random")

    def _gradient(self, planned: Planned, integrated: bool) -> np.ndarray:
        """Input x Gradient or Integrated Gradients per position (``gradient_scores``) of the target's
        log-probability, attributed to the merged embeddings the model's language model receives (image features in
        place), with the positions and image blocks the model's own forward gave it."""
        si = planned.sweep_input
        device = self.lm.device
        ids = si.input_ids.to(device)
        n_prompt = len(ids) - si.n_target

        def forward(inputs_embeds: torch.Tensor) -> torch.Tensor:
            batch = inputs_embeds.shape[0]
            kwargs = {"inputs_embeds": inputs_embeds, "use_cache": False, "logits_to_keep": si.n_target + 1}
            if si.positions is not None:  # [n] -> [B, n]; M-RoPE's [k, n] -> [k, B, n]
                positions = si.positions.to(device)
                kwargs["position_ids"] = positions.unsqueeze(-2).expand(*positions.shape[:-1], batch, -1)
            if si.blocks is not None:  # Gemma 3 builds its bidirectional image blocks from the token types
                kwargs["token_type_ids"] = (si.blocks >= 0).long().to(device)[None].expand(batch, -1)
            return target_logprob(self.lm.model(**kwargs).logits, ids[n_prompt:])

        return gradient_scores(forward, si.embeds[None].to(device), n_prompt, integrated)


def evaluate_boxes(lm, examples: list[BoxExample], methods: list[str], image_grid=None, seed: int = 0,
                   on_example: Callable[[int, int], None] | None = None) -> dict:  # fmt: skip
    """The JSON shape of `atman eval squad` (no deletion curves): n, model, methods {name: metrics}, examples."""
    ev = BoxEval(lm, image_grid)
    model = getattr(lm, "model_id", type(lm.model).__name__)
    per_example = run_examples(ev, examples, methods, ev.scores, None, {"model": model}, seed, on_example)
    summaries = {name: result.summary() for name, result in method_results(per_example, methods).items()}
    return {
        "n": len(examples),
        "model": model,
        "image_grid": image_grid,
        "box_share": float(np.mean([r["box_share"] for r in per_example])),
        "methods": {
            name: {k: v for k, v in m.items() if not k.startswith(("aopc", "lds"))} for name, m in summaries.items()
        },
        "examples": per_example,
    }
