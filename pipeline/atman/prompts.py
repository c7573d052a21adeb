"""From user text to token ids: chat template, explain spans, target tokens (given or generated).

Chat rule (``chat=None``): the tokenizer's chat template is used when the model has one and the prompt is a
question (its last non-space character is '?'); anything else is raw text to continue. ``chat=True`` or
``False`` decides explicitly. The decision and its reason travel with the result (``Explanation.chat``,
``chat_reason``), because an automatic template changes the scores and the user must be able to see it was applied.
Raw text is tokenized as it is, with no added special tokens. Under a chat template only the user's text is
explainable, never the template's tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch

from pipeline.atman.devices import input_device
from pipeline.atman.explanation import CHAT_AUTO_APPLIED
from pipeline.atman.request import check_prompt, check_target
from pipeline.atman.units import Span


@dataclass(frozen=True)
class PreparedPrompt:
    """prompt_ids: [p] everything before the target; token_spans: per position, its span in ``prompt`` or None."""

    prompt: str
    chat: bool
    prompt_ids: torch.Tensor
    token_spans: list[Span | None]
    chat_reason: str = ""


def context_length(model: torch.nn.Module, tokenizer) -> int | None:
    """The model's context in tokens, or None where neither config nor tokenizer states one."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "max_position_embeddings", None)
    if n is None:
        n = getattr(tokenizer, "model_max_length", None)
        n = n if n is not None and n < 10**8 else None  # the tokenizer's "unlimited" sentinel
    return n


def chat_decision(tokenizer, prompt: str, chat: bool | None) -> tuple[bool, str]:
    """Whether the chat template wraps ``prompt``, and why (an ``explicit: ...`` or ``auto: ...`` reason)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is not None and not isinstance(chat, bool):
        raise ValueError(f"chat: {chat!r} is not True, False or None (None: the template for prompts ending in '?')")
    if chat and not has_template:
        raise ValueError("chat: this tokenizer has no chat template; pass chat=False (--no-chat)")
    if chat is not None:
        return chat, f"explicit: chat={chat}"
    if not has_template:
        return False, "auto: the tokenizer has no chat template"
    if prompt.rstrip().endswith("?"):
        return True, CHAT_AUTO_APPLIED
    return False, "auto: prompt does not end in '?'"


def use_chat(tokenizer, prompt: str, chat: bool | None) -> bool:
    """``chat_decision`` without the reason."""
    return chat_decision(tokenizer, prompt, chat)[0]


def prepare_prompt(tokenizer, prompt: str, chat: bool | None) -> PreparedPrompt:
    """Tokenize ``prompt`` (through the chat template when used), mapping each token to its span in ``prompt``."""
    check_prompt(prompt)
    chat, reason = chat_decision(tokenizer, prompt, chat)
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
    ids = list(enc["input_ids"])
    if not chat:  # a template writes its own BOS; raw text gets the one the tokenizer would add
        lead = leading_special_ids(tokenizer)
        ids, spans = lead + ids, [None] * len(lead) + spans
    return PreparedPrompt(prompt, chat, torch.tensor(ids, dtype=torch.long), spans, reason)


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (Gemma's ``<bos>``; none for SmolLM2). Models trained
    with a BOS degrade badly without it, so raw prompts start with what ``tokenizer(text)`` would start with; only
    the leading ones: a trailing EOS would end the prompt before the target."""
    probe = "a"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def tokenize_target(tokenizer, target: str) -> torch.Tensor:
    check_target(target)
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


_OURS = ("input_ids", "inputs", "attention_mask")  # generate_target passes these itself


def generation_kwargs(generate: Any, default_max_new_tokens: int) -> dict:
    """``model.generate`` keyword arguments from ``explain(generate=...)``: an int (that many new tokens, greedy),
    a mapping of ``model.generate`` keyword arguments, or a ``transformers.GenerationConfig``. ``max_new_tokens``
    is always set (``default_max_new_tokens`` unless given): the target must fit the context, and a config's
    ``max_length`` would count the prompt. Greedy unless the arguments say otherwise. Raises ValueError naming
    ``generate``."""
    from transformers import GenerationConfig

    if generate is None:
        generate = default_max_new_tokens
    if isinstance(generate, Integral) and not isinstance(generate, bool):
        kwargs: dict = {"max_new_tokens": int(generate), "do_sample": False}
    elif isinstance(generate, GenerationConfig):
        config = copy.deepcopy(generate)
        kwargs = {"generation_config": config, "max_new_tokens": config.max_new_tokens or default_max_new_tokens}
        if (config.num_return_sequences or 1) != 1:
            raise ValueError("generate: num_return_sequences must be 1; one target is explained per prompt")
    elif isinstance(generate, Mapping):
        kwargs = {"do_sample": False, **generate}
        bad = sorted(k for k in kwargs if not isinstance(k, str) or k in _OURS)
        if bad:
            raise ValueError(f"generate: {', '.join(map(str, bad))} are set by the explainer; remove them")
        if "max_length" in kwargs:
            raise ValueError("generate: max_length counts the prompt too; give max_new_tokens instead")
        if kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("generate: num_return_sequences must be 1; one target is explained per prompt")
        kwargs.setdefault("max_new_tokens", default_max_new_tokens)
    else:
        raise ValueError(
            f"generate: {generate!r} is not a number of new tokens (int), a dict of model.generate keyword "
            "arguments, or a transformers.GenerationConfig"
        )
    n = kwargs["max_new_tokens"]
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise ValueError(f"generate: must be >= 1 new tokens (got max_new_tokens={n!r})")
    return kwargs


@torch.inference_mode()
def generate_target(model, tokenizer, prompt_ids: torch.Tensor, generate: int | dict, inputs: dict | None = None
                    ) -> torch.Tensor:  # fmt: skip
    """A continuation of ``prompt_ids`` (greedy unless ``generate``'s arguments sample), cut before the first EOS
    token: the target that is then explained. ``generate`` is a number of new tokens or ``generation_kwargs``'s
    result. EOS is the model's and tokenizer's unless the arguments (or their GenerationConfig) name their own
    ``eos_token_id``; a ``stop_strings`` argument gets the tokenizer it needs. ``inputs``: the model's other inputs
    for the prompt (a vision-language model's pixel values, token types, ...), on the model's device."""
    kwargs = generation_kwargs(generate, 1) if not isinstance(generate, dict) else dict(generate)
    if kwargs["max_new_tokens"] < 1:
        raise ValueError(f"generate: must be >= 1 new tokens (got {kwargs['max_new_tokens']})")
    device = input_device(model)  # a dispatched model's offloaded weights are on meta
    config = kwargs.get("generation_config")
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    eos = set(eos) if isinstance(eos, (list, tuple, set)) else ({int(eos)} if eos is not None else set())
    if not eos:
        eos = _eos_ids(model, tokenizer)
        kwargs["eos_token_id"] = sorted(eos) or None
    if kwargs.get("pad_token_id", getattr(config, "pad_token_id", None)) is None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    if kwargs.get("stop_strings", getattr(config, "stop_strings", None)):
        kwargs.setdefault("tokenizer", tokenizer)
    ids = prompt_ids[None].to(device)
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **(inputs or {}), **kwargs)
    except (ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"generate: model.generate refused the arguments: {first}") from err
    out = getattr(out, "sequences", out)[0, ids.shape[1] :].cpu()  # return_dict_in_generate gives an output object
    stop = next((i for i, t in enumerate(out.tolist()) if t in eos), len(out))
    if stop == 0:
        raise ValueError("target: the model generated EOS first, so there is no target to explain; pass a target")
    return out[:stop]
