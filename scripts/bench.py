"""Benchmark decode and prefill speed against the card's own memory bandwidth.

    python scripts/bench.py --models Llama-2-7B Llama-3-8B --precisions bf16 int8 int4.g128 --out bench.json
    python scripts/bench.py --cells Llama-2-7B:bf16:1:200 Llama-2-7B:bf16:1:4000 --second_compile --out gpu0.json
    python scripts/bench.py --merge gpu0.json gpu1.json --out all.json --markdown all.md --plot all.png
    bash scripts/bench_all.sh OUT_DIR   # the whole matrix (SUITES["all"]) on 4 GPUs in parallel, then merged

A cell is MODEL:PRECISION:BATCH:NEW_TOKENS (precision: bf16, int8, int4.gG, fp8, fp8-scaled_mm). One process,
on a CUDA GPU:
1. runs kernels.check_kernels (each Triton kernel against its float64 PyTorch reference),
   and stops with an error if any disagrees: speeds of wrong kernels mean nothing;
2. measures the device-to-device copy bandwidth (bytes read + bytes written per second), the practical
   ceiling of a memory-bound decode;
3. runs the cells in the order given: builds the cell's config with random weights on the GPU (they decode
   at exactly the speed of real ones; consecutive cells of one model and precision share the build),
   quantized layer by layer with quantize.py's own code as generate.py --random_quantization builds them
   (tp.random_shard on one process), and runs generate.py's loop with the compiled decode
   step: one untimed run (its time is the compile time), then --samples timed ones of --prompt_tokens
   prompts, one a row (--long_samples for cells of over 1000 new tokens), then a prefill of one
   --prefill_tokens prompt.

Columns (medians over the samples):
- prompt: the decode samples' prompt length (--prompt_tokens; 5, as gpt-fast's figures; a server's prompt
  length makes its static-batch counterpart, every row attending over as many positions).
- decode tok/s: new tokens after the first / time after the first token, over the whole batch.
- GB read per step: the weights (an untied embedding table aside: a step reads only the looked-up rows)
  + the filled part of the KV cache averaged over the generation (the least an attention must read).
  GB/s: those bytes x steps per second. MBU: GB/s / the copy bandwidth of the row's own GPU.
  limit tok/s: copy bandwidth / bytes per step x batch size.
- prefill tok/s: one prompt of --prefill_tokens (2048) tokens through generate.prefill, eager as generate.py
  runs it by default (--compile_prefill: compiled), the cache sized for exactly that prompt.
- time to first token: of the decode samples' prompt.
- compile: the untimed first run (compile + up to 200 tokens). 2nd compile (--second_compile, the first
  cell only): the same cell again in a fresh process sharing this one's compile caches.
- peak memory: allocated from after the build: the compiling run and the decode samples.

Compile caches (inductor's FX-graph and autotune caches, Triton's kernels) go to a fresh temporary folder
unless --cache_dir names one, so a first compile is cold whatever ran on the machine before; cells in one
process still share the kernels they have in common.

Outputs: a JSON file (--out, rewritten after every cell, so a stopped run keeps its finished cells), a
markdown table (stdout, and --markdown FILE) and a PNG plot of batch-1 decode tok/s per precision against
each cell's bandwidth limit (--plot FILE; needs matplotlib, a bench-only extra not in requirements.txt:
pip install matplotlib). --merge combines the JSON files of several processes (e.g. one per GPU) and
needs no GPU: `--merge all.json --plot all.png` plots a finished run anywhere.
"""
import argparse
import gc
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate  # noqa: E402
import kernels  # noqa: E402
import tp  # noqa: E402
from checkpoint import (CONFIGS, ArgumentParser, InputError, check_output,  # noqa: E402
                        check_output_folder, random_model, read_json, script_exits, write_files)
from model import ModelArgs  # noqa: E402

DEVICE = "cuda"  # the benchmark is for GPUs; tests point it at the CPU to check the code path
PROMPT_TOKENS = 5  # the decode samples' prompt by default, as in gpt-fast's numbers
WARMUP_TOKENS = 200  # the compiling run: the decode graph is the same at every position, a long cell needn't repeat 4000
LONG_CELL = 1000  # cells generating more new tokens than this take --long_samples samples
PRECISION_ORDER = ("bf16", "int8", "int4.g128", "int4.g32", "fp8")  # table and plot order; others follow
BYTES_PER_GB = 1e9

# scripts/bench_all.sh runs SUITES["all"] as four parallel processes, one per GPU, part 0 with --second_compile.
# Balanced by estimate (a cell: ~70 s compile + ~15-30 s of runs; a 4000-token cell ~100-125 s; the second
# compile ~60 s; a process ~30 s to start and check kernels): ~410-480 s a part, under bench_all.sh's 550 s
# limit. The headline cells (Llama-2-7B, batch 1) run first in their parts, so an overrun costs the extras.
# Each row records its wall_s: rebalance from those.
L2, L3 = "Llama-2-7B", "Llama-3-8B"
SUITES = {
    "all": (
        (f"{L2}:bf16:1:200", f"{L2}:int4.g32:1:200", f"{L2}:fp8:1:200"),
        (f"{L2}:int4.g128:1:200", f"{L2}:int8:1:200", f"{L3}:fp8:1:200", f"{L2}:bf16:1:4000"),
        (f"{L3}:bf16:1:200", f"{L3}:int8:1:200", f"{L3}:int4.g128:1:200", f"{L3}:int4.g32:1:200",
         f"{L2}:int4.g128:1:4000"),
        (f"{L2}:bf16:8:200", f"{L2}:bf16:32:200", f"{L2}:int8:8:200", f"{L2}:int8:32:200"),
    ),
    "quick": (("TinyLlama-1.1B:bf16:1:200", "TinyLlama-1.1B:int8:1:200"),),  # a smoke test of the whole flow
}


# ---- cells --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    model: str
    precision: str
    batch_size: int = 1
    new_tokens: int = 200

    @classmethod
    def parse(cls, spec: str) -> "Cell":
        """MODEL:PRECISION[:BATCH[:NEW_TOKENS]], e.g. Llama-2-7B:int4.g128:1:4000."""
        parts = spec.split(":")
        if not 2 <= len(parts) <= 4 or not all(p.isascii() and p.isdigit() for p in parts[2:]):
            raise InputError(f"cell {spec!r} is not MODEL:PRECISION[:BATCH[:NEW_TOKENS]]")
        return cls(parts[0], parts[1], *map(int, parts[2:]))

    @property
    def spec(self) -> str:
        return f"{self.model}:{self.precision}:{self.batch_size}:{self.new_tokens}"


def parse_precision(precision: str) -> tuple[str, Optional[int]]:
    """"bf16", "int8", "int4.g128", "fp8", "fp8-scaled_mm" -> (mode, int4 group size or None)."""
    mode, dot_g, group = precision.partition(".g")
    if mode in ("bf16", "int8", "fp8", "fp8-scaled_mm") and not dot_g:
        return mode, None
    if mode == "int4" and group.isdigit() and int(group) in kernels.GROUPSIZES:
        return mode, int(group)
    raise InputError(f"unknown precision {precision!r}: bf16, int8, int4.gG (G one of {kernels.GROUPSIZES}), fp8, fp8-scaled_mm")


def check_cell(cell: Cell, prompt_tokens: int = PROMPT_TOKENS):
    """An InputError naming the problem for a cell that cannot run, before anything is built."""
    if cell.model not in CONFIGS:
        raise InputError(f"unknown model name {cell.model!r}; known: {', '.join(CONFIGS)}")
    args = ModelArgs(**CONFIGS[cell.model])
    parse_precision(cell.precision)
    if cell.batch_size < 1 or cell.new_tokens < 1:
        raise InputError(f"cell {cell.spec}: batch size and new tokens must be >= 1")
    if prompt_tokens + cell.new_tokens > args.block_size:
        raise InputError(f"cell {cell.spec}: {prompt_tokens} + {cell.new_tokens} tokens exceed "
                         f"{cell.model}'s {args.block_size}-token context")


def cells_from_args(args) -> list:
    if args.suite is not None:
        parts = SUITES[args.suite]
        part = args.part or 0
        if not 0 <= part < len(parts):
            raise InputError(f"--part must be in 0..{len(parts) - 1} for suite {args.suite!r}")
        cells = [Cell.parse(s) for s in parts[part]]
    elif args.cells is not None:
        cells = [Cell.parse(s) for s in args.cells]
    else:
        cells = [Cell(m, p, b, n) for m in args.models or [L2] for p in args.precisions or ["bf16"]
                 for b in args.batch_sizes or [1] for n in args.max_new_tokens or [200]]
    for cell in cells:
        check_cell(cell, args.prompt_tokens)
    return cells


# ---- measurements -------------------------------------------------------------------------------------

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
    return 2 * n_bytes / statistics.median(times) / BYTES_PER_GB


def build(name: str, precision: str):
    """Random-weight model of the named config in bf16 on the device, quantized as `precision` says:
    each quantized layer's random float weight is quantized by quantize.py's code as it is made, so
    no float copy of the model is ever held (generate.py --random_quantization builds the same)."""
    mode, _ = parse_precision(precision)
    if mode == "bf16":
        return random_model(name, DEVICE, torch.bfloat16)
    kernels.FP8_SCALED_MM = mode == "fp8-scaled_mm"  # read when the model reaches its device
    return tp.random_shard(name, precision.replace("-scaled_mm", ""), 1, torch.device(DEVICE),
                           torch.bfloat16)


def kv_bytes_per_step(model, batch_size: int, prompt_tokens: int, new_tokens: int) -> float:
    """Bytes of KV cache a decode step must read, averaged over a generation: keys and values of every layer
    at the filled positions. Step i (0-based) attends over prompt_tokens + i + 1 positions."""
    args = model.args
    per_position = 2 * args.n_layer * args.n_kv_heads * args.head_dim * model.tok_embeddings.weight.element_size()
    steps = new_tokens - 1  # the first new token comes from the prefill
    return per_position * batch_size * (prompt_tokens + (steps + 1) / 2)


def measure_decode(model, cell: Cell, samples: int, prefill_fn, decode_fn, prompt_tokens: int) -> dict:
    """One untimed compiling run, then `samples` timed generations of cell.new_tokens tokens per row,
    each row from a prompt of its own of prompt_tokens random tokens (a mixture's rows then choose
    experts as independently as generate.bytes_read_per_step counts them)."""
    device = torch.device(DEVICE)
    prompts = [torch.randint(0, model.args.vocab_size, (prompt_tokens,)).tolist()
               for _ in range(cell.batch_size)]
    # Sized for this generation (setup_caches rounds up to whole 8s): the cache's memory.
    model.setup_caches(cell.batch_size, prompt_tokens + cell.new_tokens)

    def run(new_tokens: int):
        return generate.generate(model, prompts, new_tokens, generate.Sampling(), (), prefill_fn, decode_fn)

    t0 = time.perf_counter()
    run(min(cell.new_tokens, WARMUP_TOKENS))
    compile_s = time.perf_counter() - t0
    weight_bytes = generate.bytes_read_per_step(model, cell.batch_size)
    kv_bytes = kv_bytes_per_step(model, cell.batch_size, prompt_tokens, cell.new_tokens)
    # generate.metrics turns "bytes read per step" into GB/s: here the weights and the filled KV cache.
    results = [generate.metrics(run(cell.new_tokens), weight_bytes + kv_bytes, device) for _ in range(samples)]
    return dict(samples=samples, prompt_tokens=prompt_tokens,
                weights_gb=weight_bytes / BYTES_PER_GB, kv_gb=kv_bytes / BYTES_PER_GB,
                tok_s=statistics.median(r["decode_tok_s"] for r in results),
                tok_s_samples=[r["decode_tok_s"] for r in results],
                gb_s=statistics.median(r["bandwidth_gb_s"] for r in results),
                ttft_ms=statistics.median(r["ttft_s"] for r in results) * 1e3,
                compile_s=compile_s, peak_memory_gb=results[-1]["peak_memory_gb"])


def measure_prefill(model, prompt_tokens: int, samples: int, prefill_fn) -> dict:
    """Time to first token of one prompt_tokens-long prompt (batch 1), after one untimed run."""
    prompt = [torch.randint(0, model.args.vocab_size, (prompt_tokens,)).tolist()]
    model.setup_caches(1, prompt_tokens + 1)  # the prompt and its first new token

    def ttft_s() -> float:
        return generate.generate(model, prompt, 1, generate.Sampling(), (), prefill_fn).ttft_s

    ttft_s()  # untimed: cuBLAS picks its kernels here (and a compiled prefill compiles)
    median_s = statistics.median(ttft_s() for _ in range(samples))
    return dict(prefill_tokens=prompt_tokens, prefill_ms=median_s * 1e3, prefill_tok_s=prompt_tokens / median_s)


def bench_cell(model, cell: Cell, samples: int, prefill_tokens: int, compile_prefill: bool = False,
               prompt_tokens: int = PROMPT_TOKENS) -> dict:
    """Every measurement of one cell on its built model (no bandwidth-derived columns yet: see with_bandwidth)."""
    t0 = time.perf_counter()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()  # peak memory of decoding, not of building and quantizing
    prefill_fn, decode_fn = generate.compile_functions(True, compile_prefill)
    row = dict(model=cell.model, precision=cell.precision, batch_size=cell.batch_size, new_tokens=cell.new_tokens,
               **measure_decode(model, cell, samples, prefill_fn, decode_fn, prompt_tokens), second_compile_s=None,
               prefill_compiled=compile_prefill, prefill_tokens=None, prefill_ms=None, prefill_tok_s=None)
    if prefill_tokens:
        row.update(measure_prefill(model, min(prefill_tokens, model.args.block_size - 1), samples, prefill_fn))
    torch._dynamo.reset()  # the next cell compiles afresh and gets the memory the CUDA graphs held
    row["wall_s"] = time.perf_counter() - t0
    return row


def with_bandwidth(row: dict, card: str, copy_gb_s: float) -> dict:
    """The row with its GPU and the columns that compare it with that GPU's copy bandwidth."""
    bytes_per_step_gb = row["weights_gb"] + row["kv_gb"]
    return dict(row, card=card, gpu=os.environ.get("CUDA_VISIBLE_DEVICES"), copy_gb_s=copy_gb_s,
                mbu=row["gb_s"] / copy_gb_s, limit_tok_s=copy_gb_s / bytes_per_step_gb * row["batch_size"])


def second_compile_s(cell: Cell, cache_dir: str, prompt_tokens: int = PROMPT_TOKENS) -> Optional[float]:
    """Compile time of `cell` in a fresh process that shares this one's compile caches (warm FX-graph,
    autotune and Triton caches): what a user's second run pays. None, with a warning, if that run fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "second_compile.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--cells", cell.spec, "--samples", "1",
                   "--prompt_tokens", str(prompt_tokens), "--prefill_tokens", "0", "--skip_kernel_checks",
                   "--cache_dir", cache_dir, "--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"warning: the second-compile run of {cell.spec} failed: {last}", file=sys.stderr)
            return None
        return json.loads(out.read_text())["rows"][0]["compile_s"]


def kernel_checks() -> list:
    """kernels.check_kernels on the GPU (each Triton kernel against its PyTorch reference), where it exists."""
    if DEVICE != "cuda" or not hasattr(kernels, "check_kernels"):
        return []
    return [plain_check(c) for c in kernels.check_kernels(torch.device(DEVICE))]


def plain_check(check: dict) -> dict:
    """A kernel check (name, ok, and whatever describes the case and its error: shape, rows, rel_err, ...)
    with JSON values: a tensor becomes a list, anything else JSON cannot hold its str."""
    assert "name" in check and "ok" in check, f"kernels.check_kernels gave {check}: each check needs a name and ok"
    plain = json.loads(json.dumps(check, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
    return dict(plain, ok=bool(plain["ok"]))


def is_error(key: str) -> bool:
    """Which fields of a kernel check are errors (rel_err: a key containing "err"); the others name the case."""
    return "err" in key


def describe_check(check: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in check.items() if k != "ok")


@contextmanager
def compile_caches(folder: Optional[str]):
    """Point inductor's and Triton's caches at `folder`, or at a fresh temporary one removed afterwards."""
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {name: os.environ.get(name) for name in names}
    fresh = folder is None
    folder = str(Path(folder or tempfile.mkdtemp(prefix="bench_compile_cache.")).resolve())
    os.environ.update(TORCHINDUCTOR_CACHE_DIR=folder, TRITON_CACHE_DIR=os.path.join(folder, "triton"))
    try:
        yield folder
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)


# ---- one benchmark process ----------------------------------------------------------------------------

def run_benchmark(args):
    cells = cells_from_args(args)
    check_plot(args.plot, {cell.batch_size for cell in cells})  # before minutes of GPU work
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise InputError("the benchmark needs a CUDA GPU, and this PyTorch sees none (--merge works anywhere)")
    card = generate.device_name(torch.device(DEVICE))
    result = dict(card=card, torch=torch.__version__, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  copy_gb_s=None, kernel_checks=[], rows=[])
    with compile_caches(args.cache_dir) as cache_dir:
        result["kernel_checks"] = [] if args.skip_kernel_checks else kernel_checks()
        failed = [c for c in result["kernel_checks"] if not c["ok"]]
        if result["kernel_checks"]:
            print(checks_markdown(result["kernel_checks"]), flush=True)
        if failed:
            generate.write_json(args.out, result)
            # a kernel that disagrees with its reference is a bug: a traceback, not a line
            raise RuntimeError(f"kernel check failed ({len(failed)} of {len(result['kernel_checks'])}): "
                             + "; ".join(describe_check(c) for c in failed))
        result["copy_gb_s"] = copy_bandwidth_gb_s()
        print(f"{card}, torch {torch.__version__}, copy bandwidth {result['copy_gb_s']:.0f} GB/s", flush=True)
        for row in bench_rows(cells, args, cache_dir):
            result["rows"].append(with_bandwidth(row, card, result["copy_gb_s"]))
            print(json.dumps(result["rows"][-1]), flush=True)
            generate.write_json(args.out, result)
    report(result, args)


def bench_rows(cells: list, args, cache_dir: str):
    """Measure the cells in the order given (consecutive cells of one model and precision share its build);
    yields one row per cell."""
    from tqdm import tqdm
    bar = tqdm(total=len(cells), desc="cells", unit="cell", disable=None)  # on a terminal only, not in logs
    for (name, precision), group in itertools.groupby(cells, key=lambda c: (c.model, c.precision)):
        model = build(name, precision)
        for cell in group:
            samples = args.long_samples if cell.new_tokens > LONG_CELL else args.samples
            row = bench_cell(model, cell, samples, args.prefill_tokens, args.compile_prefill, args.prompt_tokens)
            if args.second_compile and cell is cells[0]:
                row["second_compile_s"] = second_compile_s(cell, cache_dir, args.prompt_tokens)
            bar.update(1)
            yield row
        del model
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    bar.close()


# ---- merging and reporting ----------------------------------------------------------------------------

# What --merge reads of a result and of its rows, and the JSON types each may have (a bool is no number
# here): a file edited by hand, or cut short, is refused before anything is written.
NUMBER, MAYBE_NUMBER, MAYBE_INT = (int, float), (int, float, type(None)), (int, type(None))
RESULT_FIELDS = dict(card=(str,), torch=(str,), date=(str,), copy_gb_s=MAYBE_NUMBER, kernel_checks=(list,),
                     rows=(list,))
ROW_FIELDS = dict(model=(str,), precision=(str,), batch_size=(int,), new_tokens=(int,), tok_s=NUMBER, gb_s=NUMBER,
                  weights_gb=NUMBER, kv_gb=NUMBER, mbu=NUMBER, limit_tok_s=NUMBER, copy_gb_s=NUMBER,
                  ttft_ms=NUMBER, compile_s=NUMBER, second_compile_s=MAYBE_NUMBER, prefill_tokens=MAYBE_INT,
                  prefill_tok_s=MAYBE_NUMBER, prefill_compiled=(bool,), peak_memory_gb=NUMBER)


def wrong_fields(record, fields: dict) -> list:
    """The fields of a JSON object that are missing or of a type `fields` does not allow."""
    if not isinstance(record, dict):
        return list(fields)
    return [k for k, kinds in fields.items() if k not in record or type(record[k]) not in kinds]


def read_result(path: Path) -> dict:
    result = read_json(path)  # an InputError naming the file if it is missing or not a JSON object
    wrong = wrong_fields(result, RESULT_FIELDS)
    if wrong:
        raise InputError(f"{path} is not a bench.py result ({', '.join(wrong)}: missing or not of its type)")
    for i, row in enumerate(result["rows"]):
        wrong = wrong_fields(row, ROW_FIELDS)
        if not wrong and "prompt_tokens" in row and type(row["prompt_tokens"]) is not int:
            wrong = ["prompt_tokens"]
        if wrong:
            raise InputError(f"{path}: row {i} is not a measured cell ({', '.join(wrong)}: missing or not "
                             "of its type)")
    for i, check in enumerate(result["kernel_checks"]):
        if not (isinstance(check, dict) and type(check.get("ok")) is bool
                and all(type(v) in NUMBER for k, v in check.items() if is_error(k))):
            raise InputError(f"{path}: kernel check {i} is not a check (an object with ok true or false, its "
                             "errors numbers)")
    return result


def merge(results: list) -> dict:
    """One result of several processes' results: every row, kernel checks combined, the processes' cards,
    torch versions and copy bandwidths summarised (each row keeps its own)."""
    def joined(key):
        return " / ".join(dict.fromkeys(r[key] for r in results))  # distinct values, in order

    copies = [r["copy_gb_s"] for r in results if r["copy_gb_s"] is not None]
    return dict(card=joined("card"), torch=joined("torch"), date=max(r["date"] for r in results),
                copy_gb_s=statistics.median(copies) if copies else None,
                kernel_checks=merge_checks([c for r in results for c in r["kernel_checks"]]),
                rows=sorted((row for r in results for row in r["rows"]), key=row_order))


def merge_checks(checks: list) -> list:
    """The same kernel case checked on several GPUs: its largest errors, ok only if ok everywhere."""
    merged = {}
    for check in checks:
        key = json.dumps({k: v for k, v in check.items() if k != "ok" and not is_error(k)}, sort_keys=True)
        if key not in merged:
            merged[key] = dict(check)
            continue
        m = merged[key]
        m.update({k: max(m.get(k, v), v) for k, v in check.items() if is_error(k)}, ok=m["ok"] and check["ok"])
    return list(merged.values())


def row_order(row: dict):
    rank = PRECISION_ORDER.index(row["precision"]) if row["precision"] in PRECISION_ORDER else len(PRECISION_ORDER)
    return (row["model"], row["batch_size"], row_prompt_tokens(row), row["new_tokens"], rank,
            row["precision"])


def row_prompt_tokens(row: dict) -> int:
    return row.get("prompt_tokens", PROMPT_TOKENS)  # a row without it was measured with the default


COLUMNS = ("model", "precision", "batch", "prompt", "new tokens", "GB read per step (weights + KV)", "decode tok/s",
           "GB/s", "MBU", "limit tok/s", "prefill tok/s", "time to first token", "compile", "2nd compile", "peak memory")


def table_cells(r: dict) -> list:
    def maybe(value, fmt):
        return "—" if value is None else fmt.format(value)

    return [r["model"], r["precision"], str(r["batch_size"]), str(row_prompt_tokens(r)), str(r["new_tokens"]),
            f"{r['weights_gb']:.2f} + {r['kv_gb']:.2f}", f"{r['tok_s']:.1f}", f"{r['gb_s']:.0f}", f"{r['mbu']:.1%}",
            f"{r['limit_tok_s']:.0f}", maybe(r["prefill_tok_s"], "{:.0f}"), f"{r['ttft_ms']:.1f} ms",
            f"{r['compile_s']:.0f} s", maybe(r["second_compile_s"], "{:.0f} s"), f"{r['peak_memory_gb']:.1f} GB"]


def markdown(result: dict) -> str:
    rows = result["rows"]
    copies = sorted({round(r["copy_gb_s"]) for r in rows})
    copy = ("not measured" if not copies else f"{copies[0]} GB/s" if len(copies) == 1
            else f"{copies[0]}–{copies[-1]} GB/s (per GPU)")
    prefill = sorted({(r["prefill_tokens"], r["prefill_compiled"]) for r in rows if r["prefill_tokens"]})
    lines = [f"{result['card']}, torch {result['torch']}, {result['date']}, copy bandwidth {copy}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    lines += ["", "Decode: a prompt of the prompt column's random tokens, "
              "medians of the timed samples (JSON: samples, tok_s_samples); "
              "time to first token is the decode prompt's. KV: the filled cache averaged over the generation. "
              "MBU: GB/s / the row's own GPU's copy bandwidth."]
    if prefill:
        lines.append("Prefill: one prompt of " + ", ".join(f"{n} tokens ({'compiled' if c else 'eager'})" for n, c in prefill) + ".")
    if result["kernel_checks"]:
        lines += ["", checks_markdown(result["kernel_checks"])]
    return "\n".join(lines) + "\n"


def checks_markdown(checks: list) -> str:
    keys = list(dict.fromkeys(k for c in checks for k in c if k != "ok"))  # name, shape, ..., in kernels.py's order
    keys = [k for k in keys if not is_error(k)] + [k for k in keys if is_error(k)]  # what the case is, then its errors

    def cell(value) -> str:
        return "" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| kernel check: " + " | ".join(keys) + " | ok |", "|" + "---|" * (len(keys) + 1)]
    lines += ["| " + " | ".join(cell(c.get(k)) for k in keys) + f" | {'yes' if c['ok'] else '**NO**'} |" for c in checks]
    return "\n".join(lines)


def check_plot(path: Optional[Path], batch_sizes: set):
    """Refuse before the work a --plot that cannot be drawn (no matplotlib, no batch-1 cell)."""
    if path is None:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib, a bench-only extra (pip install matplotlib), "
                         "or plot elsewhere later: bench.py --merge RESULT.json --plot FILE.png")
    if 1 not in batch_sizes:
        raise InputError("--plot draws batch-1 decode speeds, and no cell here has batch size 1")


def plot(result: dict, path: Path):
    """Batch-1 decode tok/s per precision, one panel per model, one bar colour per generation length, with
    each cell's bandwidth limit marked over its bar and its tok/s and MBU written on top."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a benchmark machine
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["batch_size"] == 1]
    assert rows, "check_plot refuses a plot without batch-1 rows"
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, name in zip(axes[0], models):
        plot_model(ax, [r for r in rows if r["model"] == name])
        ax.set_title(f"{name}, batch 1")
    fig.suptitle(f"{result['card']}, torch {result['torch']}, {result['date'][:10]}")
    fig.tight_layout()
    write_files(path.parent, {path.name: lambda tmp: fig.savefig(tmp, format="png", dpi=120)})
    plt.close(fig)


def plot_model(ax, rows: list):
    precisions = list(dict.fromkeys(r["precision"] for r in rows))  # rows come in row_order
    lengths = sorted({r["new_tokens"] for r in rows})
    width = 0.8 / len(lengths)
    for j, n in enumerate(lengths):
        mine = [r for r in rows if r["new_tokens"] == n]
        xs = [precisions.index(r["precision"]) + (j - (len(lengths) - 1) / 2) * width for r in mine]
        ax.bar(xs, [r["tok_s"] for r in mine], width * 0.9, color=f"C{j}", label=f"{n} new tokens")
        ax.hlines([r["limit_tok_s"] for r in mine], [x - width / 2 for x in xs], [x + width / 2 for x in xs],
                  colors="black", linestyles="--", label="bandwidth limit" if j == 0 else None)
        for x, r in zip(xs, mine):
            ax.annotate(f"{r['tok_s']:.0f}\n{r['mbu']:.0%}", (x, r["tok_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(precisions)), precisions)
    ax.set_ylim(0, 1.2 * max(max(r["tok_s"], r["limit_tok_s"]) for r in rows))  # room for the legend
    ax.set_ylabel("decode tok/s (and MBU) per cell")
    ax.legend(fontsize=8)


def report(result: dict, args):
    """The markdown table on stdout and wherever --markdown says, the plot where --plot says."""
    text = markdown(result)
    print("\n" + text)
    if args.markdown:
        write_files(args.markdown.parent, {args.markdown.name: lambda tmp: tmp.write_text(text)})
    if args.plot:
        plot(result, args.plot)


def run_merge(args):
    results = [read_result(p) for p in args.merge]
    seen = set()
    for path, row in ((p, row) for p, r in zip(args.merge, results) for row in r["rows"]):
        key = json.dumps(row, sort_keys=True)
        if key in seen:  # the same measurement twice would count as two
            raise InputError(f"--merge: a row of {path} is in the inputs twice "
                             f"({row['model']}:{row['precision']}:{row['batch_size']}:{row['new_tokens']}): "
                             "a file given twice, or a merged file and one of its parts")
        seen.add(key)
    result = merge(results)
    check_plot(args.plot, {row["batch_size"] for row in result["rows"]})
    if args.out:
        generate.write_json(args.out, result)
    report(result, args)


# ---- the command line ---------------------------------------------------------------------------------

# The flags of measuring and their defaults, filled in after parsing: --merge refuses those given.
MEASURING_DEFAULTS = dict(samples=5, long_samples=2, prompt_tokens=PROMPT_TOKENS, prefill_tokens=2048,
                          compile_prefill=False, second_compile=False, skip_kernel_checks=False,
                          cache_dir=None)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    cells = p.add_argument_group("cells: a cross product of these four lists, or --cells, or --suite")
    cells.add_argument("--models", nargs="+", help="named configs of checkpoint.py (default Llama-2-7B)")
    cells.add_argument("--precisions", nargs="+", help="bf16 (default), int8, int4.gG, fp8, fp8-scaled_mm")
    cells.add_argument("--batch_sizes", nargs="+", type=int, help="default 1")
    cells.add_argument("--max_new_tokens", nargs="+", type=int, help="tokens generated per row (default 200; e.g. 200 4000)")
    cells.add_argument("--cells", nargs="+", metavar="MODEL:PRECISION:BATCH:NEW_TOKENS", help="exactly these cells")
    cells.add_argument("--suite", choices=SUITES, help="a predefined list of cells split into parts (bench_all.sh)")
    cells.add_argument("--part", type=int, help="which part of --suite to run (default 0)")
    # (their defaults: MEASURING_DEFAULTS)
    p.add_argument("--samples", type=int,
                   help="timed samples per cell, after one untimed compiling run "
                        f"(default {MEASURING_DEFAULTS['samples']})")
    p.add_argument("--long_samples", type=int,
                   help=f"timed samples of cells of more than {LONG_CELL} new tokens "
                        f"(default {MEASURING_DEFAULTS['long_samples']})")
    p.add_argument("--prompt_tokens", type=int,
                   help=f"prompt length of the decode samples (default {PROMPT_TOKENS}; a server's "
                        "prompt length: a static batch doing its rows' work)")
    p.add_argument("--prefill_tokens", type=int,
                   help="prompt length of the prefill measurement "
                        f"(default {MEASURING_DEFAULTS['prefill_tokens']}; 0: skip it)")
    p.add_argument("--compile_prefill", action="store_true", default=None,
                   help="compile the prefill (default: eager, as generate.py)")
    p.add_argument("--second_compile", action="store_true", default=None,
                   help="also time the first cell's compile in a fresh process with warm caches")
    p.add_argument("--skip_kernel_checks", action="store_true", default=None,
                   help="don't run kernels.check_kernels first")
    p.add_argument("--cache_dir", help="inductor/Triton compile caches (default: a fresh temporary folder)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="combine these results instead of measuring (no GPU needed)")
    p.add_argument("--out", type=Path, help="the JSON result (default bench.json when measuring)")
    p.add_argument("--markdown", type=Path, help="also write the markdown table here")
    p.add_argument("--plot", type=Path, help="a PNG plot of batch-1 decode tok/s against the bandwidth limits (matplotlib)")
    args = p.parse_args(argv)
    # the flags of measuring the user gave (check_args), then the defaults of the others
    args.measuring = [f"--{flag}" for flag in MEASURING_DEFAULTS if getattr(args, flag) is not None]
    for flag, default in MEASURING_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    if args.out is None and not args.merge:
        args.out = Path("bench.json")
    return args


def check_args(args):
    """Reject bad combinations up front, each with one clear sentence (raised as InputError)."""
    lists = [flag for flag in ("models", "precisions", "batch_sizes", "max_new_tokens") if getattr(args, flag)]
    ways = bool(lists) + (args.cells is not None) + (args.suite is not None)
    if args.merge and (ways or args.part is not None):
        raise InputError("--merge combines finished results: give it no cells")
    if args.merge and args.measuring:
        raise InputError(f"--merge combines finished results and measures nothing: leave out "
                         f"{', '.join(args.measuring)}")
    if ways > 1:
        raise InputError("give the cells one way: --models/--precisions/--batch_sizes/--max_new_tokens, --cells, or --suite")
    if min(args.samples, args.long_samples, args.prompt_tokens) < 1 or args.prefill_tokens < 0:
        raise InputError("--samples, --long_samples and --prompt_tokens must be >= 1, --prefill_tokens >= 0")
    if args.part is not None and args.suite is None:
        raise InputError("--part picks a part of --suite: give --suite too")
    if args.cache_dir is not None:
        # a folder compiling can write into; force: what it already holds is no concern
        check_output_folder(Path(args.cache_dir), "--cache_dir", force=True)
    written = []
    for flag in ("out", "markdown", "plot"):
        if getattr(args, flag) is not None:
            check_output(getattr(args, flag), f"--{flag}", [*(args.merge or []), *written])
            written.append(getattr(args, flag))


def run(args):
    check_args(args)
    if args.merge:
        run_merge(args)
    else:
        run_benchmark(args)


def main(argv=None):
    """One run of bench.py: bad input ends in one `error:` line and exit status 1."""
    with script_exits():
        run(parse_args(argv))


if __name__ == "__main__":
    main()
