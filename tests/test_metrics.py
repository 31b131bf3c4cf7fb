"""The figures generate.py prints say what they count: bytes of weights read per decode step,
tokens per row and over the batch."""
import json

import pytest
import torch
from safetensors.torch import load_file

import generate


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


def run_generate(argv: list, capsys) -> str:
    """generate.py's main() in this process (the command line's own start-up is tested elsewhere):
    what it printed to stderr, where the figures go."""
    capsys.readouterr()
    generate.main([str(a) for a in argv])
    return capsys.readouterr().err


# tied: the embedding is the output layer (float SmolLM2); quantize.py's files hold an int8 one.
@pytest.mark.parametrize("weights, tied", [("model.safetensors", True), ("model_int8.pth", False),
                                           ("model_int4.g32.pth", False)])
def test_reported_bytes_per_step_are_the_weights_a_step_reads(smollm2_quantized, weights, tied,
                                                               tmp_path, capsys):
    # smollm2_quantized: quantize.py's int8 and int4 files of SmolLM2, made once (conftest.py).
    out = tmp_path / "m.json"
    stderr = run_generate(["--checkpoint_path", smollm2_quantized / weights, "--prompt", "Hi",
                           "--max_new_tokens", "4", "--temperature", "0", "--device", "cpu",
                           "--json", out], capsys)
    reported = json.loads(out.read_text())["model_bytes"]
    assert reported == bytes_read_per_step(smollm2_quantized / weights, tied)
    assert f"a decode step reads {reported / 1e9:.3f} GB of weights on cpu" in stderr


def test_batch_metrics_count_rows_and_the_whole_batch(smollm2_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.json"
    stderr = run_generate(["--checkpoint_path", smollm2_checkpoint, "--prompt", "Hi", "--prompt",
                           "Tell me a story", "--max_new_tokens", "5", "--temperature", "0",
                           "--device", "cpu", "--json", out], capsys)
    sample = json.loads(out.read_text())["samples"][0]
    assert len(sample["new_tokens"]) == 2 and len(sample["prompt_tokens"]) == 2
    total = sum(sample["new_tokens"])
    assert f"{total} new tokens over 2 rows" in stderr
    assert "tok/s over the batch" in stderr and "per row)" in stderr


@pytest.mark.parametrize("name", ["trace.json", "trace.json.gz"])
def test_a_profile_is_the_last_samples_trace_written_whole_and_gzipped_by_its_name(
        smollm2_checkpoint, tmp_path, capsys, name):
    import gzip
    run_generate(["--checkpoint_path", smollm2_checkpoint, "--prompt", "Hi", "--max_new_tokens",
                  "3", "--num_samples", "2", "--temperature", "0", "--device", "cpu", "--profile",
                  tmp_path / name], capsys)
    data = (tmp_path / name).read_bytes()
    trace = json.loads(gzip.decompress(data) if name.endswith(".gz") else data)
    assert trace["traceEvents"]
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left
