"""Tiny random causal LMs (2 layers, d=64) of the families the engine claims, built offline from configs."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = ("llama", "qwen2", "gpt2", "gemma3")
# a larger init than the default 0.02, so attention is peaked and suppression moves the CE measurably
INIT = 0.25


def tiny_model(family: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        initializer_range=INIT,
    )
    if family == "llama":  # grouped-query attention, RoPE
        config, cls = LlamaConfig(num_key_value_heads=2, **common), LlamaForCausalLM
    elif family == "qwen2":  # q/k/v biases, sliding window on the upper layer
        config = Qwen2Config(
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=1,
            layer_types=["full_attention", "sliding_attention"],
            **common,
        )
        cls = Qwen2ForCausalLM
    elif family == "gpt2":  # learned absolute positions, multi-head attention
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            initializer_range=INIT,
            bos_token_id=0,
            eos_token_id=0,
        )
        cls = GPT2LMHeadModel
    elif family == "gemma3":  # sliding-window + global layers, QK-norm, query_pre_attn_scalar
        config = Gemma3TextConfig(
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
            **common,
        )
        cls = Gemma3ForCausalLM
    else:
        raise ValueError(f"family: {family!r} is not one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    return cls(config).eval()
