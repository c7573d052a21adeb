"""The AttnLRP peer (pipeline/peers/attnlrp.py, lxt 2.1): an exact decomposition checked by hand, conservation, and
no trace of lxt's patches on the shared model or on the other methods afterwards."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import first_sentence, missing_tool
from tiny_models import tiny_model

from pipeline import LoadedModel
from pipeline.data import SQUAD_DEV
from pipeline.evaluate import Example, SquadEval, evaluate, load_squad
from pipeline.peers import attnlrp, peer_scores

EXAMPLE = Example(
    "e1",
    "The Eiffel Tower is in Paris. It was finished in 1889 and is made of iron.",
    "When was the Eiffel Tower finished?",
    [{"text": "1889", "answer_start": 49}],
)


@pytest.fixture(scope="module", autouse=True)
def lxt_installed():
    try:
        attnlrp._lxt_modules()
    except attnlrp.AttnLRPUnavailable as err:
        missing_tool(str(err), f".venv/bin/pip install --no-deps lxt=={attnlrp.LXT_VERSION}")


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def case(tiny_lms, request):
    """A tiny model of each family lxt has rules for (the two embedded models' architectures)."""
    lm = tiny_lms[request.param]
    planned, _ = SquadEval(lm).prepare(EXAMPLE)
    return lm, planned


def target_logits(model, ids: torch.Tensor, n_target: int) -> np.ndarray:
    """Each target token's logit at the position that predicts it: one plain forward."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, -n_target - 1 : -1]
    return logits.gather(-1, ids[-n_target:, None])[:, 0].double().numpy()


def test_shape_through_the_peer_registry(case):
    lm, planned = case
    scores = peer_scores("attnlrp", lm, planned)
    assert scores.shape == (len(planned.units),) and scores.dtype == np.float64 and np.isfinite(scores).all()
    assert len(planned.units) > 5 and np.abs(scores).max() > 0
    relevance, _ = attnlrp.token_relevance(lm, planned)
    expected = [relevance[list(u.positions)].sum() for u in planned.units]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_exact_decomposition_without_attention(case):
    """With every attention output zeroed (o_proj = 0) a position's logits depend on its own token only, and
    AttnLRP (identity rule on RMSNorm and SiLU, uniform rule on the gate product, linear layers without bias) is
    exactly conservative: each target token's logit lands, whole, on the token that predicts it, and nothing
    anywhere else. Plain Input x Gradient gives ~0 there (RMSNorm is scale-invariant); an off-by-one target, a
    wrong sign or a missing rule breaks the equality."""
    lm, planned = case
    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    ids, n_target = planned.sweep_input.input_ids, planned.sweep_input.n_target
    n = len(ids)
    per_token = target_logits(model, ids, n_target)
    assert (per_token > 0.1).any() and (per_token < -0.1).any()  # a sign test bites
    relevance, explained = attnlrp.token_relevance(LoadedModel(model, lm.tokenizer, "tiny-no-attn", "random"), planned)
    np.testing.assert_allclose(relevance[n - n_target - 1 : n - 1], per_token, rtol=1e-4, atol=1e-5)
    others = np.r_[relevance[: n - n_target - 1], relevance[n - 1 :]]
    np.testing.assert_allclose(others, 0.0, atol=1e-6)
    assert explained == pytest.approx(per_token.sum(), rel=1e-5)


def test_approximate_conservation_and_not_plain_gradient(case):
    """On the whole model the relevances sum to the explained output up to what AttnLRP's softmax rule absorbs
    (measured: 72 % here); the attention rules are in effect (the relevance is not plain Input x Gradient)."""
    lm, planned = case
    relevance, explained = attnlrp.token_relevance(lm, planned)
    ids, n_target = planned.sweep_input.input_ids, planned.sweep_input.n_target
    assert explained == pytest.approx(target_logits(lm.model, ids, n_target).sum(), rel=1e-5)
    assert 0.5 < relevance.sum() / explained < 1.1
    embeds = lm.model.get_input_embeddings()(ids[None]).detach().requires_grad_()
    logits = lm.model(inputs_embeds=embeds).logits[0, -n_target - 1 : -1]
    (grad,) = torch.autograd.grad(logits.gather(-1, ids[-n_target:, None]).sum(), embeds)
    plain = (grad * embeds).sum(-1)[0].detach().double().numpy()
    assert np.abs(relevance - plain).max() > 0.1 * np.abs(plain).max()


def test_eager_and_sdpa_attention_agree(case):
    """The default (SDPA) and the module's own eager attention both go through lxt's attention wrapper."""
    lm, planned = case
    family = "llama" if "Llama" in type(lm.model).__name__ else "gemma3"
    eager = tiny_model(family, lm.model.config.vocab_size, attn_implementation="eager")
    assert lm.model.config._attn_implementation == "sdpa"
    relevance, _ = attnlrp.token_relevance(lm, planned)
    eager_relevance, _ = attnlrp.token_relevance(LoadedModel(eager, lm.tokenizer, "tiny-eager", "random"), planned)
    np.testing.assert_allclose(eager_relevance, relevance, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "module", "classes"),
    [
        ("lxt.efficient.models.llama", "llama", (("LlamaMLP", "forward"), ("LlamaRMSNorm", "forward"))),
        ("lxt.efficient.models.gemma3", "gemma3", (("Gemma3MLP", "forward"), ("Gemma3RMSNorm", "_norm"))),
    ],
)
def test_patch_is_in_effect_only_inside(family, module, classes):
    import importlib

    from torch.nn import Dropout

    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    targets = [(getattr(modeling, cls), method) for cls, method in classes] + [(Dropout, "forward")]

    def state():
        return [getattr(t, m) for t, m in targets] + [
            modeling.eager_attention_forward,
            modeling.ALL_ATTENTION_FUNCTIONS,
        ]

    before = state()
    assert all(getattr(t, m).__module__ != "lxt.efficient.patches" for t, m in targets[:1])
    with pytest.raises(RuntimeError, match="inside"):
        with attnlrp.attnlrp_patched(family):
            assert all(getattr(t, m) is not b for (t, m), b in zip(targets, before, strict=False))
            interface = modeling.ALL_ATTENTION_FUNCTIONS
            assert interface.get_interface("sdpa", None).__qualname__.startswith("wrap_attention_forward")
            assert modeling.eager_attention_forward.__module__ == "lxt.efficient.patches"
            raise RuntimeError("inside")
    after = state()
    assert all(a is b for a, b in zip(before, after, strict=True))


def test_other_methods_unchanged_after_attnlrp(case):
    """The evaluation runs every method on one model object: AtMan, Input x Gradient and a plain forward give
    bit-identical numbers before and after attnlrp ran, and no parameter gained a gradient."""
    lm, planned = case
    ev = SquadEval(lm)
    ids = planned.sweep_input.input_ids

    def numbers():
        rng = np.random.default_rng(0)
        with torch.no_grad():
            logits = lm.model(input_ids=ids[None]).logits
        return ev.scores("atman", planned, rng), ev.scores("ixg", planned, rng), logits

    atman, ixg, logits = numbers()
    peer_scores("attnlrp", lm, planned)
    atman_after, ixg_after, logits_after = numbers()
    np.testing.assert_array_equal(atman_after, atman)
    np.testing.assert_array_equal(ixg_after, ixg)
    assert torch.equal(logits_after, logits)
    assert all(p.grad is None for p in lm.model.parameters())


def test_non_llama_is_refused(tiny_lms):
    lm = tiny_lms["gpt2"]
    planned, _ = SquadEval(lm).prepare(EXAMPLE)
    with pytest.raises(
        attnlrp.AttnLRPUnavailable, match="GPT2LMHeadModel is not supported; .* LlamaForCausalLM, Gemma3"
    ):
        attnlrp.unit_scores(lm, planned)


@pytest.mark.slow
def test_eval_on_the_real_model(real_lm):
    """`atman eval squad --methods attnlrp,random` on the real model, on the first bundled example's first sentence
    (conftest.first_sentence): every metric in range."""
    example = first_sentence(load_squad(str(SQUAD_DEV), limit=1)[0])
    result = evaluate(real_lm, [example], ["attnlrp", "random"], lds_masks=0)
    assert result["n"] == 1 and set(result["methods"]) == {"attnlrp", "random"}
    for example in result["examples"]:
        m = example["methods"]["attnlrp"]
        assert 0 <= m["AP"] <= 100 and 0 <= m["AR"] <= 100 and m["seconds"] > 0
    summary = result["methods"]["attnlrp"]
    assert summary["mAP"] is not None and 0 <= summary["mAP"] <= 100
