"""Triton kernel for decoding with int8 or fp8 weights: a weight-only GEMV (one row of activations).

At batch 1 a linear layer is a matrix-vector product: each weight is read once and used once, so the kernel's
only job is to stream the weights at full memory bandwidth. torch.compile's fusion of
`F.linear(x, w_int8.to(bf16)) * scales` reads int8 weights at under half the copy bandwidth on an H100
(BENCHMARKS.md). This kernel reads the one-byte weights as int32 words of four (wide loads), a (BLOCK_N rows,
BLOCK_K4 words) tile per step, converts each byte in registers, multiplies by the matching x values and
accumulates in float32, reducing over K once at the end. Autotuning picks the tile per layer shape on the first
call. The weights are int8 (quantize.Int8Linear) or fp8 e4m3 (quantize.Fp8Linear), one scale per output row.

Measured and not kept (BENCHMARKS.md, issue 4): reading one byte per lane (the previous version: 257.8 against
290.8 tok/s for Llama-2-7B), converting int8 to float with exponent bit tricks instead of conversion instructions (no faster:
the conversions are not the bottleneck), split-K on 4096 x 4096 layers, a version taking up to 8 rows of
activations (slower at one row), a Triton int4 GEMV (slower than PyTorch's tinygemm), and a split-K attention
over the filled part of the KV cache (no faster than F.scaled_dot_product_attention, even 4000 tokens in).

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
    def byte_to_float(words, j: tl.constexpr, FP8: tl.constexpr):
        """Byte j of each int32 word as float32: an fp8 e4m3 bit pattern, or an int8 value."""
        if FP8:
            return ((words >> (8 * j)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        return ((words << (24 - 8 * j)) >> 24).to(tl.float32)  # byte j to the top, then an arithmetic shift down

    @triton.jit
    def scaled_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K4, WORDS_PER_SPLIT, FP8: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K4: tl.constexpr):
        """y[split, n] = scales[n] * sum over the split's columns k of x[k] * w[n, k], for BLOCK_N rows n. The
        one-byte weights (int8 or fp8) are read as int32 words of four: w_ptr is (N, K4) row-major, K = 4 K4;
        split s (program_id 1) takes words [s * WORDS_PER_SPLIT, (s + 1) * WORDS_PER_SPLIT)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < N
        row_start = rows.to(tl.int64) * K4  # int64: N * K passes 2**31 in the largest models
        first = tl.program_id(1) * WORDS_PER_SPLIT
        last = tl.minimum(first + WORDS_PER_SPLIT, K4)
        acc = tl.zeros((BLOCK_N, BLOCK_K4), dtype=tl.float32)
        for c0 in range(0, WORDS_PER_SPLIT, BLOCK_K4):
            c = first + c0 + tl.arange(0, BLOCK_K4)  # (BLOCK_K4,) word columns
            c_ok = c < last
            # Masked-off words read as 0: weight 0 (int8) or +0.0 (fp8), never an undefined NaN pattern.
            words = tl.load(w_ptr + row_start[:, None] + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0)
            for j in tl.static_range(4):  # byte j of word c is column 4c + j
                w = byte_to_float(words, j, FP8)  # (BLOCK_N, BLOCK_K4)
                x = tl.load(x_ptr + 4 * c + j, mask=c_ok, other=0.0).to(tl.float32)  # (BLOCK_K4,)
                acc += w * x[None, :]  # one reduction over k at the end, not per step
        scales = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        y = tl.sum(acc, axis=1) * scales  # (BLOCK_N,)
        tl.store(y_ptr + tl.program_id(1) * N + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    # The tiles that won a sweep of 48 (rows 2-16 x words 64-256 x 4/8 warps x 1/3 stages) on Llama-2-7B's
    # layer shapes on an H100 (BENCHMARKS.md); autotuning picks among them per shape on the first call.
    GEMV_CONFIGS = [triton.Config(dict(BLOCK_N=n, BLOCK_K4=k), num_warps=w, num_stages=3)
                    for n in (4, 8, 16) for k in (128, 256) for w in (4, 8)]
    scaled_gemv_tuned = triton.autotune(configs=GEMV_CONFIGS, key=["N", "K4", "WORDS_PER_SPLIT", "FP8"])(scaled_gemv_kernel)

# A layer with few output rows and a long K (Llama-2-7B's down projection: 4096 x 11008) gives too few programs
# to keep every SM's loads in flight, so its K is split into parts of at most SPLIT_COLUMNS, one program each
# per row block, and the caller adds the partial sums: at most MAX_SPLIT terms, which torch.compile unrolls
# into the next kernel. Measured on an H100: 4096 x 11008 split in 2 is 7 % faster than whole rows; 4096 x 4096
# is fastest whole (split in 2, 4 or 8 it is 6-34 % slower), as are the layers of 12288 rows and more.
SPLIT_MAX_ROWS, SPLIT_COLUMNS, MAX_SPLIT = 8192, 8192, 8
SPLIT_ALIGN_WORDS = 256  # splits start on whole tiles of every config (BLOCK_K4 divides it)


def split_k_for(n_rows: int, n_columns: int) -> int:
    return 1 if n_rows > SPLIT_MAX_ROWS else min(MAX_SPLIT, -(-n_columns // SPLIT_COLUMNS))


def words_per_split(n_columns: int, split_k: int) -> int:
    words = -(-n_columns // 4 // split_k)
    return words if split_k == 1 else -(-words // SPLIT_ALIGN_WORDS) * SPLIT_ALIGN_WORDS


@torch.library.custom_op("blitz::scaled_gemv_partials", mutates_args=())
def scaled_gemv_partials(x: Tensor, weight: Tensor, scales: Tensor, split_k: int) -> Tensor:
    """x's K values times one-byte weights (N, K) (int8 or float8_e4m3fn, K a multiple of 4), scaled per row:
    (split_k, N) partial sums, in x's dtype when split_k is 1, else in float32."""
    N, K = weight.shape
    y = torch.empty(split_k, N, dtype=x.dtype if split_k == 1 else torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split_k)  # noqa: E731
    scaled_gemv_tuned[grid](x.contiguous(), weight.view(torch.int32), scales, y, N, K // 4, words_per_split(K, split_k),
                            FP8=weight.dtype == torch.float8_e4m3fn)
    return y


@scaled_gemv_partials.register_fake
def _(x: Tensor, weight: Tensor, scales: Tensor, split_k: int) -> Tensor:
    return x.new_empty(split_k, weight.shape[0], dtype=x.dtype if split_k == 1 else torch.float32)


def scaled_gemv(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x (K,) or (1, ..., K) times int8 or float8_e4m3fn weight (N, K), scaled per output row by scales (N,):
    (..., N) in x's dtype."""
    N, K = weight.shape
    assert x.numel() == K and K % 4 == 0, f"scaled_gemv takes one row of activations of a multiple of 4, got {tuple(x.shape)}"
    split_k = split_k_for(N, K)
    y = scaled_gemv_partials(x, weight, scales, split_k)  # (split_k, N)
    y = y[0] if split_k == 1 else y.sum(0).to(x.dtype)  # (N,)
    return y.view(*x.shape[:-1], N)


def gemv_available(x: Tensor) -> bool:
    """The kernel serves one row of activations (of a multiple of 4 values) on a CUDA device, when Triton is installed."""
    return triton is not None and x.is_cuda and x.numel() == x.shape[-1] and x.shape[-1] % 4 == 0


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
