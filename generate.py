"""Generate text: prefill the prompt, then decode one token at a time against the static KV cache.

    python generate.py --compile --checkpoint_path checkpoints/REPO --prompt "Hello, my name is"
    python generate.py --compile --random_weights Llama-2-7B --prompt 5 --max_new_tokens 200

Decoding at batch 1 reads every weight once per token, so its speed is set by memory bandwidth; the work
here is to keep the GPU busy: `decode_one_token` is compiled into one CUDA graph, sampling happens on the
device, and the host reads each token one step late so that it never waits on the step in flight.
"""
import argparse
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from model import ModelArgs, Transformer, atomic_path, load_checkpoint, random_model, read_config


# ---- sampling (on the device, no host sync) ---------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8  # 0 means greedy
    top_k: Optional[int] = 200
    top_p: Optional[float] = None


def sample(logits: Tensor, s: Sampling) -> Tensor:
    """logits (B, vocab) -> next token ids (B, 1)."""
    if s.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / s.temperature
    if s.top_k is not None:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens more likely than it already cover top_p of the mass.
        drop = sorted_probs.cumsum(-1) - sorted_probs > s.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    # argmax(p / E) with E ~ Exp(1) draws from p exactly (an exponential race) and, unlike
    # torch.multinomial, never synchronises with the host.
    race = torch.empty_like(probs).exponential_(1)
    return (probs / race).argmax(dim=-1, keepdim=True)


def prefill(model: Transformer, idx: Tensor, input_pos: Tensor, row_start: Tensor, s: Sampling) -> Tensor:
    """Run the whole prompt idx (B, T) through the model, filling the cache; sample the first new token."""
    logits = model(idx, input_pos, row_start, last_only=True)  # (B, 1, vocab)
    return sample(logits[:, -1], s)


def decode_one_token(model: Transformer, token: Tensor, input_pos: Tensor, row_start: Tensor, s: Sampling) -> Tensor:
    """token (B, 1) at cache slot input_pos (1,) -> next token (B, 1)."""
    logits = model(token, input_pos, row_start)  # (B, 1, vocab)
    return sample(logits[:, -1], s)


# ---- the generation loop ----------------------------------------------------------------------------

@dataclass
class Generation:
    tokens: list  # per row: the new tokens, up to and excluding the first end-of-sequence token
    generated: int  # tokens sampled over all rows, each row's end-of-sequence token included
    prompt_tokens: int  # real (unpadded) prompt tokens over all rows
    ttft_s: float  # time to first token
    decode_s: float  # time for the remaining tokens
    decode_steps: int  # forward passes after the prefill (each serves every row of the batch)


def to_host_async(t: Tensor):
    """Start copying t to the host behind the work already queued; returns (host tensor, event to wait on)."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def wait(event):
    if event is not None:
        event.synchronize()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: Transformer, prompts: list, max_new_tokens: int, sampling: Sampling, eos_ids=(),
             prefill_fn: Callable = prefill, decode_fn: Callable = decode_one_token,
             on_tokens: Optional[Callable] = None) -> Generation:
    """Generate up to max_new_tokens for each prompt (lists of ids, any lengths). Prompts are left-padded to a
    common length; `row_start` tells the model where each row's real tokens begin, so every row gets the
    tokens it would get alone. on_tokens(one new id per row, None for rows that have ended) is called as
    tokens reach the host."""
    device = model.tok_embeddings.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    assert B <= model.max_batch_size and T + max_new_tokens <= model.max_seq_length, "setup_caches() too small"
    idx = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)  # (B, T)
    row_start = torch.tensor([T - len(p) for p in prompts], dtype=torch.long, device=device)  # (B,)

    rows = [[] for _ in range(B)]
    finished = [False] * B
    eos = set(eos_ids)
    generated = 0

    def take(host_tokens: Tensor) -> bool:
        """Record one new token per row; True once every row has ended."""
        nonlocal generated
        new = [None if done else tok for done, tok in zip(finished, host_tokens.view(-1).tolist())]
        for b, tok in enumerate(new):
            if tok is not None:
                generated += 1
                finished[b] = tok in eos
                if not finished[b]:
                    rows[b].append(tok)
        if on_tokens is not None:
            on_tokens(new)
        return all(finished)

    start = time.perf_counter()
    token = prefill_fn(model, idx, torch.arange(T, device=device), row_start, sampling)  # (B, 1)
    first = token.cpu()  # the one deliberate sync: it times the first token
    ttft = time.perf_counter() - start
    done = take(first)
    input_pos = torch.tensor([T], dtype=torch.long, device=device)  # cache slot of `token`
    host, copied, steps = None, None, 0
    while not done and steps < max_new_tokens - 1:
        token = decode_fn(model, token, input_pos, row_start, sampling).clone()  # clone: CUDA graphs reuse outputs
        input_pos += 1
        steps += 1
        if host is not None:
            # The previous token's copy was queued before this step, so waiting for it leaves the GPU busy
            # with this step while the host reads that token.
            wait(copied)
            done = take(host)
        host, copied = to_host_async(token)
    if not done and host is not None:
        wait(copied)
        take(host)
    synchronize(device)
    decode_s = time.perf_counter() - start - ttft
    return Generation(rows, generated, sum(len(p) for p in prompts), ttft, decode_s, steps)


# ---- the command line -------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate text with a gpt-blitz checkpoint (or random weights, to benchmark).")
    p.add_argument("--checkpoint_path", type=Path, help="checkpoint folder, or the weights file inside it")
    p.add_argument("--random_weights", metavar="NAME", help="build the named config (model.py CONFIGS) with random weights on the device")
    p.add_argument("--prompt", action="append", help="prompt text, or an integer N for a synthetic prompt of N tokens; "
                   "repeat the flag for a batch of different prompts (default: 'Hello, my name is', or 5 tokens with --random_weights)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--interactive", action="store_true", help="read prompts from the terminal and stream answers")
    p.add_argument("--num_samples", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=1, help="repeat a single prompt this many times")
    p.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep the smallest set of tokens with this much probability")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--compile", action="store_true", help="compile decode_one_token into a CUDA graph")
    p.add_argument("--compile_prefill", action="store_true", help="also compile the prefill (dynamic shapes)")
    p.add_argument("--profile", type=Path, help="write a torch.profiler trace of the last sample to this path")
    p.add_argument("--json", type=Path, help="write the metrics of every sample to this JSON file")
    p.add_argument("--draft_checkpoint_path", type=Path, help="speculative decoding draft model (not yet supported)")
    p.add_argument("--speculate_k", type=int, default=None, help="tokens the draft proposes per step (not yet supported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="weights and activations (default: bfloat16 on GPU, float32 on CPU)")
    return p.parse_args(argv)


def check_args(args):
    """Reject bad combinations up front, each with one clear sentence (raised as ValueError)."""
    if (args.checkpoint_path is None) == (args.random_weights is None):
        raise ValueError("give exactly one of --checkpoint_path and --random_weights")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {args.top_k}")
    if args.max_new_tokens < 1 or args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--max_new_tokens, --num_samples and --batch_size must be >= 1")
    if args.draft_checkpoint_path is not None or args.speculate_k is not None:
        raise ValueError("speculative decoding (--draft_checkpoint_path, --speculate_k) is not yet supported")
    if args.prompt and len(args.prompt) > 1 and args.batch_size > 1:
        raise ValueError("give either several --prompt flags or --batch_size, not both")
    if args.interactive and args.random_weights:
        raise ValueError("--interactive needs --checkpoint_path (a tokenizer), not --random_weights")
    for flag, path in (("--json", args.json), ("--profile", args.profile)):
        if path is not None and not path.resolve().parent.is_dir():
            raise ValueError(f"{flag}: folder {path.resolve().parent} does not exist")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this PyTorch build sees no CUDA GPU")


def load_tokenizer_and_config(args):
    """The tokenizer and config come first, so bad prompts fail before gigabytes of weights load."""
    if args.random_weights:
        return None, ModelArgs.from_name(args.random_weights)
    from tokenizer import load_tokenizer
    folder, config = read_config(args.checkpoint_path)
    return load_tokenizer(folder), config


def encode_prompts(args, tokenizer, vocab_size: int) -> list:
    """Token ids for each prompt of the batch; an integer prompt becomes that many random tokens."""
    texts = args.prompt or (["5"] if tokenizer is None else ["Hello, my name is"])
    if len(texts) == 1:
        texts = texts * args.batch_size
    prompts = []
    for text in texts:
        if text.isdigit():
            prompts.append(torch.randint(0, vocab_size, (int(text),)).tolist())
        elif tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: use --checkpoint_path, or an integer --prompt with --random_weights")
        elif args.chat:
            prompts.append(tokenizer.encode_chat([{"role": "user", "content": text}]))
        else:
            prompts.append(tokenizer.encode(text))
        if not prompts[-1]:
            raise ValueError(f"prompt {text!r} has no tokens (the model needs at least one)")
    return prompts


def weight_bytes_per_step(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an untied embedding table,
    of which only the looked-up rows are read."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.args.tie_embeddings:
        total -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    return total


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def metrics(gen: Generation, model_bytes: int, device: torch.device) -> dict:
    decode_s = max(gen.decode_s, 1e-9)
    decode_tokens = gen.generated - len(gen.tokens)  # every row's first token came from the prefill
    return dict(
        new_tokens=[len(r) for r in gen.tokens],
        ttft_s=gen.ttft_s,
        prefill_tok_s=gen.prompt_tokens / gen.ttft_s,
        decode_tok_s=decode_tokens / decode_s,  # over the whole batch
        # Weights are read once per forward pass, whatever the batch (also for the one step that may run
        # past an end-of-sequence token before the host sees it).
        bandwidth_gb_s=model_bytes * gen.decode_steps / decode_s / 1e9,
        peak_memory_gb=peak_memory_gb(device),
    )


class Printer:
    """Streams row 0 of the batch to the terminal as tokens arrive (its end-of-sequence token excluded)."""

    def __init__(self, tokenizer, enabled: bool):
        from tokenizer import TextStreamer
        self.streamer = TextStreamer(tokenizer) if enabled and tokenizer is not None else None
        self.eos = set(tokenizer.eos_ids) if tokenizer is not None else set()

    def __call__(self, new_tokens: list):
        token = new_tokens[0]
        if self.streamer is not None and token is not None and token not in self.eos:
            print(self.streamer.put(token), end="", flush=True)

    def close(self):
        if self.streamer is not None:
            print(self.streamer.flush(), flush=True)


def compile_functions(args):
    """The compiled prefill and decode step, kept as values rather than installed over module globals."""
    import torch._inductor.config as inductor_config
    inductor_config.coordinate_descent_tuning = True  # tunes the decode's reduction kernels; costs compile time once
    decode_fn = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True) if args.compile else decode_one_token
    prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True) if args.compile_prefill else prefill
    return prefill_fn, decode_fn


def run(args):
    check_args(args)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)

    tokenizer, config = load_tokenizer_and_config(args)
    prompts = encode_prompts(args, tokenizer, config.vocab_size) if not args.interactive else [[0]]
    longest, context = max(len(p) for p in prompts), config.block_size
    if longest >= context:
        raise ValueError(f"the prompt has {longest} tokens but the model's context is {context} tokens")
    max_new = min(args.max_new_tokens, context - longest)
    if max_new < args.max_new_tokens:
        print(f"note: generating {max_new} tokens, all that fit the {context}-token context", file=sys.stderr)

    t0 = time.perf_counter()
    if args.random_weights:
        model = random_model(args.random_weights, device, dtype)
    else:
        model, _ = load_checkpoint(args.checkpoint_path, device, dtype)
    model.eval()
    synchronize(device)
    print(f"Loaded {args.random_weights or args.checkpoint_path} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    # Interactive prompts are unknown up front: size the cache for a generous conversation turn, not for the
    # whole context (131k positions for Llama-3.1 would cost gigabytes and slow every decode step).
    max_seq = min(context, 4096) if args.interactive else longest + max_new
    model.setup_caches(max_batch_size=len(prompts), max_seq_length=max_seq)

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    prefill_fn, decode_fn = compile_functions(args)
    eos_ids = tokenizer.eos_ids if tokenizer is not None else []

    def one_sample(prompts, stream: bool, max_new: int = max_new):
        printer = Printer(tokenizer, stream and len(prompts) == 1)
        gen = generate(model, prompts, max_new, sampling, eos_ids, prefill_fn, decode_fn, printer)
        printer.close()
        return gen

    if args.interactive:
        return interactive(args, tokenizer, one_sample, max_seq, max_new)
    run_samples(args, prompts, one_sample, tokenizer, weight_bytes_per_step(model), device)


def run_samples(args, prompts: list, one_sample: Callable, tokenizer, model_bytes: int, device: torch.device):
    """--num_samples timed generations of the same prompts (after one untimed compiling run), with metrics."""
    compile_s = None
    if args.compile or args.compile_prefill:
        t0 = time.perf_counter()
        one_sample(prompts, stream=False)
        compile_s = time.perf_counter() - t0
        print(f"Compilation time: {compile_s:.2f} s", file=sys.stderr)
    results = []
    for i in range(args.num_samples):
        profiling = args.profile is not None and i == args.num_samples - 1
        with torch.profiler.profile() if profiling else nullcontext() as prof:
            gen = one_sample(prompts, stream=True)
        if profiling:
            prof.export_chrome_trace(str(args.profile))
        if len(prompts) > 1 and tokenizer is not None:
            for b, row in enumerate(gen.tokens):
                print(f"[{b}] {tokenizer.decode(row)}")
        m = metrics(gen, model_bytes, device)
        results.append(m)
        print(f"Sample {i}: {sum(m['new_tokens'])} tokens, time to first token {m['ttft_s'] * 1000:.1f} ms, "
              f"prefill {m['prefill_tok_s']:.1f} tok/s, decode {m['decode_tok_s']:.2f} tok/s, "
              f"{m['bandwidth_gb_s']:.1f} GB/s, peak memory {m['peak_memory_gb']:.2f} GB", file=sys.stderr)
    summary = {k: sum(r[k] for r in results) / len(results) for k in ("ttft_s", "decode_tok_s", "bandwidth_gb_s")}
    print(f"Average over {len(results)} samples: decode {summary['decode_tok_s']:.2f} tok/s, "
          f"{summary['bandwidth_gb_s']:.1f} GB/s, model {model_bytes / 1e9:.2f} GB", file=sys.stderr)
    if args.json:
        write_json(args.json, dict(args={k: str(v) for k, v in vars(args).items()}, device=device_name(device),
                                   torch=torch.__version__, model_bytes=model_bytes, compile_s=compile_s,
                                   samples=results, average=summary))


def interactive(args, tokenizer, one_sample, max_seq: int, max_new: int):
    """Answer prompts from the terminal until end of input; each turn gets what is left of the cache."""
    while True:
        try:
            text = input("Prompt> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        ids = tokenizer.encode_chat([{"role": "user", "content": text}]) if args.chat else tokenizer.encode(text)
        if not ids or len(ids) >= max_seq:
            print(f"(skipped: the prompt has {len(ids)} tokens; 1 to {max_seq - 1} fit)", file=sys.stderr)
            continue
        one_sample([ids], stream=True, max_new=min(max_new, max_seq - len(ids)))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_json(path: Path, data: dict):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (OSError, ValueError) as e:  # bad input: one line, no traceback (CheckpointError is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
