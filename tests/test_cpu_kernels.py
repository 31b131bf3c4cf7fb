"""The CPU path of the quantized layers (kernels.py, "CPU kernels"): PyTorch's weight-only int8 and
int4 matmuls against the dequantized reference on small and odd shapes, the exact plain path past
the row limits, and prepare_for_device choosing the kernels for a model on the CPU.

The kernels compute with bfloat16 activations (the only ones their x86 code vectorizes): x is
rounded to bfloat16 and so is the product, so the layer equals F.linear(x rounded to bfloat16,
layer.dequantize()) within bfloat16's output rounding (at most 2 ** -8 relative, per element), and
the float32 reference within a little more. A wrong layout, nibble order, scale or padding is off
by tens of percent."""

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script
import kernels
from kernels import relative_error
import quantize as Q
from checkpoint import empty_model, randomize_, to_device
from model import ModelArgs, Transformer

# The tests that run the kernels, or check that a model gets them, need a CPU they serve (AVX2,
# AVX512); the others hold on any CPU.
needs_cpu_kernels = pytest.mark.skipif(
    not kernels.cpu_kernels_usable(torch.float32),
    reason=f"CPU capability {torch.backends.cpu.get_cpu_capability()}: the layers keep their plain "
           "path here")

OUTPUT_ROUNDING = 4e-3  # bfloat16 rounds to 2 ** -8 = 3.9e-3 relative at most, plus float32 sums
AGAINST_FLOAT32 = 1e-2  # ... and x's own rounding to bfloat16


def float_linear(n: int, k: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
        linear.bias.normal_(0, 0.02)
    return linear


def int8_layer(n: int, k: int) -> kernels.Int8Linear:
    linear = float_linear(n, k)
    layer = kernels.Int8Linear(k, n, True)
    layer.load_state_dict({**Q.quantize_int8(linear.weight.detach()), "bias": linear.bias.detach()},
                          strict=True, assign=True)
    return layer


def int4_layer(n: int, k: int, groupsize: int, seed: int = 0) -> kernels.Int4Linear:
    linear = float_linear(n, k, seed)
    layer = kernels.Int4Linear(k, n, True, groupsize=groupsize,
                               padded_in_features=Q.int4_padded_k(k, groupsize))
    tensors = Q.quantize_int4(linear.weight.detach(), groupsize)
    layer.load_state_dict({**tensors, "bias": linear.bias.detach()}, strict=True, assign=True)
    return layer


def inputs(rows: int, k: int, dtype=torch.float32) -> torch.Tensor:
    """rows rows of activations: (rows, K), or (2, rows / 2, K) for an even count (a batch)."""
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + k))
    return (x if rows % 2 else x.view(2, rows // 2, k)).to(dtype)


def reference(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F.linear with the dequantized weights, of x in float32 and of x rounded to bfloat16."""
    w = layer.dequantize()
    return (F.linear(x.float(), w, layer.bias.float()),
            F.linear(x.bfloat16().float(), w, layer.bias.float()))


@pytest.fixture
def plain_path_refused(monkeypatch):
    """Fail any call of Int8Linear's plain path (its PyTorch matmul)."""
    monkeypatch.setattr(kernels, "one_byte_linear", lambda *a: pytest.fail("plain int8 path"))


# ---- the raw ops first, in a subprocess: a shape the vectorized code mishandles may crash -------

ROUTED_SHAPES_CHECK = """
import torch
import kernels
from kernels import relative_error
# Every int8 shape the routing lets through (K a multiple of 16), with ragged N and any rows,
# against the float64 product of the same bfloat16 inputs.
for K in (16, 48, 208, 576):
    for N in (1, 3, 37, 100):
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        assert kernels.int8_cpu_kernel_fits(K)
        for M in (1, 2, 3, 5, 17, kernels.CPU_INT8_MAX_ROWS):
            x = torch.randn(M, K).bfloat16()
            y = torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(N, dtype=torch.bfloat16))
            exact = x.double() @ w.double().T
            err = relative_error(y, exact)
            assert y.shape == (M, N) and err < 4e-3, (M, N, K, err)
# The layer's own guards: a weight off the allocator's alignment (inside a memory-mapped file, say)
# is copied at load time, and x is copied to fresh memory (aligned vector loads of its rows).
layer = kernels.Int8Linear(64, 8, False)
layer.weight = torch.nn.Parameter(torch.randint(-127, 128, (8 * 64 + 1,), dtype=torch.int8)[1:]
                                  .view(8, 64), requires_grad=False)
layer.scales = torch.nn.Parameter(torch.rand(8) / 127, requires_grad=False)
layer.use_cpu_kernel()
assert layer.weight.data_ptr() % kernels.CPU_ALIGNMENT == 0
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(3 * 64 + 1).to(dtype)[1:].view(3, 64)  # 2 or 4 bytes past an aligned address
    y = layer(x)
    exact = x.double() @ layer.dequantize().double().T
    err = relative_error(y, exact)
    assert y.dtype == dtype and err < 1e-2, (dtype, err)
print("ok")
"""


@needs_cpu_kernels
def test_int8_op_is_right_on_every_shape_the_routing_lets_through_and_any_alignment():
    r = run_script("-c", ROUTED_SHAPES_CHECK)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_int8_routing_refuses_k_that_the_op_gets_wrong():
    for k in (8, 77, 130, 200, 201):
        assert not kernels.int8_cpu_kernel_fits(k)


# ---- each layer against its dequantized reference ----------------------------------------------

@needs_cpu_kernels
@pytest.mark.parametrize("n, k", [(37, 208), (48, 64), (1, 16), (100, 96)])
@pytest.mark.parametrize("rows", [1, 3, 32])
@torch.no_grad()
def test_int8_cpu_kernel_matches_the_dequantized_reference(n, k, rows, plain_path_refused):
    layer = int8_layer(n, k)
    layer.use_cpu_kernel()
    x = inputs(rows, k)
    y = layer(x)
    exact, rounded_x = reference(layer, x)
    assert y.shape == exact.shape and y.dtype == torch.float32
    assert relative_error(y, rounded_x) < OUTPUT_ROUNDING
    assert relative_error(y, exact) < AGAINST_FLOAT32


@needs_cpu_kernels
@torch.no_grad()
def test_int8_cpu_kernel_takes_a_transposed_input(plain_path_refused):
    layer = int8_layer(48, 64)
    layer.use_cpu_kernel()
    x = torch.randn(64, 3).t()  # (3, 64), column-major
    assert relative_error(layer(x), reference(layer, x)[1]) < OUTPUT_ROUNDING


def test_the_int8_cpu_kernel_is_refused_a_k_it_gets_wrong():
    with pytest.raises(AssertionError, match="K % 16"):
        int8_layer(8, 40).use_cpu_kernel()


def file_layer(mode: str) -> torch.nn.Module:
    return int8_layer(37, 208) if mode == "int8" else int4_layer(37, 208, 32)


def prepared_layer(mode: str) -> torch.nn.Module:
    """A layer as prepare_for_device leaves it on this CPU (int4: its packed copy beside the
    file's tensors), or (int4-kernel-alone) use_kernel without max_rows: the packed copy only."""
    layer = file_layer(mode)
    if mode == "int8":
        layer.use_cpu_kernel()
    else:
        layer.use_kernel("cpu", torch.bfloat16,
                         None if mode == "int4-kernel-alone" else kernels.CPU_INT4_MAX_ROWS)
    return layer


@needs_cpu_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_a_prepared_layer_still_computes_after_moving_to_another_dtype(mode):
    layer = prepared_layer(mode)
    x = inputs(3, 208)
    expected = reference(layer, x)[0]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # The derived buffers (unit scales, scales and zeros) follow: the ops take them in
        # bfloat16 again. float16 takes the plain path.
        layer.to(dtype)
        y = layer(x.to(dtype))
        assert y.dtype == dtype and relative_error(y, expected) < AGAINST_FLOAT32


@pytest.mark.parametrize("mode", ["int8", "int4", "int4-kernel-alone"])
def test_every_tensor_a_prepared_layer_holds_follows_it_to_another_device(mode):
    """What the preparation derives is a buffer or a parameter, never a plain attribute that
    module.to() (a GPU, here the meta device) would leave behind; and the derived buffers are no
    part of the state_dict, which stays the file's tensors."""
    layer = prepared_layer(mode)
    if mode != "int4-kernel-alone":  # (whose packed copy replaced the file's tensors)
        assert layer.state_dict().keys() == file_layer(mode).state_dict().keys()
    layer.to("meta")
    held = [*layer.parameters(), *layer.buffers(),
            *(v for v in vars(layer).values() if isinstance(v, torch.Tensor))]
    assert held and all(t.is_meta for t in held)


@pytest.mark.parametrize("assign", [False, True], ids=["copied", "assigned"])
@pytest.mark.parametrize("triton_layout", [False, True], ids=["file-layout", "triton-layout"])
@torch.no_grad()
def test_a_prepared_int4_layer_computes_with_the_weights_loaded_into_it(triton_layout, assign,
                                                                       monkeypatch):
    """load_state_dict into a layer whose kernel has a packed copy beside the file's tensors (the
    CPU's; with the Triton layout in their place, a GPU's tinygemm and Triton kernels) repacks
    the loaded tensors."""
    layer = int4_layer(37, 208, 32)
    layer.use_kernel("cpu", torch.bfloat16, kernels.CPU_INT4_MAX_ROWS)
    loaded = int4_layer(37, 208, 32, seed=1)
    if triton_layout:
        layer.use_triton()
        loaded.use_triton()
    layer.load_state_dict(loaded.state_dict(), strict=True, assign=assign)
    x = inputs(3, 208)
    expected = reference(loaded, x)[1]
    monkeypatch.setattr(kernels.Int4Linear, "dequantize", lambda self: pytest.fail("dequantized"))
    assert relative_error(layer(x), expected) < OUTPUT_ROUNDING


@pytest.mark.parametrize("n, k, groupsize", [
    (37, 208, 32),  # K padded to 224, N to 48
    (48, 64, 32),  # whole groups, N a multiple of 16
    (1, 96, 64),  # one output, K padded to 128 in the file; 3 groups of 32 for the kernel
    (100, 200, 128),  # K padded to 256
    (20, 256, 256),
], ids=["ragged", "whole", "one-output", "g128-padded", "g256"])
@needs_cpu_kernels
@pytest.mark.parametrize("rows", [1, 5, 128])
@torch.no_grad()
def test_int4_cpu_kernel_matches_the_dequantized_reference(n, k, groupsize, rows, monkeypatch):
    layer = int4_layer(n, k, groupsize)
    layer.use_kernel("cpu", torch.bfloat16, kernels.CPU_INT4_MAX_ROWS)
    x = inputs(rows, k)
    exact, rounded_x = reference(layer, x)  # before the plain path is refused
    with monkeypatch.context() as m:
        m.setattr(kernels.Int4Linear, "dequantize", lambda self: pytest.fail("dequantized"))
        y = layer(x)
    assert y.shape == exact.shape and y.dtype == torch.float32
    assert relative_error(y, rounded_x) < OUTPUT_ROUNDING
    assert relative_error(y, exact) < AGAINST_FLOAT32


@pytest.mark.parametrize("k, groupsize, kernel_k, kernel_groupsize", [
    (576, 128, 576, 64),  # SmolLM2's width: 4.5 groups, halves end at K
    (96, 128, 96, 32),  # quarters
    (208, 32, 224, 32),  # no group of 32 or more ends at 208: padded
])
@needs_cpu_kernels
@torch.no_grad()
def test_int4_kernel_multiplies_no_padding_where_smaller_groups_end_at_k(k, groupsize, kernel_k,
                                                                          kernel_groupsize):
    """Each file group's scale and zero serve its parts: the same weights, without the padding."""
    layer = int4_layer(16, k, groupsize)
    x = inputs(5, k)
    _, rounded_x = reference(layer, x)
    layer.use_kernel("cpu", torch.bfloat16, kernels.CPU_INT4_MAX_ROWS)
    assert (layer.kernel_in_features, layer.kernel_groupsize) == (kernel_k, kernel_groupsize)
    assert relative_error(layer(x), rounded_x) < OUTPUT_ROUNDING


def test_an_int8_layer_counts_its_unit_scales_as_read_only_for_inputs_the_kernel_serves():
    layer = int8_layer(37, 208)
    layer.use_cpu_kernel()
    served, plain = (layer.weights_read(rows) for rows in (kernels.CPU_INT8_MAX_ROWS, kernels.CPU_INT8_MAX_ROWS + 1))
    assert any(t is layer.unit_scales for t in served)
    assert not any(t is layer.unit_scales for t in plain)


@needs_cpu_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_more_rows_than_the_limit_take_the_exact_plain_path(mode):
    """Prefills: MKL's float32 matmul on the dequantized weights, float32-exact."""
    if mode == "int8":
        layer, rows = int8_layer(37, 208), kernels.CPU_INT8_MAX_ROWS + 1
        layer.use_cpu_kernel()
    else:
        layer, rows = int4_layer(37, 208, 32), kernels.CPU_INT4_MAX_ROWS + 1
        layer.use_kernel("cpu", torch.bfloat16, kernels.CPU_INT4_MAX_ROWS)
    x = inputs(rows, 208)
    assert relative_error(layer(x), reference(layer, x)[0]) < 1e-5


@needs_cpu_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_bfloat16_layers_use_the_kernel_too(mode, monkeypatch):
    if mode == "int8":
        layer = int8_layer(37, 208).bfloat16()
        layer.use_cpu_kernel()
    else:
        layer = int4_layer(37, 208, 32).bfloat16()
        layer.use_kernel("cpu", torch.bfloat16, kernels.CPU_INT4_MAX_ROWS)
    x = inputs(3, 208, torch.bfloat16)
    exact = reference(layer, x)[0]
    monkeypatch.setattr(kernels, "one_byte_linear", lambda *a: pytest.fail("plain int8 path"))
    monkeypatch.setattr(kernels.Int4Linear, "dequantize", lambda self: pytest.fail("dequantized"))
    y = layer(x)
    assert y.dtype == torch.bfloat16 and relative_error(y, exact) < AGAINST_FLOAT32


# ---- prepare_for_device on a model --------------------------------------------------------------

# K of 96 (attention, w13) and 200 (w2: no multiple of 16 for int8, padded to 224 for int4); N of
# 100 (the vocabulary, int8's quantized output layer) and 192 (wqkv).
TINY = dict(dim=96, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=100, intermediate_size=200,
            block_size=64, attention_bias=True, tie_embeddings=True)
IDX = torch.randint(0, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(1))


def quantized_model(mode: str, groupsize, dtype=torch.float32, device="cpu"):
    """TINY with random weights, quantized as quantize.py does, loaded onto the device (the CPU
    unless given) the way checkpoint.load_model does (to_device, hence prepare_for_device)."""
    torch.manual_seed(0)
    args = ModelArgs(**TINY)
    with torch.no_grad():
        float_tensors = randomize_(Transformer(args)).state_dict()
    layers = Q.linear_names(args, include_output=True)
    qargs, quantization = Q.quantized_config(args, mode, groupsize, Q.DEFAULT_OUTPUT_MODE, layers,
                                             {})
    tensors = {name: t for name, t in float_tensors.items()
               if name.removesuffix(".weight") not in layers}
    for layer in layers:
        w, layer_mode = float_tensors[f"{layer}.weight"], kernels.layer_mode(quantization, layer)
        tensors.update({f"{layer}.{key}": t
                        for key, t in Q.quantize_weight(layer_mode, w, groupsize).items()})
        if layer_mode == "int4":
            Q.record_padding(quantization["padded"], layer, w.shape[1], groupsize)
    model = empty_model(qargs, quantization)
    if qargs.tie_embeddings:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    return to_device(model, device, dtype)


@torch.no_grad()
def logits_of(model, idx=IDX) -> torch.Tensor:
    """A prefill of idx, then one decode step: (1, T + 1, vocab)."""
    model.setup_caches(1, idx.shape[1] + 1)
    T = idx.shape[1]
    prefill = model(idx, torch.arange(T))
    step = model(idx[:, -1:], torch.tensor([T]))
    return torch.cat([prefill, step], dim=1)


@needs_cpu_kernels
@pytest.mark.parametrize("mode, groupsize", [("int8", None), ("int4", 32), ("int4", 64)],
                         ids=["int8", "int4-g32", "int4-g64"])
def test_prepare_for_device_selects_the_cpu_kernels(mode, groupsize, monkeypatch):
    """Every int4 layer and every int8 layer whose K fits is routed; the forward passes (12-token
    prefill, one decode step) then never touch the plain path of a routed layer, and give the plain
    model's logits up to bfloat16's rounding."""
    model = quantized_model(mode, groupsize)
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, (kernels.Int8Linear, kernels.Int4Linear))}
    assert len(layers) == 4 * TINY["n_layer"] + 1  # the output layer: int8 in every mode
    for name, layer in layers.items():
        if mode == "int8" or name == "output":
            assert layer.cpu_kernel == (not name.endswith("w2")), name  # w2's K = 200
        else:
            assert layer.kernel is torch.ops.aten._weight_int4pack_mm_for_cpu, name
            assert layer.scales_and_zeros.dtype == torch.bfloat16
    plain_calls = []
    one_byte_linear, dequantize = kernels.one_byte_linear, kernels.Int4Linear.dequantize
    monkeypatch.setattr(kernels, "one_byte_linear",
                        lambda x, *a: plain_calls.append(x.shape) or one_byte_linear(x, *a))
    monkeypatch.setattr(kernels.Int4Linear, "dequantize",
                        lambda self: plain_calls.append(self) or dequantize(self))
    routed = logits_of(model)
    # int8: the two w2 layers, in the prefill and in the decode step; int4: none.
    assert len(plain_calls) == (2 * TINY["n_layer"] if mode == "int8" else 0)

    monkeypatch.undo()
    monkeypatch.setattr(kernels, "cpu_kernels_usable", lambda dtype: False)
    plain_model = quantized_model(mode, groupsize)
    assert not any(getattr(m, "cpu_kernel", False) or getattr(m, "kernel", None) is not None
                   for m in plain_model.modules())
    assert relative_error(routed, logits_of(plain_model)) < AGAINST_FLOAT32
    # The int4 layers keep the file's tensors (the packed copy is no part of the state_dict): it is
    # still a checkpoint.
    routed_tensors, plain_tensors = model.state_dict(), plain_model.state_dict()
    assert routed_tensors.keys() == plain_tensors.keys()
    assert all(torch.equal(routed_tensors[k], plain_tensors[k]) for k in plain_tensors)


def test_prepare_for_device_leaves_float16_models_on_the_plain_path(monkeypatch):
    """The vectorized code serves bfloat16 (and float32 through it) only: float16 stays plain even on
    a CPU the kernels serve (any CPU here passes for one)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert kernels.cpu_kernels_usable(torch.float32)
    model = quantized_model("int4", 32, torch.float16)
    assert all(m.kernel is None for m in model.modules() if isinstance(m, kernels.Int4Linear))
    model = quantized_model("int8", None, torch.float16)
    assert not any(m.cpu_kernel for m in model.modules() if isinstance(m, kernels.Int8Linear))


def test_dependent_launches_pay_for_one_row_gemv_models_and_float_or_int8_mixtures():
    """kernels.dependent_launches_pay, which turns on inductor's dependent launches where the model
    runs on a GPU: int8 and fp8 models, float ones once their nn.Linear layers are FloatLinear, and
    mixtures of experts in float or int8, int4 ones whose single rows take the Triton kernel; not
    int4 whose single rows another op takes (tinygemm on a GPU, here its CPU twin) or plain
    nn.Linear in a dense model."""
    from test_moe import tiny_model as tiny_moe
    assert kernels.dependent_launches_pay(quantized_model("int8", None))
    assert kernels.dependent_launches_pay(quantized_model("fp8", None))
    int4 = quantized_model("int4", 32)  # the CPU op's packed copy beside the file's tensors
    assert not kernels.dependent_launches_pay(int4)
    int4_layers = [m for m in int4.layers.modules() if isinstance(m, kernels.Int4Linear)]
    for layer in int4_layers:  # the words beside the op's copy, as groups of 32 and 64 on a GPU
        layer.use_triton()
    assert not kernels.dependent_launches_pay(int4)
    for layer in int4_layers:  # the words alone, as groups of 128 and 256 on a GPU
        layer.kernel = None
    assert kernels.dependent_launches_pay(int4)
    model = Transformer(ModelArgs(**TINY))
    assert not kernels.dependent_launches_pay(model)
    kernels.use_float_gemv(model)
    assert kernels.dependent_launches_pay(model)
    assert kernels.dependent_launches_pay(tiny_moe())
    moe = tiny_moe()
    kernels.use_float_gemv(moe)  # as prepare_for_device does on a GPU
    assert kernels.dependent_launches_pay(moe)
    wo = moe.layers[0].attention.wo
    moe.layers[0].attention.wo = kernels.Int4Linear(wo.in_features, wo.out_features, False, 32)
    assert not kernels.dependent_launches_pay(moe)


@needs_cpu_kernels
@torch.no_grad()
def test_compiled_layers_call_the_cpu_kernels_as_eager_does():
    """torch.compile (inductor's C++ backend, as generate.py --compile on the CPU) keeps the ops,
    which give eager's result bit for bit at decode (a float32 rewrite would be off by bfloat16's
    rounding)."""
    int8, int4 = int8_layer(208, 96), int4_layer(48, 208, 32)
    int8.use_cpu_kernel()
    int4.use_kernel("cpu", torch.bfloat16, kernels.CPU_INT4_MAX_ROWS)
    layers = torch.nn.Sequential(int8, int4)
    x = inputs(1, 96)
    torch.testing.assert_close(torch.compile(layers, fullgraph=True)(x), layers(x), rtol=0, atol=0)
