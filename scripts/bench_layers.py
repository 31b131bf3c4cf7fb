"""Time a model's linear layers alone, per precision and row count, against the copy bandwidth.

    python scripts/bench_layers.py --precisions bf16 int8 int4.g128 --rows 1 8 2048

A decode step at batch B runs B rows through every linear layer; a prefill of T tokens, T rows.
This builds the model as scripts/bench.py does (random weights, quantized by quantize.py's code),
then times one pass of R random rows through each linear layer of its blocks in turn (each layer's
own kernels, no attention, no compile), as the median of --repeats passes. A pass reads the whole
model's linear weights, far more than the L2 cache holds, as a decode step does. Columns: ms a
pass; GB/s = the layers' weight bytes / time, and that as a share of the copy bandwidth measured in
this process (the ceiling of a memory-bound pass); rows/s = R / time; and against bf16 at the same
R (at one row, bf16's GEMV). int4 up to 64 rows is timed twice where tinygemm holds a copy (groups
of 32 and 64): by tinygemm and by the Triton small matmul (`path`); bf16 at one row too: by cuBLAS
and by the project's GEMV (kernels.FloatLinear).
The Triton kernels are checked against their reference first (kernels.check_kernels), as bench.py
does: speeds of wrong kernels mean nothing.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's modules
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py beside this file
import kernels  # noqa: E402
from bench import (BYTES_PER_GB, build, copy_bandwidth_gb_s, describe_check,  # noqa: E402
                   kernel_checks, parse_precision)
from checkpoint import CONFIGS, ArgumentParser, InputError, script_exits  # noqa: E402

LINEARS = (nn.Linear, kernels.Int8Linear, kernels.Int4Linear, kernels.Fp8Linear)


def time_pass(layers: list, rows: int, repeats: int) -> float:
    """Median ms of one pass of `rows` random bf16 rows through every layer, replayed as a CUDA
    graph (as the compiled decode step runs: no launch overhead) after two eager passes (in which
    Triton compiles)."""
    inputs = {layer.in_features: torch.randn(rows, layer.in_features, device="cuda",
                                             dtype=torch.bfloat16) for layer in layers}

    def one_pass():
        for layer in layers:
            layer(inputs[layer.in_features])
    one_pass()
    one_pass()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_pass()
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:])


def paths(layers: list, rows: int):
    """(name, set-up) of each way the layers serve `rows` rows: int4 up to the small matmul's
    MAX_MM_ROWS both by tinygemm and by Triton where kernels.TINYGEMM_MAX_ROWS gives it a copy; bf16
    at one row both by cuBLAS and by the GEMV (FloatLinear), the GEMV last, which leaves
    kernels.FLOAT_GEMV as it was and is what the other precisions are compared with."""
    if rows == 1 and any(isinstance(layer, kernels.FloatLinear) for layer in layers):
        def float_gemv(on: bool):
            kernels.FLOAT_GEMV = on
        return [("cublas", lambda: float_gemv(False)), ("gemv", lambda: float_gemv(True))]
    int4 = [layer for layer in layers if isinstance(layer, kernels.Int4Linear)]
    # both ways only where both are loaded (no tinygemm copy, or tinygemm's alone: one way)
    if not int4 or rows > kernels.MAX_MM_ROWS or int4[0].kernel_max_rows is None:
        return [("", lambda: None)]

    def tinygemm_rows(n):
        for layer in int4:
            layer.kernel_max_rows = n
    return [("tinygemm", lambda: tinygemm_rows(rows)), ("triton", lambda: tinygemm_rows(0))]


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Llama-2-7B", choices=CONFIGS,
                   help="named config of checkpoint.py whose layers are timed (default Llama-2-7B)")
    p.add_argument("--precisions", nargs="+",
                   default=["bf16", "int8", "int4.g128", "int4.g32", "fp8"],
                   help="bf16, int8, int4.gG, fp8 or fp8-scaled_mm, as in bench.py (default: bf16 "
                   "int8 int4.g128 int4.g32 fp8)")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32, 2048],
                   help="rows a pass runs through each layer: a decode batch or a prompt's tokens "
                   "(default: 1 8 32 2048)")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed passes per precision and row count; the median is reported "
                   "(default 10)")
    args = p.parse_args(argv)
    for precision in args.precisions:
        parse_precision(precision)  # unknown ones fail before anything is built
    if min(args.rows + [args.repeats]) < 1:
        raise InputError("--rows and --repeats must be >= 1")
    return args


@torch.inference_mode()
def measure(args):
    if not torch.cuda.is_available():
        raise InputError("the layer benchmark needs a CUDA GPU, and this PyTorch sees none")
    failed = [c for c in kernel_checks() if not c["ok"]]  # speeds of wrong kernels mean nothing
    if failed:
        # a kernel that disagrees with its reference is a bug: a traceback, not a line
        raise RuntimeError("kernel check failed: " + "; ".join(describe_check(c) for c in failed))
    copy = copy_bandwidth_gb_s()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy {copy:.0f} GB/s")
    print("| precision | path | rows | ms a pass | GB/s | % of copy | rows/s | vs bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    bf16_ms = {}
    for precision in args.precisions:
        model = build(args.model, precision)
        layers = [m for m in model.layers.modules() if isinstance(m, LINEARS)]
        n_bytes = sum(t.numel() * t.element_size() for layer in layers
                      for t in layer.parameters())
        for rows in args.rows:
            for path, set_up in paths(layers, rows):
                set_up()
                ms = time_pass(layers, rows, args.repeats)
                gb_s = n_bytes / BYTES_PER_GB / (ms / 1e3)
                versus = f"{bf16_ms[rows] / ms:.2f}x" if rows in bf16_ms else ""
                if precision == "bf16":  # the baseline: the last bf16 path, the GEMV at one row
                    bf16_ms[rows] = ms
                print(f"| {precision} | {path} | {rows} | {ms:.3f} | {gb_s:.0f} | "
                      f"{100 * gb_s / copy:.1f} | {rows / ms * 1e3:.0f} | {versus} |", flush=True)
        del model, layers
        torch.cuda.empty_cache()


def main(argv=None):
    """Bad input ends in one `error:` line and exit status 1."""
    with script_exits():
        measure(parse_args(argv))


if __name__ == "__main__":
    main()
