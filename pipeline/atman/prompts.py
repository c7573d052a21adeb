"""From user text to token ids: chat template, explain spans, target tokens (given or generated).

Chat rule (``chat=None``): the tokenizer's chat template is used when the model has one and the prompt is a
question (its last non-space character is '?'); anything else is raw text to continue. ``chat=True`` or
``False`` decides explicitly. Raw text is tokenized as it is, with no added special tokens. Under a chat
template only the user's text is explainable, never the template's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.atman.units import Span


@dataclass(frozen=True)
class PreparedPrompt:
    """prompt_ids: [p] everything before the target; token_spans: per position, its span in ``prompt`` or None."""

    prompt: str
    chat: bool
    prompt_ids: torch.Tensor
    token_spans: list[Span | None]


def context_length(model: torch.nn.Module, tokenizer) -> int | None:
    """The model's context in tokens, or None where neither config nor tokenizer states one."""
    n = getattr(model.config, "max_position_embeddings", None)
    if n is None:
        n = getattr(tokenizer, "model_max_length", None)
        n = n if n is not None and n < 10**8 else None  # the tokenizer's "unlimited" sentinel
    return n


def normalize_spans(prompt: str, explain_span: Span | list[Span] | None) -> list[Span]:
    """Validated list of [start, end) character ranges; default the whole prompt."""
    if explain_span is None:
        return [(0, len(prompt))]
    spans = [explain_span] if isinstance(explain_span, tuple) else list(explain_span)
    out = []
    for span in spans:
        if not (isinstance(span, (tuple, list)) and len(span) == 2 and all(isinstance(x, int) for x in span)):
            raise ValueError(f"explain_span: {span!r} is not a (start, end) pair of character offsets")
        start, end = span
        if not 0 <= start < end <= len(prompt):
            raise ValueError(
                f"explain_span: ({start}, {end}) is outside the prompt; use 0 <= start < end <= {len(prompt)}"
            )
        out.append((start, end))
    return sorted(out)


def use_chat(tokenizer, prompt: str, chat: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("chat: this tokenizer has no chat template; pass chat=False (--no-chat)")
    if chat is None:
        return has_template and prompt.rstrip().endswith("?")
    return chat


def prepare_prompt(tokenizer, prompt: str, chat: bool | None) -> PreparedPrompt:
    """Tokenize ``prompt`` (through the chat template when used), mapping each token to its span in ``prompt``."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: must be a non-empty string")
    chat = use_chat(tokenizer, prompt, chat)
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        offset = text.rfind(prompt)
        if offset < 0:
            raise ValueError(
                "chat: the chat template rewrites the prompt text, so units cannot be located; use chat=False"
            )
    else:
        text, offset = prompt, 0
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans: list[Span | None] = []
    for a, b in enc["offset_mapping"]:
        a, b = max(a, offset) - offset, min(b, offset + len(prompt)) - offset
        spans.append((a, b) if a < b else None)
    return PreparedPrompt(prompt, chat, torch.tensor(enc["input_ids"], dtype=torch.long), spans)


def tokenize_target(tokenizer, target: str) -> torch.Tensor:
    if not isinstance(target, str) or not target:
        raise ValueError("target: must be a non-empty string (or leave it out to generate one)")
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target: {target!r} encodes to no tokens")
    return torch.tensor(ids, dtype=torch.long)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return ids


@torch.inference_mode()
def generate_target(model, tokenizer, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation of ``prompt_ids``, stopped before the first EOS token."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: must be >= 1 new tokens (got {max_new_tokens})")
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    ids = prompt_ids[None].to(device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(eos) or None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0),
    )[0, ids.shape[1] :].cpu()
    stop = next((i for i, t in enumerate(out.tolist()) if t in eos), len(out))
    if stop == 0:
        raise ValueError("target: the model generated EOS first, so there is no target to explain; pass a target")
    return out[:stop]
