"""Units of explanation: groups of token positions suppressed together, with their character spans.

A unit is built from text segments (a word, a sentence, ...) of the prompt; its tokens are those whose
character span overlaps the segment. A token that straddles two segments merges them into one unit,
so every token belongs to at most one unit and each unit is one suppression pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, NamedTuple

from pipeline.atman.config import Granularity

Span = tuple[int, int]  # [start, end) character range

_WORD = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]+")
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]\u201d\u2019]))\s+|\n\s*\n")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Unit:
    """One explained unit: its text, character span in the prompt, and token positions in the sequence."""

    text: str
    start: int
    length: int
    positions: tuple[int, ...]


class UnitSpan(NamedTuple):
    """An explained unit as ``Explanation.units`` reports it: its text and character span in the prompt. A named
    tuple, so ``text, start, length = unit`` and ``unit[0]`` keep working where callers unpack plain tuples."""

    text: str
    start: int
    length: int

    @property
    def end(self) -> int:
        """One past the last character: ``prompt[unit.start : unit.end] == unit.text``."""
        return self.start + self.length


class ScoredUnit(NamedTuple):
    """A unit with its score, as ``Explanation.top`` and every top-k list (terminal, report, notebook) give it."""

    text: str
    start: int
    length: int
    score: float

    @property
    def end(self) -> int:
        return self.start + self.length


def top_units(units: Sequence[Sequence], scores: Sequence[float], k: int | None = 5) -> list[ScoredUnit]:
    """The ``k`` highest-scoring units (all with ``k=None``), highest first; ties keep prompt order and NaN scores
    come last. ``units`` are (text, start, length) items in prompt order and ``scores`` one float per unit: the one
    top-k rule of ``Explanation.top``, the terminal rows and the HTML report, so they never disagree."""
    if len(units) != len(scores):
        raise ValueError(f"scores: {len(scores)} scores for {len(units)} units; give one score per unit")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise ValueError(f"k: {k!r} is not a number of units >= 0 (or None for all of them)")
    values = [float(x) for x in scores]
    return [ScoredUnit(str(units[i][0]), int(units[i][1]), int(units[i][2]), values[i]) for i in top_order(values, k)]


def top_order(scores: Sequence[float], k: int | None = None) -> list[int]:
    """Indices of the ``k`` highest scores (all with ``k=None``), highest first, ties in order, NaN last: the rule
    of ``top_units``, for units without text (image units)."""
    values = [float(x) for x in scores]
    nan = [math.isnan(x) for x in values]
    return sorted(range(len(values)), key=lambda i: (nan[i], 0.0 if nan[i] else -values[i]))[:k]


def _split(text: str, span: Span, breaks: re.Pattern[str]) -> list[Span]:
    start, end = span
    out, pos = [], start
    for match in breaks.finditer(text, start, end):
        out.append((pos, match.start()))
        pos = match.end()
    out.append((pos, end))
    return out


def _strip(text: str, span: Span) -> Span | None:
    start, end = span
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def segments(text: str, spans: list[Span], granularity: Granularity, delimiter: str | None = None) -> list[Span]:
    """Character spans of the units inside ``spans`` (token granularity is handled by ``build_units``)."""
    out: list[Span] = []
    for span in spans:
        if granularity == "word":
            pieces = [m.span() for m in _WORD.finditer(text, *span)]
        elif granularity == "sentence":
            pieces = _split(text, span, _SENTENCE_BREAK)
        elif granularity == "paragraph":
            pieces = _split(text, span, _PARAGRAPH_BREAK)
        elif granularity == "custom":
            pieces = _split(text, span, re.compile(re.escape(delimiter or "")))
        else:
            raise ValueError(f"granularity: {granularity!r} has no text segments")
        out.extend(s for s in (_strip(text, p) for p in pieces) if s is not None)
    return out


def _overlaps(a: Span, b: Span) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def build_units(
    text: str,
    token_spans: list[Span | None],
    explain_spans: list[Span],
    granularity: Granularity,
    delimiter: str | None = None,
) -> list[Unit]:
    """Group token positions into units.

    Args:
        text: the user's prompt; all spans are character offsets into it.
        token_spans: per sequence position, the token's span in ``text``, or None for tokens outside the prompt
            (chat template, special tokens, target). Only these positions can ever be suppressed.
        explain_spans: the character ranges to explain; tokens outside them are never perturbed.
    """
    eligible = [
        (pos, span)
        for pos, span in enumerate(token_spans)
        if span is not None and span[0] < span[1] and any(_overlaps(span, e) for e in explain_spans)
    ]
    if granularity == "token":
        units = []
        for pos, (a, b) in eligible:
            # clip to the explain span the token overlaps, so reported spans never leave it
            e = next(e for e in explain_spans if _overlaps((a, b), e))
            a, b = max(a, e[0]), min(b, e[1])
            units.append(Unit(text[a:b], a, b - a, (pos,)))
        return units

    groups: list[tuple[Span, set[int]]] = []  # merged segment span, token positions
    for seg in segments(text, explain_spans, granularity, delimiter):
        positions = {pos for pos, span in eligible if _overlaps(span, seg)}
        if not positions:
            continue
        if groups and groups[-1][1] & positions:  # a token straddles both segments: one unit
            (a, _), prev = groups[-1]
            groups[-1] = ((a, seg[1]), prev | positions)
        else:
            groups.append((seg, positions))
    return [Unit(text[a:b], a, b - a, tuple(sorted(p))) for (a, b), p in groups]


def _is_pair(span: Any) -> bool:
    return (
        isinstance(span, (tuple, list))
        and len(span) == 2
        and all(isinstance(x, Integral) and not isinstance(x, bool) for x in span)
    )


def normalize_spans(prompt: str, explain_span: Span | list[Span] | None) -> list[Span]:
    """Validated, sorted list of [start, end) character ranges; default the whole prompt.

    Accepts what JSON gives as well as what Python code writes: one pair as a tuple or a list (``[3, 9]``), or a
    list (or tuple) of such pairs. Overlapping ranges are merged, so no token can fall into two units."""
    if explain_span is None:
        return [(0, len(prompt))]
    if _is_pair(explain_span):
        spans = [explain_span]
    elif isinstance(explain_span, (tuple, list)):
        spans = list(explain_span)
    else:
        raise ValueError(f"explain_span: {explain_span!r} is not a (start, end) pair or a list of them")
    if not spans:
        raise ValueError("explain_span: an empty list explains nothing; leave it out (None) to explain all the prompt")
    out: list[Span] = []
    for span in spans:
        if not _is_pair(span):
            raise ValueError(f"explain_span: {span!r} is not a (start, end) pair of character offsets")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= len(prompt):
            raise ValueError(
                f"explain_span: ({start}, {end}) is outside the prompt; use 0 <= start < end <= {len(prompt)}"
            )
        out.append((start, end))
    merged: list[Span] = []
    for start, end in sorted(out):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
