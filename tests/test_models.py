"""Model loading: local directories, safetensors only, the embedded model's one-time conversion."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import tiny_model

from pipeline import load_model
from pipeline.models import resolve_dtype


def test_load_local_directory(tmp_path, tokenizer):
    model = tiny_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.model_id == str(tmp_path) and lm.revision == "local"
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)
    # transformers' default swaps in Hub kernels; AtMan explains the model's own modules (raised on an H200)
    assert lm.model.use_kernels is False


def test_pickle_weights_are_refused(tmp_path, tokenizer):
    model = tiny_model("llama", len(tokenizer))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # pickle: could run code when loaded
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="^model: "):
        load_model(str(tmp_path), device="cpu")


def test_unknown_model_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="^model: "):
        load_model(str(tmp_path / "nowhere"), device="cpu")


def test_auto_dtype():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="^dtype: "):
        resolve_dtype("int3", torch.device("cpu"))


@pytest.mark.slow
def test_two_processes_convert_once(tmp_path):
    """Two loaders racing on an empty cache: one converts, the other waits and reuses it."""
    script = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from pipeline import load_model
        lm = load_model(device="cpu")
        print("params", sum(p.numel() for p in lm.model.parameters()))
        """
    )
    env = {**os.environ, "ATMAN_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum("converting" in o for o in outs) == 1
    assert all("params 134515008" in o for o in outs)
    assert sorted(os.listdir(tmp_path / "models")) == ["smollm2-135m-instruct", "smollm2-135m-instruct.lock"]
