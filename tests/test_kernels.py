"""kernels.py's Triton kernels against their PyTorch reference, run by Triton's CPU interpreter
(the same kernel source the GPU compiles; the interpreter has no fp8, so fp8 weights are checked on
the GPU by kernels.check_kernels, which scripts/bench.py runs first; speeds: BENCHMARKS.md)."""
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("triton", reason="Triton is installed with requirements-test.txt")
numpy = pytest.importorskip("numpy")
# Triton 3.6's interpreter passes scalar arguments as 1-element arrays, and NumPy 2.4 refuses int()
# of those, so no kernel looping up to an argument runs in it there (requirements-test.txt's
# mistral-common keeps NumPy < 2.4).
pytestmark = pytest.mark.skipif(
    tuple(map(int, numpy.__version__.split(".")[:2])) >= (2, 4),
    reason="Triton's interpreter fails on NumPy >= 2.4 (int() of a 1-element array)")

SCALED_GEMV_CHECK = """
import torch, triton
from kernels import GEMV_CONFIGS, scaled_gemv_kernel, scaled_gemv_reference, words_per_split
torch.manual_seed(0)
# Whole tiles, ragged rows and columns.
for N, K in ((64, 1024), (100, 1000), (8, 4096), (37, 300), (16, 8192)):
    # -128 too: every byte pattern is converted exactly.
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    scales = torch.rand(N) / 127
    x = torch.randn(K)
    reference = scaled_gemv_reference(x, w, scales)  # (N,)
    for config in GEMV_CONFIGS[::5] if N != 37 else GEMV_CONFIGS:
        # K split over 3 programs (or fewer, then some add nothing): each word counted once.
        for split_k in (1, 3):
            y = torch.full((split_k, N), float("nan"))  # poisoned: every element must be written
            grid = (triton.cdiv(N, config.kwargs["BLOCK_N"]), split_k)
            scaled_gemv_kernel[grid](x, w.view(torch.int32), scales, None, y, N, K // 4,
                                     words_per_split(K, split_k), 1, PER_WORD=4, FP8=False,
                                     **config.kwargs)
            error = ((y.sum(0).double() - reference).norm() / reference.norm()).item()
            assert error < 1e-6, (N, K, config, split_k, error)
print("ok")
"""

# The interpreter's tl.dot mishandles bfloat16 (NumPy has no such type), so x is float32 here;
# kernels.check_kernels checks the bf16 path on the GPU.
SCALED_MM_CHECK = """
import torch, triton
from kernels import MM_CONFIGS, mm_block_rows, scaled_mm_kernel, scaled_gemv_reference
torch.manual_seed(0)
# A decode batch of M rows in one tile, padded to 16, 64 and exactly 64 rows.
for M in (2, 8, 33, 64):
    for N, K in ((64, 1024), (100, 1000), (37, 300)):  # whole tiles, ragged outputs and columns
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
        scales = torch.rand(N) / 127
        x = torch.randn(M, K)
        reference = scaled_gemv_reference(x, w, scales)  # (M, N)
        for config in MM_CONFIGS[::5] if N != 37 else MM_CONFIGS:
            y = torch.full((M, N), float("nan"))  # poisoned: every element must be written
            grid = (triton.cdiv(N, config.kwargs["BLOCK_N"]),)
            scaled_mm_kernel[grid](x, w, scales, y, M, N, K, BLOCK_M=mm_block_rows(M),
                                   **config.kwargs)
            error = ((y.double() - reference).norm() / reference.norm()).item()
            assert error < 1e-6, (M, N, K, config, error)
print("ok")
"""

# The GEMV indexed by expert: float weights (PER_WORD 1; the interpreter has bf16 loads) and int8
# words with scales. Each config takes one kind, input (x a row per token or per pair) and K split
# in turn.
EXPERT_GEMV_CHECK = """
import torch, triton
from kernels import EXPERT_CONFIGS, scaled_gemv_kernel, expert_matmul_reference, words_per_split
torch.manual_seed(0)
for E, N, K in ((4, 32, 512), (5, 37, 300)):  # whole tiles (some configs); ragged ones
    kinds = [(torch.randn(E, N, K, dtype=dtype), None) for dtype in (torch.bfloat16, torch.float16)]
    kinds.append((torch.randint(-128, 128, (E, N, K), dtype=torch.int8), torch.rand(E, N) / 127))
    experts = torch.tensor([[3, 1], [1, 1]]) % E  # 2 tokens, top-2, one expert twice
    for c, config in enumerate(EXPERT_CONFIGS):
        (weight, scales), rows = kinds[c % 3], 1 + c // 3 % 2  # rows 1: w13's input, 2: w2's
        split_k = 1 + 2 * (c % 2)  # 3: K over 3 programs, each column counted once
        per_word = 4 if scales is not None else 1
        x = torch.randn(2, rows, K)
        reference = expert_matmul_reference(x, experts, weight, scales)  # (2, 2, N)
        y = torch.full((split_k, 4, N), float("nan"))  # poisoned: every element must be written
        grid = (triton.cdiv(N, config.kwargs["BLOCK_N"]), split_k, 4)
        scaled_gemv_kernel[grid](x, weight.view(torch.int32) if per_word == 4 else weight, scales,
                                 experts, y, N, K // per_word,
                                 words_per_split(K, split_k) * 4 // per_word, 2 // rows,
                                 PER_WORD=per_word, FP8=False, **config.kwargs)
        error = ((y.sum(0).view(2, 2, N).double() - reference).norm() / reference.norm()).item()
        assert error < 1e-6, (weight.dtype, N, K, rows, config, split_k, error)
print("ok")
"""


def run_in_interpreter(check: str):
    r = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.slow
def test_scaled_gemv_kernel_matches_reference_for_every_config():
    run_in_interpreter(SCALED_GEMV_CHECK)


@pytest.mark.slow
def test_scaled_mm_kernel_matches_reference_for_decode_batches():
    run_in_interpreter(SCALED_MM_CHECK)


@pytest.mark.slow
def test_expert_gemv_kernel_matches_reference_for_each_weight_kind():
    run_in_interpreter(EXPERT_GEMV_CHECK)
