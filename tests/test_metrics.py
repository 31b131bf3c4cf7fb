"""The figures generate.py prints say what they count: bytes of weights read per decode step,
tokens per row and over the batch."""
import json

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import generate
import quantize
from checkpoint import load_model, read_checkpoint, save_checkpoint
from model import KVCache, ModelArgs, Transformer


class StoragesRead(TorchDispatchMode):
    """While on: the storages of the tensors every op takes, except the embedding's table (a
    lookup reads the rows it looks up)."""

    def __init__(self):
        super().__init__()
        self.storages = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.aten.embedding.default:
            self.storages |= {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                              if isinstance(t, Tensor)}
        return func(*args, **(kwargs or {}))


def weights_held(model: Transformer) -> list:
    """Every tensor a module of the model holds (parameters, buffers, plain attributes), but the
    KV cache (no weights) and the rotary table (a step reads its positions' rows)."""
    held = []
    for m in model.modules():
        if not isinstance(m, KVCache):
            held += [*m.parameters(recurse=False), *m.buffers(recurse=False),
                     *(v for v in vars(m).values() if isinstance(v, Tensor))]
    return [t for t in held if t is not model.rope]


@torch.no_grad()
def bytes_a_step_reads(model: Transformer, tokens: int) -> int:
    """Observed: the bytes of the weights one decode step of `tokens` rows hands to its ops (each
    storage once, a tied output layer's included)."""
    model.setup_caches(tokens, 8)
    with StoragesRead() as reads:
        model(torch.zeros(tokens, 1, dtype=torch.long), torch.tensor([0]))
    read = {t.untyped_storage().data_ptr(): t for t in weights_held(model)
            if t.untyped_storage().data_ptr() in reads.storages}
    return sum(t.nbytes for t in read.values())


def run_generate(argv: list, capsys) -> str:
    """generate.py's main() in this process (the command line's own start-up is tested elsewhere):
    what it printed to stderr, where the figures go."""
    capsys.readouterr()
    generate.main([str(a) for a in argv])
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def int4_model(tmp_path_factory) -> Transformer:
    """A tiny random model quantized by quantize.py to int4 in groups of 64 (its int8 output layer
    quantize.py's default), loaded on the CPU in float32. dim 96 is padded to 128 in the file; the
    CPU kernel's copy takes it as 3 groups of 32 and its scales in bfloat16."""
    folder = tmp_path_factory.mktemp("int4")
    torch.manual_seed(0)
    args = ModelArgs(dim=96, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=100,
                     intermediate_size=160, block_size=64, attention_bias=True)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    save_checkpoint(folder, args, model.state_dict())
    quantize.main(["--checkpoint_path", str(folder / "model.safetensors"), "--mode", "int4",
                   "--groupsize", "64"])
    return load_model(read_checkpoint(folder / "model_int4.g64.pth"), "cpu", torch.float32)


# 1 row: the CPU kernels (on AVX2 and AVX-512 machines) with their own copies; 200 rows, past their
# row limits: PyTorch's matmul on the file's tensors
@pytest.mark.parametrize("tokens", [1, 200])
def test_bytes_read_per_step_are_those_of_the_tensors_its_ops_take(int4_model, tokens):
    counted = generate.bytes_read_per_step(int4_model, tokens)
    assert counted == bytes_a_step_reads(int4_model, tokens)


@pytest.mark.parametrize("weights", ["model.safetensors", "model_int8.pth", "model_int4.g32.pth"])
def test_reported_bytes_per_step_are_the_weights_a_step_reads(smollm2_quantized, weights,
                                                               tmp_path, capsys, monkeypatch):
    # smollm2_quantized: quantize.py's int8 and int4 files of SmolLM2, made once (conftest.py).
    models, load_weights = [], generate.load_weights

    def keep_model(*args):
        models.append(load_weights(*args))
        return models[-1]
    monkeypatch.setattr(generate, "load_weights", keep_model)
    out = tmp_path / "m.json"
    stderr = run_generate(["--checkpoint_path", smollm2_quantized / weights, "--prompt", "Hi",
                           "--max_new_tokens", "4", "--temperature", "0", "--device", "cpu",
                           "--json", out], capsys)
    reported = json.loads(out.read_text())["model_bytes"]
    assert reported == bytes_a_step_reads(models[0], 1)
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


def test_throughput_counts_the_tokens_after_the_prefill_and_bandwidth_one_read_per_forward():
    """Each row's first token comes from the prefill (timed as the time to first token), so decode
    throughput counts the rest; a decode step reads the weights once whatever its rows. Two rows: 5
    new tokens, and 3 then an end token (9 sampled), after prompts of 4 and 6 tokens, in 4 steps."""
    gen = generate.Generation(tokens=[[1] * 5, [2] * 3], generated=9, prompt_tokens=[4, 6],
                              ttft_s=0.5, decode_s=2.0, decode_steps=4)
    m = generate.metrics(gen, model_bytes=3e9, device=torch.device("cpu"))
    assert m["new_tokens"] == [5, 3] and m["prompt_tokens"] == [4, 6]
    assert m["prefill_tok_s"] == pytest.approx((4 + 6) / 0.5)
    assert m["decode_tok_s"] == pytest.approx((9 - 2) / 2.0)
    assert m["bandwidth_gb_s"] == pytest.approx(3 * 4 / 2.0)
    assert "accepted_lengths" not in m


def test_speculation_metrics_count_kept_drafts_and_the_tokens_the_rounds_gave():
    """k = 3; rounds that kept 0, 2, 2 and 3 drafts: 7 of 12 drafts kept, and each round adds the
    target's own token: 11 tokens in 4 verifies, or 9 where the last round's answer ended after
    its second token."""
    m = generate.speculation_metrics([1, 0, 2, 1], 11)
    assert m["acceptance_rate"] == pytest.approx(7 / 12)
    assert m["tokens_per_verify"] == pytest.approx(11 / 4)
    assert generate.speculation_metrics([1, 0, 2, 1], 9)["tokens_per_verify"] == pytest.approx(9 / 4)
    assert generate.speculation_metrics([0, 0, 0, 0], 0)["acceptance_rate"] is None  # no rounds


def test_a_speculative_samples_tokens_per_verify_counts_the_tokens_it_gave():
    """An answer of 7 tokens (its end token among them) from the prefill and one round that kept
    all 8 drafts: 6 tokens in 1 verify, not 9."""
    gen = generate.Generation(tokens=[[1] * 6], generated=7, prompt_tokens=[4], ttft_s=0.5,
                              decode_s=1.0, decode_steps=1, accepted_lengths=[0] * 8 + [1])
    m = generate.metrics(gen, model_bytes=3e9, device=torch.device("cpu"))
    assert m["acceptance_rate"] == 1.0 and m["tokens_per_verify"] == 6


def test_a_batchs_line_names_each_figure_in_its_unit_over_the_batch_and_per_row():
    """The batch of test_throughput_counts_the_tokens_after_the_prefill_and_bandwidth_one_read_per_forward."""
    gen = generate.Generation(tokens=[[1] * 5, [2] * 3], generated=9, prompt_tokens=[4, 6],
                              ttft_s=0.5, decode_s=2.0, decode_steps=4)
    line = generate.describe(generate.metrics(gen, model_bytes=3e9, device=torch.device("cpu")))
    assert line.startswith("8 new tokens over 2 rows (3 to 5 per row), time to first token 500.0 ms, prefill "
                           "20.0 tok/s, decode 3.50 tok/s over the batch (1.75 per row), weights read 6.0 GB/s, "
                           "peak memory "), line


def test_peak_memory_on_a_cpu_is_the_processs_peak_resident_set_in_gb():
    import resource
    gen = generate.Generation(tokens=[[1] * 5], generated=5, prompt_tokens=[4], ttft_s=0.5, decode_s=2.0,
                              decode_steps=4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    peak = generate.metrics(gen, model_bytes=3e9, device=torch.device("cpu"))["peak_memory_gb"]
    assert before / 1e9 <= peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def test_speculations_line_gives_the_acceptance_and_the_rounds_by_drafts_kept():
    """The rounds of test_speculation_metrics_count_kept_drafts_and_the_tokens_the_rounds_gave; none kept 1."""
    line = generate.describe_speculation(generate.speculation_metrics([1, 0, 2, 1], 11))
    assert line == ("speculative decoding, 3 drafts a round: 58.3% accepted, 2.75 tokens per target forward, "
                    "rounds by drafts kept {0: 1, 2: 2, 3: 1} (none kept any other number)")
    no_rounds = generate.describe_speculation(generate.speculation_metrics([0, 0, 0, 0], 0))
    assert no_rounds == "speculative decoding: no rounds (the first token ended the sample)"


@pytest.mark.parametrize("name", ["trace.json", "trace.json.gz"])
def test_a_profile_is_the_last_samples_trace_written_whole_and_gzipped_by_its_name(
        smollm2_checkpoint, tmp_path, capsys, monkeypatch, name):
    import gzip
    generations, profiled_after = [], []  # profiled_after: generations done when profiling began
    generate_fn, profile = generate.generate, torch.profiler.profile

    def counted(*args, **kwargs):
        generations.append(1)
        return generate_fn(*args, **kwargs)

    def counting_profile(*args, **kwargs):
        profiled_after.append(len(generations))
        return profile(*args, **kwargs)
    monkeypatch.setattr(generate, "generate", counted)
    monkeypatch.setattr(torch.profiler, "profile", counting_profile)
    run_generate(["--checkpoint_path", smollm2_checkpoint, "--prompt", "Hi", "--max_new_tokens",
                  "3", "--num_samples", "2", "--temperature", "0", "--device", "cpu", "--profile",
                  tmp_path / name], capsys)
    assert profiled_after == [1] and len(generations) == 2  # the second sample alone
    data = (tmp_path / name).read_bytes()
    trace = json.loads(gzip.decompress(data) if name.endswith(".gz") else data)
    # one sample of two: its prefill and 2 decode steps, each a forward that embeds once
    forwards = [e for e in trace["traceEvents"] if e.get("name") == "aten::embedding"]
    assert len(forwards) == 3
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left
