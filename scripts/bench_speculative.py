"""The cost model of speculative decoding on a GPU: one target verify of k + 1 tokens against one
plain decode step, and one draft step, from which the expected speedup at any acceptance rate
follows.

    python scripts/bench_speculative.py --out bench_speculative.json

Target: the Llama-2-7B shape in bfloat16 with random weights (they run at the speed of real ones). Drafts: the
same shape in int4 g128 (the cost of a quantized copy of the target, built by bench.py's `build`) and the
TinyLlama-1.1B shape in bfloat16 (a smaller model of the family). Each step is generate.py's own function,
compiled as generate.py compiles it (one CUDA graph each; the verify at its fixed shape (1, k + 1)), and timed
with CUDA events: the median of --repeats calls after a warm-up, at cache position --position of a
--cache_length-slot cache. The three models share the GPU (about 20 GB). Compiling dominates the run time (1-1.5
min per 7B graph): decode, the first --ks verify and the drafts come first, the other ks after, and no
measurement starts after --time_budget_s; the JSON file is rewritten after each one.

With acceptance rate a (each draft kept with probability a, independently of the others) a round of k drafts
yields E = (1 - a^(k + 1)) / (1 - a) tokens and costs k draft steps + one verify, plus one more draft step when
all k are kept (probability a^k: the last draft is fed back into the draft's cache). The expected speedup over
plain decoding is E * decode / cost. Prompt lookup's drafts cost no GPU time. Not modelled: the host's one sync
per round (measure tok/s with generate.py for that).
"""
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's modules
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py beside this file
import bench  # noqa: E402
import generate  # noqa: E402
from checkpoint import (ArgumentParser, InputError, check_device, check_output,  # noqa: E402
                        script_exits)

ACCEPTANCE_RATES = (0.5, 0.6, 0.7, 0.8, 0.9)


def time_ms(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of one fn() call: CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timed(fn, device: torch.device, repeats: int) -> dict:
    """Time fn; its first call (which compiles) is timed separately."""
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return dict(first_call_s=time.perf_counter() - t0, ms=time_ms(fn, device, repeats))


def step_call(fn, model, args, device: torch.device):
    """fn(model, token, ...) at cache slot args.position: the decode step or the draft step."""
    token = torch.randint(0, model.args.vocab_size, (1, 1), device=device)
    position = torch.tensor([[args.position]], device=device)  # (1, 1)
    return lambda: fn(model, token, position, generate.Sampling())


def verify_call(fn, model, k: int, args, device: torch.device):
    """fn(model, k + 1 tokens, ...) at cache slots args.position onwards, with a random draft distribution."""
    vocab = model.args.vocab_size
    tokens = torch.randint(0, vocab, (1, k + 1), device=device)
    positions = args.position + torch.arange(k + 1, device=device)[None]  # (1, k + 1)
    draft_probs = torch.softmax(torch.randn(k, vocab, device=device), dim=-1)  # (k, vocab)
    return lambda: fn(model, tokens, positions, draft_probs, generate.Sampling())


def build(spec: str, args):
    """NAME:PRECISION -> (name, precision, model with its cache), quantized in memory as bench.py does."""
    name, _, precision = spec.partition(":")
    precision = precision or "bf16"
    print(f"building {name} {precision}", flush=True)
    model = bench.build(name, precision)
    model.setup_caches(max_batch_size=1, max_seq_length=args.cache_length)
    return name, precision, model


def plan(args, fns: dict, device: torch.device) -> list:
    """(model, precision, step, k, call) in the order they are measured: what the cost model needs most first
    (decode, the first k's verify, each draft), then the other ks, so that a run cut short by --time_budget_s
    still has a complete cost model for one k."""
    target, drafts = build(f"{args.target}:bf16", args), [build(spec, args) for spec in args.drafts]
    name, precision, model = target
    verifies = [(name, precision, f"verify k={k}", k, verify_call(fns["verify"], model, k, args, device)) for k in args.ks]
    steps = [(name, precision, "decode", None, step_call(fns["decode"], model, args, device)), verifies[0]]
    steps += [(n, p, "draft step", None, step_call(fns["draft"], m, args, device)) for n, p, m in drafts]
    return steps + verifies[1:]


def expected_speedup(a: float, k: int, decode_ms: float, verify_ms: float, draft_ms: float) -> float:
    tokens_per_round = (1 - a ** (k + 1)) / (1 - a)
    round_ms = k * draft_ms + verify_ms + a ** k * draft_ms
    return tokens_per_round * decode_ms / round_ms


def speedup_table(rows: list, target: str) -> list:
    """Markdown lines: the expected speedup of each draft (and of prompt lookup) for each k and acceptance rate."""
    decode = next(r["ms"] for r in rows if r["model"] == target and r["step"] == "decode")
    verifies = [r for r in rows if r["model"] == target and "k" in r]
    drafts = [(f"{r['model']} {r['precision']}", r["ms"]) for r in rows if r["step"] == "draft step"]
    lines = [f"| proposer | k | verify / decode | {' | '.join(f'a = {a}' for a in ACCEPTANCE_RATES)} |",
             "|---|---|---|" + "---|" * len(ACCEPTANCE_RATES)]
    for proposer, draft_ms in drafts + [("prompt lookup (no GPU draft)", 0.0)]:
        for v in verifies:
            cells = " | ".join(f"{expected_speedup(a, v['k'], decode, v['ms'], draft_ms):.2f}x" for a in ACCEPTANCE_RATES)
            lines.append(f"| {proposer} | {v['k']} | {v['ms'] / decode:.2f} | {cells} |")
    return lines


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="Llama-2-7B",
                   help="the target: a named config of checkpoint.py, in bf16 (default Llama-2-7B)")
    p.add_argument("--drafts", nargs="+", default=["Llama-2-7B:int4.g128", "TinyLlama-1.1B:bf16"],
                   help="NAME:PRECISION of each draft, precisions as in bench.py "
                   "(default: Llama-2-7B:int4.g128 TinyLlama-1.1B:bf16)")
    p.add_argument("--ks", nargs="+", type=int, default=[4, 2, 8],
                   help="drafts per round to time the verify for, the first before the drafts "
                   "(default: 4 2 8; each k is one more compiled graph: 1-1.5 min for a 7B target "
                   "on an H100)")
    p.add_argument("--position", type=int, default=256,
                   help="cache slot of the timed step (default 256)")
    p.add_argument("--cache_length", type=int, default=512,
                   help="cache slots, which the verify attends over (default 512)")
    p.add_argument("--repeats", type=int, default=50,
                   help="timed calls per step; the median is reported (default 50)")
    p.add_argument("--time_budget_s", type=float, default=420,
                   help="start no new measurement after this many seconds (default 420)")
    p.add_argument("--device", default="cuda",
                   help="where the models run (default cuda; a CPU only with --eager)")
    p.add_argument("--eager", action="store_true", help="no torch.compile (to check the script on a CPU)")
    p.add_argument("--out", type=Path, default=Path("bench_speculative.json"),
                   help="the JSON result, rewritten after each measurement "
                   "(default bench_speculative.json)")
    args = p.parse_args(argv)
    if min(args.ks) < 1 or args.position < 0 or args.repeats < 1:
        raise InputError("--ks and --repeats must be >= 1, --position >= 0")
    if not 0 < args.time_budget_s < math.inf:
        raise InputError(f"--time_budget_s must be a positive number of seconds, got {args.time_budget_s}")
    if args.position + max(args.ks) + 1 > args.cache_length:
        raise InputError(f"--cache_length {args.cache_length} is too small for --position {args.position} and "
                         f"--ks up to {max(args.ks)}: a verify writes k + 1 slots from --position")
    check_output(args.out, "--out")
    for spec in [f"{args.target}:bf16", *args.drafts]:
        name, _, precision = spec.partition(":")
        bench.check_cell(bench.Cell(name, precision or "bf16", 1, 1))  # a known config and precision
        block_size = bench.ModelArgs(**bench.CONFIGS[name]).block_size
        if args.cache_length > block_size:
            raise InputError(f"--cache_length {args.cache_length} exceeds {name}'s {block_size}-token context")
    started, device = time.perf_counter(), check_device(args.device, "--device")
    if device.type != "cuda" and not args.eager:
        raise InputError(f"--device {args.device}: the step times are speeds on a CUDA GPU only "
                         "(--eager runs the script elsewhere, as a check of the code)")
    bench.DEVICE = args.device  # bench.build makes its models there
    compiled = not args.eager
    # compile_functions also sets the compiler options generate.py uses; the draft step and the verify are
    # compiled as generate.py's load_proposer and compile_verify compile them.
    _, decode_fn = generate.compile_functions(compiled, False)
    draft_fn = (torch.compile(generate.draft_one_token, mode="reduce-overhead", fullgraph=True) if compiled
                else generate.draft_one_token)
    verify_fn = generate.compile_verify() if compiled else generate.verify
    card = generate.device_name(device)
    print(f"{card}, torch {torch.__version__}", flush=True)

    rows = []
    with torch.inference_mode():
        for name, precision, step, k, call in plan(args, dict(decode=decode_fn, draft=draft_fn, verify=verify_fn), device):
            if time.perf_counter() - started > args.time_budget_s:
                print(f"  skipped {name} {precision} {step}: past --time_budget_s", flush=True)
                continue
            rows.append(dict(model=name, precision=precision, step=step, **({"k": k} if k else {}),
                             **timed(call, device, args.repeats)))
            print(f"  {name} {precision} {step}: {rows[-1]['ms']:.3f} ms (first call, compiling: "
                  f"{rows[-1]['first_call_s']:.0f} s)", flush=True)
            generate.write_json(args.out, dict(card=card, torch=torch.__version__, rows=rows,
                                               args=vars(args) | {"out": str(args.out)}))
    report(rows, args, card)


def report(rows: list, args, card: str):
    rows = sorted(rows, key=lambda r: (r["step"] == "draft step", r.get("k", 0)))  # decode, verifies, drafts
    if not rows or rows[0]["step"] != "decode":
        print("the target's decode step was not measured: no cost model")
        return
    decode = rows[0]["ms"]
    if args.eager:
        print("(--eager: a check of the script, not a speed result)")
    print(f"\n{card}, torch {torch.__version__}, cache position {args.position} of {args.cache_length}\n")
    print("| model | precision | step | ms | / target decode | first call (compile) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['step']} | {r['ms']:.3f} | {r['ms'] / decode:.2f} | {r['first_call_s']:.0f} s |")
    print("\nExpected speedup over plain decoding, (1 - a^(k+1)) / (1 - a) tokens per round of cost k draft steps "
          "+ verify + a^k draft steps, at acceptance rate a:\n")
    print("\n".join(speedup_table(rows, args.target)))


if __name__ == "__main__":
    with script_exits():
        main()
