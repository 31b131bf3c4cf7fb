"""An OpenAI-compatible HTTP server with continuous batching over the static KV cache.

    python server.py --checkpoint_path checkpoints/REPO --compile --max_batch_size 8
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 50}'

Endpoints: POST /v1/chat/completions (the checkpoint's chat template), POST /v1/completions,
GET /v1/models (and /v1/models/NAME), GET /health, and GET / (a chat page, chat.html).

One scheduler thread owns the model. The KV cache has --max_batch_size rows; each request takes the
lowest free row (its slot) and keeps it until it ends. Every row has its own cache position, so a
new request's prompt is prefilled into its row while the other rows keep decoding: each decode step
carries --prefill_chunk tokens of it through the same forward, which reads the weights once for
both. Its last token is its first decode step's input. A finished or cancelled request frees its row
at the next step. The step runs row 0 alone when only it decodes and no prompt waits, else every row
(with --compile, one CUDA graph for each kind of step), and samples each row with its own settings:
a greedy request gets the tokens of generate.py's --temperature 0 whatever shares the batch, and a
seeded one the same tokens on every run (its noise is a hash of its seed, position and token ids,
not a draw from a shared generator), up to rounding: a row's logits are computed within batches of
other sizes, and in bfloat16 another batch size can round a near-tie the other way.

Under torchrun (tp.py) rank 0 serves HTTP and schedules; before each forward it broadcasts the
step's inputs, and every rank runs the same forward. Not served: speculative decoding (it proposes
for one sequence; here the batch is many users).
"""
import argparse
import asyncio
import gc
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from torch import Tensor
from tqdm import tqdm

import tp
from checkpoint import CONFIGS, ArgumentParser, InputError, read_checkpoint, script_exits
from generate import DEVICE_FLAGS, MODEL_FLAGS, check_model_flags, compile_functions, load_weights
from model import ModelArgs, Transformer
from tokenizer import TextStreamer, is_text, load_tokenizer


# ---- sampling each row with its own settings (on the device, no host sync) ----------------------

def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash of int64 values in [0, 2**32): products stay below 2**63."""
    m = 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & m
    x = ((x >> 16) ^ x) * 0x45D9F3B & m
    return (x >> 16) ^ x


def seeded_race(seed: Tensor, position: Tensor, ids: Tensor) -> Tensor:
    """Exp(1) noise for the exponential race of generate.sample_from, shaped like the token ids
    (B, n) it is for: a function of each row's seed (B,), the cache slot it samples at (B,) and the
    token id, so a seeded request draws the same tokens whatever else is in the batch. (The ids are
    data, not an arange: inductor computes an arange's arithmetic in int32, where these constants
    overflow.)"""
    m = 0xFFFFFFFF
    row = mix32(mix32(mix32(seed & m) ^ (seed >> 32) & m) ^ position)  # (B,): all 64 seed bits
    bits = mix32((row[:, None] + ids * 0x9E3779B1) & m)  # (B, n), 32 random bits
    # E = -log(1 - V) as generate.exponential_noise makes it: fine near 0 (V's 32 bits kept), and
    # V held below 1, so E is finite and positive (a dropped token's 0 / 0 would win the argmax).
    v = ((bits.float() + 0.5) / 2**32).clamp_(max=1 - 2**-24)
    return -torch.log1p(-v)


# A sampled request draws from the CANDIDATES most likely tokens at most (top_k caps at it): their
# mass is all but the whole distribution at temperatures people use, and a top-k of fixed size is
# cheaper than sorting a 128k vocabulary for every row at every step.
CANDIDATES = 1024


class RowSettings(NamedTuple):
    """How a row samples: a request's numbers in its Job, each a tensor (B,) of every row's in the
    scheduler (int64 for an int, float32 for a float). A new option is a field here, its default
    what a free row holds, a request field (CommonFields, read where the Job is made) and its rule
    in sample_rows; the scheduler and torchrun's ranks carry every field as they are."""
    temperature: float = 0.0  # 0: greedy, the argmax as in generate.sample
    top_k: int = CANDIDATES  # of the CANDIDATES most likely tokens
    top_p: float = 1.0  # the nucleus; 1: all
    seed: int = 0  # of the noise: a seeded request draws the same tokens on every run


FREE_ROW = RowSettings()


def settings_dtype(field: str) -> torch.dtype:
    """The dtype of a RowSettings field's tensor, from the field's type (a float field whose
    default is written 0 stays float32)."""
    return torch.long if RowSettings.__annotations__[field] is int else torch.float32


def free_rows(n: int, device=None) -> RowSettings:
    """The settings of n free rows: each field a tensor (n,) of FREE_ROW's value, in its dtype."""
    return RowSettings(*(torch.full((n,), v, dtype=settings_dtype(f), device=device)
                         for f, v in zip(RowSettings._fields, FREE_ROW)))


# The fields of each dtype, by index: a job's are copied to the device, and a step's broadcast to
# torchrun's ranks, one tensor a dtype.
FIELDS_BY_DTYPE = {dtype: [i for i, f in enumerate(RowSettings._fields)
                           if settings_dtype(f) == dtype] for dtype in (torch.long, torch.float32)}


def sample_rows(logits: Tensor, position: Tensor, settings: RowSettings) -> Tensor:
    """logits (B, vocab) -> next token ids (B, 1), each row as its settings (B,) say."""
    temperature, top_k, top_p, seed = settings
    B, V = logits.shape
    ranked, order = logits.float().topk(min(V, CANDIDATES), dim=-1)  # (B, k), most likely first
    # Scaled after subtracting the row's maximum: a tiny temperature then sends the others to -inf
    # (near-greedy), where dividing the logits themselves overflows to inf and samples noise.
    ranked = (ranked - ranked[:, :1]) / torch.where(temperature > 0, temperature, 1.0)[:, None]
    k = ranked.shape[-1]
    ranks = torch.arange(k, device=logits.device)
    probs = torch.softmax(ranked.masked_fill(ranks >= top_k[:, None], -float("inf")), dim=-1)
    # The nucleus as generate.probabilities keeps it: a token goes when it and the tokens less
    # likely than it hold at most 1 - top_p; the most likely stays. That mass is a suffix sum, taken
    # as a matmul with a lower-triangular matrix: on a GPU, inductor cannot fuse the argmax below
    # into the split scan kernel a cumsum becomes.
    tail = probs @ torch.ones(k, k, device=logits.device).tril()  # (B, k)
    probs = probs.masked_fill((tail <= 1 - top_p[:, None]) & (ranks > 0), 0.0)
    drawn = order.gather(1, (probs / seeded_race(seed, position, order)).argmax(-1, keepdim=True))
    return torch.where(temperature[:, None] > 0, drawn, logits.argmax(dim=-1, keepdim=True))


def decode_rows(model: Transformer, token: Tensor, input_pos: Tensor, settings: RowSettings,
                chunk: Optional[tuple] = None) -> Tensor:
    """token (B, 1) at cache slots input_pos (B, 1), one per row -> next token (B, 1).

    chunk: (ids (1, C), slots (1, C), row (1,)), the next piece of one prompt, prefilled by the same
    forward in the request's cache row: every matmul reads the weights once for both. The row is
    an index tensor, not an int (which dynamo would specialize: a compile for each row)."""
    logits = model(token, input_pos, chunk=chunk)  # (B, 1, vocab)
    return sample_rows(logits[:, -1], input_pos[:, 0], settings)


# ---- the scheduler -------------------------------------------------------------------------------

def tensor_on(values: list, device) -> Tensor:
    """Host numbers as a tensor on device, without waiting for the work queued there: a CUDA copy
    from pageable memory (`torch.tensor(values, device=...)`) first waits for the stream to drain,
    one from pinned memory does not."""
    t = torch.tensor(values)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(eq=False)  # a job is itself: found in the waiting queue by identity
class Job:
    """One request as the scheduler sees it. `emit` hands the HTTP side each new token id, then one
    finish reason ("stop" or "length"), through the scheduler's deliver (or "stop" from the HTTP
    side itself, for a client gone)."""
    prompt: list
    max_tokens: int
    settings: RowSettings
    emit: Callable
    cancelled: bool = False  # set by the HTTP side: a stop string, a client gone, the answer's end
    filled: int = 0  # prompt tokens prefilled: all but the last, the first decode step's input
    computed: int = 0  # tokens sampled on the device: emitted, or in the step in flight
    generated: int = 0  # tokens emitted
    admitted: float = 0.0  # when it took its row: prompts are prefilled in that order


class Scheduler:
    """Owns the model and its cache: B rows for B requests. HTTP handlers submit and cancel jobs
    (from the event loop's thread, or Starlette's thread pool for a stream's background task;
    `changed` guards the queue); everything else happens on the scheduler's own thread. step_fn
    is decode_rows, compiled or not; compiled, every chunk is padded to --prefill_chunk tokens
    (static_chunks): one shape."""

    def __init__(self, model: Transformer, eos_ids, max_queue: int, prefill_chunk: int,
                 step_fn: Callable, static_chunks: bool):
        self.model, self.eos = model, set(eos_ids)
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.step_fn, self.static_chunks = step_fn, static_chunks
        B, device = model.max_batch_size, model.tok_embeddings.weight.device
        self.rows: list[Optional[Job]] = [None] * B
        self.waiting: deque = deque()
        self.changed = threading.Condition()  # guards waiting and stopping
        self.stopping = False
        # Each row's sampling settings, written when a job takes the row.
        self.settings = free_rows(B, device)
        # Each row's last sampled token, the next decode step's input: it stays on the device.
        self.next_token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.in_flight = None  # the decode step whose tokens are not yet emitted (see step)
        # A step's (job, token id or finish reason) go out together: one hand-over between threads
        # a step, not one a token (start() sets how).
        self.outbox: list = []
        self.deliver: Callable[[list], None] = hand_out
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, name="scheduler", daemon=True)

    def start(self, deliver: Callable[[list], None]):
        """Run the scheduler thread; deliver(events) then gets each step's events."""
        self.deliver = deliver
        self.thread.start()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when --max_queue jobs wait already (beyond those about to take a free
        row)."""
        with self.changed:
            if len(self.waiting) >= self.max_queue + self.rows.count(None):
                return False
            self.waiting.append(job)
            self.changed.notify()
            return True

    def cancel(self, job: Job):
        """End a job: a waiting one leaves the queue, a running one frees its row next step."""
        job.cancelled = True
        with self.changed:
            if job in self.waiting:
                self.waiting.remove(job)

    def stop(self):
        with self.changed:
            self.stopping = True
            self.changed.notify()
        self.thread.join()

    def run(self):
        try:
            self.serve()
        except BaseException:
            traceback.print_exc()
            os._exit(1)  # a bug: without this thread every request would wait forever

    @torch.inference_mode()
    def serve(self):
        self.warm_up()
        if dist.is_initialized():  # the other ranks' warm-up is over too: no rows, C = 1
            dist.broadcast(tensor_on([0, 1], self.next_token.device), 0)
        freeze_long_lived()
        self.ready.set()
        while True:
            with self.changed:
                while not (self.stopping or self.waiting or any(self.rows)):
                    if not self.changed.wait(KEEP_ALIVE_S) and dist.is_initialized():
                        # idle: the other ranks, waiting in a broadcast, would time out
                        dist.broadcast(tensor_on([0, 2], self.next_token.device), 0)
                if self.stopping:
                    break
                for r in range(len(self.rows)):
                    if self.rows[r] is not None and self.rows[r].cancelled:
                        self.rows[r] = None
                    if self.rows[r] is None and self.waiting:
                        self.admit(r, self.waiting.popleft())
            self.step()
        if dist.is_initialized():  # the other ranks stop too
            send_step(self.next_token[:0], self.next_token[:0], FREE_ROW, None)

    def warm_up(self):
        """Compile the step for every number of rows it runs, with and without a prompt's chunk,
        and capture their CUDA graphs, before the first request. The chunk writes row 0's first
        slots, which its first request overwrites."""
        device, B = self.next_token.device, len(self.rows)
        shapes = [(n, None) for n in sorted({self.rows_run(last) for last in range(B)})]
        shapes.append((B, self.chunk_at(0, [0] * min(2, self.prefill_chunk))))
        with tqdm(shapes, desc="warm-up", unit="step") as bar:
            for n, chunk in bar:
                bar.set_postfix_str(f"{n} rows" + (" and a prompt" if chunk else ""))
                for _ in range(3):  # CUDA graph trees: warm-up, capture, replay
                    # the live step's own input: a fresh tensor made in inference mode would
                    # differ from it in kind, and the step would compile again at the first request
                    self.forward(self.next_token[:n], tensor_on([[0]] * n, device), chunk)

    def rows_run(self, last: int) -> int:
        """How many rows a decode step without a prompt's chunk runs when `last` is the highest
        decoding row: one, or all (a step with a chunk runs all). Each count is a compile of its
        own; a step is memory-bound, so a few rows cost nearly what all do (Llama-2-7B int8 on an
        H200: 3.5 ms a step for one row, 5.75 ms for 32; BENCHMARKS.md), except in a mixture of
        experts, where more rows choose more experts to read."""
        return 1 if last == 0 else len(self.rows)

    def forward(self, idx: Tensor, input_pos: Tensor, chunk: Optional[tuple]) -> Tensor:
        """The step of the first n rows, idx (n, 1), with each row's sampling settings, and a
        prompt's chunk or None. Under torchrun every rank runs it."""
        settings = RowSettings(*(t[:idx.shape[0]] for t in self.settings))
        if dist.is_initialized():
            send_step(idx, input_pos, settings, chunk)
        return self.step_fn(self.model, idx, input_pos, settings, chunk)

    def admit(self, r: int, job: Job):
        self.rows[r] = job
        job.admitted = time.perf_counter()
        # Through pinned memory (tensor_on): a host number assigned to a CUDA tensor is copied
        # from pageable memory, which waits for every queued step first. One copy a dtype.
        for fields in FIELDS_BY_DTYPE.values():
            values = tensor_on([job.settings[i] for i in fields], self.next_token.device)
            for i, value in zip(fields, values):
                self.settings[i][r] = value

    def step(self):
        """A decode step over the decoding rows, carrying the next chunk of the earliest admitted
        prompt; then the tokens of the step before it. Each step's inputs are the last one's tokens
        where they lie, on the device, so the step is queued before the host reads them: the GPU
        works on one step while the host emits the last one's tokens. A job that ends costs one
        step more of its row (its token is dropped) but none past its max_tokens."""
        decoding = [r for r, j in enumerate(self.rows)
                    if j and j.filled == len(j.prompt) - 1 and j.computed < j.max_tokens]
        prefilling = [r for r, j in enumerate(self.rows) if j and j.filled < len(j.prompt) - 1]
        chunk = self.next_chunk(min(prefilling, key=lambda r: self.rows[r].admitted)
                                ) if prefilling else None
        launched = self.decode(decoding, chunk) if decoding or chunk else None
        if self.in_flight is not None:
            jobs, tokens, copied = self.in_flight
            if copied is not None:
                copied.synchronize()
            tokens = tokens.tolist()
            for r, job in jobs.items():
                if self.rows[r] is job:  # not ended (or replaced) since
                    self.take(r, tokens[r][0])
        self.in_flight = launched
        if self.outbox:
            self.deliver(self.outbox)
            self.outbox = []

    def decode(self, decoding: list, chunk: Optional[tuple]) -> tuple:
        """Queue one step: ({row: job} of the decoding rows, the step's new tokens (n, 1) in host
        memory, and on CUDA the event after which they are there)."""
        # The step runs row 0 alone or every row (a request takes the lowest free row: alone, it
        # decodes at batch 1). Rows in it that are not decoding still run: each writes a slot that
        # its next prefill chunk or decode step overwrites before anything reads it, and a next
        # input that its first decode step replaces with its prompt's last token.
        device = self.next_token.device
        n = len(self.rows) if chunk or not decoding else self.rows_run(max(decoding))
        starting = [r for r in decoding if self.rows[r].computed == 0]
        if starting:  # a prompt's last token is its first decode step's input
            firsts = tensor_on([self.rows[r].prompt[-1] for r in starting], device)
            for i, r in enumerate(starting):
                self.next_token[r, 0] = firsts[i]
        slots = [[len(j.prompt) - 1 + j.computed if r in decoding else j.filled if j else 0]
                 for r, j in enumerate(self.rows[:n])]
        new = self.forward(self.next_token[:n], tensor_on(slots, device), chunk)  # (n, 1)
        # Copied out before the next step reuses the CUDA graph's output memory.
        self.next_token[:n] = new
        tokens, copied = new, None
        if new.is_cuda:  # into pinned memory, so that the copy does not hold the host up
            tokens = torch.empty(new.shape, dtype=new.dtype, pin_memory=True)
            tokens.copy_(new, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        for r in decoding:
            self.rows[r].computed += 1
        return {r: self.rows[r] for r in decoding}, tokens, copied

    def next_chunk(self, r: int) -> tuple:
        """The next --prefill_chunk tokens of row r's prompt, but its last (the first decode
        step's input), for decode_rows: (ids (1, C), slots (1, C), row (1,))."""
        job = self.rows[r]
        n = min(self.prefill_chunk, len(job.prompt) - 1 - job.filled)
        chunk = self.chunk_at(r, job.prompt[job.filled:job.filled + n], job.filled)
        job.filled += n
        return chunk

    def chunk_at(self, r: int, ids: list, start: int = 0) -> tuple:
        """ids at slots start.. of row r. Padded to --prefill_chunk tokens where the step is
        compiled (static_chunks): the padding's slots follow the prompt's (the cache's last slot
        past its end), where nothing reads before the row writes them again."""
        C = self.prefill_chunk if self.static_chunks else len(ids)
        last_slot = self.model.max_seq_length - 1
        slots = [min(start + i, last_slot) for i in range(C)]
        both = tensor_on([ids + [0] * (C - len(ids)), slots], self.next_token.device)  # (2, C)
        return both[:1], both[1:], tensor_on([r], self.next_token.device)

    def take(self, r: int, token: int):
        """Hand a row's new token to its job (at the end of the step); free the row when the job
        ends."""
        job = self.rows[r]
        if job.cancelled:
            self.rows[r] = None
        elif token in self.eos:
            self.outbox.append((job, "stop"))
            self.rows[r] = None
        else:
            self.outbox.append((job, token))
            job.generated += 1
            if job.generated == job.max_tokens:
                self.outbox.append((job, "length"))
                self.rows[r] = None


def hand_out(events: list):
    """Each (job, item) of a step to its job's emit, in order."""
    for job, item in events:
        job.emit(item)


# ---- under torchrun: rank 0 schedules, every rank runs the same forwards -------------------------

# An idle rank 0 tells the others it is alive this often: they wait for its next step in a
# broadcast, which gives up after the process group's timeout (10 minutes for NCCL).
KEEP_ALIVE_S = 60


def send_step(idx: Tensor, input_pos: Tensor, settings: RowSettings, chunk: Optional[tuple]):
    """Rank 0: broadcast one step of the scheduler (its rows, their sampling settings and a prompt's
    chunk), or the end (no rows)."""
    b, C = idx.shape[0], 0 if chunk is None else chunk[0].shape[1]
    dist.broadcast(tensor_on([b, C], idx.device), 0)
    if not b:
        return
    # two broadcasts: the int64 columns (the rows' tokens and slots, then the int settings), the
    # float settings
    ints, floats = ([settings[i] for i in fields] for fields in FIELDS_BY_DTYPE.values())
    dist.broadcast(torch.stack([idx[:, 0], input_pos[:, 0], *ints], dim=1), 0)
    dist.broadcast(torch.stack(floats, dim=1), 0)
    if C:
        dist.broadcast(torch.cat([chunk[0][0], chunk[1][0], chunk[2]]), 0)  # (2C + 1,)


def freeze_long_lived():
    """After the warm-up: what is alive now (weights, compiled steps, dynamo's caches) lives as
    long as the server. Out of the garbage collector's view, it is no longer walked by a full
    collection, which holds the GIL (rare while serving, but 0.4 s each for compiled SmolLM2 on
    a CPU: a stall in every stream), nor by the one at exit (a compiled SmolLM2 server on a CPU
    exited 5 s after SIGTERM, 2.5 s with this)."""
    gc.freeze()


def follow(model: Transformer, step_fn: Callable):
    """Ranks other than 0: run the steps rank 0's scheduler sends (after the warm-up's, a header
    of no rows and C = 1; while idle, no rows and C = 2 now and then), until it stops."""
    device = model.tok_embeddings.weight.device
    while True:
        header = torch.empty(2, dtype=torch.long, device=device)
        dist.broadcast(header, 0)
        b, C = header.tolist()
        if b == 0 and C:  # C = 1: rank 0's warm-up is over; 2: rank 0 is idle, and alive
            if C == 1:
                freeze_long_lived()
            continue
        if b == 0:
            return
        int_fields, float_fields = FIELDS_BY_DTYPE.values()
        # idx, input_pos and the int settings; the float settings (send_step's order)
        ints = torch.empty(b, 2 + len(int_fields), dtype=torch.long, device=device)
        floats = torch.empty(b, len(float_fields), device=device)
        dist.broadcast(ints, 0)
        dist.broadcast(floats, 0)
        columns = {**dict(zip(int_fields, ints[:, 2:].unbind(1))),
                   **dict(zip(float_fields, floats.unbind(1)))}
        settings = RowSettings(*(columns[i] for i in range(len(FREE_ROW))))
        chunk = None
        if C:
            sent = torch.empty(2 * C + 1, dtype=torch.long, device=device)
            dist.broadcast(sent, 0)
            chunk = (sent[None, :C], sent[None, C:2 * C], sent[2 * C:])
        with torch.inference_mode():
            step_fn(model, ints[:, :1], ints[:, 1:2], settings, chunk)


# ---- the HTTP side: OpenAI's requests, responses and errors --------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: Optional[str] = None,
                 param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        # OpenAI's types: a wrong key or model is an invalid request too (its code says which)
        kind = "rate_limit_error" if self.status == 429 else "invalid_request_error"
        error = dict(message=self.message, type=kind, param=self.param, code=self.code)
        return JSONResponse({"error": error}, self.status, headers=self.headers)


class BodyLimit:
    """ASGI middleware: a request body of more than `limit` bytes is answered 413, before the route
    reads it where its Content-Length says so, else once that many bytes have come (a chunked body):
    the route would parse it whole on the event loop, then tokenize it, before its prompt is found
    too long for the context."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is over this server's limit of {self.limit} "
                             "bytes", "request_too_large")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await too_large.response()(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise too_large  # FastAPI answers it as its cause (http_error)
            return message
        await self.app(scope, counted, send)


# The request's models are strict: a value of the wrong JSON type is a 400, as OpenAI's API answers
# it ("5" is no 5, true no 1), not converted.
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


def one_of(forms: str) -> WrapValidator:
    """For a field of several forms: a value that fits none is one error that names them, where
    pydantic gives an error for each form, each placed at the form's name (prompt.list[int].0)."""
    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_form", f"must be {forms}") from None
    return WrapValidator(validate)


class CommonFields(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share. Unknown fields are accepted and
    ignored, except those in UNSUPPORTED, which would change the answer."""
    model_config = ConfigDict(extra="allow", strict=True)
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    # (NaN, which JSON from Python clients may hold, is refused as not finite, not as out of range)
    temperature: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False)  # None: 1
    top_p: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False)  # None: 1; 0: greedy
    top_k: Optional[int] = Field(None, ge=1, le=CANDIDATES)  # extension: the k most likely
    seed: Optional[int] = Field(None, ge=-2**63, lt=2**63)  # OpenAI's: an int64
    stop: Annotated[Union[str, list[str], None], one_of("a string or a list of strings")] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    # tool results ("tool", "function") belong to tool calls, which this server does not make
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Union[str, list[dict], None],  # text, or parts {"type": "text", "text": ...}
                       one_of("a string or a list of parts")] = None


class ChatRequest(CommonFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(CommonFields):
    # text or token ids, alone or in a list of one prompt
    prompt: Annotated[Union[str, list[int], list[str], list[list[int]]],
                      one_of("a string or a list of token ids, or a list of one of those")]


# OpenAI's API takes up to 4 stop strings. Each is looked for at every token, on the event loop
# that serves every stream, in time that can grow with the square of its length (held_back):
# 100 characters keep that to microseconds.
MAX_STOPS, MAX_STOP_CHARS = 4, 100

# field -> the values that leave the answer as this server gives it
UNSUPPORTED = {"n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,),
               "echo": (False,), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
               "function_call": ("none",), "presence_penalty": (0,), "frequency_penalty": (0,),
               "logit_bias": ({},), "suffix": ("",), "response_format": ({"type": "text"},),
               "modalities": (["text"],), "audio": (), "min_p": (0,), "repetition_penalty": (1,),
               # vLLM's extensions, which clients written for it send
               "min_tokens": (0,), "ignore_eos": (False,), "stop_token_ids": ([],),
               "typical_p": (1,), "include_stop_str_in_output": (False,)}


def check_supported(body: CommonFields):
    # JSON's true is not 1 (n), nor 0 false (logprobs: 0 asks for the chosen tokens' logprobs)
    def allowed(value, name) -> bool:
        return any(value == v and isinstance(value, bool) == isinstance(v, bool)
                   for v in UNSUPPORTED[name])
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and value is not None and not allowed(value, name):
            raise APIError(400, f"{name}={json.dumps(value)} is not supported by this server",
                           "unsupported_parameter", name)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options goes with stream: true", "invalid_request",
                       "stream_options")


def message_text(message: Message) -> str:
    if message.content is None and message.role != "assistant":  # as OpenAI's API: only an
        raise APIError(400, f"a {message.role} message needs content",  # answer's may be null
                       "invalid_request", "messages")
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(part.get("type") != "text" for part in message.content):
        raise APIError(400, "only text content parts are supported", "unsupported_content",
                       "messages")
    if not all(isinstance(part.get("text"), str) for part in message.content):
        raise APIError(400, "a text content part's text must be a string", "invalid_request",
                       "messages")
    return "".join(part["text"] for part in message.content)


def unicode_text(text: str, param: str) -> str:
    """text, refused if it holds a lone surrogate: JSON can escape one ("\\ud800"), but it is not
    Unicode text and no tokenizer takes it."""
    if not is_text(text):
        raise APIError(400, "the text holds a lone surrogate (half of a UTF-16 pair), which is not "
                       "Unicode text", "invalid_text", param)
    return text


def held_back(text: str, stops: list) -> int:
    """How many characters at the end of text could be the start of a stop string: they wait for
    the next token before going out. Only the last len(stop) - 1 characters can; a start is
    tried only where the stop's first character is, which is one search for most text."""
    held = 0
    for stop in stops:
        tail = text[max(0, len(text) - len(stop) + 1):]
        start = tail.find(stop[0])
        while start >= 0 and not stop.startswith(tail[start:]):
            start = tail.find(stop[0], start + 1)
        if start >= 0:
            held = max(held, len(tail) - start)
    return held


class RandomWeightsTokenizer:
    """Text for a --random_weights model (benchmarks): each UTF-8 byte of a prompt is a token, and
    each generated id reads as one printable character. No end of sequence: answers run to
    max_tokens."""
    eos_ids: list = []

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def encode_chat(self, messages: list) -> list:
        return self.encode("\n".join(m["content"] for m in messages))

    def decode(self, ids: list) -> str:
        return "".join(chr(33 + i % 94) for i in ids)


def make_app(scheduler: Scheduler, tokenizer, model_id: str, context: int,
             api_key: Optional[str], page: Optional[str]) -> FastAPI:
    """The routes, over a running scheduler (started and stopped with the app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        # each step's tokens reach the event loop's thread in one callback
        scheduler.start(lambda events: loop.call_soon_threadsafe(hand_out, events))
        await asyncio.to_thread(scheduler.ready.wait)  # the port opens once the step is compiled
        yield  # after uvicorn's graceful shutdown: every response is complete
        scheduler.stop()

    app = FastAPI(title="gpt-blitz", lifespan=lifespan)
    # a prompt that fits the context takes a few bytes a token: room for it many times over
    app.add_middleware(BodyLimit, limit=max(1 << 20, 256 * context))
    created, vocab_size = int(time.time()), scheduler.model.args.vocab_size

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    async def key_refused(request: Request) -> Optional[JSONResponse]:
        """The answer to a request without the key, or None. A body's errors ask it first: FastAPI
        reads the body before the route's dependencies (authorize) run."""
        try:
            await authorize(request)
        except APIError as refused:
            return refused.response()
        return None

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        if (refused := await key_refused(request)) is not None:
            return refused
        errors = e.errors()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if errors[0]["loc"][:1] == ("body",) and not media.endswith(("/json", "+json")):
            # FastAPI reads no other body as JSON: curl -d without -H sends a form
            return APIError(400, "send the body as JSON, with the header Content-Type: "
                            "application/json", "invalid_json").response()
        if errors[0]["type"] == "json_invalid":
            return APIError(400, f"the body is not valid JSON ({errors[0]['ctx']['error']})",
                            "invalid_json").response()
        where = [".".join(str(x) for x in err["loc"][1:]) for err in errors]
        message = "; ".join(f"{w or 'body'}: {err['msg']}" for w, err in zip(where, errors))
        return APIError(400, message, "invalid_request", where[0] or None).response()

    @app.exception_handler(InputError)
    async def input_error(request: Request, e: InputError):
        # The request's own content, e.g. messages that the chat template refuses.
        return APIError(400, str(e), "invalid_request").response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if isinstance(e.__cause__, APIError):  # raised while FastAPI read the body (BodyLimit)
            return e.__cause__.response()
        if e.status_code == 400:  # a body FastAPI cannot parse (not UTF-8, nested too deep)
            if (refused := await key_refused(request)) is not None:
                return refused
            return APIError(400, "the body could not be parsed as JSON", "invalid_json").response()
        return APIError(e.status_code, str(e.detail), headers=e.headers).response()

    async def authorize(request: Request):
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # an authentication scheme's name has no case (RFC 9110): "bearer" is "Bearer"
        if api_key is not None and not (scheme.lower() == "bearer" and
                                        secrets.compare_digest(given.encode(), api_key.encode())):
            raise APIError(401, "invalid or missing API key (send the header Authorization: "
                           "Bearer KEY)", "invalid_api_key")

    @app.get("/health")
    async def health():
        running = len(scheduler.rows) - scheduler.rows.count(None)
        return {"status": "ok", "requests_running": running,
                "requests_waiting": len(scheduler.waiting)}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        if page is None:
            raise APIError(404, "no chat page: chat.html is missing beside server.py")
        return page

    served = {"id": model_id, "object": "model", "created": created, "owned_by": "gpt-blitz"}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [served]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def one_model(name: str):
        if name != model_id:
            raise APIError(404, f"the model {name!r} does not exist: this server serves "
                           f"{model_id!r}", "model_not_found", "model")
        return served

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request):
        check_supported(body)
        # "developer": OpenAI's newer name for the system message, which templates know
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": unicode_text(message_text(m), "messages")} for m in body.messages]
        return await complete(request, body, lambda: tokenizer.encode_chat(messages), True,
                              body.max_completion_tokens or body.max_tokens)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        check_supported(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):  # prompts
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (a list of prompts is n > 1)",
                               "unsupported_parameter", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):  # token ids
            if not prompt:
                raise APIError(400, "the prompt is an empty list", "invalid_request", "prompt")
            return await complete(request, body, lambda: prompt, False, body.max_tokens)
        prompt = unicode_text(prompt, "prompt")
        return await complete(request, body, lambda: tokenizer.encode(prompt), False,
                              body.max_tokens)

    async def complete(request: Request, body: CommonFields, encode: Callable, chat: bool,
                       max_tokens: Optional[int]):
        if body.model is not None and body.model != model_id:
            raise APIError(404, f"the model {body.model!r} does not exist: this server serves "
                           f"{model_id!r}", "model_not_found", "model")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > MAX_STOPS or not all(0 < len(stop) <= MAX_STOP_CHARS for stop in stops):
            raise APIError(400, f"stop takes up to {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} "
                           "characters", "invalid_stop", "stop")
        stops = [unicode_text(stop, "stop") for stop in stops]
        # in a thread: a long prompt takes seconds to tokenize, while the event loop serves every
        # stream
        prompt = await asyncio.to_thread(encode)
        where = "messages" if chat else "prompt"
        if not prompt:
            raise APIError(400, "the prompt has no tokens", "empty_prompt", where)
        # given as ids, or a tokenizer that is not the model's: the forward would fail on them
        if not all(0 <= i < vocab_size for i in prompt):
            raise APIError(400, f"token ids go from 0 to {vocab_size - 1}", "invalid_prompt", where)
        if max_tokens is None:
            if len(prompt) >= context:  # not even one token fits
                raise APIError(400, f"this server's context is {context} tokens, but the prompt "
                               f"has {len(prompt)}", "context_length_exceeded", where)
            max_tokens = context - len(prompt)  # all that fits
        if len(prompt) + max_tokens > context:
            raise APIError(400, f"this server's context is {context} tokens, but {len(prompt)} "
                           f"prompt tokens + {max_tokens} max_tokens = "
                           f"{len(prompt) + max_tokens}", "context_length_exceeded", where)
        queue = asyncio.Queue()
        settings = RowSettings(temperature=1.0 if body.temperature is None else body.temperature,
                               top_k=body.top_k or CANDIDATES,
                               top_p=1.0 if body.top_p is None else body.top_p,
                               seed=secrets.randbits(63) if body.seed is None else body.seed)
        job = Job(prompt, max_tokens, settings, emit=queue.put_nowait)
        if not scheduler.submit(job):
            queued = scheduler.max_queue
            raise APIError(429, f"the server is busy: {queued} request"
                           f"{'s are' if queued > 1 else ' is'} waiting already", "queue_full",
                           headers={"Retry-After": "1"})
        head = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}",
                    object="chat.completion" if chat else "text_completion",
                    created=int(time.time()), model=model_id)

        def usage(n: int) -> dict:
            return dict(prompt_tokens=len(prompt), completion_tokens=n,
                        total_tokens=len(prompt) + n)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            # A client that leaves ends the stream (Starlette listens for it below ASGI 2.4, and
            # uvicorn's HTTP scope says 2.3), and the answer's end cancels the job; the background
            # task, run however the response ends, cancels one whose stream never started.
            return StreamingResponse(chunks(answer(job, queue, stops, chat), head, chat, usage,
                                            include_usage), media_type="text/event-stream",
                                     background=BackgroundTask(scheduler.cancel, job))
        gone = asyncio.create_task(cancel_when_gone(request, job))  # a client that leaves
        text, n = "", 0
        try:
            async for piece, reason, n in answer(job, queue, stops, chat):
                text += piece
        finally:
            gone.cancel()
        choice = dict(index=0, finish_reason=reason, logprobs=None)
        message = dict(role="assistant", content=text)
        choice.update(dict(message=message) if chat else dict(text=text))
        return dict(head, choices=[choice], usage=usage(n))

    async def answer(job: Job, queue: asyncio.Queue, stops: list, chat: bool):
        """(text, finish reason or None, tokens so far) as the job's tokens arrive. A stop string
        ends the answer just before it, also when it spans tokens; the job ends with the answer.
        A completion's text continues its prompt's; a chat answer is a message of its own."""
        streamer = (TextStreamer(tokenizer) if chat
                    else TextStreamer.continuing(tokenizer, job.prompt))
        pending, n = "", 0
        try:
            while True:
                item = await queue.get()
                done = isinstance(item, str)
                n += not done
                pending += streamer.flush(cut=item == "length") if done else streamer.put(item)
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    yield pending[:cut], "stop", n
                    return
                if done:
                    yield pending, item, n
                    return
                ready = len(pending) - held_back(pending, stops)
                if ready > 0:
                    yield pending[:ready], None, n
                    pending = pending[ready:]
        finally:
            scheduler.cancel(job)  # a no-op for a job that has ended

    async def cancel_when_gone(request: Request, job: Job):
        """A client that leaves before its (not streamed) answer frees its row (the answer cancels
        this watch when it ends)."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        scheduler.cancel(job)
        job.emit("stop")  # ends the answer nobody reads

    async def chunks(events, head: dict, chat: bool, usage: Callable, include_usage: bool):
        """Server-sent events in OpenAI's chunk format, ending with data: [DONE]."""
        head = dict(head, object="chat.completion.chunk" if chat else "text_completion")
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict, reason: Optional[str] = None) -> str:
            choice = dict(index=0, finish_reason=reason, logprobs=None)
            choice.update(delta=delta) if chat else choice.update(text=delta.get("content", ""))
            return f"data: {json.dumps(dict(head, choices=[choice], **extra))}\n\n"

        if chat:
            yield chunk(dict(role="assistant", content=""))
        n = 0
        async for text, reason, n in events:
            if text:
                yield chunk(dict(content=text))
            if reason is not None:
                yield chunk({}, reason)
        if include_usage:
            yield f"data: {json.dumps(dict(head, choices=[], usage=usage(n)))}\n\n"
        yield "data: [DONE]\n\n"

    return app


# ---- the command line ----------------------------------------------------------------------------

SPECULATION_FLAGS = ("--draft_checkpoint_path", "--speculate_ngram", "--speculate_k")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        description="Serve a gpt-blitz checkpoint over an OpenAI-compatible HTTP API, many "
        "requests batched at once; under torchrun the model is split over the processes. "
        "Speculative decoding is not served (its flags are refused).",
        parents=[MODEL_FLAGS, DEVICE_FLAGS])
    # generate.py's flag, kept out of --help: it is refused below (the decode step prefills)
    p.add_argument("--compile_prefill", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api_key", help="require the header Authorization: Bearer API_KEY")
    p.add_argument("--max_batch_size", type=int, default=8,
                   help="requests decoded at once: rows of the KV cache (default 8)")
    p.add_argument("--max_queue", type=int, default=64,
                   help="requests that may wait for a row; beyond, 429 (default 64)")
    p.add_argument("--max_seq_length", type=int,
                   help="cache slots per row: the longest prompt + max_tokens served (default: "
                   "the model's context, at most 4096). The cache takes B times this, and on a "
                   "CPU every decode step attends over every slot: size it for the workload")
    p.add_argument("--prefill_chunk", type=int, default=32,
                   help="prompt tokens prefilled with each decode step (with --compile every "
                   "step that carries a prompt computes this many): bounds how much a new "
                   "request slows the others' steps; larger chunks bring a prompt's first "
                   "token sooner but slow the steps that carry them (default 32; at most "
                   "--max_seq_length)")
    args, unknown = p.parse_known_args(argv)
    if any(a.split("=")[0] in SPECULATION_FLAGS for a in unknown):
        raise InputError("the server does not do speculative decoding (it proposes tokens for one "
                         "sequence; the server's batch is many users): drop "
                         f"{', '.join(SPECULATION_FLAGS)}")
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.compile_prefill:
        raise InputError("--compile_prefill has nothing to compile here: prompts are prefilled "
                         "inside the decode steps, which --compile compiles")
    check_model_flags(args)
    if min(args.max_batch_size, args.max_queue, args.prefill_chunk,
           1 if args.max_seq_length is None else args.max_seq_length) < 1:
        raise InputError("--max_batch_size, --max_queue, --prefill_chunk and --max_seq_length "
                         "must be >= 1")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is not a TCP port (0 to 65535)")
    # HTTP headers carry ASCII; an empty key would let "Authorization: Bearer" in
    if args.api_key is not None and not (args.api_key.isascii() and args.api_key.isprintable()
                                         and args.api_key.strip() == args.api_key != ""):
        raise InputError("--api_key must be printable ASCII, not empty, with no spaces around it")
    return args


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use is refused at once, not
    after minutes of warm-up."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own does
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


class Server(uvicorn.Server):
    """uvicorn's server, but a second Ctrl-C while the open answers finish ends the process at once,
    with status 130 and the answers cut off. uvicorn's own forced quit would cancel their tasks,
    each logging a traceback, and leave the scheduler's thread stepping as Python shuts down."""

    def handle_exit(self, sig, frame):
        if self.should_exit and sig == signal.SIGINT:  # as uvicorn tells a forced quit
            print("stopped at once: the open answers are cut off", file=sys.stderr, flush=True)
            os._exit(130)
        super().handle_exit(sig, frame)


def main(argv=None):
    args = parse_args(argv)
    distributed = dist.is_torchelastic_launched()  # under torchrun: split the model
    if distributed:
        tp.quiet_other_ranks()
    if args.random_weights:
        ckpt, tokenizer, config = None, RandomWeightsTokenizer(), ModelArgs(**CONFIGS[
            args.random_weights])
        model_id = args.random_weights
    else:
        ckpt = read_checkpoint(args.checkpoint_path)
        tokenizer, config = load_tokenizer(ckpt.folder), ckpt.args
        model_id = ckpt.folder.resolve().name  # (a folder given as "." has no name)
    context = args.max_seq_length or min(config.block_size, 4096)
    if context > config.block_size:
        raise InputError(f"--max_seq_length {context} is beyond the model's context of "
                         f"{config.block_size} tokens")
    if args.prefill_chunk > context:
        raise InputError(f"--prefill_chunk {args.prefill_chunk} is beyond the {context} slots of "
                         "a row (--max_seq_length)")
    listener = listen(args.host, args.port) if tp.rank() == 0 else None  # rank 0 serves HTTP
    device = tp.start(args, config, args.device) if distributed else args.device
    model = load_weights(args, ckpt, config, device, args.max_batch_size, context)
    # The step compiles for one row and for B rows, and for B rows with a prompt's chunk, each
    # with static shapes: with the row count symbolic, a 7B step of 32 rows took 14.7 ms on an
    # H200, against 5.8 ms compiled for 32.
    _, step_fn = compile_functions(args.compile, False, decode_step=decode_rows,
                                   decode_dynamic=False)
    if tp.rank() != 0:
        # torchrun's SIGTERM (and a terminal's Ctrl-C) reaches every process at once: rank 0
        # finishes the open answers first, then its end header stops this one (should rank 0 die
        # instead, torchrun kills this one after its shutdown wait).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return follow(model, step_fn)
    scheduler = Scheduler(model, tokenizer.eos_ids, args.max_queue, args.prefill_chunk, step_fn,
                          static_chunks=args.compile)
    page_path = Path(__file__).with_name("chat.html")
    page = page_path.read_text() if page_path.is_file() else None
    app = make_app(scheduler, tokenizer, model_id, context, args.api_key, page)
    # uvicorn finishes the open responses on SIGTERM or Ctrl-C, then raises the signal again:
    # exit 0 then.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: sys.exit(0))
    # uvicorn names no address for a socket it is given: say where (--port 0 picks a free one)
    host, port = listener.getsockname()[:2]
    print(f"serving {model_id} at http://{f'[{host}]' if ':' in host else host}:{port}/v1 (the "
          "chat page at /) once the warm-up ends", file=sys.stderr, flush=True)
    Server(uvicorn.Config(app, log_level="info")).run(sockets=[listener])


if __name__ == "__main__":
    with script_exits(tp.exit_with_error):
        main()
