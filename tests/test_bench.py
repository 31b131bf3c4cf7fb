"""scripts/bench.py's code path on the CPU: every precision builds, quantizes in memory and decodes.
(Speed is measured on GPUs only, into BENCHMARKS.md; nothing here asserts a speed.)"""
import pytest

import generate
from conftest import load_script


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4.g32", "int4.g128", "fp8"])
def test_bench_cell_runs_every_precision(precision, monkeypatch):
    bench = load_script("bench")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    # Eager: compiling stories15M five times on 2 CPU cores would take minutes and prove nothing new.
    monkeypatch.setattr(generate, "compile_functions", lambda _: (generate.prefill, generate.decode_one_token))
    row = bench.bench_cell("stories15M", precision, batch_size=2, samples=1)
    assert row["precision"] == precision and row["tok_s"] > 0 and row["gb_s"] > 0
    bytes_bf16 = 30_383_424  # stories15M in bf16, its untied embedding table not counted
    assert row["model_gb"] * 1e9 == bytes_bf16 if precision == "bf16" else row["model_gb"] * 1e9 < bytes_bf16
