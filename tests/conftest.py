from __future__ import annotations

import atexit
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psutil
import pytest
import transformers
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

from durations import longest_first  # noqa: E402
from tiny_models import FAMILIES, tiny_model  # noqa: E402

from pipeline import LoadedModel, load_model  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# Property tests draw the same examples on every run (a failure reproduces; CI does not flake on a new draw).
# HYPOTHESIS_PROFILE=explore draws fresh random examples, for a local bug hunt.
settings.register_profile("atman", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "atman"))


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin made config._tmp_path_factory
def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test`: one worker per core) each worker, and every `atman` process it starts,
    computes on one thread: two workers with a thread per core each fight over the cores (measured: 21 min against
    the suite's serial 27 on the 2-core machine, where one thread each fills both cores)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller, before it starts its workers: they inherit it
        _run_caches(config)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


MODELS_ENV = "ATMAN_TEST_CACHE"


def _run_caches(config) -> None:
    """The caches of every process this run starts (its xdist workers, each `atman` subprocess, Ray's workers all
    inherit os.environ): this run's own, in its pytest base temp dir, never the machine user's. ``ATMAN_CACHE``,
    the converted embedded models (SmolLM2's conversion: about 30 s, once per run, the xdist workers sharing it
    through the models' file lock), and ``ATMAN_CACHE_DIR``, the queries' verified parts; a test that checks a
    cache points it at its own tmp_path. Removed at exit: the converted model is about 540 MB, and pytest keeps
    the base temp dirs of the last runs (so a run killed before this also leaves nothing for long).
    ``ATMAN_TEST_CACHE=DIR``: keep the converted models in DIR instead, across runs (no conversion after the
    first run), when asked for."""
    root = config._tmp_path_factory.getbasetemp() / "atman-cache"
    root.mkdir()
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    os.environ["ATMAN_CACHE"] = os.environ.get(MODELS_ENV) or str(root / "models")
    os.environ["ATMAN_CACHE_DIR"] = str(root / "parts")


def pytest_collection_modifyitems(config, items) -> None:
    """Whole files, longest first: see tests/durations.py."""
    longest_first(items)


def in_ci() -> bool:
    """``CI=true``: the environment `.ci/run` (and GitHub Actions, GitLab CI) set."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def missing_tool(reason: str, install: str) -> NoReturn:
    """A tool a test needs is missing: in CI that is a failure (nothing that matters is skipped there), elsewhere
    a skip that says why and how to install it."""
    message = f"{reason}; install it: {install}"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def first_sentence(ex):
    """A SQuAD ``Example`` with its context cut after its first sentence, which must hold the first answer: the
    real-model evaluation tests' example (a quarter of a whole bundled example's units, for the suite's budget)."""
    from pipeline.evaluate import Example

    context = ex.context[: ex.context.index(". ") + 1]
    assert ex.answers[0]["answer_start"] + len(ex.answers[0]["text"]) <= len(context), "the answer is cut off"
    return Example(ex.id, context, ex.question, ex.answers)


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


@dataclass(frozen=True)
class LocalRay:
    """The test session's own Ray: its processes are the ones below the raylet/GCS that name ``temp_dir``."""

    temp_dir: str

    def owns(self, proc: psutil.Process) -> bool:
        """``proc`` was started by this Ray (another job's Ray on a shared machine is never touched)."""
        try:
            return any(self.temp_dir + os.sep in " ".join(p.cmdline()) for p in [proc, *proc.parents()])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    def processes(self, name: str) -> list[psutil.Process]:
        """This Ray's live worker processes whose title starts with ``name`` (e.g. ``ray::ExplainWorker``)."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if cmd and cmd[0].startswith(name) and self.owns(proc):
                found.append(proc)
        return found


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> LocalRay:
    """One local 2-CPU Ray shared by the tests that run jobs in this process (starting Ray costs ~5 s).
    Its session files live in a short private temp dir (Ray's socket paths are limited to ~107 bytes). It declares
    one GPU with no device behind it, so jobs with ``gpus_per_actor`` are scheduled as on a GPU node (Ray sets
    the actors' CUDA_VISIBLE_DEVICES; torch still finds no CUDA and they compute on the CPU); jobs without it
    never ask for it."""
    import shutil
    import tempfile

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp = tempfile.mkdtemp(prefix="atman-test-ray-")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir=temp, logging_level="WARNING")
    yield LocalRay(temp)
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
