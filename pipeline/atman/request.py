"""What one explanation is asked for: the prompt, what to explain of it, and how the target comes about.

The Python API (``Explainer.explain`` / ``plan`` / ``explain_batch``), ``atman explain`` and a job's worker all
describe an explanation with these same inputs; they build one ``ExplainRequest`` and hand it over, so the list of
inputs is written here once. The Explainer's keyword arguments still work: they build the same object. Light on
purpose (no torch): the CLI and the worker build requests before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any

from pipeline.atman.units import Span, normalize_spans

if TYPE_CHECKING:
    from transformers import GenerationConfig


@dataclass(frozen=True)
class ExplainRequest:
    """One explanation's inputs, as ``Explainer.explain`` documents them (its keyword arguments are these fields).

    prompt: the text whose units are scored. target: the text to explain; None: the model generates one.
    generate: how to generate the target (an int of new tokens, ``model.generate`` keyword arguments or a
    ``GenerationConfig``). explain_span: the prompt's character range(s) to explain (default all of it). chat: wrap
    the prompt in the chat template (None: the '?' rule). images: PIL images, paths or bytes shown before the
    prompt (vision-language models). image_grid: ROWS x COLS cells per image (``(8, 8)`` or ``"8x8"``; default
    the config's). Values are checked where they are used (``Explainer.plan``), with messages naming the field.
    """

    prompt: str
    target: str | None = None
    _: KW_ONLY
    generate: int | Mapping[str, Any] | GenerationConfig | None = None
    explain_span: Span | list[Span] | list[int] | None = None
    chat: bool | None = None
    images: Sequence[Any] | None = None
    image_grid: tuple[int, int] | str | None = None

    @classmethod
    def of(cls, prompt: str | ExplainRequest, target: str | None = None, **inputs: Any) -> ExplainRequest:
        """The request the Explainer's arguments describe: ``prompt`` itself when it is a request (then every
        other argument must be left out), else a request of ``prompt``, ``target`` and ``inputs``."""
        if not isinstance(prompt, ExplainRequest):
            return cls(prompt, target, **inputs)
        given = [name for name, value in {"target": target, **inputs}.items() if value is not None]
        if given:
            raise TypeError(
                f"{given[0]}: given next to an ExplainRequest; set it in the request instead "
                f"(dataclasses.replace(request, {given[0]}=...))"
            )
        return prompt

    def check(self) -> None:
        """The checks that need no model (the prompt, the target, the explain span), so that a bad request fails
        before a model loads; ValueErrors naming the field, as ``Explainer.plan`` raises them (it checks the rest)."""
        check_prompt(self.prompt)
        if self.target is not None:
            check_target(self.target)
        if self.explain_span is not None:
            normalize_spans(self.prompt, self.explain_span)


def check_prompt(prompt: Any) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: must be a non-empty string")


def check_target(target: Any) -> None:
    if not isinstance(target, str) or not target:
        raise ValueError("target: must be a non-empty string (or leave it out to generate one)")
