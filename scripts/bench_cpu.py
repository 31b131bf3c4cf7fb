"""CPU decode speed of the quantized formats against float32, measured in one process.

    python scripts/bench_cpu.py --models SmolLM2-135M Llama-3.2-1B --threads 2 --out cpu.json

On a CPU, decode is memory-bound as on a GPU: a step reads every weight once. generate.py runs a
CPU model eagerly in float32 by default, and so does this benchmark (--compile: as generate.py
--compile does, which takes out most of an eager step's fixed cost of small ops): for each named
config it builds random-weight models (they decode at exactly the speed of real ones) in float32
and in each of --precisions, quantized by quantize.py's code (generate.py --random_quantization
builds the same), and times generate.py's loop on a 5-token prompt. The precisions take turns,
one sample each per round, so that a machine whose speed drifts (other work, clock changes) slows
them alike; the table gives each one's median over --rounds rounds, the spread of its samples
and its ratio to float32's median.

Columns: decode tok/s (new tokens after the first / time after the first token, batch 1) and its
slowest and fastest sample; GB read per step (generate.bytes_read_per_step: the tensors each
layer's kernel reads, such as an int4 layer's copy packed for the CPU kernel, but no untied
embedding table, of which a step reads the looked-up rows; the KV cache is a few MB here and left
out); GB/s (those bytes x steps per second) and its share of the machine's copy bandwidth (a 1 GiB
memory copy, bytes read + written per second, in the same process and the same threads).
"""
import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate  # noqa: E402
import tp  # noqa: E402
from checkpoint import (CONFIGS, ArgumentParser, InputError, check_output,  # noqa: E402
                        empty_model, random_model, script_exits)
from model import ModelArgs  # noqa: E402

PROMPT_TOKENS = 5
PRECISIONS = ("int8", "int4.g32", "int4.g128")


def copy_bandwidth_gb_s(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Median GB/s of a large memory copy, counting the bytes read and the bytes written."""
    src = torch.randn(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n_bytes / statistics.median(times) / 1e9


def build(name: str, precision: str):
    if precision == "float32":
        return random_model(name, "cpu", torch.float32)
    return tp.random_shard(name, precision, 1, torch.device("cpu"), torch.float32)


def bench_model(name: str, precisions: list, rounds: int, new_tokens: int, compiled: bool,
                bar) -> list:
    """Rows of one named config: float32 first, then each precision."""
    models = {p: build(name, p) for p in ["float32", *precisions]}
    prompt = [torch.randint(0, models["float32"].args.vocab_size, (PROMPT_TOKENS,)).tolist()]
    samples = {p: [] for p in models}
    # generate.py --compile's decode step, one for every model: dynamo compiles it for each model
    # it meets (its cache of compiled variants is per function and bounded: emptied for each config)
    torch._dynamo.reset()
    _, decode = generate.compile_functions(compiled, False)
    for precision, model in models.items():
        model.setup_caches(1, PROMPT_TOKENS + new_tokens)
        # untimed: first-call costs, and the compile
        generate.generate(model, prompt, 4, generate.Sampling(), decode_fn=decode)
        bar.update(1)
    for _ in range(rounds):
        for precision, model in models.items():
            gen = generate.generate(model, prompt, new_tokens, generate.Sampling(),
                                    decode_fn=decode)
            samples[precision].append(gen.decode_steps / gen.decode_s)
            bar.update(1)
    base = statistics.median(samples["float32"])
    rows = []
    for precision, model in models.items():
        tok_s = statistics.median(samples[precision])
        step_bytes = generate.bytes_read_per_step(model, 1)
        rows.append(dict(model=name, precision=precision, tok_s=tok_s, vs_float32=tok_s / base,
                         gb_per_step=step_bytes / 1e9, gb_s=step_bytes * tok_s / 1e9,
                         samples=samples[precision]))
    del models
    gc.collect()
    return rows


def markdown(result: dict) -> str:
    lines = ["| model | precision | decode tok/s | min–max | × float32 | GB read per step "
             "| GB/s | share of copy |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['precision']} | {r['tok_s']:.1f} | "
                     f"{min(r['samples']):.1f}–{max(r['samples']):.1f} | "
                     f"{r['vs_float32']:.2f} | {r['gb_per_step']:.3f} | {r['gb_s']:.1f} | "
                     f"{r['gb_s'] / result['copy_gb_s']:.0%} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="CPU decode speed of the quantized formats (int8, int4, fp8) "
                       "against float32")
    p.add_argument("--models", nargs="+", default=["SmolLM2-135M"],
                   help="named configs of checkpoint.py (default: SmolLM2-135M)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS),
                   choices=tp.RANDOM_QUANTIZATIONS,
                   help=f"compared with float32 (default: {' '.join(PRECISIONS)})")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--rounds", type=int, default=5, help="samples per precision (default: 5)")
    p.add_argument("--new_tokens", type=int, default=64, help="tokens per sample (default: 64)")
    p.add_argument("--compile", action="store_true",
                   help="compile each model's decode step, as generate.py --compile does (about "
                   "a minute per model on 2 cores)")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    unknown = [m for m in args.models if m not in CONFIGS]
    if unknown:
        raise InputError(f"unknown model name {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    if args.threads < 1 or args.rounds < 1 or args.new_tokens < 2:
        raise InputError("--threads and --rounds must be >= 1, --new_tokens >= 2")
    for name in args.models:
        config = ModelArgs(**CONFIGS[name])
        if PROMPT_TOKENS + args.new_tokens > config.block_size:
            raise InputError(f"--new_tokens {args.new_tokens} and the {PROMPT_TOKENS}-token prompt "
                             f"do not fit {name}'s context of {config.block_size} tokens")
        # a model's float32 weights and its quantized copies are held together (each copy well
        # under half of the float32 bytes); too large for this machine, refused before making any
        float32_bytes = sum(p.nbytes for p in empty_model(config).parameters())
        generate.check_cache_fits(config, 1, PROMPT_TOKENS + args.new_tokens, torch.float32,
                                  torch.device("cpu"), weight_bytes=int(
                                      float32_bytes * (1 + len(set(args.precisions)) / 2)))
    if args.out is not None:
        check_output(args.out, "--out")
    args.precisions = list(dict.fromkeys(args.precisions))  # each once: a table row each
    torch.set_num_threads(args.threads)
    from tqdm import tqdm
    result = dict(cpu=torch.backends.cpu.get_cpu_capability(), threads=args.threads,
                  torch=torch.__version__, compiled=args.compile,
                  copy_gb_s=copy_bandwidth_gb_s(), rows=[])
    # each model's untimed (compiling) run, then its samples
    runs = len(args.models) * (1 + len(args.precisions)) * (1 + args.rounds)
    with tqdm(total=runs, desc="runs", disable=None) as bar:
        for name in args.models:
            result["rows"] += bench_model(name, args.precisions, args.rounds, args.new_tokens,
                                          args.compile, bar)
    print(f"CPU ({result['cpu']}), {args.threads} threads, torch {torch.__version__}, "
          f"{'compiled' if args.compile else 'eager'}, copy bandwidth "
          f"{result['copy_gb_s']:.1f} GB/s")
    print(markdown(result))
    if args.out is not None:
        generate.write_json(args.out, result)


if __name__ == "__main__":
    with script_exits():
        main()
