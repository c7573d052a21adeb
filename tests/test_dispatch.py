"""Models larger than one device: loaded with a ``device_map`` (accelerate's hooks, weights offloaded to disk and
loaded for each call), AtMan's scores are those of the model on one device, fast engine and reference alike.

This machine has no GPU, so the tiny models here are split between the CPU and disk: every layer computes on the
CPU, but accelerate's ``AlignDevicesHook`` wraps the modules and an offloaded layer's weights live on ``meta``
between calls, the two things that break hand-made attention under ``device_map="auto"``. That the engine reads
its per-batch tensors on each layer's own device is checked with a layer on ``meta`` standing in for a second GPU
(meta refuses another device's tensors as CUDA does). A job's ``gpus_per_actor > 1`` is checked up to the
``device_map`` the worker asks ``load_model`` for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import AlignDevicesHook
from tiny_models import tiny_model
from transformers import AutoTokenizer

from pipeline import AtManConfig, Explainer, LoadedModel, load_model
from pipeline.atman.attention import UnsupportedModelError
from pipeline.atman.sweep import SweepAttention, SweepInput, _KVStore, _Row
from pipeline.jobspec import JobSpec, JobSpecError, load_job
from pipeline.models import DEFAULT_MODEL, converted_dir

TOL = 1e-4
PROMPTS = ["The cat sat on the mat. The dog was not happy at all.", "Alice gave Bob a book. Bob thanked"]
TARGETS = [" The dog left", " Alice"]


@pytest.fixture(scope="module")
def tok():
    """The embedded model's tokenizer alone (the tiny models share it)."""
    return AutoTokenizer.from_pretrained(converted_dir(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tok) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _last_layer_on_disk(model: torch.nn.Module, layers: str) -> dict[str, str]:
    """A device map with every module on the CPU but the last decoder layer (``layers`` names their list), which
    is offloaded to disk."""
    base, _, attr = layers.rpartition(".")
    n = len(model.get_submodule(layers))
    device_map = {name: "cpu" for name, _ in model.named_children() if name != base}
    device_map |= {f"{base}.{name}": "cpu" for name, _ in model.get_submodule(base).named_children() if name != attr}
    return device_map | {f"{layers}.{i}": "disk" if i == n - 1 else "cpu" for i in range(n)}


def _assert_offloaded(model: torch.nn.Module, layer: torch.nn.Module) -> None:
    """accelerate's hooks are really there, and ``layer``'s weights are on disk (meta between calls): a test that
    passes cannot have run an undispatched model."""
    assert isinstance(model._hf_hook, AlignDevicesHook)
    assert all(p.device.type == "meta" for p in layer.parameters())
    assert any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in layer.modules())


def _explain(model, tok, **config):
    return Explainer(model, tok, AtManConfig(**config)).explain_batch(PROMPTS, TARGETS, chat=False)


def _assert_same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.units == w.units
        assert np.abs(w.scores).max() > 1e-2  # suppression moves the target: the comparison means something
        np.testing.assert_allclose(g.scores, w.scores, rtol=0, atol=TOL)
        assert g.base_target_ce == pytest.approx(w.base_target_ce, abs=TOL)


@pytest.fixture(scope="module")
def whole(llama_dir) -> LoadedModel:
    return load_model(llama_dir, device="cpu")


@pytest.fixture(scope="module")
def split(llama_dir, whole, tmp_path_factory) -> LoadedModel:
    """The same model with its last layer offloaded to disk, loaded the way a job loads one (``load_model``)."""
    device_map = _last_layer_on_disk(whole.model, "model.layers")
    lm = load_model(llama_dir, device_map=device_map, offload_folder=tmp_path_factory.mktemp("offload"))
    assert lm.model.hf_device_map == device_map and lm.device == torch.device("cpu")
    return lm


@pytest.mark.parametrize("mode", ["multiplicative", "log_additive", "scale"])
def test_a_model_with_a_layer_on_disk_gives_the_scores_of_the_whole_model(whole, split, mode):
    _assert_offloaded(split.model, split.model.model.layers[1])
    reference = _explain(whole, None, mode=mode, engine="reference")
    _assert_same(_explain(split, None, mode=mode), reference)
    _assert_same(_explain(split, None, mode=mode, padding_side="right"), reference)
    _assert_same(_explain(split, None, mode=mode, engine="reference"), reference)


@pytest.mark.parametrize("family", ["bloom", "falcon_alibi"])
def test_an_adapter_family_runs_inside_accelerates_hooks(tok, tmp_path, family):
    """Bloom and Falcon-RW have AtMan adapters (their attention ignores transformers' interface) and ALiBi slopes;
    the adapter goes inside the attention module's own hook, which still moves inputs and loads weights."""
    whole = tiny_model(family, len(tok))
    model = tiny_model(family, len(tok))
    model = dispatch_model(model, _last_layer_on_disk(model, "transformer.h"), main_device="cpu", offload_dir=tmp_path)
    attn = model.transformer.h[1].self_attention
    _assert_offloaded(model, model.transformer.h[1])
    hook, own = attn._hf_hook, attn._old_forward
    calls = []
    pre_forward = hook.pre_forward
    hook.pre_forward = lambda *a, **k: calls.append(1) or pre_forward(*a, **k)
    reference = _explain(whole, tok, engine="reference")
    _assert_same(_explain(model, tok), reference)
    _assert_same(_explain(model, tok, engine="reference"), reference)
    assert calls  # the hook ran around the adapter
    assert attn._hf_hook is hook and attn._old_forward == own  # and the module is left as it was found


def test_bloom_slow_but_exact_loads_the_offloaded_weight_it_reads(tok, tmp_path):
    """Bloom's ``slow_but_exact`` path reads the output projection's weight instead of calling the module, which
    under offload is ``meta`` (and F.linear on a meta weight returns garbage, not an error); the adapter loads it
    through accelerate. Bloom's own MLP does the same: accelerate's ``preload_module_classes`` covers it."""
    import transformers

    def bloom():
        config = transformers.BloomConfig(
            vocab_size=len(tok), hidden_size=64, n_layer=2, n_head=4, initializer_range=0.25,
            slow_but_exact=True, pretraining_tp=2,
        )  # fmt: skip
        torch.manual_seed(0)
        return transformers.BloomForCausalLM(config).eval()

    model = bloom()
    device_map = _last_layer_on_disk(model, "transformer.h")
    model = dispatch_model(
        model, device_map, main_device="cpu", offload_dir=tmp_path, preload_module_classes=["BloomMLP"]
    )
    _assert_offloaded(model, model.transformer.h[1])
    _assert_same(_explain(model, tok), _explain(bloom(), tok, engine="reference"))


def test_a_model_whose_attention_is_not_reached_still_refuses_under_dispatch(tok, tmp_path):
    model = tiny_model("mpt", len(tok))
    model = dispatch_model(
        model, _last_layer_on_disk(model, "transformer.blocks"), main_device="cpu", offload_dir=tmp_path
    )
    _assert_offloaded(model, model.transformer.blocks[1])
    with pytest.raises(UnsupportedModelError, match=r"^model: MptForCausalLM: suppression reached attention layers"):
        Explainer(model, tok)


@pytest.mark.parametrize("mode", ["multiplicative", "log_additive", "scale"])
@pytest.mark.parametrize("window", [None, 3])
def test_each_layer_reads_the_batch_on_its_own_device(mode, window):
    """Layers 0 and 2 on the CPU, 1 and 3 on ``meta`` (a second GPU's stand-in): every attention call computes on
    its query's device, with the batch moved there once and the prefix keys/values kept where their layer is."""
    seq = SweepInput(torch.arange(8), 2, torch.tensor([[0.1] + [1.0] * 7, [1.0] * 3 + [0.1] + [1.0] * 4]))
    store = _KVStore()
    devices = ["cpu", "meta", "cpu", "meta"]
    for rows in ([_Row(0, 0)], [_Row(0, 0, 0), _Row(0, 0, 1)], [_Row(0, 3, 1)]):  # base pass, then suppression
        ctx = SweepAttention(rows, [seq], store, mode, "left", torch.device("cpu"))
        length, seen = ctx.input_ids.shape[1], {}
        for layer, device in enumerate(devices):
            q = torch.randn(len(rows), 4, length, 8, device=device)
            k, v = (torch.randn(len(rows), 2, length, 8, device=device) for _ in range(2))
            for alibi in (None, torch.linspace(0.1, 0.4, 4, device=device)):
                out = ctx.attend(layer, q, k, v, scaling=0.3, sliding_window=window, alibi=alibi)
                assert out.device == q.device and out.shape == q.shape
            mask = ctx.visible(window)
            assert mask.device == q.device and seen.setdefault(device, mask) is mask  # built once per device
        assert all(store.keys[layer][0].device.type == device for layer, device in enumerate(devices))


def test_load_model_with_device_map_names_the_field_it_cannot_use(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^device: 'cpu' with a device_map; give one of them"):
        load_model(llama_dir, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match=r"^offload_folder: device_map puts modules on disk"):
        load_model(llama_dir, device_map={"": "disk"})
    with pytest.raises(ValueError, match=r"^device_map: max_memory and offload_folder only place a model"):
        load_model(llama_dir, offload_folder=tmp_path)
    with pytest.raises(ValueError, match=r"^device_map: 'cuda:7' is not available"):
        load_model(llama_dir, device_map="cuda:7")


def test_device_map_auto_loads_a_local_directory(llama_dir):
    lm = load_model(llama_dir, device_map="auto", dtype="float32")  # no GPU here: all of it on the CPU
    assert not lm.model.training and lm.dtype == torch.float32
    assert lm.device == next(lm.model.parameters()).device == torch.device("cpu")


@pytest.mark.parametrize("gpus", [1.5, 2.5])
def test_gpus_per_actor_above_one_is_whole(tmp_path, gpus):
    (tmp_path / "in.jsonl").write_text('{"prompt": "hello"}\n')
    (tmp_path / "job.yaml").write_text(f"name: x\ninput: {{path: in.jsonl}}\nresources: {{gpus_per_actor: {gpus}}}\n")
    with pytest.raises(JobSpecError, match=rf"resources\.gpus_per_actor: {gpus} GPUs: above 1 .* whole number"):
        load_job(tmp_path / "job.yaml")


@pytest.mark.parametrize("gpus", [0, 0.25, 0.5, 1, 2, 4])
def test_gpus_per_actor_fractions_up_to_one_and_whole_numbers_pass(gpus):
    spec = JobSpec.model_validate({"name": "x", "input": {"path": "in.jsonl"}, "resources": {"gpus_per_actor": gpus}})
    assert spec.resources.gpus_per_actor == gpus


@pytest.mark.parametrize(("gpus", "device_map"), [(0, None), (0.5, None), (1, None), (2, "auto"), (4, "auto")])
def test_the_worker_spreads_the_model_over_more_than_one_gpu(monkeypatch, tmp_path, tok, gpus, device_map):
    """A CPU cannot run two GPUs; what can be checked is the worker's request: device_map auto over the GPUs Ray
    gave the actor (the only ones its CUDA_VISIBLE_DEVICES shows) when it has more than one."""
    from pipeline import models
    from pipeline.worker import ExplainWorker

    asked = {}

    def fake_load_model(name, **kwargs):
        asked.update(kwargs)
        return LoadedModel(tiny_model("llama", len(tok)), tok, name, "random")

    monkeypatch.setattr(models, "load_model", fake_load_model)
    spec = JobSpec.model_validate({"name": "x", "input": {"path": "in.jsonl"}, "resources": {"gpus_per_actor": gpus}})
    run = {"root": str(tmp_path / "out"), "model": "tiny", "run_date": "2026-01-01", "run_id": "w"}
    threads = torch.get_num_threads()
    try:
        ExplainWorker(spec.model_dump_json(), run)
    finally:
        torch.set_num_threads(threads)
    assert asked["device_map"] == device_map
    # no GPU asked for: the CPU, even where CUDA is visible (Ray does not hide a node's GPUs from such an actor)
    assert asked["device"] == ("cpu" if gpus == 0 else "auto")


def test_a_precision_policy_computes_inside_accelerates_hooks(llama_dir, tmp_path):
    """bf16 weights, one layer on disk: the fp32 policy equals the naive method on a float32 copy of the same
    values, and the offloaded layer goes back to disk in its stored dtype."""
    whole = load_model(llama_dir, device="cpu", dtype="bfloat16")
    wide = LoadedModel(whole.model.float(), whole.tokenizer, whole.model_id, whole.revision)
    device_map = _last_layer_on_disk(wide.model, "model.layers")
    split = load_model(llama_dir, dtype="bfloat16", device_map=device_map, offload_folder=tmp_path)
    _assert_offloaded(split.model, split.model.model.layers[1])
    _assert_same(_explain(split, None, precision="fp32"), _explain(wide, None, engine="reference"))
    _assert_offloaded(split.model, split.model.model.layers[1])
    assert {p.dtype for p in split.model.parameters()} == {torch.bfloat16}
