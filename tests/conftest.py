from __future__ import annotations

import sys
from pathlib import Path

import pytest
import transformers

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, tiny_model  # noqa: E402

from pipeline import LoadedModel, load_model  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def real_lm() -> LoadedModel:
    """The embedded default model (SmolLM2-135M-Instruct), float32 on CPU."""
    return load_model("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(real_lm):
    """The real model's tokenizer (with its chat template), shared by the tiny models."""
    return real_lm.tokenizer


@pytest.fixture(scope="session")
def tiny_lms(tokenizer) -> dict[str, LoadedModel]:
    return {f: LoadedModel(tiny_model(f, len(tokenizer)), tokenizer, f"tiny-{f}", "random") for f in FAMILIES}


TINY_CONTEXT = 96  # the job tests' tiny model: a short context, so "longer than the context" is cheap to hit


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny random Llama with the real tokenizer, saved as a local model directory (what a job's model.id
    names); loads in well under a second, so Ray tests spend their time on Ray, not on the model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", len(tokenizer))
    model.config.max_position_embeddings = TINY_CONTEXT
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local 2-CPU Ray shared by the tests that run jobs in this process (starting Ray costs ~5 s).
    Its session files live in a short private temp dir (Ray's socket paths are limited to ~107 bytes)."""
    import os
    import shutil
    import tempfile

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp = tempfile.mkdtemp(prefix="atman-test-ray-")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="WARNING")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
