"""Triton kernels for decoding with quantized weights (batch 1: one row of activations).

At batch 1 a linear layer is a matrix-vector product: each weight is read once and used once, so the
kernel's only job is to stream the weights at full memory bandwidth. torch.compile's fusion of
`F.linear(x, w_int8.to(bf16)) * scales` reads int8 weights at under half the copy bandwidth on an H100
(BENCHMARKS.md); this kernel reads a (BLOCK_N, BLOCK_K) tile of int8 weights per step, converts it in
registers, multiplies by the matching slice of x and accumulates in float32, reducing over K only once at
the end. Autotuning picks the tile shape per layer shape on the first call.

quantize.Int8Linear calls `int8_gemv` on CUDA when one row of activations comes in; everything else
(prefill, batches, CPU) keeps the plain PyTorch path, which is also the reference the kernel is tested
against (tests/test_kernels.py runs the kernel in Triton's CPU interpreter).
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
    def int8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[n] = scales[n] * sum_k x[k] * w[n, k] for BLOCK_N rows n; w int8 (N, K) row-major."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < N
        row_start = rows.to(tl.int64) * K  # int64: N * K passes 2**31 in the largest models
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + row_start[:, None] + k[None, :], mask=row_ok[:, None] & (k[None, :] < K), other=0)
            acc += w.to(tl.float32) * x[None, :]  # (BLOCK_N, BLOCK_K): one reduction at the end, not per step
        scales = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, (tl.sum(acc, axis=1) * scales).to(y_ptr.dtype.element_ty), mask=row_ok)

    # Few rows per program keep enough programs in flight to cover all SMs even for 4096-row layers.
    INT8_GEMV_CONFIGS = [triton.Config(dict(BLOCK_N=n, BLOCK_K=k), num_warps=w)
                         for n, k, w in ((8, 512, 4), (16, 256, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 4), (32, 512, 8))]
    int8_gemv_tuned = triton.autotune(configs=INT8_GEMV_CONFIGS, key=["N", "K"])(int8_gemv_kernel)


@torch.library.custom_op("blitz::int8_gemv", mutates_args=())
def int8_gemv(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x (K,) or (1, ..., K) times int8 weight (N, K), scaled per row by scales (N,): (..., N) in x's dtype."""
    N, K = weight.shape
    assert x.numel() == K, f"int8_gemv takes one row of activations, got {tuple(x.shape)}"
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    int8_gemv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](x.contiguous(), weight, scales, y, N, K)
    return y.view(*x.shape[:-1], N)


@int8_gemv.register_fake
def _(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def int8_gemv_available(x: Tensor) -> bool:
    """The kernel serves one row of activations on a CUDA device, when Triton is installed."""
    return triton is not None and x.is_cuda and x.numel() == x.shape[-1]
