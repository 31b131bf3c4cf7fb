"""Load test: concurrent clients against a running OpenAI-compatible server (server.py).

    python server.py --checkpoint_path checkpoints/REPO --compile --max_batch_size 32 &
    python scripts/load_test.py --concurrency 32 --requests 256 --prompt_tokens 128 --max_tokens 200
    python scripts/load_test.py --concurrency 8 --duration 60 --out load.json

Each of --concurrency clients (the official `openai` async client) sends one streamed request to
POST /v1/completions after another, until --requests have been sent or --duration seconds have
passed (requests in flight then are waited for and counted). The clients are split over
--processes processes, which start together. The model is the first one that GET /v1/models lists.

The prompt counts up, "10001, 10002, 10003, ...", to about --prompt_tokens tokens: two short
requests first measure the server's token count of 8 and of 16 numbers (they also warm it up), so
no tokenizer is needed here. A model, base or chat, continues the count greedily (temperature 0), so
answers run to --max_tokens; those that end earlier show in finish_reasons. Each request's count
starts at its own number, so a server's prefix cache cannot share prompts between requests.

Reported (and written to --out as JSON):
- requests/s and output tok/s: finished requests and their completion tokens (the server's usage
  counts) over the wall time from the first request sent to the last one finished;
- time to first token (TTFT): from sending a request to its first streamed text;
- inter-token latency (ITL): the gaps between consecutive streamed text chunks of one answer (one
  chunk a token, as server.py streams, except where it holds text back: a stop string's possible
  start, a character whose bytes span tokens);
- p50 and p99 of each, in milliseconds. Requests the server refused (e.g. 429: queue full; the
  client then waits as its Retry-After asks before its next request) or that failed (a stream
  that ended without its finish_reason or its usage, or with a chunk that is not JSON) are counted
  in `failed` and `errors`, and left out of the statistics;
- client CPU: the busiest client process's CPU seconds over the wall time. Each process's clients
  share one Python thread: near 100 %, the client, not the server, may be what limits the figures
  above (give more --processes).
"""
import argparse
import asyncio
import json
import math
import multiprocessing
import os
import queue
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from tqdm import tqdm

try:
    import openai
except ImportError:  # a test dependency (requirements-test.txt), not the project's: main() says so
    openai = None

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import ArgumentParser, InputError, check_output, script_exits  # noqa: E402
from generate import write_json  # noqa: E402

CALIBRATION = (8, 16)  # prompts of this many numbers measure the tokens of one
# One Python process parses a few thousand streamed chunks a second (the openai client's parsing is
# most of it): 32 clients of a fast server would saturate it and measure the client.
CLIENTS_PER_PROCESS = 8


class BrokenStream(Exception):
    """A stream that ended without what every answer of an OpenAI-compatible server carries."""


@dataclass
class Result:
    """One request: its timings (perf_counter seconds) and the server's token counts."""
    sent: float
    chunk_times: list = field(default_factory=list)  # arrival of each chunk that carried text
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Optional[str] = None


def percentile(values: list, q: float) -> float:
    """The q-th percentile (0..100) of values, interpolated between the two nearest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def prompt(request: int, numbers: int) -> str:
    """Five-digit numbers: in the usual tokenizers, each has as many tokens as the next."""
    return "".join(f"{10000 + request + i}, " for i in range(numbers)).rstrip()


async def stream_request(client, model: str, text: str, max_tokens: int) -> Result:
    result, usage = Result(sent=time.perf_counter()), False
    stream = await client.completions.create(
        model=model, prompt=text, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            result.chunk_times.append(time.perf_counter())
        if chunk.choices and chunk.choices[0].finish_reason:
            result.finish_reason = chunk.choices[0].finish_reason
        if chunk.usage:  # the last chunk, asked for by include_usage
            result.prompt_tokens = chunk.usage.prompt_tokens
            result.completion_tokens = chunk.usage.completion_tokens
            usage = True
    if result.finish_reason is None:
        raise BrokenStream("no finish_reason")  # e.g. a connection closed mid-answer
    if not usage:
        raise BrokenStream("no usage")  # its tokens would count as none
    return result


def retry_after(e: "openai.APIStatusError") -> float:  # openai may be missing: the name is text
    """The seconds a refused request's Retry-After header asks for: 1 if it gives no number, at
    most a minute (a server's "inf" would stop the client for good)."""
    try:
        return min(60.0, max(0.0, float(e.response.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


async def calibrate(args) -> tuple[str, int]:
    """The model's name, and how many numbers make a prompt of about --prompt_tokens tokens: the
    server's token counts of the CALIBRATION prompts. A server that cannot be reached or refuses
    these requests is bad input (a wrong --url or --api_key)."""
    client = openai.AsyncOpenAI(base_url=args.url, api_key=args.api_key or "none", max_retries=0,
                                timeout=600)
    try:
        # read raw: a server that is not OpenAI's API (an HTML page) fails inside the client's parse
        raw = await client.models.with_raw_response.list()
        try:
            models = json.loads(raw.http_response.text)["data"]
            model = models[0]["id"] if models else None
        except (ValueError, LookupError, TypeError):
            raise InputError(f"the server at {client.base_url} does not answer GET /models as an "
                             "OpenAI-compatible API") from None
        if model is None:
            raise InputError(f"the server at {client.base_url} lists no models")
        counts = []
        for numbers in CALIBRATION:
            response = await client.completions.create(model=model, prompt=prompt(0, numbers),
                                                       max_tokens=1, temperature=0)
            tokens = getattr(response.usage, "prompt_tokens", None)
            if type(tokens) is not int:
                raise InputError(f"the server at {client.base_url} gives no prompt_tokens count "
                                 "in a completion's usage, by which the load test sizes its "
                                 "prompts")
            counts.append(tokens)
    except openai.APIConnectionError as e:
        raise InputError(f"cannot reach the server at {client.base_url}: {e}") from None
    except openai.APIStatusError as e:
        raise InputError(f"the server at {client.base_url} answered {e.status_code}: "
                         f"{e.message}") from None
    finally:
        await client.close()
    short, long = counts
    if long <= short:
        raise InputError(f"the server at {client.base_url} counts {short} prompt tokens for "
                         f"{CALIBRATION[0]} numbers and {long} for {CALIBRATION[1]}: its counts do "
                         "not grow with the prompt, by which the load test sizes its prompts")
    per_number = (long - short) / (CALIBRATION[1] - CALIBRATION[0])
    return model, max(1, round(CALIBRATION[0] + (args.prompt_tokens - short) / per_number))


def load(args) -> dict:
    """Run the clients in --processes processes (forked: they share this one's arguments), start
    them together once each has started, and merge what they measured."""
    model, numbers = asyncio.run(calibrate(args))
    context = multiprocessing.get_context("fork")
    events, go = context.Queue(), context.Event()
    sent = context.Value("i", 0)  # requests sent by all processes: each one's prompt number
    shares = [args.concurrency // args.processes + (i < args.concurrency % args.processes)
              for i in range(args.processes)]
    workers = [context.Process(target=worker, args=(args, model, numbers, clients, sent, go, events),
                               daemon=True) for clients in shares]
    for w in workers:
        w.start()
    for _ in workers:
        wait_for(events, workers)
    start = time.perf_counter()
    go.set()
    results, errors, cpu = [], Counter(), []
    with tqdm(total=args.requests, unit="req", desc="requests", file=sys.stderr) as progress:
        while len(cpu) < len(workers):
            kind, payload = wait_for(events, workers)
            if kind == "request":
                progress.update()
            else:  # a process's results, when all its clients are done
                results += [Result(**r) for r in payload["results"]]
                errors.update(payload["errors"])
                cpu.append(payload["cpu_s"])
    wall = time.perf_counter() - start
    return dict(summary(args, model, results, errors, sent.value, wall),
                client_processes=len(workers), client_cpu=max(cpu) / wall)


def wait_for(events, workers: list) -> tuple:
    """The next (kind, payload) a client process sends; a process that died is a bug there (its
    traceback is on stderr)."""
    while True:
        try:
            return events.get(timeout=1)
        except queue.Empty:
            dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a client process exited with status {dead[0]}")


def worker(args, model: str, numbers: int, clients: int, sent, go, events):
    asyncio.run(drive(args, model, numbers, clients, sent, go, events))


async def drive(args, model: str, numbers: int, clients: int, sent, go, events):
    """One process's clients: each sends one request after another until --requests have been
    sent (by every process) or --duration has passed. All requests are streamed."""
    client = openai.AsyncOpenAI(base_url=args.url, api_key=args.api_key or "none", max_retries=0,
                                timeout=600)
    events.put(("ready", None))
    await asyncio.to_thread(go.wait)
    cpu_start = cpu_seconds()
    deadline = time.perf_counter() + args.duration if args.duration else math.inf
    results, errors = [], Counter()

    def next_request() -> Optional[int]:
        with sent.get_lock():
            if args.requests is not None and sent.value >= args.requests:
                return None
            sent.value += 1
            return sent.value

    async def client_loop():
        pause = 0.0  # what a 429's Retry-After asks of this client's next request, if any
        while time.perf_counter() + pause < deadline and (n := next_request()) is not None:
            await asyncio.sleep(pause)
            pause = 0.0
            try:
                results.append(await stream_request(client, model, prompt(n, numbers),
                                                    args.max_tokens))
            except openai.APIError as e:  # e.g. 429 (the queue is full), a dropped connection
                refused = isinstance(e, openai.APIStatusError)
                errors[str(e.status_code) if refused else type(e).__name__] += 1
                if refused and e.status_code == 429:  # sent again at once, it measures this loop
                    pause = retry_after(e)
            except BrokenStream as e:
                errors[str(e)] += 1
            except json.JSONDecodeError:  # a chunk that is not JSON
                errors["chunk not JSON"] += 1
            events.put(("request", None))

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    events.put(("done", dict(results=[vars(r) for r in results], errors=dict(errors),
                             cpu_s=cpu_seconds() - cpu_start)))
    await client.close()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summary(args, model: str, results: list, errors: Counter, sent: int, wall: float) -> dict:
    answered = [r for r in results if r.chunk_times]
    ttft = [(r.chunk_times[0] - r.sent) * 1e3 for r in answered]
    itl = [(b - a) * 1e3 for r in answered for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    output_tokens = sum(r.completion_tokens for r in results)

    def p50_p99(values):
        return {"p50": percentile(values, 50), "p99": percentile(values, 99)} if values else None

    return {
        "url": args.url, "model": model, "date": datetime.now(timezone.utc).isoformat(),
        "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "prompt_tokens": (sum(r.prompt_tokens for r in results) / len(results)
                          if results else None),  # the mean over requests, counted by the server
        "sent": sent, "finished": len(results), "failed": sent - len(results),
        "errors": dict(errors), "finish_reasons": dict(Counter(r.finish_reason for r in results)),
        "wall_s": wall, "output_tokens": output_tokens,
        "requests_per_s": len(results) / wall, "output_tok_s": output_tokens / wall,
        "ttft_ms": p50_p99(ttft), "itl_ms": p50_p99(itl), "itl_samples": len(itl),
    }


def report(result: dict):
    def ms(stats):
        return f"{stats['p50']:.1f} / {stats['p99']:.1f} ms" if stats else "-"
    errors = f" {result['errors']}" if result["errors"] else ""
    print(f"{result['model']} at {result['url']}: {result['concurrency']} clients, "
          f"{result['finished']} requests finished, {result['failed']} failed{errors}")
    print(f"requests/s     {result['requests_per_s']:.2f}")
    print(f"output tok/s   {result['output_tok_s']:.1f}")
    print(f"TTFT p50 / p99 {ms(result['ttft_ms'])}")
    print(f"ITL  p50 / p99 {ms(result['itl_ms'])}")
    print(f"client CPU     {result['client_cpu']:.0%} of one core, the busiest of "
          f"{result['client_processes']} client processes")


# ---- the command line ---------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1",
                   help="the server's API base URL (default http://127.0.0.1:8000/v1)")
    p.add_argument("--api_key", help="the server's --api_key, if it was started with one")
    p.add_argument("--concurrency", type=int, default=8,
                   help="clients sending at the same time (default 8)")
    p.add_argument("--requests", type=int, help="requests in all (default 100 without --duration)")
    p.add_argument("--duration", type=float, help="send requests for this many seconds instead")
    p.add_argument("--prompt_tokens", type=int, default=128,
                   help="about this many prompt tokens (default 128)")
    p.add_argument("--max_tokens", type=int, default=200,
                   help="output tokens asked per request (default 200)")
    p.add_argument("--processes", type=int,
                   help="client processes, the clients split among them (default: one for each "
                   f"{CLIENTS_PER_PROCESS} clients, at most one per CPU core)")
    p.add_argument("--out", type=Path, help="write the result here as JSON")
    args = p.parse_args(argv)
    if args.requests is None and args.duration is None:
        args.requests = 100
    if args.processes is None:
        args.processes = min(-(-args.concurrency // CLIENTS_PER_PROCESS), os.cpu_count() or 1)
    return args


def check_args(args):
    """Reject bad input up front, each with one clear sentence (raised as InputError)."""
    if not args.url.startswith(("http://", "https://")):
        raise InputError(f"--url {args.url!r} is not an http:// or https:// URL")
    try:
        url = urlsplit(args.url)
        host, _ = url.hostname, url.port  # each raises if malformed
    except ValueError as e:
        raise InputError(f"--url {args.url!r}: {e}") from None
    if not host:
        raise InputError(f"--url {args.url!r} names no host")
    if args.requests is not None and args.duration is not None:
        raise InputError("give --requests or --duration, not both")
    counts = [args.concurrency, args.prompt_tokens, args.max_tokens, args.processes]
    if min(counts + ([args.requests] if args.requests is not None else [])) < 1:
        raise InputError("--concurrency, --requests, --prompt_tokens, --max_tokens and "
                         "--processes must be >= 1")
    if args.processes > args.concurrency:
        raise InputError(f"--processes {args.processes} is more than the --concurrency "
                         f"{args.concurrency} clients to split among them")
    if args.duration is not None and not 0 < args.duration < math.inf:
        raise InputError(f"--duration must be a positive number of seconds, got {args.duration}")
    if args.out is not None:
        check_output(args.out, "--out")


def main(argv=None):
    """One load test: bad input ends in one `error:` line and exit status 1."""
    with script_exits():
        args = parse_args(argv)
        if openai is None:
            raise InputError("the load test drives the server with the official openai client: "
                             "pip install openai")
        check_args(args)
        result = load(args)
    report(result)
    if args.out is not None:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    if not result["finished"]:  # nothing was measured: a failure, whatever the reason
        sys.exit(f"error: no request finished ({result['failed']} failed: {result['errors']})")


if __name__ == "__main__":
    main()
