"""Never silently wrong: a model whose attention AtMan cannot reach in every layer (or whose masks it would get
wrong) is refused with its class and the reason — from Python, `atman explain` and `atman run` — and the caller's
model is left exactly as it was found."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from pipeline import AtManConfig, Explainer, LoadedModel, UnsupportedModelError
from pipeline.atman import families

ATMAN = str(Path(sys.executable).parent / "atman")
PROMPT, TARGET = "The cat sat on the mat. The cat was happy.", " The dog"


def _lm(model, tokenizer):
    return LoadedModel(model, tokenizer, "tiny", "random")


class _OwnEagerAttention(torch.nn.Module):
    """Wraps a Llama attention module but computes attention itself, never calling the attention interface: the
    shape of a decoder layer that bypasses (or does not forward) what AtMan hands it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        a = self.inner
        shape = (*hidden_states.shape[:-1], -1, a.head_dim)
        q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        causal = torch.full((q.shape[2], q.shape[2]), torch.finfo(q.dtype).min).triu(1)[None, None]
        out, _ = eager_attention_forward(a, q, k, v, causal, scaling=a.scaling)
        return a.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), None


def test_a_layer_that_bypasses_atman_is_refused(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    model.model.layers[1].self_attn = _OwnEagerAttention(model.model.layers[1].self_attn)
    with pytest.raises(UnsupportedModelError, match=r"^model: LlamaForCausalLM: .*layers \[0x1\] of 2"):
        Explainer(_lm(model, tokenizer), AtManConfig())


def test_a_layer_run_twice_is_refused(tokenizer):
    """Shared layers (one module, one layer_idx, two calls) would break the per-layer prefix store."""
    model = tiny_model("llama", len(tokenizer))
    model.model.layers[1] = model.model.layers[0]
    with pytest.raises(UnsupportedModelError, match=r"layers \[0x2\] of 2; a layer's attention ran more than once"):
        Explainer(_lm(model, tokenizer), AtManConfig())


def test_a_family_without_its_adapter_is_refused(tokenizer, monkeypatch):
    monkeypatch.delitem(families.ADAPTERS, "GPTNeoSelfAttention")
    with pytest.raises(UnsupportedModelError, match=r"^model: GPTNeoForCausalLM: .*\[none\] of 2"):
        Explainer(_lm(tiny_model("gpt_neo", len(tokenizer)), tokenizer), AtManConfig())


def test_a_mask_other_than_causal_is_refused(tokenizer):
    """Gemma 3 with bidirectional attention (EmbeddingGemma) routes through the interface, but its mask is not
    causal: prefix reuse and batching would be wrong, so the unperturbed pass refuses it."""
    model = tiny_model("gemma3", len(tokenizer))
    model.config.use_bidirectional_attention = True
    with pytest.raises(
        UnsupportedModelError, match="^model: Gemma3ForCausalLM: attention layer 0 masks keys differently from"
    ):
        Explainer(_lm(model, tokenizer), AtManConfig())


def test_the_runtime_check_refuses_too(tokenizer):
    """A model that passes the probe and is broken afterwards still never returns scores."""
    lm = _lm(tiny_model("llama", len(tokenizer)), tokenizer)
    ex = Explainer(lm, AtManConfig())
    lm.model.model.layers[0].self_attn = _OwnEagerAttention(lm.model.model.layers[0].self_attn)
    with pytest.raises(UnsupportedModelError, match=r"layers \[1x1\] of 2"):
        ex.explain(PROMPT, TARGET, chat=False)


@pytest.mark.parametrize(("family", "implementation"), [("llama", "eager"), ("llama", "sdpa"), ("gpt_neo", "eager")])
def test_the_callers_model_is_left_as_found(tokenizer, family, implementation):
    model = tiny_model(family, len(tokenizer), attn_implementation=implementation)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(ids, output_attentions=True)
    modules = {name: dict(m.__dict__) for name, m in model.named_modules()}
    Explainer(_lm(model, tokenizer), AtManConfig(mode="multiplicative")).explain(PROMPT, TARGET, chat=False)
    assert model.config._attn_implementation == implementation
    assert {name: dict(m.__dict__) for name, m in model.named_modules()}.keys() == modules.keys()
    assert all("forward" not in m.__dict__ for m in model.modules()), "an adapter was left installed"
    after = model(ids, output_attentions=True)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    assert after.attentions is not None and all(a is not None for a in after.attentions)
    for a, b in zip(after.attentions, before.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(scope="module")
def mpt_dir(tmp_path_factory, tokenizer) -> str:
    path = tmp_path_factory.mktemp("tiny-mpt")
    tiny_model("mpt", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([ATMAN, *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def test_cli_explain_refuses_with_exit_2_naming_the_model(mpt_dir):
    out = _cli("explain", "--model", mpt_dir, "--prompt", PROMPT, "--target", TARGET, "--no-chat")
    assert out.returncode == 2, out.stderr
    stderr = " ".join(out.stderr.split())  # the console wraps long lines
    assert f"model: '{mpt_dir}' cannot be explained exactly: MptForCausalLM: suppression reached" in stderr
    assert "Traceback" not in out.stderr


@pytest.mark.cluster
@pytest.mark.parametrize("address", ["inline", "local"])
def test_atman_run_refuses_with_exit_2_before_any_row(tmp_path, mpt_dir, address):
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hello there", "target": " friend"}\n')
    (tmp_path / "job.yaml").write_text(
        f"name: refuse\nmodel: {{id: {mpt_dir}}}\ninput: {{path: in.jsonl}}\noutput: {{root: out}}\n"
    )
    out = _cli("run", "job.yaml", "--address", address, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert f"model.id: '{mpt_dir}' cannot be explained exactly: MptForCausalLM" in " ".join(out.stderr.split())
    assert not list((tmp_path / "out").rglob("*.parquet")), "no row may be written for a refused model"
