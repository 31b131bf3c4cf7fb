"""The figures generate.py prints say what they count: bytes of weights read per decode step,
tokens per row and over the batch."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script


def stored_tensors(weights) -> dict:
    if weights.suffix == ".safetensors":
        return load_file(weights)
    return torch.load(weights, map_location="cpu", weights_only=True)


def bytes_read_per_step(weights, tied: bool) -> int:
    """What one float32 decode step must read, from the file: every stored tensor once (a tied
    embedding is the output layer, read whole), except an untied embedding table, of which a step
    reads only the looked-up rows. Float tensors (int4's bfloat16 scales too) run in float32."""
    tensors = stored_tensors(weights)
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
               for name, t in tensors.items() if tied or name != "tok_embeddings.weight")


@pytest.fixture(scope="module")
def quantized(smollm2_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("metrics") / "SmolLM2"
    shutil.copytree(smollm2_checkpoint, folder)
    for mode in ("int8", "int4"):
        r = run_script("quantize.py", "--checkpoint_path", folder, "--mode", mode)
        assert r.returncode == 0, r.stderr[-2000:]
    return folder


@pytest.mark.parametrize("weights, tied", [("model.safetensors", True), ("model_int8.pth", False),
                                           ("model_int4.g32.pth", True)])
def test_reported_bytes_per_step_are_the_weights_a_step_reads(quantized, weights, tied, tmp_path):
    out = tmp_path / "m.json"
    r = run_script("generate.py", "--checkpoint_path", quantized / weights, "--prompt", "Hi",
                   "--max_new_tokens", "4", "--temperature", "0", "--device", "cpu", "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    reported = json.loads(out.read_text())["model_bytes"]
    assert reported == bytes_read_per_step(quantized / weights, tied)
    assert f"a decode step reads {reported / 1e9:.3f} GB of weights on cpu" in r.stderr


def test_batch_metrics_count_rows_and_the_whole_batch(smollm2_checkpoint, tmp_path):
    out = tmp_path / "m.json"
    r = run_script("generate.py", "--checkpoint_path", smollm2_checkpoint, "--prompt", "Hi",
                   "--prompt", "Tell me a story", "--max_new_tokens", "5", "--temperature", "0",
                   "--device", "cpu", "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    sample = json.loads(out.read_text())["samples"][0]
    assert len(sample["new_tokens"]) == 2 and len(sample["prompt_tokens"]) == 2
    total = sum(sample["new_tokens"])
    assert f"{total} new tokens over 2 rows" in r.stderr
    assert "tok/s over the batch" in r.stderr and "per row)" in r.stderr
