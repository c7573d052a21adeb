"""Tiny random causal LMs (2 layers, d=64) of every family we claim, built offline from transformers configs.

``ARCHITECTURES`` is the coverage table: family name -> (config class, model class, config arguments, note).
tests/test_families.py runs each against an independent oracle and writes README's support table from it.
"""

from __future__ import annotations

import torch
import transformers

# a larger init than the default 0.02, so attention is peaked and suppression moves the CE measurably
INIT = 0.25
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    initializer_range=INIT,
)
_GQA = dict(_COMMON, num_key_value_heads=2)
_FALCON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, initializer_range=INIT,
               max_position_embeddings=512)  # fmt: skip

ARCHITECTURES: dict[str, tuple[str, str, dict, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GQA, "grouped-query attention, RoPE"),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            _GQA,
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=1,
            layer_types=["full_attention", "sliding_attention"],
        ),
        "q/k/v biases, a sliding-window layer",
    ),  # fmt: skip
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=16), "QK-norm"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_GQA, sliding_window=5), "sliding window on every layer"),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
        "mixture of experts",
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_GQA, pad_token_id=0), "fused qkv, partial RoPE factor 1"),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            _GQA,
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=5.0,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "attention logit soft-capping, sliding + global layers",
    ),  # fmt: skip
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            _COMMON,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "sliding + global layers, QK-norm",
    ),  # fmt: skip
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, initializer_range=INIT, bos_token_id=0, eos_token_id=0),
        "learned absolute positions",
    ),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512, initializer_range=INIT),
        "parallel attention + MLP, partial rotary (the AtMan authors' model)",
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=5,
            max_position_embeddings=512,
            initializer_range=INIT,
        ),
        "global + local layers, unscaled scores",
    ),  # fmt: skip
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(_COMMON, rotary_pct=0.25),
        "parallel residual, partial rotary",
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=512,
            init_std=INIT,
        ),
        "learned positions with offset 2",
    ),  # fmt: skip
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(hidden_size=64, n_layer=2, n_head=4, initializer_range=INIT),
        "ALiBi, fused qkv, residual inside attention",
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(_FALCON, multi_query=True, parallel_attn=True),
        "Falcon-7B layout: multi-query, rotary, parallel attention",
    ),  # fmt: skip
    "falcon_new": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(_FALCON, num_kv_heads=2, new_decoder_architecture=True),
        "Falcon-40B layout: new decoder architecture, grouped kv, rotary",
    ),  # fmt: skip
    "falcon_alibi": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(_FALCON, alibi=True, multi_query=False, parallel_attn=False, bias=True),
        "Falcon-RW layout: ALiBi, multi-head, sequential",
    ),  # fmt: skip
    "stablelm": (
        "StableLmConfig",
        "StableLmForCausalLM",
        dict(_GQA, partial_rotary_factor=0.25, qk_layernorm=True, use_parallel_residual=True),
        "partial rotary, per-head QK layer norm; its decoder layer drops extra kwargs",
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _GQA, "QK-norm, post-norm"),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_GQA, logit_scale=1.0), "parallel block, interleaved RoPE"),
}

REFUSED: dict[str, tuple[str, str, dict, str]] = {
    "mpt": (
        "MptConfig",
        "MptForCausalLM",
        dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=512, initializer_range=INIT),
        "ALiBi in its own attention module, no adapter",
    ),
    "xglm": (
        "XGLMConfig",
        "XGLMForCausalLM",
        dict(d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, init_std=INIT),
        "own attention module, no adapter",
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            _GQA,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "attention sinks",
    ),  # fmt: skip
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(hidden_size=64, num_hidden_layers=2), "no attention layers"),
}
"""Families built tiny that AtMan refuses, with why; tests/test_families.py checks each refusal."""

FAMILIES = ("llama", "qwen2", "gpt2", "gemma3")
"""The families the full engine-vs-reference grid runs on (tests/test_engine_equivalence.py)."""


def tiny_model(family: str, vocab_size: int, seed: int = 0, attn_implementation: str | None = None) -> torch.nn.Module:
    table = {**ARCHITECTURES, **REFUSED}
    if family not in table:
        raise ValueError(f"family: {family!r} is not one of {', '.join(table)}")
    config_cls, model_cls, kwargs, _ = table[family]
    config = getattr(transformers, config_cls)(vocab_size=vocab_size, **kwargs)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()
