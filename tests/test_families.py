"""Coverage: every family we claim equals an independent oracle (tests/oracle.py) to 1e-4 in all three modes, with
word units, prefix reuse and batching across prompts; every family we refuse is refused with a message.

README's support table is rendered from this file's tables (``python tests/test_families.py --write``) and a test
checks that README carries exactly that rendering, so the two cannot drift apart.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import mask4d_scores, oracle_scores, unit_multipliers
from tiny_models import ARCHITECTURES, REFUSED, tiny_model

from pipeline import AtManConfig, Explainer, LoadedModel, UnsupportedModelError

TOL = 1e-4
MODES = ("multiplicative", "log_additive", "scale")
PROMPTS = [
    "The cat sat on the mat. The cat was happy, and the dog was not happy at all.",
    "Alice gave Bob a book. Bob thanked Alice!",
    "Is water wet? Some say yes.",
]
TARGETS = [" The cat", " Alice smiled.", " No"]

ORACLE_ATTENTION = {"falcon_alibi": "sdpa"}
"""The implementation the oracle's untouched copy runs (default: eager). Falcon's eager ALiBi path in transformers
5.x adds the ALiBi bias twice (once in the scores, once in the mask it builds), so it disagrees with the model's
own SDPA path, the default; AtMan follows the SDPA path (bias added once, as in Falcon-RW)."""
MASK4D = {"llama", "qwen3", "mixtral", "phi3", "gpt2", "gptj", "gpt_neo", "gpt_neox", "falcon", "falcon_new",
          "stablelm", "olmo2", "cohere"}  # fmt: skip
"""Families whose forward accepts a 4D additive float mask as it is, where log_additive is also checked through
that plainer oracle. The others build their own masks (sliding windows), positions (OPT) or ALiBi (Bloom,
Falcon-RW) from a 2D mask."""
ROUTE = {"gpt_neo": "adapter", "bloom": "adapter", "falcon": "adapter", "falcon_new": "adapter",
         "falcon_alibi": "adapter"}  # fmt: skip
REFUSAL = {
    "mpt": r"MptForCausalLM: suppression reached attention layers \[none\] of 2",
    "xglm": r"XGLMForCausalLM: suppression reached attention layers \[none\] of 2",
    "gpt_oss": r"GptOssForCausalLM: AtMan cannot suppress attention with attention sinks",
    "mamba": r"MambaForCausalLM: suppression reached attention layers \[none\] of 2",
}


@pytest.fixture(scope="module")
def explained(tokenizer):
    """Per family: the engine's explanations in each mode (explain_batch: rows of 3 prompts share passes)."""
    cache = {}

    def get(family):
        if family not in cache:
            lm = LoadedModel(tiny_model(family, len(tokenizer)), tokenizer, f"tiny-{family}", "random")
            cache[family] = {
                mode: Explainer(lm, AtManConfig(mode=mode, granularity="word", batch_size=7)).explain_batch(
                    PROMPTS, TARGETS, chat=False
                )
                for mode in MODES
            }
        return cache[family]

    return get


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_family_equals_independent_oracle(family, explained, tokenizer):
    oracle_model = tiny_model(family, len(tokenizer), attn_implementation=ORACLE_ATTENTION.get(family, "eager"))
    worst = 0.0
    for mode, explanations in explained(family).items():
        for prompt, target, e in zip(PROMPTS, TARGETS, explanations, strict=True):
            target_ids = torch.tensor(tokenizer(target, add_special_tokens=False)["input_ids"])
            prompt_ids, mult = unit_multipliers(tokenizer, prompt, e.units, len(target_ids), e.factor)
            ids = torch.cat([prompt_ids, target_ids])
            assert e.n_prompt_tokens == len(prompt_ids)
            expected = oracle_scores(oracle_model, ids, mult, len(target_ids), mode)
            assert np.abs(expected).max() > 1e-2, "suppression must move the target CE for the check to mean anything"
            np.testing.assert_allclose(e.scores, expected, rtol=0, atol=TOL, err_msg=f"{family} {mode}")
            worst = max(worst, float(np.abs(e.scores - expected).max()))
            if mode == "log_additive" and family in MASK4D:
                plain = mask4d_scores(oracle_model, ids, mult, len(target_ids))
                np.testing.assert_allclose(e.scores, plain, rtol=0, atol=TOL, err_msg=f"{family} 4D mask")
    print(f"{family}: max |engine - oracle| = {worst:.1e}")


@pytest.mark.parametrize("family", REFUSED)
def test_family_is_refused_with_the_reason(family, tokenizer):
    lm = LoadedModel(tiny_model(family, len(tokenizer)), tokenizer, f"tiny-{family}", "random")
    with pytest.raises(UnsupportedModelError, match=f"^model: {REFUSAL[family]}"):
        Explainer(lm, AtManConfig())


def _attention_modules(model, name):
    return [m for m in model.modules() if type(m).__name__ == name]


def _wrong_qkv(model):
    for m in _attention_modules(model, "FalconAttention"):
        m.query_key_value = torch.nn.Linear(64, 7)


def _no_projection(model):
    for m in _attention_modules(model, "BloomAttention"):
        del m.query_key_value


def _no_config_field(model):
    del model.config.attention_layers  # GPT-Neo's per-layer global / local list


PROBE_REFUSALS = {
    "falcon_new": (
        _wrong_qkv,
        r"FalconAttention \(transformers .*\) .*: query_key_value with 128 outputs \(it has 7\)",
    ),
    "bloom": (_no_projection, r"BloomAttention \(transformers .*\) .*: a linear projection query_key_value"),
    "gpt_neo": (_no_config_field, r"GPTNeoSelfAttention \(transformers .*\) .*: config\.attention_layers"),
}


@pytest.mark.parametrize("family", PROBE_REFUSALS)
def test_adapter_probe_refuses_a_module_that_changed_shape(family, tokenizer):
    """A family module that lacks what its adapter reads (a projection, a config field) or whose projection does not
    match its config is refused at the probe, naming the class and what is missing, with nothing left installed."""
    model = tiny_model(family, len(tokenizer))
    change, message = PROBE_REFUSALS[family]
    change(model)
    lm = LoadedModel(model, tokenizer, f"tiny-{family}", "random")
    with pytest.raises(UnsupportedModelError, match=f"^model: {REFUSED_CLASS[family]}: {message}"):
        Explainer(lm, AtManConfig())
    assert not any("forward" in vars(m) for m in model.modules()), "a refused model is left as it was"


REFUSED_CLASS = {"falcon_new": "FalconForCausalLM", "bloom": "BloomForCausalLM", "gpt_neo": "GPTNeoForCausalLM"}


def test_adapter_refuses_a_missing_family_function(tokenizer, monkeypatch):
    model = tiny_model("falcon", len(tokenizer))
    monkeypatch.delattr(sys.modules[type(model).__module__], "apply_rotary_pos_emb")
    lm = LoadedModel(model, tokenizer, "tiny-falcon", "random")
    with pytest.raises(UnsupportedModelError, match=r"FalconAttention .*the function apply_rotary_pos_emb in "):
        Explainer(lm, AtManConfig())


def test_a_call_that_changed_shape_is_a_refusal_not_a_traceback(tokenizer, monkeypatch):
    """transformers passes the attention module other arguments than the adapter expects (the rotary embeddings
    gone, say): the pass refuses naming the class; an AttributeError never escapes the engine."""
    from pipeline.atman import families

    probe, _ = families.ADAPTERS["FalconAttention"]

    def changed(layer, ctx, hidden_states, *args, **kwargs):
        return families._falcon(layer, ctx, hidden_states, position_embeddings=None)

    monkeypatch.setitem(families.ADAPTERS, "FalconAttention", (probe, changed))
    lm = LoadedModel(tiny_model("falcon", len(tokenizer)), tokenizer, "tiny-falcon", "random")
    with pytest.raises(
        UnsupportedModelError, match=r"^model: FalconForCausalLM: FalconAttention .*position_embeddings"
    ):
        Explainer(lm, AtManConfig())


def render_table() -> str:
    """The support table README shows, rendered from this file's tables."""
    lines = [
        "| family | transformers class | what it exercises | route | checked against |",
        "|---|---|---|---|---|",
    ]
    for family, (_, model_cls, _, note) in ARCHITECTURES.items():
        impl = ORACLE_ATTENTION.get(family, "eager")
        check = f"oracle on the model's own {impl} attention, 3 modes"
        if family in MASK4D:
            check += "; 4D-mask oracle (log_additive)"
        lines.append(f"| {family} | `{model_cls}` | {note} | {ROUTE.get(family, 'attention interface')} | {check} |")
    for family, (_, model_cls, _, note) in REFUSED.items():
        lines.append(f"| {family} | `{model_cls}` | {note} | **refused** | `{REFUSAL[family].replace(chr(92), '')}` |")
    return "\n".join(lines)


README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- support-table:begin -->", "<!-- support-table:end -->"


def test_readme_support_table_is_generated_from_this_test():
    text = README.read_text()
    block = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    assert block, f"README.md lacks the {BEGIN} ... {END} block"
    assert block.group(1) == render_table(), "README's support table drifted: run python tests/test_families.py --write"


if __name__ == "__main__" and "--write" in sys.argv:
    text = README.read_text()
    new = re.sub(
        re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: f"{BEGIN}\n{render_table()}\n{END}", text, flags=re.S
    )
    README.write_text(new)
