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
            scaled_gemv_kernel[grid](x, w.view(torch.int32), scales, y, N, K // 4,
                                     words_per_split(K, split_k), FP8=False, **config.kwargs)
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
