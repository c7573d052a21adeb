"""Granularity: text segments, token-to-unit mapping, merging of straddling tokens."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.atman.units import build_units, segments


def _text(text, spans):
    return [text[a:b] for a, b in spans]


def test_word_segments_split_punctuation():
    t = "Don't panic, Arthur! It's 42."
    assert _text(t, segments(t, [(0, len(t))], "word")) == ["Don't", "panic", ",", "Arthur", "!", "It's", "42", "."]


def test_sentence_and_paragraph_segments():
    t = 'He said "go." She went! Did he?\n\nNew para. Second sentence'
    assert _text(t, segments(t, [(0, len(t))], "sentence")) == [
        'He said "go."',
        "She went!",
        "Did he?",
        "New para.",
        "Second sentence",
    ]
    assert _text(t, segments(t, [(0, len(t))], "paragraph")) == [
        'He said "go." She went! Did he?',
        "New para. Second sentence",
    ]


def test_custom_delimiter_segments():
    t = "alpha | beta|gamma |"
    assert _text(t, segments(t, [(0, len(t))], "custom", "|")) == ["alpha", "beta", "gamma"]


def test_segments_stay_inside_explain_spans():
    t = "one two three four"
    assert _text(t, segments(t, [(4, 13)], "word")) == ["two", "three"]
    assert _text(t, segments(t, [(5, 11)], "word")) == ["wo", "thr"]


def test_straddling_token_merges_units():
    t = "ab cd"
    # token 0 covers "ab c" (straddles both words), token 1 covers "d"
    units = build_units(t, [(0, 4), (4, 5)], [(0, 5)], "word")
    assert [(u.text, u.positions) for u in units] == [("ab cd", (0, 1))]


def test_tokens_outside_prompt_are_never_units():
    t = "hi there"
    spans = [None, (0, 2), (2, 8), None]  # template token, "hi", " there", special token
    units = build_units(t, spans, [(0, len(t))], "token")
    assert [(u.text, u.positions) for u in units] == [("hi", (1,)), (" there", (2,))]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab .,!?\n'")), min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=39), max_size=12),
    granularity=st.sampled_from(["token", "word", "sentence", "paragraph", "custom"]),
    span=st.tuples(st.integers(0, 40), st.integers(0, 40)),
)
def test_units_are_disjoint_and_inside_the_span(text, cuts, granularity, span):
    bounds = sorted({0, len(text), *[c for c in cuts if c < len(text)]})
    token_spans = list(itertools.pairwise(bounds))
    a, b = sorted(span)
    a, b = min(a, len(text) - 1), min(max(b, a + 1), len(text))
    units = build_units(text, token_spans, [(a, b)], granularity, "," if granularity == "custom" else None)
    seen: set[int] = set()
    for u in units:
        assert u.text == text[u.start : u.start + u.length]
        assert u.positions and not seen & set(u.positions)
        seen |= set(u.positions)
        # every token of the unit overlaps the explain span
        assert all(token_spans[p][0] < b and a < token_spans[p][1] for p in u.positions)
    assert [u.start for u in units] == sorted(u.start for u in units)
