"""The GPU path: compiled decode with CUDA graphs gives the eager path's tokens. Runs where CUDA
exists (the device runs recorded in BENCHMARKS.md); on CPU-only machines these are reported as
skipped."""
import pytest
import torch

from generate import Sampling, decode_one_token, generate, prefill
from test_generate import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_compiled_cuda_graph_decode_matches_eager_for_a_mixed_batch():
    model = tiny_model(attention_bias=True).cuda()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 7)]
    model.setup_caches(len(prompts), 11 + 40)
    eager = generate(model, prompts, 40, Sampling(temperature=0)).tokens
    decode = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    pre = torch.compile(prefill, fullgraph=True, dynamic=True)
    for _ in range(3):  # warm-up, graph recording, replay
        compiled = generate(model, prompts, 40, Sampling(temperature=0), prefill_fn=pre,
                            decode_fn=decode).tokens
        assert compiled == eager


def test_bf16_logits_match_float32_reference():
    from kernels import relative_error
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 30))
    model.setup_caches(2, 30)
    with torch.no_grad():
        ref = model(idx, torch.arange(30)).double()
        model = model.cuda().to(torch.bfloat16)
        model.setup_caches(2, 30)
        out = model(idx.cuda(), torch.arange(30, device="cuda")).double().cpu()
    rel = relative_error(out, ref)
    assert rel < 1e-2, f"bf16 relative error {rel:.2e}"


def test_every_kernel_matches_its_reference_on_gpu():
    from kernels import check_kernels
    results = check_kernels("cuda")
    assert len(results) > 200  # every kernel's cases (243 on an H200)
    failures = [r for r in results if not r["ok"]]
    assert not failures, failures


def test_compiled_sampling_with_the_top_k_kernel_draws_from_the_top_k_distribution(monkeypatch):
    """generate.sample in a CUDA graph, its top k by kernels.top_k (two rounds over a 32000-token
    vocabulary; torch.topk is not called): each of 20000 rows draws only from its top 2, in
    proportion to their probabilities, as the CPU test of the same distribution asks."""
    import kernels
    from generate import sample
    assert kernels.top_k_tiles(32000, 2)[1] > 0  # the second round runs

    def not_called(*args, **kwargs):
        raise AssertionError("torch.topk was called: the top-k kernel was not")
    monkeypatch.setattr(torch, "topk", not_called)
    logits = torch.full((32000,), -20.0)
    logits[[7, 31000, 15000, 3]] = torch.log(torch.tensor([0.15, 0.5, 0.1, 0.25]))
    rows = logits.to("cuda", torch.bfloat16).expand(20000, -1).contiguous()
    draw = torch.compile(sample, mode="reduce-overhead", fullgraph=True)
    torch.manual_seed(0)
    for _ in range(3):  # warm-up, graph recording, replay
        tokens = draw(rows, Sampling(temperature=1.0, top_k=2)).view(-1).cpu()
    assert set(tokens.tolist()) == {31000, 3}
    freq = (tokens == 31000).float().mean().item()
    assert abs(freq - 2 / 3) < 0.015, freq


@pytest.mark.parametrize("qk_norm", [False, True])
def test_decode_attention_kernel_in_a_compiled_cuda_graph_matches_sdpa_at_each_rows_slot(qk_norm):
    """Rows decoding at different slots, with keys past each row's slot left over from a longer
    prefill: the compiled step with the decode attention kernel (checkpoint.to_device gives it;
    with q/k norm, the kernel applies it) against the eager step through SDPA, 20 steps (warm-up,
    recording, replays)."""
    import copy
    from kernels import decode_attention, prepare_for_device, relative_error
    model = tiny_model(qk_norm=qk_norm).cuda().to(torch.bfloat16)  # 4 query heads, 2 kv heads
    reference = copy.deepcopy(model)
    prepare_for_device(model)
    assert all(layer.attention.decode_kernel is decode_attention for layer in model.layers)
    ids = torch.randint(0, 97, (3, 32), device="cuda")
    starts = torch.tensor([[3], [11], [7]], device="cuda")  # (B, 1) each row's first decode slot
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for m in (model, reference):
            m.setup_caches(3, 32)
            m(ids[:, :11], torch.arange(11, device="cuda"))  # prefill: SDPA in both
        for t in range(20):
            pos = starts + t
            token = ids.gather(1, pos)  # (B, 1)
            expected = reference(token, pos).double()
            logits = step(token, pos).double()  # read before the next replay overwrites it
            rel = relative_error(logits, expected)
            assert rel < 2e-2, f"step {t}: relative error {rel:.2e}"


@pytest.mark.parametrize("piece", [16, 1])
def test_server_steps_with_the_chunk_attention_kernel_in_a_compiled_cuda_graph_match_sdpa(piece):
    """A server's steps: rows 0 and 1 decoding, a prompt prefilled into row 2 in three pieces of 16
    tokens (or of one: a one-token piece is no decode step) riding along, and row 2 decoding too, at the slot after its piece, as the server runs a
    prefilling row (its token dropped). The compiled step with the chunk and decode attention
    kernels (prepare_for_device gives them), recorded as a CUDA graph, against the eager step
    through SDPA: every row's logits at each step (warm-up, recording, replay; row 2's attend over
    the pieces before), then row 2's cache."""
    import copy
    from torch._dynamo.utils import counters
    from kernels import chunk_attention_op, prepare_for_device, relative_error
    model = tiny_model(qk_norm=True).cuda().to(torch.bfloat16)  # 4 query heads, 2 kv heads
    reference = copy.deepcopy(model)
    prepare_for_device(model)
    assert all(layer.attention.chunk_kernel is chunk_attention_op for layer in model.layers)
    ids = torch.randint(0, 97, (3, 64), device="cuda")
    counters.clear()
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    row = torch.tensor([2], device="cuda")
    with torch.no_grad():
        for m in (model, reference):
            m.setup_caches(3, 64)
            m(ids[:2, :11], torch.arange(11, device="cuda"))  # rows 0 and 1: SDPA in both
        for t, start in enumerate((0, piece, 2 * piece)):
            pos = torch.tensor([[11 + t], [11 + t], [start + piece]], device="cuda")  # (3, 1)
            slots = torch.arange(start, start + piece, device="cuda")[None]  # (1, piece)
            chunk = (ids[2:, start:start + piece], slots, row)
            expected = reference(ids[:, 11 + t:12 + t], pos, chunk=chunk).double()
            logits = step(ids[:, 11 + t:12 + t], pos, chunk=chunk).double()
            assert relative_error(logits, expected) < 2e-2, t
    assert counters["inductor"]["cudagraph_skips"] == 0  # the step ran as a CUDA graph
    for layer, wanted in zip(model.layers, reference.layers):
        cache, expected_cache = layer.attention.kv_cache, wanted.attention.kv_cache
        assert relative_error(cache.k[2], expected_cache.k[2]) < 2e-2
        assert relative_error(cache.v[2], expected_cache.v[2]) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_one_byte_gemv_takes_each_activation_dtype_and_a_view_inside_a_word(dtype):
    from kernels import kernel_route, one_byte_linear, quantized_cases, relative_error
    torch.manual_seed(0)
    for name, weights, reference_weights in quantized_cases(96, 320, "cuda")[:2]:  # int8, fp8
        for start in (0, 1):  # 1: x starts one value into its buffer
            x = torch.randn(1, 1, 321, device="cuda", dtype=dtype)[..., start:start + 320]
            assert kernel_route(x) == "gemv"
            y = one_byte_linear(x, *weights)  # (1, 1, 96)
            reference = x.double() @ reference_weights.T
            rel = relative_error(y, reference)
            assert y.dtype == dtype and rel < 1e-2, (name, start, rel)


def test_gemv_launched_early_reads_the_x_that_the_kernel_just_before_it_writes(monkeypatch):
    """On Hopper the one-row GEMV is a programmatic dependent launch that loads weights before
    waiting for the kernel before it: in a CUDA graph replayed on new inputs, each GEMV (int8
    weights, K whole and split; bf16 weights, whose K stays whole) must still see the x that
    kernel has just written, whether a plain PyTorch kernel or another GEMV (which lets it launch
    early) wrote it."""
    import kernels
    from kernels import random_one_byte, relative_error, scaled_gemv
    monkeypatch.setattr(torch._inductor.config.triton, "enable_pdl", True)  # as prepare_for_device
    torch.manual_seed(0)
    for N, K in [(12288, 4096), (4096, 11008)]:
        a = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        assert kernels.dependent_launch(a) == (kernels.on_hopper(a)
                                               and kernels.GRID_DEPENDENCY_CONTROL)
        int8, scales = random_one_byte((N, K), "cuda")[0], torch.rand(N, device="cuda") / 127
        bf16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / 64
        # (4096, N) bf16: its GEMV follows the first with no kernel between (the first K whole)
        then = torch.randn(4096, N, device="cuda", dtype=torch.bfloat16) / 64
        for weights, reference in (((int8, scales), int8.double() * scales.double()[:, None]),
                                   ((bf16, None), bf16.double())):
            def step():
                x = scaled_gemv(a * 2, *weights)  # x written by a plain kernel just before
                return x, scaled_gemv(x, then, None)
            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                x, y = step()  # (1, N), (1, 4096)
            for _ in range(5):
                a.copy_(torch.randn_like(a))
                graph.replay()
                rel = relative_error(x, 2 * a.double() @ reference.T)
                assert rel < 5e-3, (N, K, rel)
                assert relative_error(y, x.double() @ then.double().T) < 5e-3, (N, K)


@pytest.mark.parametrize("kind, rows", [("int4 g128", 1), ("int4 g128", 8), ("int8", 32),
                                        ("int8", 64), ("fp8", 32)])
def test_quantized_kernel_launched_early_reads_the_x_that_the_kernel_just_before_it_writes(
        kind, rows, monkeypatch):
    """On Hopper int4's Triton kernel (single rows in groups of 128 and 256 go through it, and
    batches), its first words loaded before its wait, and the one-byte small matmul of 32 to 64
    rows, which waits before any load, are programmatic dependent launches: in a CUDA graph
    replayed on new inputs, each call must see the x that plain PyTorch kernels wrote just before
    it (K split in parts in both layers). The next test gives int4's kernel a writer that lets it
    start early."""
    import kernels
    from kernels import (int4_triton_linear, int4_words, quantized_cases, quantized_mm,
                         relative_error)
    monkeypatch.setattr(torch._inductor.config.triton, "enable_pdl", True)  # as prepare_for_device
    torch.manual_seed(0)
    a = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    assert kernels.dependent_launch(a) == (kernels.on_hopper(a) and kernels.GRID_DEPENDENCY_CONTROL)
    # (12288, 4096), then (4096, 12288) after it
    (_, first, reference), (_, then, then_reference) = [
        next(c for c in quantized_cases(*shape, "cuda") if c[0] == kind)
        for shape in ((12288, 4096), (4096, 12288))]
    layer = quantized_mm
    if kind.startswith("int4"):  # the words as a CUDA int4 layer holds them
        first, then = [(int4_words(packed), *rest) for packed, *rest in (first, then)]
        layer = int4_triton_linear

    def step():
        x = layer(a * 2, *first)  # x written by a plain kernel just before
        return x, layer(x / 64, *then)
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x, y = step()  # (rows, 12288), (rows, 4096)
    for _ in range(5):
        a.copy_(torch.randn_like(a))
        graph.replay()
        assert relative_error(x, 2 * a.double() @ reference.T) < 1e-2
        assert relative_error(y, (x / 64).double() @ then_reference.T) < 1e-2


def test_int4_kernel_launched_right_after_the_gemv_reads_the_x_the_gemv_writes(monkeypatch):
    """The one-row GEMV lets the next kernel launch before it has written its output; int4's
    kernel right after it (its single rows in groups of 128) must still wait for that output: in a
    CUDA graph replayed on new inputs, its sums are those of the x the GEMV has just written."""
    import kernels
    from kernels import int4_triton_linear, int4_words, quantized_cases, relative_error, scaled_gemv
    monkeypatch.setattr(torch._inductor.config.triton, "enable_pdl", True)  # as prepare_for_device
    torch.manual_seed(0)
    a = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert kernels.dependent_launch(a) == (kernels.on_hopper(a) and kernels.GRID_DEPENDENCY_CONTROL)
    bf16 = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    (_, (packed, *int4), reference), = [c for c in quantized_cases(12288, 4096, "cuda")
                                        if c[0] == "int4 g128"]
    words = int4_words(packed)

    def step():
        h = scaled_gemv(a * 2, bf16, None)  # (1, 4096): the GEMV's output, no kernel after it
        return h, int4_triton_linear(h, words, *int4)
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, y = step()  # (1, 4096), (1, 12288)
    for _ in range(5):
        a.copy_(torch.randn_like(a))
        graph.replay()
        assert relative_error(h, 2 * a.double() @ bf16.double().T) < 1e-2
        assert relative_error(y, h.double() @ reference.T) < 1e-2


@pytest.mark.parametrize("mode, groupsize", [("int8", None), ("fp8", None), ("int4", 32),
                                             ("int4", 128)])
def test_a_quantized_model_prepared_for_the_gpu_holds_only_16_byte_aligned_tensors(mode, groupsize):
    """torch.compile copies a GPU input that does not start on a 16-byte boundary on every call,
    and its CUDA graphs on every replay: no parameter or buffer of a model prepared for the GPU
    (prepare_for_device: int4's words, tinygemm's copy, scales and zeros side by side) is one."""
    from test_cpu_kernels import quantized_model
    model = quantized_model(mode, groupsize, torch.bfloat16, "cuda")
    tensors = dict(model.named_parameters(), **dict(model.named_buffers()))
    assert [name for name, t in tensors.items() if t.data_ptr() % 16] == []


@pytest.mark.parametrize("groupsize, padded", [(32, 320), (128, 384)])
def test_int4_layer_packed_for_tinygemm_dequantizes_to_the_files_weights(groupsize, padded):
    """dequantize(), the kernels' reference, read back from tinygemm's own packed copy once it
    has replaced the file's tensors (the op times the identity) gives the file's weights bit for
    bit: K of 300 padded to whole groups, N of 7 padded to 16 for the op."""
    from kernels import Int4Linear
    layer = Int4Linear(300, 7, False, groupsize=groupsize, padded_in_features=padded)
    layer.weight.random_(0, 256)
    layer.scales.uniform_(0.01, 0.1)
    layer.zeros.uniform_(-0.1, 0.1)
    before = layer.dequantize()  # (7, 300)
    layer.cuda().use_kernel("cuda")
    assert not hasattr(layer, "weight") and layer.packed.is_cuda
    assert torch.equal(layer.dequantize().cpu(), before)


@pytest.mark.parametrize("rows", [65, 160, 256])
def test_one_byte_layer_compiled_past_the_small_matmul_rows_matches_eager(rows):
    """Past MAX_MM_ROWS the layer pads x to whole blocks of rows and drops the padding's results:
    compiled (the pad fused into x's producer, as in server.py's mixed steps) as eager."""
    from kernels import kernel_route, one_byte_linear, quantized_cases, relative_error
    torch.manual_seed(0)
    for name, weights, reference_weights in quantized_cases(4096, 1024, "cuda")[:2]:  # int8, fp8
        x = torch.randn(rows, 1, 1024, device="cuda", dtype=torch.bfloat16)
        assert kernel_route(x, 256) == "mm" and kernel_route(x) == "dequantize"
        layer = torch.compile(lambda x: one_byte_linear(torch.relu(x), *weights), fullgraph=True)
        eager = one_byte_linear(torch.relu(x), *weights)  # (rows, 1, 4096)
        compiled = layer(x)
        reference = torch.relu(x).double() @ reference_weights.T
        assert compiled.shape == eager.shape == (rows, 1, 4096)
        assert torch.equal(compiled, eager), name
        assert relative_error(eager, reference) < 1e-2, name
        torch._dynamo.reset()


@pytest.mark.parametrize("rows", [65, 256])
def test_one_byte_layer_past_the_small_matmul_rows_is_right_and_the_same_on_every_call(rows):
    """A layer of more tiles than the GPU holds at once (12288 outputs: 192 a block of rows, for
    ~132 SMs), so its programs run in waves: right, and the same bits on every call (the
    pipeline's stages must not race, whichever programs share an SM)."""
    from kernels import one_byte_linear, quantized_cases, relative_error
    torch.manual_seed(0)
    for name, weights, reference_weights in quantized_cases(12288, 4096, "cuda")[:2]:  # int8, fp8
        x = torch.randn(rows, 1, 4096, device="cuda", dtype=torch.bfloat16)
        first = one_byte_linear(x, *weights)  # (rows, 1, 12288)
        assert relative_error(first, x.double() @ reference_weights.T) < 2.5e-3, name  # ~1.7e-3
        for _ in range(10):
            assert torch.equal(one_byte_linear(x, *weights), first), name


def test_mixture_of_experts_compiled_decode_matches_eager_and_grouped_mm_the_gathered_form():
    """Decode takes the gathered form through the expert GEMV, the router its kernel
    (checkpoint.to_device gives both)."""
    from kernels import expert_matmul, prepare_for_device, router_top_k
    from test_moe import tiny_model as tiny_moe
    model = tiny_moe().cuda()  # float32: 8 experts, 2 per token
    prepare_for_device(model)
    assert model.layers[0].feed_forward.w13.kernel is expert_matmul
    assert model.layers[0].feed_forward.router_kernel is router_top_k
    for n_rows in (3, 5):  # 6 pairs: the gathered form at decode; 10: the grouped (looped) one
        prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 7, 2, 9)[:n_rows]]
        model.setup_caches(n_rows, 11 + 24)
        eager = generate(model, prompts, 24, Sampling(temperature=0)).tokens
        decode = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, graph recording, replay
            compiled = generate(model, prompts, 24, Sampling(temperature=0),
                                decode_fn=decode).tokens
            assert compiled == eager
        torch._dynamo.reset()
    moe = model.layers[0].feed_forward.to(torch.bfloat16)  # bfloat16: torch._grouped_mm on CUDA
    x = torch.randn(64, moe.w13.in_features, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        experts = moe.gate(x).topk(2).indices  # (64, 2)
        # the expert GEMV returns float32 sums: compare in float32
        torch.testing.assert_close(moe.grouped(x, experts).float(), moe.gathered(x, experts),
                                   atol=2e-2, rtol=2e-2)
        compiled = torch.compile(moe.grouped, fullgraph=True, dynamic=True)
        torch.testing.assert_close(compiled(x, experts), moe.grouped(x, experts),
                                   atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", ["float", "int8", "fp8"])
def test_expert_gemv_and_router_in_a_compiled_cuda_graph_match_the_pytorch_form(mode):
    from kernels import expert_matmul, relative_error, router_top_k
    from test_moe import moe_with_experts
    moe = moe_with_experts(mode).cuda().to(torch.bfloat16)
    x = torch.randn(3, 1, moe.w13.in_features, device="cuda", dtype=torch.bfloat16)  # 6 pairs
    with torch.no_grad():
        pytorch_form = moe(x).double()
        moe.w13.kernel = moe.w2.kernel = expert_matmul
        moe.router_kernel = router_top_k
        compiled = torch.compile(moe, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, graph recording, replay
            rel = relative_error(compiled(x), pytorch_form)
            assert rel < 1e-2, f"{mode}: relative error {rel:.2e}"


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_grouped_expert_kernel_in_a_compiled_cuda_graph_matches_the_pytorch_form(mode):
    """A decode batch of 8 tokens (16 pairs for 8 experts: the grouped form) through one-byte
    experts: the grouped expert kernel (prepare_for_device gives it, in bf16) against the
    dequantized copy's torch._grouped_mm, eager and in a compiled CUDA graph."""
    from kernels import grouped_expert_mm, prepare_for_device, relative_error
    from test_moe import moe_with_experts, tiny_model as tiny_moe
    model = tiny_moe()
    model.layers[0].feed_forward = moe = moe_with_experts(mode)
    model = model.cuda().to(torch.bfloat16)
    x = torch.randn(8, 1, moe.w13.in_features, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        pytorch_form = moe(x).double()
        prepare_for_device(model)
        assert moe.w13.grouped_kernel is moe.w2.grouped_kernel is grouped_expert_mm
        assert relative_error(moe(x), pytorch_form) < 1e-2
        compiled = torch.compile(moe, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, graph recording, replay
            rel = relative_error(compiled(x), pytorch_form)
            assert rel < 1e-2, f"{mode}: relative error {rel:.2e}"


def test_float_gemv_in_a_compiled_cuda_graph_matches_pytorch_matmul(monkeypatch):
    """A bf16 model's one-token decode step with a FloatLinear GEMV in place of each nn.Linear
    (prepare_for_device puts them in; every layer's row goes through it, w2's K of 8448 columns
    whole, as float weights stay, w13's with SwiGLU) against the same step through PyTorch's
    matmul, eager and in a CUDA graph compiled as generate.py compiles (on Hopper, the GEMVs and
    inductor's kernels programmatic dependent launches), within bf16 rounding."""
    import torch.nn as nn
    import kernels
    from generate import compile_functions
    from kernels import FloatLinear, prepare_for_device, relative_error
    model = tiny_model(attention_bias=True, intermediate_size=8448).cuda().to(torch.bfloat16)
    model.setup_caches(1, 32)
    prompt, token = torch.randint(0, 97, (1, 8), device="cuda"), torch.tensor([[5]], device="cuda")
    position = torch.tensor([8], device="cuda")
    with torch.no_grad():
        model(prompt, torch.arange(8, device="cuda"))
        pytorch_matmul = model(token, position).double()  # (1, 1, vocab)
        prepare_for_device(model)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is FloatLinear for m in linears)
        assert kernels.gemv_split_k(model.layers[0].feed_forward.w2.weight) == 1
        calls, gemv = [], kernels.scaled_gemv
        monkeypatch.setattr(kernels, "scaled_gemv", lambda *args, **kwargs: calls.append(kwargs)
                            or gemv(*args, **kwargs))
        assert relative_error(model(token, position), pytorch_matmul) < 1e-2
        # w13's with SwiGLU in it, one a layer
        assert len(calls) == len(linears)
        assert sum(call.get("swiglu_out", False) for call in calls) == len(model.layers)
        monkeypatch.undo()
        _, step = compile_functions(True, False, decode_step=model)
        assert torch._inductor.config.triton.enable_pdl == kernels.PDL
        for _ in range(3):  # warm-up, graph recording, replay
            rel = relative_error(step(token, position), pytorch_matmul)
            assert rel < 1e-2, f"relative error {rel:.2e}"


def test_int4_w13_gives_swiglu_from_its_kernel_in_a_compiled_cuda_graph(monkeypatch):
    """An int4 model's one-token decode step (fp16, groups of 32: its single rows through the
    Triton kernel, K ragged against the kernel's chunks) with each dense w13 giving SiLU(gate) * up
    from its kernel (int4_swiglu_row, one call a layer) against the same step with SwiGLU apart,
    eager and in a CUDA graph compiled as generate.py compiles, within fp16 rounding."""
    import kernels
    from generate import compile_functions
    from kernels import relative_error
    from test_cpu_kernels import quantized_model
    model = quantized_model("int4", 32, torch.float16, "cuda")
    feed_forwards = [layer.feed_forward for layer in model.layers]
    assert all(ff.swiglu_kernel is kernels.swiglu_linear for ff in feed_forwards)
    model.setup_caches(1, 32)
    prompt, token = torch.randint(0, 100, (1, 8), device="cuda"), torch.tensor([[5]], device="cuda")
    position = torch.tensor([8], device="cuda")
    with torch.no_grad():
        model(prompt, torch.arange(8, device="cuda"))
        for ff in feed_forwards:
            ff.swiglu_kernel = None
        apart = model(token, position).double()  # (1, 1, vocab)
        for ff in feed_forwards:
            ff.swiglu_kernel = kernels.swiglu_linear
        calls, swiglu_row = [], kernels.int4_swiglu_row
        monkeypatch.setattr(kernels, "int4_swiglu_row",
                            lambda *args: calls.append(args) or swiglu_row(*args))
        assert relative_error(model(token, position), apart) < 1e-2
        assert len(calls) == len(feed_forwards)
        monkeypatch.undo()
        _, step = compile_functions(True, False, decode_step=model)
        for _ in range(3):  # warm-up, graph recording, replay
            rel = relative_error(step(token, position), apart)
            assert rel < 1e-2, f"relative error {rel:.2e}"


def test_bf16_mixture_compiled_decode_through_the_float_gemv_matches_eager():
    """A bf16 mixture's one-token step as prepare_for_device leaves it (attention, router and
    output through FloatLinear's GEMV, the experts through the expert GEMV, w2's launched early
    where dependent launches run), eager, then compiled as generate.py compiles it: no further from
    the same weights' step in float32 than PyTorch's own bf16 step is, give or take half of that
    (the order of the sums differs)."""
    import copy
    import torch.nn as nn
    from generate import compile_functions
    from kernels import FloatLinear, expert_matmul, prepare_for_device, relative_error
    from test_moe import tiny_model as tiny_moe
    model = tiny_moe().cuda().to(torch.bfloat16)  # weights from a fixed seed
    reference = copy.deepcopy(model).float()
    prompt = torch.arange(3, 11, device="cuda")[None]  # (1, 8)
    token, position = torch.tensor([[5]], device="cuda"), torch.tensor([8], device="cuda")
    with torch.no_grad():
        for m in (model, reference):
            m.setup_caches(1, 32)
            m(prompt, torch.arange(8, device="cuda"))
        float32 = reference(token, position).double()  # (1, 1, vocab)
        pytorch_bf16 = relative_error(model(token, position), float32)
        assert pytorch_bf16 < 2e-2
        prepare_for_device(model)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is FloatLinear for m in linears)
        assert model.layers[0].feed_forward.w13.kernel is expert_matmul
        bound = 1.5 * pytorch_bf16
        eager = relative_error(model(token, position), float32)
        assert eager < bound, f"relative error {eager:.2e}, PyTorch's bf16 {pytorch_bf16:.2e}"
        _, step = compile_functions(True, False, decode_step=model)
        for _ in range(3):  # warm-up, graph recording, replay
            rel = relative_error(step(token, position), float32)
            assert rel < bound, f"relative error {rel:.2e}, PyTorch's bf16 {pytorch_bf16:.2e}"


def int8_mixture() -> torch.nn.Module:
    """test_moe's tiny mixture with int8 attention projections and experts, swapped and quantized
    by the project's own code as quantize.py writes them (the router and output layer stay float)."""
    from kernels import swap_linears
    from quantize import linear_names, quantize_weight
    from test_moe import tiny_model as tiny_moe
    model = tiny_moe()
    layers = linear_names(model.args, include_output=False)
    weights = {name: model.get_submodule(name).weight for name in layers}
    swap_linears(model, dict(mode="int8", groupsize=None, layers=layers))
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).load_state_dict(quantize_weight("int8", w, None), assign=True)
    return model


def test_int8_mixture_compiled_decode_with_dependent_launches_matches_eager():
    """On Hopper prepare_for_device launches an int8 mixture's inductor kernels, its attention
    GEMVs and w2's expert GEMV (which reads the router's expert ids before its wait) as
    programmatic dependent launches, w13's expert GEMV and the router's top-k plainly: replayed as
    a CUDA graph, the compiled decode gives eager's greedy tokens."""
    import kernels
    from model import MoEFeedForward
    model = int8_mixture().cuda()  # float32 activations: no near-ties from rounding
    kernels.prepare_for_device(model)
    assert torch._inductor.config.triton.enable_pdl  # (it acts on Hopper and later only)
    for moe in (m for m in model.modules() if isinstance(m, MoEFeedForward)):
        assert moe.w13.kernel is kernels.expert_matmul
        assert moe.w2.kernel.func is kernels.expert_matmul and moe.w2.kernel.keywords == dict(
            ids_final=True)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 7)]
    for rows in (prompts[:1], prompts):  # one row: the GEMVs; three: the small matmul
        model.setup_caches(len(rows), 11 + 24)
        eager = generate(model, rows, 24, Sampling(temperature=0)).tokens
        decode = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, graph recording, replay
            assert generate(model, rows, 24, Sampling(temperature=0),
                            decode_fn=decode).tokens == eager
        torch._dynamo.reset()
