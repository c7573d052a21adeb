"""AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers", ICML 2024)
through its authors' library, PyPI ``lxt`` 2.1 (its efficient, Gradient x Input formulation).

One forward and one backward pass per target: the explained output is the sum over the target tokens of each
token's logit (lxt explains logits; its docs: "explain any other token, or several tokens together"), the
relevance of a token is (embedding x LRP-modified gradient) summed over the embedding dimension, as lxt's examples
do, and a unit's score is the sum over its tokens. lxt's rules (identity rule on RMSNorm and the MLP activation,
uniform rule on the gated product and on the attention matmuls) are approximately conservative: the relevances of
all input tokens sum to about the explained output.

Llama and Gemma 3 (the two embedded models' architectures): lxt's rule maps ``lxt.efficient.models.llama.attnLRP``
and ``lxt.efficient.models.gemma3.attnLRP``; any other model is refused naming its class.

Two things stand between lxt 2.1 and this project, both handled here without changing lxt's rules:
- ``import lxt`` fails on transformers 5: lxt's package ``__init__`` imports every model family it supports, and
  its bundled BERT file (``lxt/efficient/models/bert.py``) imports ``transformers.modeling_attn_mask_utils``, a
  module transformers 5 removed (masks moved to ``transformers.masking_utils``); its ViT map also imports
  torchvision, which CPU installs here lack (PyPI's torchvision wheels link CUDA torch). So only the files a family
  needs are loaded (``rules``, ``patches``, ``models/llama`` or ``models/gemma3``), which import nothing of the rest.
- lxt's attention patch (``patches.patch_attention``) replaces the modeling module's ``ALL_ATTENTION_FUNCTIONS``
  with a plain dict of wrapped functions; transformers 5's ``LlamaAttention.forward`` calls
  ``ALL_ATTENTION_FUNCTIONS.get_interface(...)``, which a dict lacks (``AttributeError``). The adapter below
  wraps the same functions with lxt's own ``wrap_attention_forward`` into a transformers ``AttentionInterface``.

lxt patches classes and the modeling module, so every Llama in the process would be affected: the patch is applied
only for the duration of one call (under a lock) and undone in ``finally``; the model object is never modified.
The patched method of each class is read from lxt's rule (``forward``, or ``_norm`` for Gemma 3's RMSNorm).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

LXT_VERSION = "2.1"
_LXT_BASE = {  # module -> file under the lxt package, in import order (each imports only the ones before it)
    "lxt.efficient.rules": "efficient/rules.py",
    "lxt.efficient.patches": "efficient/patches.py",
}
FAMILIES = {  # the model class -> lxt's module of rules for it (its file: efficient/models/<name>.py)
    "LlamaForCausalLM": "lxt.efficient.models.llama",
    "Gemma3ForCausalLM": "lxt.efficient.models.gemma3",
}
SETTINGS = {"attnlrp": {"lxt_version": LXT_VERSION, "explained": "sum of the target tokens' logits"}}
"""What ``method_params`` records for a run of this peer."""
_LOCK = threading.RLock()
_MISSING = object()


class AttnLRPUnavailable(RuntimeError):
    """lxt cannot explain this model here; the message names the reason."""


def _lxt_modules(family: str = "lxt.efficient.models.llama") -> tuple[ModuleType, ModuleType]:
    """lxt's ``patches`` module and its rule module for one family (``FAMILIES``' values), loaded from lxt's files
    without its package ``__init__`` (which fails on transformers 5, see the module docstring). Modules already
    imported are reused."""
    spec = importlib.util.find_spec("lxt")
    if spec is None or not spec.submodule_search_locations:
        raise AttnLRPUnavailable(
            f"attnlrp: the library lxt is not installed (pip install --no-deps lxt=={LXT_VERSION})"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = {**_LXT_BASE, family: "efficient/models/" + family.rsplit(".", 1)[1] + ".py"}
    for name, relative in files.items():
        if name in sys.modules:
            continue
        file_spec = importlib.util.spec_from_file_location(name, root / relative)
        if file_spec is None or file_spec.loader is None:
            raise AttnLRPUnavailable(f"attnlrp: lxt at {root} has no {relative} (expected lxt {LXT_VERSION})")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        try:
            file_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise AttnLRPUnavailable(f"attnlrp: cannot load lxt's {relative}: {type(err).__name__}: {err}") from err
    return sys.modules["lxt.efficient.patches"], sys.modules[family]


def _patch_attention(modeling: ModuleType, patches: ModuleType) -> None:
    """lxt's ``patch_attention`` with the container transformers 5 expects: every attention function (the module's
    eager one and each registered one) wrapped by lxt's ``wrap_attention_forward``, in an ``AttentionInterface``."""
    from transformers import AttentionInterface

    original = modeling.ALL_ATTENTION_FUNCTIONS
    if not hasattr(original, "get_interface"):  # transformers 4 reads the mapping with .get / []: lxt's own patch
        patches.patch_attention(modeling)
        return

    def wrap(fn):  # once: a function lxt already wrapped (a global lxt patch) keeps its single wrapper
        return fn if fn.__module__ == patches.__name__ else patches.wrap_attention_forward(fn)

    wrapped = AttentionInterface()
    for key, fn in original.items():
        wrapped[key] = wrap(fn)
    modeling.eager_attention_forward = wrap(modeling.eager_attention_forward)
    modeling.ALL_ATTENTION_FUNCTIONS = wrapped


def _modeling_module(rules: dict) -> ModuleType:
    """The transformers modeling module among a rule map's keys (the one whose attention functions lxt wraps)."""
    return next(target for target in rules if isinstance(target, ModuleType))


@contextmanager
def attnlrp_patched(family: str = "lxt.efficient.models.llama") -> Iterator[None]:
    """lxt's AttnLRP rules on every model of one family (``FAMILIES``' values) in the process inside the block, the
    originals restored after it."""
    patches, rules_module = _lxt_modules(family)
    rules = rules_module.attnLRP
    modeling = _modeling_module(rules)
    with _LOCK:
        saved: list[tuple[object, str, object]] = []
        for target, patch in rules.items():
            if target is modeling:
                names = ("eager_attention_forward", "ALL_ATTENTION_FUNCTIONS")
            else:  # lxt's rules are partial(patch_method, fn[, method_name=...]): the method they replace
                names = (getattr(patch, "keywords", {}).get("method_name", "forward"),)
            saved += [(target, name, vars(target).get(name, _MISSING)) for name in names]
        try:
            for target, patch in rules.items():
                if target is modeling:
                    _patch_attention(modeling, patches)
                else:  # lxt's patch_method leaves a method it already replaced as it is
                    patch(target)
            yield
        finally:
            for target, name, value in reversed(saved):
                if value is _MISSING:
                    if name in vars(target):
                        delattr(target, name)
                else:
                    setattr(target, name, value)


def check_model(model) -> str:
    """The lxt rule module for ``model``'s class (``FAMILIES``), its files loaded; ``AttnLRPUnavailable`` naming the
    class and the supported ones for any other architecture (no rules: the relevances would be plain gradients
    under another name), or naming what is missing when lxt cannot be loaded."""
    family = FAMILIES.get(type(model).__name__)
    if family is None:
        raise AttnLRPUnavailable(
            f"attnlrp: {type(model).__name__} is not supported; this peer applies lxt's rules for "
            f"{', '.join(FAMILIES)} only"
        )
    _lxt_modules(family)
    return family


def token_relevance(lm, planned) -> tuple[np.ndarray, float]:
    """AttnLRP relevance of every input token (prompt and target, [n]) for the summed target-token logits, and that
    explained output (the relevances sum to about it)."""
    model = lm.model
    family = check_model(model)
    ids = planned.sweep_input.input_ids.to(model.device)[None]
    n_target = planned.sweep_input.n_target
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with attnlrp_patched(family), torch.enable_grad():  # logits of the positions that predict the target only
        logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=n_target + 1).logits[0, :-1]
        explained = logits.gather(-1, ids[0, -n_target:, None]).sum()
        (grad,) = torch.autograd.grad(explained, embeds)  # the inputs only: no parameter's .grad is touched
    relevance = (embeds.detach() * grad).float().sum(-1)[0]
    return relevance.cpu().numpy().astype(np.float64), float(explained.detach())


def unit_scores(lm, planned) -> np.ndarray:
    """AttnLRP relevance of each planned unit: the sum of its tokens' relevances."""
    relevance, _ = token_relevance(lm, planned)
    return np.array([relevance[list(u.positions)].sum() for u in planned.units], dtype=np.float64)
