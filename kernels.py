"""Triton kernel for decoding with int8 or fp8 weights: a weight-only GEMV (one row of activations).

At batch 1 a linear layer is a matrix-vector product: each weight is read once and used once, so the kernel's
only job is to stream the weights at full memory bandwidth. torch.compile's fusion of
`F.linear(x, w_int8.to(bf16)) * scales` reads int8 weights at under half the copy bandwidth on an H100
(BENCHMARKS.md); this kernel reads a (BLOCK_N, BLOCK_K) tile of weights per step, converts it in registers,
multiplies by the matching slice of x and accumulates in float32, reducing over K only once at the end.
Autotuning picks the tile shape per layer shape on the first call. The weights are int8 (quantize.Int8Linear)
or fp8 e4m3 (quantize.Fp8Linear), with one scale per output row.

Measured and not kept (BENCHMARKS.md, issue 4): a version of this kernel taking up to 8 rows of activations
(slower at one row), a Triton int4 GEMV (slower than PyTorch's tinygemm), and a split-K attention over the
filled part of the KV cache (no faster than F.scaled_dot_product_attention, even 4000 tokens in).

The callers keep a plain PyTorch path (prefill, batches, CPU), which is also the reference the kernel is
checked against: `check_kernels` on the GPU (scripts/bench.py runs it first), tests/test_kernels.py in
Triton's CPU interpreter.
"""
import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the callers then keep their PyTorch path
    triton = None


if triton is not None:
    @triton.jit
    def scaled_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[n] = scales[n] * sum_k x[k] * w[n, k] for BLOCK_N rows n; w int8 or fp8 (N, K) row-major."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < N
        row_start = rows.to(tl.int64) * K  # int64: N * K passes 2**31 in the largest models
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            in_bounds = row_ok[:, None] & (k[None, :] < K)
            # Masked-off lanes are undefined, and as fp8 bits could be NaN (NaN * 0 is NaN): zero them in registers.
            w = tl.where(in_bounds, tl.load(w_ptr + row_start[:, None] + k[None, :], mask=in_bounds).to(tl.float32), 0.0)
            acc += w * x[None, :]  # (BLOCK_N, BLOCK_K): one reduction at the end, not per step
        scales = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, (tl.sum(acc, axis=1) * scales).to(y_ptr.dtype.element_ty), mask=row_ok)

    # Few rows per program keep enough programs in flight to cover all SMs even for 4096-row layers. (A wider
    # search, up to 64 rows by 1024 columns, picked no faster tiles on an H100: BENCHMARKS.md.)
    GEMV_CONFIGS = [triton.Config(dict(BLOCK_N=n, BLOCK_K=k), num_warps=w)
                    for n, k, w in ((8, 512, 4), (16, 256, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 4), (32, 512, 8))]
    scaled_gemv_tuned = triton.autotune(configs=GEMV_CONFIGS, key=["N", "K"])(scaled_gemv_kernel)


@torch.library.custom_op("blitz::scaled_gemv", mutates_args=())
def scaled_gemv(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x (K,) or (1, ..., K) times int8 or float8_e4m3fn weight (N, K), scaled per output row by scales (N,):
    (..., N) in x's dtype."""
    N, K = weight.shape
    assert x.numel() == K, f"scaled_gemv takes one row of activations, got {tuple(x.shape)}"
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    scaled_gemv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](x.contiguous(), weight, scales, y, N, K)
    return y.view(*x.shape[:-1], N)


@scaled_gemv.register_fake
def _(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def gemv_available(x: Tensor) -> bool:
    """The kernel serves one row of activations on a CUDA device, when Triton is installed."""
    return triton is not None and x.is_cuda and x.numel() == x.shape[-1]


def scaled_gemv_reference(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """The same product in float64 with PyTorch."""
    return (x.double() @ weight.double().T) * scales.double()


def check_kernels(device="cuda") -> list:
    """The kernel against its float64 reference on Llama-2-7B's layer shapes and a ragged one, for int8 and fp8
    weights: a list of {name, shape, rel_err, ok}. scripts/bench.py runs this before timing anything."""
    torch.manual_seed(0)
    results = []
    for N, K in ((12288, 4096), (4096, 11008), (32000, 4096), (37, 300)):
        x = torch.randn(1, 1, K, device=device, dtype=torch.bfloat16)
        int8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
        fp8 = (torch.randn(N, K, device=device) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        for name, weight, scales in (("int8", int8, (torch.rand(N, device=device) / 127).to(torch.bfloat16)),
                                     ("fp8", fp8, torch.rand(N, device=device) / 448)):
            y = scaled_gemv(x, weight, scales)  # (1, 1, N)
            reference = scaled_gemv_reference(x, weight.float() if name == "fp8" else weight, scales)
            rel = ((y.double() - reference).norm() / reference.norm()).item()
            results.append(dict(name=name, shape=[N, K], rel_err=rel, ok=y.shape == (1, 1, N) and rel < 1e-2))  # bf16 output: ~4e-3
    return results
