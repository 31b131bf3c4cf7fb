"""Benchmark decode speed against the card's own memory bandwidth.

    python scripts/bench.py --models Llama-2-7B --out bench.json

Measures the device-to-device copy bandwidth first (bytes read + bytes written per second: the practical
ceiling for a memory-bound decode), then runs generate.py's own code path with --random_weights for each
model (random weights decode at exactly the speed of real ones) and reports tok/s, GB/s and MBU
(model-bandwidth utilisation = achieved GB/s / copy GB/s) as a markdown table.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate  # noqa: E402


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
    return 2 * n_bytes / sorted(times)[len(times) // 2] / 1e9


def bench_model(name: str, extra: list) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "metrics.json"
        generate.run(generate.parse_args(["--random_weights", name, "--compile", "--prompt", "5",
                                          "--max_new_tokens", "200", "--num_samples", "5",
                                          "--json", str(out), *extra]))
        return json.loads(out.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["Llama-2-7B"])
    p.add_argument("--out", type=Path, default=Path("bench.json"))
    p.add_argument("generate_args", nargs="*", help="extra generate.py flags, after --")
    args = p.parse_args()
    copy_bw = copy_bandwidth_gb_s()
    card = torch.cuda.get_device_name()
    rows = []
    for name in args.models:
        result = bench_model(name, args.generate_args)
        samples = result["samples"]
        tok_s = sorted(s["decode_tok_s"] for s in samples)[len(samples) // 2]  # median
        gb_s = sorted(s["bandwidth_gb_s"] for s in samples)[len(samples) // 2]
        rows.append(dict(model=name, tok_s=tok_s, gb_s=gb_s, mbu=gb_s / copy_bw,
                         ttft_ms=samples[-1]["ttft_s"] * 1e3, peak_memory_gb=samples[-1]["peak_memory_gb"],
                         model_gb=result["model_bytes"] / 1e9, compile_s=result.get("compile_s")))
    print(f"\n{card}, torch {torch.__version__}, copy bandwidth {copy_bw:.0f} GB/s\n")
    print("| model | decode tok/s | GB/s | MBU | time to first token | compile | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tok_s']:.1f} | {r['gb_s']:.0f} | {r['mbu']:.1%} | {r['ttft_ms']:.1f} ms "
              f"| {r['compile_s']:.0f} s | {r['peak_memory_gb']:.1f} GB |")
    args.out.write_text(json.dumps(dict(card=card, torch=torch.__version__, copy_gb_s=copy_bw, rows=rows), indent=2))


if __name__ == "__main__":
    main()
