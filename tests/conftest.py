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
