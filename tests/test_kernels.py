"""kernels.py's Triton kernels against their PyTorch reference, run by Triton's CPU interpreter (the same
kernel source the GPU compiles; its speed is measured on GPUs only, into BENCHMARKS.md)."""
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("triton", reason="Triton is installed with requirements-test.txt")

INT8_GEMV_CHECK = """
import torch, triton
from kernels import INT8_GEMV_CONFIGS, int8_gemv_kernel
torch.manual_seed(0)
for N, K in ((64, 1024), (100, 1000), (8, 4096), (37, 300)):  # whole tiles, ragged rows and columns
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scales = torch.rand(N) / 127
    x = torch.randn(K)
    reference = (w.double() @ x.double()) * scales.double()  # (N,)
    for config in INT8_GEMV_CONFIGS:
        y = torch.full((N,), float("nan"))  # poisoned: every element must be written
        grid = (triton.cdiv(N, config.kwargs["BLOCK_N"]),)
        int8_gemv_kernel[grid](x, w, scales, y, N, K, **config.kwargs)
        error = ((y.double() - reference).norm() / reference.norm()).item()
        assert error < 1e-6, (N, K, config, error)
print("ok")
"""


def test_int8_gemv_kernel_matches_reference_for_every_config():
    r = subprocess.run([sys.executable, "-c", INT8_GEMV_CHECK], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
