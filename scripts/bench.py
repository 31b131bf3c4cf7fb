"""Benchmark decode speed against the card's own memory bandwidth.

    python scripts/bench.py --models Llama-2-7B --precisions bf16 int8 int4.g32 int4.g128 fp8 --out bench.json

Measures the device-to-device copy bandwidth first (bytes read + bytes written per second: the practical
ceiling for a memory-bound decode), then for each (model, precision, batch size) builds the named config
with random weights on the GPU (random weights decode at exactly the speed of real ones), quantizes it in
memory with quantize.py's own code, and runs generate.py's compiled decode loop: one untimed compiling
run, then --samples timed ones (5-token prompt, 200 new tokens). Prints a markdown table of the medians:
tok/s, GB/s, MBU (= GB/s / copy GB/s), the bandwidth limit in tok/s, compile time and peak memory.
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate  # noqa: E402
import quantize  # noqa: E402
from model import build_model, random_model  # noqa: E402

DEVICE = "cuda"  # the benchmark is for GPUs; tests point it at the CPU to check the code path


def copy_bandwidth_gb_s(n_bytes: int = 4 << 30, repeats: int = 20) -> float:
    """Median GB/s of a large device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.randn(n_bytes // 4, device="cuda")  # random data, never zeros
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    assert torch.equal(dst, src), "copy produced wrong data"
    return 2 * n_bytes / median(times) / 1e9


def median(xs):
    return sorted(xs)[len(xs) // 2]


def build(name: str, precision: str):
    """Random-weight model of the named config in bf16 on the GPU, quantized as `precision` says
    ("bf16", "int8", "int4.g32", "fp8", "fp8-scaled_mm", ...)."""
    model = random_model(name, DEVICE, torch.bfloat16)
    if precision == "bf16":
        return model
    mode, _, group = precision.partition(".g")
    quantize.FP8_SCALED_MM = mode == "fp8-scaled_mm"
    mode = mode.removesuffix("-scaled_mm")
    args, state_dict = model.args, model.state_dict()
    names = [k for k in state_dict if not (args.tie_embeddings and k == "output.weight")]
    qsd, qargs, quantization = quantize.quantize_state_dict(
        names, state_dict.__getitem__, args, mode, int(group) if group else None, quantize.OUTPUT_BY_DEFAULT[mode])
    del model, state_dict
    return build_model(qargs, qsd, quantization, DEVICE, torch.bfloat16)


def bench_cell(name: str, precision: str, batch_size: int, samples: int) -> dict:
    model = build(name, precision)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()  # peak memory of decoding, not of building and quantizing
    row = dict(model=name, precision=precision, batch_size=batch_size, **measure(model, batch_size, samples))
    del model
    torch._dynamo.reset()  # the next cell compiles afresh and gets the memory the CUDA graphs held
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def measure(model, batch_size: int, samples: int) -> dict:
    """One untimed compiling run, then `samples` timed ones; medians of generate.py's own metrics."""
    prompts = [torch.randint(0, model.args.vocab_size, (5,)).tolist()] * batch_size
    model.setup_caches(batch_size, 5 + 200)
    prefill_fn, decode_fn = generate.compile_functions(argparse.Namespace(compile=True, compile_prefill=False))

    def run():
        return generate.generate(model, prompts, 200, generate.Sampling(), (), prefill_fn, decode_fn)

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    model_bytes = generate.weight_bytes_per_step(model)
    results = [generate.metrics(run(), model_bytes, torch.device(DEVICE)) for _ in range(samples)]
    return dict(model_gb=model_bytes / 1e9, tok_s=median([r["decode_tok_s"] for r in results]),
                gb_s=median([r["bandwidth_gb_s"] for r in results]), ttft_ms=median([r["ttft_s"] for r in results]) * 1e3,
                compile_s=compile_s, peak_memory_gb=results[-1]["peak_memory_gb"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["Llama-2-7B"])
    p.add_argument("--precisions", nargs="+", default=["bf16"], help="bf16, int8, int4.gG, fp8, fp8-scaled_mm")
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[1])
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench.json"))
    args = p.parse_args()
    copy_bw = copy_bandwidth_gb_s()
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, copy bandwidth {copy_bw:.0f} GB/s", flush=True)
    rows = []
    for name in args.models:
        for precision in args.precisions:
            for bs in args.batch_sizes:
                row = bench_cell(name, precision, bs, args.samples)
                row.update(mbu=row["gb_s"] / copy_bw, limit_tok_s=copy_bw / row["model_gb"] * bs)
                rows.append(row)
                print(json.dumps(row), flush=True)
                args.out.write_text(json.dumps(dict(card=card, torch=torch.__version__, copy_gb_s=copy_bw, rows=rows), indent=2))
    print(f"\n{card}, torch {torch.__version__}, copy bandwidth {copy_bw:.0f} GB/s\n")
    print("| model | precision | batch | GB read per step | decode tok/s | GB/s | MBU | limit tok/s | time to first token | compile | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['batch_size']} | {r['model_gb']:.2f} | {r['tok_s']:.1f} | {r['gb_s']:.0f} "
              f"| {r['mbu']:.1%} | {r['limit_tok_s']:.0f} | {r['ttft_ms']:.1f} ms | {r['compile_s']:.0f} s | {r['peak_memory_gb']:.1f} GB |")


if __name__ == "__main__":
    main()
