"""kernels.py's Triton kernel against its PyTorch reference, run by Triton's CPU interpreter (the same kernel
source the GPU compiles; the interpreter has no fp8, so fp8 weights are checked on the GPU by
kernels.check_kernels, which scripts/bench.py runs first; speeds are in BENCHMARKS.md)."""
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("triton", reason="Triton is installed with requirements-test.txt")

SCALED_GEMV_CHECK = """
import torch, triton
from kernels import GEMV_CONFIGS, scaled_gemv_kernel, scaled_gemv_reference
torch.manual_seed(0)
for N, K in ((64, 1024), (100, 1000), (8, 4096), (37, 300)):  # whole tiles, ragged rows and columns
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scales = torch.rand(N) / 127
    x = torch.randn(K)
    reference = scaled_gemv_reference(x, w, scales)  # (N,)
    for config in GEMV_CONFIGS:
        y = torch.full((N,), float("nan"))  # poisoned: every element must be written
        grid = (triton.cdiv(N, config.kwargs["BLOCK_N"]),)
        scaled_gemv_kernel[grid](x, w, scales, y, N, K, **config.kwargs)
        error = ((y.double() - reference).norm() / reference.norm()).item()
        assert error < 1e-6, (N, K, config, error)
print("ok")
"""


def test_scaled_gemv_kernel_matches_reference_for_every_config():
    r = subprocess.run([sys.executable, "-c", SCALED_GEMV_CHECK], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
