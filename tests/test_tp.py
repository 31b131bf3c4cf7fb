"""tp.py: tensor parallelism. How each rank's part of a checkpoint is cut (in this process, no process group),
quantize-then-split against split-then-quantize, and then the real thing: 2 or 3 processes under torchrun
(gloo on the CPU) against one process, for logits, compiled greedy decoding and generate.py's text and errors.

Run as a script (by torchrun, from the tests below) this file is the worker that computes logits under TP."""
import json
import sys
from dataclasses import replace

import pytest
import torch

from conftest import QUIET, ROOT, TORCHRUN, as_run, assert_one_error_line, main_error, run_script
from checkpoint import CONFIGS as NAMED_CONFIGS
from checkpoint import InputError, empty_model, load_model, random_model, read_checkpoint, save_checkpoint
from model import ModelArgs, Transformer

TINY = dict(dim=64, n_layer=2, n_head=4, vocab_size=97, intermediate_size=128, block_size=64)
# Multi-head and grouped-query attention, with and without q/k/v bias. The vocabularies of 97 do not divide by 2
# (the last rank's output rows are padded); one config ties its output layer to the embedding.
CONFIGS = {
    "mha": dict(n_kv_heads=4),
    "mha-bias": dict(n_kv_heads=4, attention_bias=True, vocab_size=96),
    "gqa": dict(n_kv_heads=2, vocab_size=96),
    "gqa-bias-tied": dict(n_kv_heads=2, attention_bias=True, tie_embeddings=True),
    # a mixture of experts (Qwen3-MoE's shape: q/k norm, 4 experts of which 2 per token)
    "moe": dict(n_kv_heads=2, intermediate_size=64, n_experts=4, n_active_experts=2, qk_norm=True),
}
QUANTIZED = {"int8": ["--mode", "int8"], "int4": ["--mode", "int4", "--groupsize", "32"]}  # of gqa-bias-tied
PROMPTS = [[5, 17, 3, 44, 9, 61, 2, 30], [8, 8, 70, 1, 13, 52, 6, 25]]  # (2, 8)
DECODED = [[11, 12], [40, 41], [90, 3]]  # fed one position at a time after the prompts


def save_tiny(folder, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    args = ModelArgs(**{**TINY, **overrides})
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)  # norms too, so that their (replicated) scales matter
    save_checkpoint(folder, args, model.state_dict(), force=True)
    return folder


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """{name: weights file} for every CONFIGS entry, the int4 and int8 copies of moe and the int8 / int4 copies
    of gqa-bias-tied."""
    import quantize
    root = tmp_path_factory.mktemp("tp")
    paths = {name: save_tiny(root / name, i, **cfg) / "model.safetensors" for i, (name, cfg) in enumerate(CONFIGS.items())}
    for mode, flags in (("int4", ["--groupsize", "32"]), ("int8", [])):
        paths[f"moe-{mode}"] = root / "moe" / f"model_{mode}.pth"
        quantize.main(["--checkpoint_path", str(paths["moe"]), "--mode", mode, *flags,
                       "--out", str(paths[f"moe-{mode}"])])
    for mode, flags in QUANTIZED.items():
        out = root / "gqa-bias-tied" / f"model_{mode}.pth"
        quantize.main(["--checkpoint_path", str(paths["gqa-bias-tied"]), *flags, "--out", str(out)])
        paths[mode] = out
    return paths


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    """Logits (2, 11, vocab) of PROMPTS prefilled at once, then DECODED one position at a time."""
    device = model.tok_embeddings.weight.device
    model.setup_caches(2, 16)
    steps = [model(torch.tensor(PROMPTS, device=device), torch.arange(8, device=device))]
    for t, tokens in enumerate(DECODED):
        steps.append(model(torch.tensor(tokens, device=device)[:, None], torch.tensor([8 + t], device=device)))
    return torch.cat(steps, dim=1).cpu()


def greedy_tokens(model, decode_fn=None) -> torch.Tensor:
    """6 greedy tokens after each of PROMPTS through generate.py's loop: (2, 6)."""
    import generate
    model.setup_caches(2, 8 + 6)
    kwargs = {} if decode_fn is None else {"decode_fn": decode_fn}
    return torch.tensor(generate.generate(model, PROMPTS, 6, generate.Sampling(temperature=0), **kwargs).tokens)


# ---- cutting a checkpoint into parts (no processes needed) ---------------------------------------------------

def test_each_rank_gets_a_share_of_the_heads_kv_heads_and_ffn_width():
    import tp
    args = ModelArgs(**{**TINY, "n_kv_heads": 2})
    part = tp.shard_args(args, 2)
    assert (part.n_head, part.n_kv_heads, part.intermediate_size) == (2, 1, 64)
    assert (part.dim, part.head_dim, part.vocab_size) == (args.dim, args.head_dim, args.vocab_size)


def test_heads_or_an_ffn_width_that_do_not_divide_are_refused_with_the_process_counts_that_fit():
    import tp
    smollm2 = ModelArgs(**NAMED_CONFIGS["SmolLM2-135M"])  # 9 heads, 3 KV heads
    with pytest.raises(InputError,
                       match=r"attention heads \(9\), KV heads \(3\).* splits over 1, 3 processes"):
        tp.shard_args(smollm2, 2)
    odd_ffn = ModelArgs(dim=64, n_layer=1, n_head=4, n_kv_heads=2, vocab_size=32, intermediate_size=129)
    with pytest.raises(InputError, match=r"FFN width \(129\) to divide by 2; this model splits over 1 processes"):
        tp.shard_args(odd_ffn, 2)


def test_the_ranks_parts_put_together_are_the_checkpoint(tiny_checkpoints):
    import tp
    path = tiny_checkpoints["gqa-bias-tied"]
    whole = load_model(read_checkpoint(path))
    parts = [tp.load_shard(path, rank, 2, "cpu") for rank in range(2)]
    a = whole.args
    q, kv = a.n_head * a.head_dim, a.n_kv_heads * a.head_dim
    for i in range(a.n_layer):
        layer, halves = whole.layers[i], [p.layers[i] for p in parts]
        for name in ("weight", "bias"):  # each rank: its heads' q rows, then its kv heads' k rows, then v rows
            splits = [getattr(h.attention.wqkv, name).split([q // 2, kv // 2, kv // 2]) for h in halves]
            full = getattr(layer.attention.wqkv, name).split([q, kv, kv])
            for j in range(3):
                assert torch.equal(torch.cat([s[j] for s in splits]), full[j])
        gates_ups = [h.feed_forward.w13.weight.chunk(2) for h in halves]  # each rank: its gate rows, then its up rows
        for j, full in enumerate(layer.feed_forward.w13.weight.chunk(2)):
            assert torch.equal(torch.cat([g[j] for g in gates_ups]), full)
        assert torch.equal(torch.cat([h.attention.wo.weight for h in halves], dim=1), layer.attention.wo.weight)
        assert torch.equal(torch.cat([h.feed_forward.w2.weight for h in halves], dim=1), layer.feed_forward.w2.weight)
        assert torch.equal(halves[1].ffn_norm.weight, layer.ffn_norm.weight)  # replicated
    # The tied output layer: vocabulary rows 0-48 and 49-96, the second part padded with one zero row.
    out = torch.cat([p.output.weight for p in parts])
    assert out.shape == (98, a.dim) and torch.equal(out[:97], whole.tok_embeddings.weight) and not out[97].any()
    assert torch.equal(parts[1].tok_embeddings.weight, whole.tok_embeddings.weight)


def test_each_rank_holds_its_slice_of_every_expert_and_the_whole_router(tiny_checkpoints):
    import tp
    path = tiny_checkpoints["moe"]
    whole = load_model(read_checkpoint(path))
    parts = [tp.load_shard(path, rank, 2, "cpu") for rank in range(2)]
    for i in range(whole.args.n_layer):
        moe, halves = whole.layers[i].feed_forward, [p.layers[i].feed_forward for p in parts]
        gates_ups = [h.w13.weight.chunk(2, dim=1) for h in halves]  # (experts, inter / 2, dim) each
        for j, full in enumerate(moe.w13.weight.chunk(2, dim=1)):
            assert torch.equal(torch.cat([g[j] for g in gates_ups], dim=1), full)
        assert torch.equal(torch.cat([h.w2.weight for h in halves], dim=2), moe.w2.weight)
        assert all(torch.equal(h.gate.weight, moe.gate.weight) for h in halves)
    int4 = [tp.load_shard(tiny_checkpoints["moe-int4"], rank, 2, "cpu") for rank in range(2)]
    whole = load_model(read_checkpoint(tiny_checkpoints["moe-int4"]))
    w2 = [p.layers[0].feed_forward.w2.weights(..., torch.float32) for p in int4]
    torch.testing.assert_close(torch.cat(w2, dim=2),
                               whole.layers[0].feed_forward.w2.weights(..., torch.float32))
    # int8's w2 is row-parallel: each rank's columns, with the scales of the whole rows
    whole = load_model(read_checkpoint(tiny_checkpoints["moe-int8"])).layers[0].feed_forward.w2
    halves = [tp.load_shard(tiny_checkpoints["moe-int8"], rank, 2, "cpu").layers[0].feed_forward.w2
              for rank in range(2)]
    assert torch.equal(torch.cat([h.weight for h in halves], dim=2), whole.weight)
    assert all(torch.equal(h.scales, whole.scales) for h in halves)


def test_a_rank_refuses_weights_of_the_wrong_kind_of_dtype_naming_the_tensor(tiny_checkpoints, tmp_path):
    """As one process does (load_model): a quantized layer's integer weights stored as floats, or integers where
    floats belong, are refused before any slice is read; float weights of another float dtype load."""
    import shutil
    from safetensors.torch import load_file, save_file
    import tp
    quantized = torch.load(tiny_checkpoints["int8"], weights_only=True)
    name = "layers.0.attention.wqkv.weight"
    shutil.copytree(tiny_checkpoints["int8"].parent, tmp_path / "q")
    torch.save({**quantized, name: quantized[name].float()}, tmp_path / "q" / "model_int8.pth")
    with pytest.raises(InputError, match=f"{name} is torch.float32, expected torch.int8"):
        tp.load_shard(tmp_path / "q" / "model_int8.pth", 0, 2, "cpu")
    state = load_file(tiny_checkpoints["gqa"])
    shutil.copytree(tiny_checkpoints["gqa"].parent, tmp_path / "f")
    save_file({**state, "norm.weight": state["norm.weight"].to(torch.int8)}, tmp_path / "f" / "model.safetensors")
    with pytest.raises(InputError, match="norm.weight is torch.int8, expected floats"):
        tp.load_shard(tmp_path / "f", 1, 2, "cpu")
    save_file({k: v.to(torch.float16) for k, v in state.items()}, tmp_path / "f" / "model.safetensors")
    assert tp.load_shard(tmp_path / "f", 1, 2, "cpu").norm.weight.dtype == torch.float16


def test_a_rank_loaded_in_bfloat16_keeps_its_quantized_weights_integer(tiny_checkpoints):
    import tp
    for mode, stored in (("int8", torch.int8), ("int4", torch.uint8)):
        part = tp.load_shard(tiny_checkpoints[mode], 1, 2, "cpu", torch.bfloat16)
        assert part.layers[0].attention.wqkv.weight.dtype == stored
        assert part.norm.weight.dtype == torch.bfloat16


def test_quantize_then_split_equals_split_then_quantize(tiny_checkpoints):
    """Every int4 layer (groups fall on the split), and int8's column-parallel layers (scales are per row): the
    stored tensors of a rank's part of the quantized file are those of its quantized float part. int8's
    row-parallel layers keep the whole row's scale: they are the columns of the quantized file, exactly."""
    import quantize
    import tp
    for mode, groupsize in (("int4", 32), ("int8", None)):
        whole = load_model(read_checkpoint(tiny_checkpoints[mode]))
        for rank in range(2):
            float_part = tp.load_shard(tiny_checkpoints["gqa-bias-tied"], rank, 2, "cpu")
            quantized_part = tp.load_shard(tiny_checkpoints[mode], rank, 2, "cpu")
            for name in ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"):
                layer = quantized_part.layers[1].get_submodule(name)
                if mode == "int8" and name in tp.ROW_PARALLEL:
                    full = whole.layers[1].get_submodule(name)
                    columns = full.weight.shape[1] // 2
                    assert torch.equal(layer.weight, full.weight[:, rank * columns:(rank + 1) * columns])
                    assert torch.equal(layer.scales, full.scales)
                    continue
                w = float_part.layers[1].get_submodule(name).weight
                for key, expected in quantize.quantize_weight(mode, w, groupsize).items():
                    assert torch.equal(getattr(layer, key), expected), f"{mode} {name}.{key}"


def test_int4_groups_that_a_split_would_cut_are_refused():
    import tp
    args = ModelArgs(**{**TINY, "n_kv_heads": 2})  # wo: 64 input columns, 32 per rank
    tp.check_split_groups(args, {"groupsize": 32}, 2)
    with pytest.raises(InputError, match=r"attention.wo's 64 input columns into 32 per process, "
                                         r"which is not whole int4 groups of 64: use a group size "
                                         r"that divides it \(32\) or another number"):
        tp.check_split_groups(args, {"groupsize": 64}, 2)
    # 48 a process: no group size of int4's divides it, so only another number of processes helps
    with pytest.raises(InputError, match="48 per process, which is not whole int4 groups of 32: "
                                         "use another number of processes"):
        tp.check_split_groups(replace(args, intermediate_size=96), {"groupsize": 32}, 2)
    tp.check_split_groups(args, {"groupsize": 128}, 1)  # one process pads K to whole groups instead
    # wo's input is the heads' width (4 heads of 24 here), not the model's
    with pytest.raises(InputError, match="attention.wo's 96 input columns into 48 per process"):
        tp.check_split_groups(replace(args, head_dim=24), {"groupsize": 32}, 2)


def test_random_quantized_weights_are_quantize_pys_layers_on_each_rank():
    import kernels
    import quantize
    import tp
    part = tp.random_shard("stories15M", "int8", 2, "cpu", torch.float32)
    int8 = {name for name, m in part.named_modules() if isinstance(m, kernels.Int8Linear)}
    assert int8 == set(quantize.linear_names(part.args, include_output=True))  # the output layer too
    assert part.layers[0].attention.wqkv.out_features == 3 * 288 // 2  # its half of the 6 heads' q, k and v
    logits = logits_of(part)  # no collectives: this rank's partial sums, finite
    assert logits.shape == (2, 11, 32000 // 2) and logits.isfinite().all()
    with pytest.raises(InputError, match="144 per process, which is not whole int4 groups of 32"):
        tp.random_shard("stories15M", "int4.g32", 2, "cpu", torch.float32)  # as a real checkpoint would be


@pytest.mark.parametrize("precision", ["int8", "int4.g32", "fp8"])
def test_random_quantized_experts_on_each_rank(monkeypatch, precision):
    import kernels
    import tp
    monkeypatch.setitem(NAMED_CONFIGS, "tiny-moe", {**TINY, **CONFIGS["moe"]})
    part = tp.random_shard("tiny-moe", precision, 2, "cpu", torch.float32)
    moe = part.layers[0].feed_forward
    assert type(moe.w13) is type(moe.w2) is kernels.EXPERTS[precision.partition(".")[0]]
    assert moe.w13.weights(..., torch.float32).shape == (4, 2 * 64 // 2, TINY["dim"])
    assert type(moe.gate) is torch.nn.Linear  # the router stays in float
    assert logits_of(part).isfinite().all()


def test_random_quantization_goes_with_random_weights(tmp_path, capsys):
    import generate
    # Refused before the checkpoint (an empty folder: no weights) is even looked for.
    with pytest.raises(InputError, match="^--random_quantization goes with --random_weights"):
        generate.main(["--checkpoint_path", str(tmp_path), "--random_quantization", "int8"])
    assert capsys.readouterr() == ("", "")  # main raises; printing the one line is the script's job
    r = run_script("generate.py", "--checkpoint_path", tmp_path, "--random_quantization", "int8",
                   env=QUIET)
    assert r.returncode == 1 and r.stdout == ""
    assert_one_error_line(r.stderr, "--random_quantization goes with --random_weights")


def test_interactive_under_torchrun_is_refused_in_one_line_before_the_processes_join(tmp_path, monkeypatch,
                                                                                      capsys):
    """generate.py --interactive under torchrun (its environment stood in for, in this process): every process
    would need the prompt, so tp.start refuses it, every rank alike, before the process group forms."""
    import generate
    import tp
    from test_generate import save_tiny_checkpoint  # a tokenizer: --interactive needs one
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    monkeypatch.setattr(generate.dist, "is_torchelastic_launched", lambda: True)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tp, "STARTED", False)
    monkeypatch.setattr(tp, "init_process_group", lambda *_: pytest.fail("the processes joined"))
    main_error(as_run(generate.main), ["--checkpoint_path", checkpoint, "--interactive", "--device", "cpu"],
               capsys, "--interactive is not supported under torchrun")
    assert not tp.STARTED  # so exit_with_error speaks for every rank, from rank 0


def exits_with(monkeypatch, capfd, error, started: bool) -> tuple[int, str, str]:
    """tp.exit_with_error(error) as a process would end: (exit status, stdout, stderr). A message
    given to sys.exit is printed to stderr by the interpreter, which then exits 1."""
    import tp
    monkeypatch.setattr(tp, "STARTED", started)
    with pytest.raises(SystemExit) as exited:
        tp.exit_with_error(error)
    out, err = capfd.readouterr()
    code = exited.value.code
    return (1, out, f"{err}{code}\n") if isinstance(code, str) else (code, out, err)


def test_exit_with_error_speaks_for_every_rank_from_rank_0_then_for_each_rank(monkeypatch, capfd):
    """Before tp.start every rank checks the same input: rank 0 prints the one line, the others
    exit 1 in silence (under torchrun their sys.stderr is /dev/null, so they would print to
    sys.__stderr__), once they have given rank 0 time to print it. After it each rank prints its own
    line, naming itself."""
    import tp
    waits = []
    monkeypatch.setattr(tp.time, "sleep", waits.append)
    error = InputError("no GPU for local rank 1")
    monkeypatch.setenv("RANK", "1")
    assert exits_with(monkeypatch, capfd, error, started=False) == (1, "", "")
    assert len(waits) == 1 and waits[0] > 0
    assert exits_with(monkeypatch, capfd, error, started=True) == (
        1, "", "error: rank 1: no GPU for local rank 1\n")
    monkeypatch.setenv("RANK", "0")
    for started in (False, True):
        assert exits_with(monkeypatch, capfd, error, started) == (
            1, "", "error: no GPU for local rank 1\n")
    # A check against memory that the processes on a CPU share: rank 0 speaks for all after it too.
    alike = tp.AlikeOnEveryRank("the KV cache needs more than the free memory on cpu")
    assert exits_with(monkeypatch, capfd, alike, started=True)[2].startswith("error: the KV cache")
    monkeypatch.setenv("RANK", "1")
    assert exits_with(monkeypatch, capfd, alike, started=True) == (1, "", "")


def test_the_kv_cache_check_is_alike_on_every_rank_on_a_cpu_and_each_ranks_own_on_a_gpu(monkeypatch):
    import generate
    import tp
    args = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=32, intermediate_size=64)
    monkeypatch.setattr(generate, "host_memory_available", lambda: 1000)
    with pytest.raises(tp.AlikeOnEveryRank, match="KV cache"):
        generate.check_cache_fits(args, 1, 64, torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 0))
    with pytest.raises(InputError, match="KV cache") as refused:
        generate.check_cache_fits(args, 1, 64, torch.bfloat16, torch.device("cuda", 0))
    assert not isinstance(refused.value, tp.AlikeOnEveryRank)


def test_a_weights_file_that_cannot_load_is_refused_before_the_processes_join(tiny_checkpoints, tmp_path,
                                                                              monkeypatch):
    """Every rank reads the same file: its header is checked in tp.start, so that rank 0 speaks for all."""
    import shutil
    import tp
    folder = shutil.copytree(tiny_checkpoints["mha"].parent, tmp_path / "cut")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    monkeypatch.setattr(tp, "STARTED", False)
    monkeypatch.setattr(tp, "init_process_group", lambda *_: pytest.fail("the processes joined"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = type("Args", (), dict(checkpoint_path=folder))()
    with pytest.raises(InputError, match="cannot read weights"):
        tp.start(args, read_checkpoint(folder).args, torch.device("cpu"))
    assert not tp.STARTED


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_keeps_the_files_it_was_asked_to_write(tiny_checkpoints, tmp_path, monkeypatch, rank):
    import tp
    for name, value in (("WORLD_SIZE", "2"), ("RANK", str(rank)), ("LOCAL_RANK", str(rank))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tp, "STARTED", False)
    monkeypatch.setattr(tp, "init_process_group", lambda device: device)
    files = dict(json=tmp_path / "m.json", profile=tmp_path / "trace", output=tmp_path / "o.json")
    args = type("Args", (), dict(checkpoint_path=tiny_checkpoints["mha"], **files))()
    tp.start(args, read_checkpoint(tiny_checkpoints["mha"]).args, torch.device("cpu"))
    assert {name: getattr(args, name) for name in files} == (files if rank == 0 else dict.fromkeys(files))


# ---- under torchrun ---------------------------------------------------------------------------------------

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=two_gpus)])
def test_two_processes_give_the_logits_and_greedy_tokens_of_one(tiny_checkpoints, tmp_path, device):
    names = list(tiny_checkpoints)
    r = run_script(*TORCHRUN, "--nproc_per_node=2", "tests/test_tp.py", tmp_path, device,
                   *(tiny_checkpoints[name] for name in names), env=QUIET)
    assert r.returncode == 0, r.stderr[-3000:]
    # float32 on the CPU: the split only sums in another order. A GPU's matmul kernels may reorder more. The int8
    # and int4 layers on a CPU compute in bfloat16 (kernels.py, "CPU kernels"): each rank's partial sums of a
    # row-split layer are rounded to bfloat16 before they are added.
    atol = {"cpu": 1e-5, "cuda": 1e-4, "cpu quantized": 3e-2, "cuda quantized": 1e-4}
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for key, result in ranks[0].items():  # bit for bit: so every rank samples the same token
        assert torch.equal(result, ranks[1][key]), key
    for name in names:
        ckpt = read_checkpoint(tiny_checkpoints[name])
        one = load_model(ckpt, device)
        kind = f"{device} quantized" if ckpt.quantization is not None else device
        for output in ("", "replicated output "):  # the output layer split by vocabulary, or whole on each rank
            torch.testing.assert_close(ranks[0][f"{output}{tiny_checkpoints[name]}"], logits_of(one), atol=atol[kind],
                                       rtol=0, msg=f"{output}{name}")
    # The decode step compiled as generate.py --compile does (one CUDA graph on a GPU) picks under TP the tokens that
    # one process picks, eagerly; `one` is the last checkpoint, the one the worker compiled.
    assert ranks[0]["compiled_tokens"].tolist() == greedy_tokens(one).tolist()


# The SmolLM2 command lines run in the background from the session's start: conftest.py's torchrun_jobs.

@pytest.fixture(scope="module")
def smollm2_text(torchrun_jobs) -> str:
    """SmolLM2's greedy text in one process, without speculation."""
    r = torchrun_jobs[1]["one process"].wait()
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("speculation", ["none", "draft"])
def test_generate_under_torchrun_prints_the_greedy_text_of_one_process_once(torchrun_jobs, smollm2_text, speculation):
    # SmolLM2-135M's 9 heads and 3 KV heads split over 3 processes. The draft (here the model itself, so that it
    # is all the checkpoint there is) is replicated: every rank runs a whole copy of it.
    r = torchrun_jobs[1]["3 processes, draft" if speculation == "draft" else "3 processes"].wait()
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == smollm2_text  # rank 0 alone prints it
    assert r.stderr.count("Sample 0: 12 new tokens") == 1 and r.stderr.count("Loaded ") == 1 + (speculation == "draft")
    assert "per process, tensor parallel over 3" in r.stderr


@pytest.mark.slow
def test_generate_under_torchrun_refuses_heads_that_do_not_divide_in_one_line(torchrun_jobs):
    r = torchrun_jobs[1]["2 processes"].wait()
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "attention heads (9), KV heads (3)" in errors[0] and "1, 3 processes" in errors[0], r.stderr
    # It comes first, and no traceback of ours follows: the rest is torchrun's own report of a process that exited 1.
    assert r.stderr.splitlines()[0] == errors[0]
    assert str(ROOT / "generate.py") not in r.stderr and str(ROOT / "tp.py") not in r.stderr


def test_a_gpu_rank_needs_room_for_its_share_of_the_kv_cache_only(monkeypatch):
    """Under N-way tensor parallelism each GPU holds 1/N of the KV heads (processes on a CPU share
    one memory: they need room for all of it)."""
    import generate
    args = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=32, intermediate_size=64)
    whole = 2 * 2 * 1 * 2 * 64 * 16 * 2  # K and V, layers, rows, KV heads, slots, head_dim, bf16 bytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (whole * 3 // 4, 0))
    gpu = torch.device("cuda", 0)
    with pytest.raises(InputError, match="KV cache"):
        generate.check_cache_fits(args, 1, 64, torch.bfloat16, gpu)  # one process: all of it
    monkeypatch.setattr(generate.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(generate.dist, "get_world_size", lambda: 2)
    generate.check_cache_fits(args, 1, 64, torch.bfloat16, gpu)  # two: half of it on each GPU


def test_every_process_on_a_cpu_counts_its_own_whole_draft_cache(monkeypatch):
    """A draft model is whole in each process: on a GPU each rank's own memory holds one, where
    processes on a CPU share one memory, which must hold every process's draft cache."""
    import generate
    import tp
    args = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=32, intermediate_size=64)
    cache = 2 * 2 * 1 * 2 * 64 * 16 * 2  # K and V, layers, rows, KV heads, slots, head_dim, bf16 bytes
    monkeypatch.setattr(generate.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(generate.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(generate, "host_memory_available", lambda: 2 * cache)  # the model's and one draft's
    with pytest.raises(tp.AlikeOnEveryRank, match="the draft model's included"):
        generate.check_cache_fits(args, 1, 64, torch.bfloat16, torch.device("cpu"), draft=args)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (cache // 2 + cache, 0))
    generate.check_cache_fits(args, 1, 64, torch.bfloat16, torch.device("cuda", 0), draft=args)


@pytest.mark.slow
def test_input_every_rank_checks_alike_is_refused_in_one_line_under_torchrun(torchrun_jobs):
    r = torchrun_jobs[1]["prompt past the context, 2 processes"].wait()
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "context is 256 tokens" in errors[0], r.stderr


@pytest.mark.slow
def test_random_weights_beyond_memory_under_torchrun_are_refused_counting_every_ranks_part(torchrun_jobs):
    """Processes on a CPU share its memory: the ranks' halves of a 0.8 TB model are counted together
    (each half is more than this machine holds too), before any rank makes its part."""
    r = torchrun_jobs[1]["random weights beyond memory, 2 processes"].wait()
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "GB of random weights" in errors[0], r.stderr
    model = empty_model(ModelArgs(**NAMED_CONFIGS["Llama-3.1-405B"])).to(torch.bfloat16)
    whole = sum(p.nbytes for p in model.parameters())
    gb = float(errors[0].split("error: ")[1].split(" GB")[0])
    assert gb == pytest.approx(whole / 1e9, rel=0.01), errors[0]


@pytest.mark.slow
def test_random_weights_under_torchrun_report_the_bytes_each_gpu_reads(torchrun_jobs):
    folder, jobs = torchrun_jobs
    r = jobs["random weights, 2 processes"].wait()
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("Sample 0:") == 1
    sample = next(line for line in r.stderr.splitlines() if line.startswith("Sample 0:"))
    assert sample.endswith("GB (per process, tensor parallel over 2)"), sample  # whose GB/s and memory
    per_gpu = json.loads((folder / "random.json").read_text())["model_bytes"]
    whole = random_model("stories15M", "cpu", torch.float32)
    assert not whole.args.tie_embeddings  # a step reads only the looked-up rows of the embedding
    per_step = sum(p.nbytes for p in whole.parameters()) - whole.tok_embeddings.weight.nbytes
    norms = sum(p.numel() * p.element_size() for name, p in whole.named_parameters() if "norm" in name)
    # Each GPU reads half of every split weight (the output layer's too) and a whole copy of the norms.
    assert per_gpu == (per_step - norms) / 2 + norms


# ---- the worker that the torchrun tests start -----------------------------------------------------------------

def worker(out_dir: str, device_type: str, checkpoints: list):
    """Each rank: TP logits of every checkpoint, then greedy tokens of the last one through the decode step
    compiled as generate.py --compile compiles it; saved for the test to compare."""
    import torch.distributed as dist
    import generate
    import tp
    rank, world = tp.rank(), tp.world_size()
    device = tp.init_process_group(torch.device(device_type))
    results = {}
    for path in checkpoints:
        model = tp.parallelize(tp.load_shard(path, rank, world, device), rank, world, dist.group.WORLD)
        results[path] = logits_of(model)
    decode = torch.compile(generate.decode_one_token, mode="reduce-overhead", fullgraph=True)
    results["compiled_tokens"] = greedy_tokens(model, decode)
    tp.SHARD_OUTPUT = False  # what TP_OUTPUT=replicated sets: a whole output layer on every rank
    for path in checkpoints:
        model = tp.parallelize(tp.load_shard(path, rank, world, device), rank, world, dist.group.WORLD)
        results[f"replicated output {path}"] = logits_of(model)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3:])


@pytest.mark.slow
def test_eval_perplexity_under_torchrun_equals_one_process(torchrun_jobs):
    # eval.py shards through the same tp.load_model; every rank scores the same windows, rank 0 reports.
    folder, jobs = torchrun_jobs

    def perplexity(processes: int) -> float:
        r = jobs[f"eval, {processes} processes"].wait()
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("perplexity") == 1  # printed by rank 0 only
        return json.loads((folder / f"ppl{processes}.json").read_text())["perplexity"]["perplexity"]

    assert perplexity(3) == pytest.approx(perplexity(1), rel=1e-5)
