"""The result of one explanation: units with character spans, signed scores, per-target-token matrix."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from pipeline.atman.images import ImagePatch
from pipeline.atman.units import ScoredUnit, UnitSpan, top_units
from pipeline.atman.views import view

CHAT_AUTO_APPLIED = "auto: prompt ends in '?'"
"""``chat_reason`` when the automatic rule wrapped the prompt in the chat template (the case users must be told)."""

_ARRAYS = ("scores", "per_target", "target_scores", "target_per_target", "image_scores")
_FLOATS = ("base_target_ce", "base_ce_per_token")  # compared with tolerance by ``allclose``, like the arrays


@dataclass(eq=False)
class Explanation:
    """AtMan relevance of each unit of ``prompt`` for ``target``.

    ``scores[u]`` is the rise of the target's total cross-entropy (nats, summed over target tokens) when unit u
    is suppressed: positive = the unit supported the target. ``per_target[u, j]`` is the same for target token j.
    ``units`` are ``UnitSpan(text, start, length)`` named tuples in prompt order. ``base_target_ce`` is the
    unperturbed total CE; ``base_ce_per_token`` its per-token parts. ``chat`` says whether the prompt was wrapped
    in the chat template and ``chat_reason`` why (``"auto: prompt ends in '?'"``, ``"explicit: chat=False"``, ...).
    With ``AtManConfig.target_units``, ``target_units`` are the target tokens but the last (spans in ``target``)
    scored as inputs of the later target tokens: ``target_scores``, ``target_per_target`` (zero for the target
    tokens at or before the unit). With images (a vision-language model), ``images`` are their (width, height),
    ``image_units`` the ``ImagePatch`` boxes each image unit covers (original pixels, x right, y down) and
    ``image_scores`` their scores, on the same scale as the text's.

    ``save`` / ``load`` keep every field (JSON, the ``to_dict`` shape); ``==`` compares every field exactly (arrays
    by value), ``allclose`` with a tolerance on the scores and CEs. In a notebook it shows as the HTML report's
    heatmap.
    """

    prompt: str
    target: str
    target_tokens: list[str]
    base_target_ce: float
    base_ce_per_token: list[float]
    units: list[UnitSpan]
    scores: np.ndarray
    per_target: np.ndarray | None
    mode: str
    factor: float
    granularity: str
    conceptual_threshold: float | None
    chat: bool
    n_prompt_tokens: int
    params: dict = field(default_factory=dict)
    target_units: list[UnitSpan] | None = None
    target_scores: np.ndarray | None = None
    target_per_target: np.ndarray | None = None
    chat_reason: str | None = None
    images: list[tuple[int, int]] | None = None
    image_units: list[ImagePatch] | None = None
    image_scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.units = [UnitSpan(*u) for u in self.units]  # plain (text, start, length) tuples are accepted
        if self.target_units is not None:
            self.target_units = [UnitSpan(*u) for u in self.target_units]

    @property
    def chat_auto_applied(self) -> bool:
        """The chat template was applied by the automatic rule (the prompt ends in '?'), not asked for."""
        return bool(self.chat) and self.chat_reason == CHAT_AUTO_APPLIED

    def top(self, k: int | None = 5) -> list[ScoredUnit]:
        """The k units with the highest scores, highest first (ties in prompt order): ``ScoredUnit(text, start,
        length, score)`` named tuples. The same rule as the terminal and the HTML report (``top_units``)."""
        return top_units(self.units, self.scores, k)

    def to_dict(self) -> dict:
        """JSON-able, every field; the shape ``atman explain --json`` prints and ``save`` writes. ``chat`` is
        ``{"applied": bool, "reason": str}``: the automatic chat-template rule must be visible where it applied."""
        return {
            "prompt": self.prompt,
            "target": self.target,
            "target_tokens": list(self.target_tokens),
            "base_target_ce": float(self.base_target_ce),
            "base_ce_per_token": [float(x) for x in self.base_ce_per_token],
            "mode": self.mode,
            "factor": float(self.factor),
            "conceptual_threshold": self.conceptual_threshold,
            "granularity": self.granularity,
            "chat": {"applied": bool(self.chat), "reason": self.chat_reason},
            "n_prompt_tokens": int(self.n_prompt_tokens),
            "units": _units_dicts(self.units, self.scores),
            "per_target": _list(self.per_target),
            "target_units": None if self.target_units is None else _units_dicts(self.target_units, self.target_scores),
            "target_per_target": _list(self.target_per_target),
            "params": self.params,
            "images": None if self.images is None else [{"width": w, "height": h} for w, h in self.images],
            "image_units": None
            if self.image_units is None
            else [
                {"image": p.image, "box": [p.x0, p.y0, p.x1, p.y1], "view": p.view, "score": float(x)}
                for p, x in zip(self.image_units, np.asarray(self.image_scores).tolist(), strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Explanation:
        """The inverse of ``to_dict`` (also reads ``--json`` output from before ``chat`` carried its reason, and
        without ``params`` / ``target_per_target``). Arrays come back as float32, the dtype the explainer makes."""
        if not isinstance(d, dict):
            raise ValueError(f"explanation: expected a dict as to_dict() gives it, got {type(d).__name__}")
        missing = [k for k in ("prompt", "target", "target_tokens", "units", "mode", "factor") if k not in d]
        if missing:
            raise ValueError(f"explanation: missing key(s) {', '.join(missing)}; is this an Explanation.to_dict()?")
        chat = d.get("chat", False)
        applied, reason = (chat.get("applied", False), chat.get("reason")) if isinstance(chat, dict) else (chat, None)
        n_target = len(d["target_tokens"])
        units, scores = _units_from(d["units"], "units")
        target_units = target_scores = None
        if d.get("target_units") is not None:
            target_units, target_scores = _units_from(d["target_units"], "target_units")
        images = image_units = image_scores = None
        if d.get("image_units") is not None:
            try:
                images = [(int(i["width"]), int(i["height"])) for i in d.get("images") or []]
                image_units = [
                    ImagePatch(int(u["image"]), *map(float, u["box"]), str(u.get("view", ""))) for u in d["image_units"]
                ]
                image_scores = np.asarray([float(u["score"]) for u in d["image_units"]], dtype=np.float32)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"image_units: each needs image, box [x0, y0, x1, y1] and score ({err!r})") from None
        return cls(
            prompt=d["prompt"],
            target=d["target"],
            target_tokens=list(d["target_tokens"]),
            base_target_ce=float(d.get("base_target_ce", math.nan)),
            base_ce_per_token=[float(x) for x in d.get("base_ce_per_token", [])],
            units=units,
            scores=scores,
            per_target=_array(d.get("per_target"), (len(units), n_target)),
            mode=d["mode"],
            factor=float(d["factor"]),
            granularity=d.get("granularity", "token"),
            conceptual_threshold=d.get("conceptual_threshold"),
            chat=bool(applied),
            chat_reason=reason,
            n_prompt_tokens=int(d.get("n_prompt_tokens", 0)),
            params=dict(d.get("params") or {}),
            target_units=target_units,
            target_scores=target_scores,
            target_per_target=_array(d.get("target_per_target"), (len(target_units or []), n_target)),
            images=images,
            image_units=image_units,
            image_scores=image_scores,
        )

    def save(self, path: str | Path) -> Path:
        """Write this explanation as JSON (``to_dict``) to ``path``; ``Explanation.load(path)`` reads it back equal."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Explanation:
        """An explanation written by ``save`` (or printed by ``atman explain --json``)."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def __eq__(self, other: object) -> bool:
        """Every field equal; arrays by shape and value (NaN equals NaN), not by identity."""
        if not isinstance(other, Explanation):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    __hash__ = None  # mutable, compared by value

    def allclose(self, other: Explanation, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
        """Equal up to floating-point noise: the same prompt, target, units and settings, and scores, per-target
        matrices and CEs within ``np.allclose(rtol, atol)`` (e.g. another device or batch size)."""
        if not isinstance(other, Explanation):
            raise TypeError(f"other: expected an Explanation, got {type(other).__name__}")
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in _ARRAYS or f.name in _FLOATS:
                if (a is None) != (b is None):
                    return False
                if a is not None:
                    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
                    if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
                        return False
            elif not _same(a, b):
                return False
        return True

    def show(self, console=None, top_k: int = 5) -> None:
        """Terminal heatmap: the prompt with each unit coloured by score (red supports, blue opposes)."""
        view("terminal")(self, console=console, top_k=top_k)

    def _repr_html_(self) -> str:
        """Notebooks (Jupyter, VS Code) show the HTML report's heatmap and top units."""
        return view("html")(self)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if a is None or b is None:
            return False
        a, b = np.asarray(a), np.asarray(b)
        nan_ok = a.dtype.kind == "f" and b.dtype.kind == "f"
        return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=nan_ok))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _list(x: np.ndarray | None) -> list | None:
    return None if x is None else np.asarray(x).astype(float).tolist()


def _units_dicts(units: list[UnitSpan], scores) -> list[dict]:
    return [
        {"text": t, "start": s, "length": n, "score": float(x)}
        for (t, s, n), x in zip(units, np.asarray(scores).tolist(), strict=True)
    ]


def _units_from(items: list[dict], key: str) -> tuple[list[UnitSpan], np.ndarray]:
    try:
        units = [UnitSpan(str(u["text"]), int(u["start"]), int(u["length"])) for u in items]
        scores = np.asarray([float(u["score"]) for u in items], dtype=np.float32)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{key}: each unit needs text, start, length and score ({err!r})") from None
    return units, scores


def _array(x, shape: tuple[int, int]) -> np.ndarray | None:
    """float32 with its 2-D shape even when empty (JSON turns a [0, T] or [U, 0] matrix into [] or [[], ...])."""
    return None if x is None else np.asarray(x, dtype=np.float32).reshape(shape)
