"""The paper's SQuAD protocol (its Table 1a; docs/METHOD.md "Evaluation") for AtMan and the baselines, on identical
units.

Per example: prompt = context + question (the model's chat template for instruct models), target = the first
reference answer, units = the context's units only (``explain_span``); ground truth y = units whose characters
overlap a reference answer span. With relevance x over those units:
    AP = sum(|x| * y) / sum(|x|)            AR = sum(|x| / max|x| * y) / sum(y)
reported as means and interquartile means (0-100), plus seconds per example. Faithfulness: AOPC of the deletion
curve, the mean rise of the target CE (nats) when the top-k units (k = 1..5) are removed from attention together
(``aopc``, through AtMan's suppression) and when their tokens are dropped from the input (``aopc_removal``, the
neutral check: no method's own machinery). And the linear datamodeling score (LDS, ContextCite's faithfulness
metric, Cohen-Wang et al. 2024): over ``lds_masks`` (32) random ablations of the units (each unit kept with probability
1/2, the same ablations for every method of an example), the Spearman correlation between the CE rise a method's
scores predict (the sum of the ablated units' scores) and the CE rise measured, by removal (``lds_removal``:
ContextCite's ablation, the units' tokens dropped) and by suppression (``lds``).

Methods: ``atman`` (the library defaults), ``atman:<mode>`` and ``atman:<mode>+conceptual``, each optionally with
``+squares`` (per-target-token ΔCE squared, then summed: the paper's aggregation), ``atman:paper``
(``AtManConfig.paper()``, the authors' research code, on the evaluation's units), ``ixg`` and ``ig``
(Captum's InputXGradient and IntegratedGradients on the input embeddings; IG starts from zeroed prompt embeddings),
``rollout`` (attention rollout, Abnar & Zuidema 2020), ``random``. Gradient and rollout scores are summed per unit
over the unit's tokens.

The data defaults to the bundled SQuAD dev subset (``pipeline.data.SQUAD_DEV``: 76 examples, CC BY-SA 4.0).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import spearmanr, trim_mean

from pipeline.atman.config import AtManConfig
from pipeline.atman.explainer import Explainer, Planned
from pipeline.atman.variants import VARIANTS
from pipeline.eval_methods import LDS_MASKS, check_lds_masks, method_config
from pipeline.peers import peer_scores

DELETION_K = (1, 2, 3, 4, 5)
LDS_KEEP = 0.5
UNITS = AtManConfig().granularity  # the library's default units, as everywhere else


@dataclass(frozen=True)
class Example:
    id: str
    context: str
    question: str
    answers: list[dict]


@dataclass
class MethodResult:
    ap: list[float] = field(default_factory=list)
    ar: list[float] = field(default_factory=list)
    aopc: list[float] = field(default_factory=list)
    aopc_removal: list[float] = field(default_factory=list)
    lds: list[float] = field(default_factory=list)
    lds_removal: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def keep(self, numbers: dict) -> None:
        """Add one example's numbers (an eval's ``measure`` dict; deletion AOPCs where it has them) to the lists."""
        self.ap.append(numbers["AP"] / 100), self.ar.append(numbers["AR"] / 100)
        if "aopc" in numbers:
            self.aopc.append(numbers["aopc"]), self.aopc_removal.append(numbers["aopc_removal"])
        if "lds" in numbers:
            self.lds.append(numbers["lds"]), self.lds_removal.append(numbers["lds_removal"])
        self.seconds.append(numbers["seconds"])

    def summary(self) -> dict:
        def pct(values, iq=False):
            v = np.asarray(values, dtype=np.float64)
            return float(100 * (trim_mean(v, 0.25) if iq else v.mean())) if v.size else None

        return {
            "mAP": pct(self.ap),
            "mAR": pct(self.ar),
            "mAP_IQ": pct(self.ap, iq=True),
            "mAR_IQ": pct(self.ar, iq=True),
            "aopc": float(np.mean(self.aopc)) if self.aopc else None,
            "aopc_removal": float(np.mean(self.aopc_removal)) if self.aopc_removal else None,
            # over every example or none: a records file may hold examples measured without it (--lds-masks 0)
            "lds": float(np.mean(self.lds)) if self.lds and len(self.lds) == len(self.ap) else None,
            "lds_removal": float(np.mean(self.lds_removal)) if self.lds and len(self.lds) == len(self.ap) else None,
            "seconds_per_example": float(np.mean(self.seconds)) if self.seconds else None,
        }


def load_squad(path: str, limit: int | None = None, sample: int | None = None) -> list[Example]:
    """The examples of a SQuAD JSONL file: the first ``limit``, or ``sample`` of them evenly spaced through the file
    (first and last included: 16 of 76 are every 5th), so a subset run still spans every article."""
    if limit is not None and sample is not None:
        raise ValueError("sample: give --limit or --sample, not both")
    for name, value in (("limit", limit), ("sample", sample)):
        if value is not None and value < 1:
            raise ValueError(f"{name}: must be at least 1, got {value}")
    examples = read_examples(
        path,
        lambda row: Example(str(row["id"]), row["context"], row["question"], list(row["answers"])),
        "a SQuAD",
        limit,
    )
    if sample is not None and sample < len(examples):
        picks = np.unique(np.round(np.linspace(0, len(examples) - 1, sample)).astype(int))
        examples = [examples[i] for i in picks]
    return examples


def read_examples(path, parse: Callable[[dict], object], kind: str, limit: int | None = None) -> list:
    """``parse`` applied to each JSON line of ``path`` (the first ``limit``); ValueError naming ``data``, the file and
    the line for a line ``parse`` cannot read (``KeyError``, ``TypeError``, ``ValueError``), or for no examples."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                examples.append(parse(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"data: {path}:{number} is not {kind} example ({err})") from None
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise ValueError(f"data: {path} holds no examples")
    return examples


class SquadEval:
    """Runs the methods on examples with one loaded model; every method sees the same units."""

    def __init__(self, lm, granularity: str = UNITS, seed: int = 0, precision: str = "auto",
                 lds_masks: int = LDS_MASKS) -> None:  # fmt: skip
        self.lm = lm
        self.lds_masks = check_lds_masks(lds_masks)
        self.granularity = granularity
        self.seed = seed
        self.precision = precision
        self.base = Explainer(lm, AtManConfig(granularity=granularity, precision=precision))
        self._explainers: dict[AtManConfig, Explainer] = {}
        self._removal_base: tuple[Planned | None, float] = (None, 0.0)
        self._ablations: tuple[Planned | None, Ablations | None] = (None, None)
        self.chat = bool(getattr(lm.tokenizer, "chat_template", None))

    def prepare(self, ex: Example) -> tuple[Planned, np.ndarray]:
        prompt = f"{ex.context}\n\n{ex.question}"
        target = ex.answers[0]["text"]
        if not self.chat:
            prompt, target = f"{prompt}\nAnswer:", f" {target}"
        planned = self.base.plan(prompt, target, explain_span=(0, len(ex.context)), chat=self.chat)
        spans = [(a["answer_start"], a["answer_start"] + len(a["text"])) for a in ex.answers]
        truth = np.array(
            [any(u.start < end and start < u.start + u.length for start, end in spans) for u in planned.units],
            dtype=np.float64,
        )
        return planned, truth

    def describe(self, planned: Planned, truth: np.ndarray) -> dict:
        """What an example's record says of its units."""
        return {"n_units": len(planned.units), "n_answer_units": int(truth.sum())}

    def measure(self, planned: Planned, truth: np.ndarray, scores: np.ndarray, seconds: float) -> dict:
        """One example's numbers for one method: AP, AR (0-100), deletion AOPC and LDS, by suppression and by
        removal."""
        aopc, removal = self.deletion(planned, scores), self.removal(planned, scores)
        lds = self.lds(planned, scores) | {"lds_masks": self.lds_masks} if self.lds_masks else {}
        return plausibility(scores, truth) | {"aopc": aopc, "aopc_removal": removal} | lds | {"seconds": seconds}

    def complete(self, numbers: dict | None) -> bool:
        """Whether a method's numbers from a records file have every metric ``measure`` gives now (a record made
        before the LDS existed, or with another number of ablations, is computed again)."""
        return numbers is not None and (not self.lds_masks or numbers.get("lds_masks") == self.lds_masks)

    def scores(self, name: str, planned: Planned, rng: np.random.Generator) -> np.ndarray:
        """``name``'s unit scores: AtMan's and ``random`` here, every other method from the one registry
        (``pipeline.peers.METHODS``: the peers and the gradient and rollout baselines)."""
        if name.startswith("atman:") and name[6:] in VARIANTS:  # estimators with fewer passes, default method
            return VARIANTS[name[6:]](self.explainer(AtManConfig(granularity=self.granularity)), planned)
        if name.startswith("atman"):
            return self.atman_scores(planned, method_config(name, self.granularity))
        if name == "random":
            return rng.random(len(planned.units))
        return peer_scores(name, self.lm, planned)  # KeyError for a name not registered: parse_methods admits none

    def explainer(self, cfg: AtManConfig) -> Explainer:
        """One Explainer per config for the whole evaluation: its support probe runs once, not per example. Every
        config computes under the evaluation's precision."""
        cfg = cfg.model_copy(update={"precision": self.precision})
        if cfg not in self._explainers:
            self._explainers[cfg] = Explainer(self.lm, cfg)
        return self._explainers[cfg]

    def atman_scores(self, planned: Planned, cfg: AtManConfig) -> np.ndarray:
        """AtMan scores of the planned (prompt) units under ``cfg``: its passes, aggregation and postprocess."""
        return self.explainer(cfg).score(planned).scores.astype(np.float64)

    # --- faithfulness -----------------------------------------------------------------------------------------

    def deletion(self, planned: Planned, scores: np.ndarray) -> float:
        """AOPC: mean CE rise (nats, whole target) with the top-k units removed from attention, k = 1..5."""
        order = np.argsort(-scores, kind="stable")
        ks = [k for k in DELETION_K if k <= len(order)]
        if not ks:
            return 0.0
        return float(self._remover().suppressed_rise(planned, [order[:k] for k in ks]).mean())

    def _remover(self) -> Explainer:
        """The explainer that removes units from attention (log_additive at factor 0, no conceptual neighbours):
        the suppression AOPC's and the LDS's."""
        return self.explainer(
            AtManConfig(mode="log_additive", factor=0.0, conceptual_threshold=None, granularity=self.granularity)
        )

    def removal(self, planned: Planned, scores: np.ndarray) -> float:
        """AOPC with the top-k units' tokens dropped from the input (k = 1..5): the neutral deletion, which uses no
        method's own machinery (the suppression deletion above is AtMan's)."""
        order = np.argsort(-scores, kind="stable")
        ks = [k for k in DELETION_K if k <= len(order)]
        if not ks:
            return 0.0
        base = self._base_ce(planned)
        return float(np.mean([self._removed_ce(planned, order[:k]) - base for k in ks]))

    def lds(self, planned: Planned, scores: np.ndarray) -> dict:
        """{"lds", "lds_removal"}: how well ``scores``, read as a linear model of the CE rise, rank the rises of the
        example's random ablations (``ablations``: the same for every method)."""
        if self._ablations[0] is not planned:
            self._ablations = (planned, self.ablations(planned))
        data = self._ablations[1]
        predicted = (1.0 - data.masks) @ scores  # the ablated units' scores
        return {"lds": spearman(predicted, data.suppressed), "lds_removal": spearman(predicted, data.removed)}

    def ablations(self, planned: Planned) -> Ablations:
        """``lds_masks`` ablations of ``planned.units`` (each kept with probability ``LDS_KEEP``; drawn from the
        evaluation's seed and the example's tokens, so a rerun draws them again) and the target's CE rise under
        each: the ablated units suppressed together (factor 0, as the deletion AOPC), and their tokens dropped."""
        ids = planned.sweep_input.input_ids
        n = len(planned.units)
        rng = np.random.default_rng([self.seed, zlib.crc32(ids.cpu().numpy().astype(np.int64).tobytes())])
        masks = (rng.random((self.lds_masks, n)) < LDS_KEEP).astype(np.float64)
        dropped = [np.flatnonzero(m == 0) for m in masks]
        suppressed = np.zeros(self.lds_masks)
        some = [i for i, d in enumerate(dropped) if d.size]
        if some:
            suppressed[some] = self._remover().suppressed_rise(planned, [dropped[i] for i in some])
        base = self._base_ce(planned)
        removed = np.array([self._removed_ce(planned, d) - base if d.size else 0.0 for d in dropped])
        return Ablations(masks, suppressed, removed)

    def _base_ce(self, planned: Planned) -> float:
        """The target's CE with nothing removed; the same example's methods share it."""
        if self._removal_base[0] is not planned:
            ids = planned.sweep_input.input_ids
            self._removal_base = (planned, self._plain_ce(ids, planned.sweep_input.n_target))
        return self._removal_base[1]

    def _removed_ce(self, planned: Planned, units, keep_positions: bool = False) -> float:
        """The target's CE with the tokens of ``units`` (indices) dropped from the input; ``keep_positions``: the
        kept tokens at their original positions (``position_ids``) instead of renumbered from 0."""
        ids = planned.sweep_input.input_ids
        drop = {p for unit in units for p in planned.units[unit].positions}
        keep = torch.tensor([i for i in range(len(ids)) if i not in drop], dtype=torch.long)
        return self._plain_ce(ids[keep], planned.sweep_input.n_target, keep if keep_positions else None)

    def _plain_ce(self, ids: torch.Tensor, n_target: int, positions: torch.Tensor | None = None) -> float:
        """Target CE (nats, summed over the target tokens) of one plain forward (``positions``: its ``position_ids``,
        default 0..): ``target_logprob``, negated."""
        ids = ids.to(self.lm.device)
        extra = {} if positions is None else {"position_ids": positions[None].to(self.lm.device)}
        with torch.no_grad():
            logits = self.lm.model(input_ids=ids[None], logits_to_keep=n_target + 1, **extra).logits
            return -float(target_logprob(logits, ids[-n_target:])[0])


@dataclass(frozen=True)
class Ablations:
    """An example's random ablations: masks [m, units] (1 = kept) and the target's CE rise (nats) under each, with
    the ablated units suppressed and with their tokens removed."""

    masks: np.ndarray
    suppressed: np.ndarray
    removed: np.ndarray


def spearman(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Spearman's rank correlation; 0 where either side is constant (a method that scores every ablation the same
    ranks none of them)."""
    if np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return 0.0
    return float(spearmanr(predicted, actual).statistic)


def target_logprob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The summed log-probability of the ``target`` tokens [t] under ``logits`` [B, t + 1, vocab], the logits of the
    sequence's last t + 1 positions (``logits_to_keep=t + 1``: a forward computes no other row of the vocabulary
    projection, which for a 262k vocabulary would be most of a small model's cost): [B]."""
    logits = logits[:, :-1].float()
    target = target[None].expand(logits.shape[0], -1)
    return torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1).sum(-1)


IG_STEPS = 20
"""Integrated gradients' steps from the zeroed prompt to the prompt (``ig``)."""
IG_BATCH = 4
"""Integrated gradients' steps per forward (and backward) call: Captum's ``internal_batch_size``."""


def gradient_scores(forward: Callable, embeds: torch.Tensor, n_prompt: int, integrated: bool,
                    steps: int = IG_STEPS) -> np.ndarray:  # fmt: skip
    """Captum's InputXGradient, or IntegratedGradients from zeroed prompt embeddings (the target's stay: the prompt
    goes from nothing to itself), of ``forward(embeds)`` ([1, n, d] -> [B]), summed over the hidden dimension: one
    score per position."""
    from captum.attr import InputXGradient, IntegratedGradients

    if integrated:
        baseline = embeds.clone()
        baseline[:, :n_prompt] = 0.0
        ig = IntegratedGradients(forward)
        attr = ig.attribute(embeds, baselines=baseline, n_steps=steps, internal_batch_size=IG_BATCH)
    else:
        attr = InputXGradient(forward).attribute(embeds.clone().requires_grad_())
    return attr.sum(-1)[0].detach().float().cpu().numpy()


def unit_sums(token_scores: np.ndarray, units) -> np.ndarray:
    """Per-position scores summed over each unit's positions (how token-level methods score units)."""
    return np.array([token_scores[list(u.positions)].sum() for u in units], dtype=np.float64)


def plausibility(scores: np.ndarray, truth: np.ndarray) -> dict:
    """AP and AR (0-100) of one method's unit scores against the units that hold the answer (``truth`` 0/1)."""
    return {"AP": 100 * average_precision(scores, truth), "AR": 100 * average_recall(scores, truth)}


def average_precision(x: np.ndarray, y: np.ndarray) -> float:
    mass = np.abs(x)
    return float((mass * y).sum() / mass.sum()) if mass.sum() > 0 else 0.0


def average_recall(x: np.ndarray, y: np.ndarray) -> float:
    mass = np.abs(x)
    if y.sum() == 0 or mass.max() == 0:
        return 0.0
    return float((mass / mass.max() * y).sum() / y.sum())


def evaluate(lm, examples: list[Example], methods: list[str], granularity: str = UNITS, seed: int = 0,
             on_example: Callable[[int, int], None] | None = None, records: str | None = None,
             precision: str = "auto", lds_masks: int = LDS_MASKS) -> dict:  # fmt: skip
    """The result, as `atman eval squad --json` prints it: n, model, methods {name: metrics}, examples [...].

    ``records``: a JSONL file that keeps every finished example (one line each, written when it finishes), so a
    run of hours that stops can go on where it stopped: an example already there with this model and units is not
    recomputed, only the methods it lacks run (a later line for the same id replaces an earlier one). A file from
    another model or other units is refused (``ValueError`` naming ``records``)."""
    ev = SquadEval(lm, granularity, seed, precision, lds_masks)
    header = {"model": lm.model_id, "granularity": granularity}
    if precision != "auto":  # records of another precision are other numbers
        header["precision"] = precision
    per_example = run_examples(ev, examples, methods, ev.scores, records, header, seed, on_example)
    results = method_results(per_example, methods)
    return {
        "n": len(examples),
        "model": lm.model_id,
        "granularity": granularity,
        "dtype": str(ev.base.dtype).removeprefix("torch."),
        "precision": ev.base.precision,  # as resolved on this machine
        "answer_share": float(np.mean([r["n_answer_units"] / max(r["n_units"], 1) for r in per_example])),
        "methods": {m: results[m].summary() for m in methods},
        "differences": map_differences(results, seed),
        "examples": per_example,
    }


def run_examples(ev, examples: list, names: list[str], score: Callable, records: str | None, header: dict,
                 seed: int = 0, on_example: Callable[[int, int], None] | None = None) -> list[dict]:  # fmt: skip
    """Every example's record ({id, **header, **ev.describe(...), methods {name: ev.measure(...)}}), each name scored by
    ``score(name, planned, rng)`` on ``ev.prepare(example)``'s units (``ev``: a ``SquadEval`` or the boxes' eval); with
    ``records``, what the file holds for this header is taken as done and each example computed here is appended to
    it as soon as it finishes."""
    kept = load_records(records, header) if records else {}
    per_example = []
    for i, ex in enumerate(examples):
        record = kept.get(ex.id) or {"id": ex.id, **header, "methods": {}}
        missing = [name for name in names if not ev.complete(record["methods"].get(name))]
        if missing:
            planned, truth = ev.prepare(ex)
            record.update(ev.describe(planned, truth))
            rng = np.random.default_rng([seed, i])
            for name in missing:
                start = time.perf_counter()
                scores = score(name, planned, rng)
                record["methods"][name] = ev.measure(planned, truth, scores, time.perf_counter() - start)
            if records:
                _append_record(records, record)
        per_example.append({**record, "methods": {name: record["methods"][name] for name in names}})
        if on_example:
            on_example(i + 1, len(examples))
    return per_example


def method_results(per_example: list[dict], names: list[str]) -> dict[str, MethodResult]:
    results = {name: MethodResult() for name in names}
    for record in per_example:
        for name in names:
            results[name].keep(record["methods"][name])
    return results


_TAIL_BLOCK = 1 << 16  # bytes read at a time when looking back for the last line of a records file


def _append_record(path: str, record: dict) -> None:
    """One finished example on a line of its own. A file that does not end in a newline ends in a record that a killed
    run left half written: that line is cut off first (or, if it does parse, ended with its newline). Only the file's
    last line is read, so appending costs the same however many records the file holds."""
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(max(end - 1, 0))
        if end and f.read(1) != b"\n":
            start = _last_line_start(f, end)
            f.seek(start)
            try:
                json.loads(f.read())
                f.write(b"\n")
            except ValueError:
                f.truncate(start)
        f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def _last_line_start(f, end: int) -> int:
    """Offset of the first byte after the last newline before ``end`` (0 if none), read backwards block by block."""
    pos = end
    while pos > 0:
        size = min(_TAIL_BLOCK, pos)
        pos -= size
        f.seek(pos)
        newline = f.read(size).rfind(b"\n")
        if newline >= 0:
            return pos + newline + 1
    return 0


def load_records(path: str, header: dict) -> dict[str, dict]:
    """The examples a records file holds ({id: record}, the last line per id), checked to be from a run with this
    ``header`` (model and units; for a sweep also its mode); a missing file holds none."""
    try:
        records = _read_records(path)
    except FileNotFoundError:
        return {}
    keys = ("model", "granularity", "sweep")
    want = tuple(header.get(k) for k in keys)
    for record in records:
        seen = tuple(record.get(k) for k in keys)
        if seen != want:
            raise ValueError(f"records: {path} holds {_run_name(seen)}, not {_run_name(want)}; give another file")
    return {record["id"]: record for record in records}


def _read_records(path: str) -> list[dict]:
    """Every record of a records file, in order. A line that is not a record ({id, model, granularity, methods {}})
    is refused (``ValueError`` naming the line), except the last one if no newline ends it: a record a killed run
    left half written (the next record appended replaces it)."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["id"], record["model"], record["granularity"], record["methods"].keys()
        except ValueError as err:  # JSONDecodeError, or UTF-8 cut inside a character
            if number == len(lines):
                continue
            raise ValueError(f"records: {path}:{number} is not an evaluation record ({err})") from None
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"records: {path}:{number} is not an evaluation record ({err!r})") from None
        records.append(record)
    return records


def forget_methods(path: str, names: list[str]) -> dict[str, int]:
    """Take ``names`` out of every record of a records file (for a sweep, setting names), so the next run with that
    file computes them again and only them (after a method's code changed); the file is rewritten whole, replacing
    the old one only once written. Returns {name: how many records held it}."""
    records = _read_records(path)
    counts = {name: sum(record["methods"].pop(name, None) is not None for record in records) for name in names}
    tmp = f"{path}.forget-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    os.replace(tmp, path)
    return counts


def _run_name(header: tuple) -> str:
    model, granularity, mode = header
    return f"{model} with {granularity} units" + (f" ({mode} sweep)" if mode else "")


def map_differences(results: dict[str, MethodResult], seed: int = 0, resamples: int = 10_000) -> dict:
    """AtMan's mAP minus every other method's, paired over the same examples, with a 95 % percentile bootstrap
    interval (scipy.stats.bootstrap over the examples): {"atman - ixg": {"mAP": d, "ci95": [lo, hi]}}. The
    reference is the first AtMan method asked for; none, or fewer than two examples, gives {}."""
    from scipy.stats import bootstrap

    reference = next((m for m in results if m.startswith("atman")), None)
    if reference is None or len(results[reference].ap) < 2:
        return {}
    base = 100 * np.asarray(results[reference].ap)
    out = {}
    for name, result in results.items():
        if name == reference:
            continue
        d = base - 100 * np.asarray(result.ap)
        if np.ptp(d) == 0:  # identical differences: the interval is the point
            lo = hi = float(d[0])
        else:
            ci = bootstrap((d,), np.mean, n_resamples=resamples, method="percentile", random_state=seed)
            lo, hi = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
        out[f"{reference} - {name}"] = {"mAP": float(d.mean()), "ci95": [lo, hi]}
    return out


def sweep(lm, examples: list[Example], mode: str, factors: list[float], kappas: list[float | None],
          granularity: str = UNITS, on_example: Callable[[int, int], None] | None = None,
          records: str | None = None, lds_masks: int = LDS_MASKS) -> dict:  # fmt: skip
    """The paper's line sweep: mAP / mAR / AOPC (and the LDS, over ``lds_masks`` ablations; 0: none) of AtMan for
    every (factor, kappa) on the same examples. ``records`` as for ``evaluate``: each example's settings are kept as
    they finish, and a rerun computes only the settings an example lacks (a grid extended later reuses what was
    done)."""
    ev = SquadEval(lm, granularity, lds_masks=lds_masks)
    configs = {
        setting_name(f, k): AtManConfig(mode=mode, factor=f, conceptual_threshold=k, granularity=granularity)
        for f in factors
        for k in kappas
    }
    header = {"model": lm.model_id, "granularity": granularity, "sweep": mode}
    score = lambda name, planned, rng: ev.atman_scores(planned, configs[name])  # noqa: E731
    per_example = run_examples(ev, examples, list(configs), score, records, header, on_example=on_example)
    results = method_results(per_example, list(configs))
    return {
        "n": len(examples),
        "model": lm.model_id,
        "mode": mode,
        "granularity": granularity,
        "grid": [
            {"factor": cfg.factor, "conceptual_threshold": cfg.conceptual_threshold, **results[name].summary()}
            for name, cfg in configs.items()
        ],
    }


def setting_name(factor: float, kappa: float | None) -> str:
    """A sweep setting's key in its records: ``factor=0.1 kappa=off``."""
    return f"factor={factor:g} kappa={'off' if kappa is None else f'{kappa:g}'}"
