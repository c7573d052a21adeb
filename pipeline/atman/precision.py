"""How the sweep computes, apart from how the weights are stored: the precision policies.

AtMan's scores are differences of cross-entropies between nearly equal forward passes, so rounding in each pass
moves them by about as much as the small effects (bfloat16 throughout: rank correlation 0.56 with float32 on
SmolLM2 over SQuAD). A policy says which parts of a pass compute in 16 bits; the weights stay as stored (a bf16
model keeps bf16 memory) and are read at their exact stored values:

- ``bf16``: everything in bfloat16 (a bf16 model as it runs by itself);
- ``mixed_bf16`` / ``mixed_fp16``: the matrix products (every ``nn.Linear``, the attention kernel) take 16-bit
  inputs and accumulate in float32 with a float32 result; residual stream, norms, rotary, softmax and the
  LM head's log-softmax stay float32;
- ``tf32``: float32 activations, TF32 matrix products (on a CPU, which has no TF32, the products' inputs are
  rounded to TF32's 10-bit mantissa so the numbers match the GPU's);
- ``fp32``: float32 throughout, TF32 off.

A policy is applied by a ``TorchFunctionMode`` around the sweep's forward passes, so it needs nothing of the
model's code and works under accelerate's dispatch hooks: every 16-bit floating tensor (stored weights, buffers,
casts the model makes to its own dtype) reaching a torch function is computed on as the policy says. ``auto``
resolves (``resolve``) to ``fp32`` for float32 weights on a CPU, else to ``AUTO``, chosen by measurement
(docs/PRECISION.md: the cheapest policy whose scores stay float32-grade on both embedded trained models).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from pipeline.atman import attention, devices

HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Policy:
    """``activations``: the residual stream's dtype; ``products``: the dtype of a matrix product's inputs (None:
    the activations'); ``tf32``: float32 products on TF32 tensor cores. ``cost``: the GPU's relative time per
    pass (tensor-core rates), the order ``auto`` is chosen in."""

    name: str
    activations: torch.dtype
    products: torch.dtype | None
    tf32: bool
    cost: int


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("bf16", torch.bfloat16, None, False, 0),
        Policy("mixed_bf16", torch.float32, torch.bfloat16, False, 1),
        Policy("mixed_fp16", torch.float32, torch.float16, False, 1),
        Policy("tf32", torch.float32, None, True, 2),
        Policy("fp32", torch.float32, None, False, 3),
    )
}
AUTO = "mixed_fp16"
"""What ``auto`` means where the weights are 16-bit or the device is a GPU: the cheapest policy whose scores kept a
mean Spearman >= 0.95 with float32 and mAP within 1 point on both embedded trained models (docs/PRECISION.md has
the table; ``mixed_bf16``, as cheap, fell short on both, bf16 throughout far short)."""


def resolve(precision: str, weights: torch.dtype, device: torch.device) -> str:
    """The policy ``precision`` means for weights of dtype ``weights`` on ``device``. ``auto`` does not depend on
    the device for 16-bit weights, so a CPU run of a bf16 model computes as a GPU's would."""
    if precision != "auto":
        policy = POLICIES[precision]
        if policy.activations in HALF and weights != policy.activations:
            raise ValueError(
                f"precision: {precision!r} computes in the weights' own {str(policy.activations)[6:]}, but they are "
                f"stored in {str(weights)[6:]}; load the model with dtype {str(policy.activations)[6:]} or pick "
                "another precision (mixed_bf16, tf32, fp32)"
            )
        return precision
    if weights == torch.float32 and device.type != "cuda":
        return "fp32"
    return AUTO


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most of ``model``'s floating weights are stored in."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


@contextmanager
def computing(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Inside the block, ``model``'s forward passes compute as policy ``name`` says (see the module docstring)."""
    policy = POLICIES[name]
    stored = weights_dtype(model)
    if policy.activations == stored and policy.products is None and not policy.tf32:
        native = nullcontext()  # bf16 weights with bf16, or fp32 weights with fp32: the model as it runs
        with _tf32(False), native:
            yield
        return
    emulate = policy.tf32 and devices.input_device(model).type != "cuda"
    kernel_dtype = policy.products or policy.activations
    with _tf32(policy.tf32), attention.attend_in(kernel_dtype), _outside(_hooks(model)), _Compute(policy, emulate):
        yield


_PAUSED: ContextVar[bool] = ContextVar("atman_precision_paused", default=False)


def _hooks(model: torch.nn.Module) -> list:
    """accelerate's hooks on ``model`` (a dispatched model's ``AlignDevicesHook``s, which move inputs and load
    offloaded weights in the stored dtype around each module's forward)."""
    found = {id(h): h for m in model.modules() if (h := getattr(m, "_hf_hook", None)) is not None}
    return list(found.values())


@contextmanager
def _outside(hooks: list) -> Iterator[None]:
    """Run the hooks' bookkeeping outside the policy, so a weight loaded from offload keeps its stored dtype and
    values; the hooks are restored as found on exit."""
    patched = []
    for hook in hooks:
        for name in ("pre_forward", "post_forward"):
            patched.append((hook, name, hook.__dict__.get(name)))
            setattr(hook, name, _paused(getattr(hook, name)))
    try:
        yield
    finally:
        for hook, name, own in reversed(patched):
            if own is None:
                delattr(hook, name)
            else:
                setattr(hook, name, own)


def _paused(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        token = _PAUSED.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _PAUSED.reset(token)

    return run


class _Compute(TorchFunctionMode):
    """Casts what reaches torch functions so a pass computes as ``policy`` says; the attention kernel runs outside
    it (``attention.attend_in`` casts its inputs)."""

    def __init__(self, policy: Policy, emulate_tf32: bool) -> None:
        super().__init__()
        self.policy, self.emulate_tf32 = policy, emulate_tf32

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if attention.in_kernel() or _PAUSED.get() or name in ("__get__", "__set__"):
            return func(*args, **kwargs)
        if func is F.linear:
            return self._linear(*args, **kwargs)
        if func is F.embedding:  # look up in the stored table, then widen the rows (not the whole table)
            out = func(*args, **kwargs)
            return out.to(self.policy.activations) if out.dtype in HALF else out
        if name.endswith("_") and not name.endswith("__") and args:  # in place: the tensor written keeps its dtype
            args = (args[0], *tree_map(self._widen, args[1:]))
        else:
            args = tree_map(self._widen, args)
        return func(*args, **tree_map(self._widen, kwargs))

    def _widen(self, x):
        if isinstance(x, torch.Tensor):
            return x.to(self.policy.activations) if x.dtype in HALF else x
        if isinstance(x, torch.dtype) and x in HALF:
            return self.policy.activations
        return x

    def _linear(self, x, weight, bias=None):
        products = self.policy.products
        if products is not None:
            out = product(x, weight, products)
            return out if bias is None else out + bias.float()
        x, weight = x.to(self.policy.activations), weight.to(self.policy.activations)
        bias = None if bias is None else bias.to(self.policy.activations)
        if self.emulate_tf32:
            x, weight = round_tf32(x), round_tf32(weight)
        return F.linear(x, weight, bias)


def product(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x @ weight.T`` on inputs rounded to ``dtype``, accumulated and returned in float32. On CUDA one 16-bit
    GEMM with a float32 result; elsewhere (or where that kernel is missing) the same products computed in float32
    from the rounded inputs, which a 16-bit by 16-bit product fits exactly. float16 tops out at 65,504: a row of
    ``x`` that would pass half of that is scaled down by a power of two first and the result scaled back (exact),
    so a large activation costs that row's smallest digits, never an overflow."""
    scale = None
    if dtype == torch.float16:
        peak = x.detach().abs().amax(dim=-1, keepdim=True).float()
        scale = torch.exp2(-torch.ceil(torch.log2(peak / 32768.0)).clamp_min(0))
        x = x * scale
    x16, w16 = x.to(dtype), weight.to(dtype)
    out = None
    if x.device.type == "cuda":
        try:
            flat = torch.mm(x16.reshape(-1, x16.shape[-1]), w16.t(), out_dtype=torch.float32)
            out = flat.reshape(*x.shape[:-1], weight.shape[0])
        except (TypeError, RuntimeError):  # a torch without mm(out_dtype=...) for this pair: same numbers, slower
            out = None
    if out is None:
        out = F.linear(x16.float(), w16.float())
    return out if scale is None else out / scale


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to nearest-even at TF32's 10-bit mantissa (what a TF32 tensor core reads)."""
    bits = x.contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = (bits + 0xFFF + lsb) & ~0x1FFF
    return torch.where(torch.isfinite(x), rounded.view(torch.float32), x)


@contextmanager
def _tf32(on: bool) -> Iterator[None]:
    """TF32 for float32 matrix products on CUDA on or off inside the block (process-wide: one sweep at a time)."""
    if not torch.cuda.is_available():
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = on
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before
