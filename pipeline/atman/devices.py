"""Where a model computes, when accelerate may have spread it over several devices (``device_map``).

A model loaded with ``device_map`` (``load_model(..., device_map="auto")``, or ``accelerate.dispatch_model``) has
its layers on several GPUs, in CPU memory or on disk. accelerate's ``AlignDevicesHook`` wraps each placed module's
forward: it moves the inputs to the module's execution device and, for offloaded modules, loads the weights just
for the call (between calls they are on the ``meta`` device). So ``next(model.parameters()).device`` can be
``meta`` or another layer's GPU; these helpers ask the hooks instead. The engine builds its per-batch tensors on
``input_device`` and each attention call moves them to its query's device once (``sweep.SweepAttention``).
"""

from __future__ import annotations

import torch


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device when it has one, else the device
    of its first parameter that holds data (not ``meta``), else the CPU."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)  # accelerate may store a GPU as its index
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def input_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s inputs go: the input embedding's execution device (a dispatched model's first device)."""
    return execution_device(model.get_input_embeddings())


def dispatched(model: torch.nn.Module) -> bool:
    """Whether accelerate's hooks place ``model``'s modules (it was loaded or dispatched with a device map that
    spans several devices or offloads)."""
    return hasattr(model, "_hf_hook")
