"""A server.py app in the test's own process whose scheduler steps only when the test lets it:
what depends on when requests come and go is then the same on any machine, however fast. Used by
tests/test_server.py and tests/test_load_test.py."""
import gc
import math
import threading
import time
from contextlib import contextmanager
from typing import Callable

import torch

from model import ModelArgs, Transformer
from server import Job, RandomWeightsTokenizer, Scheduler, decode_rows, listen, make_app


class StepGate:
    """The scheduler's step function, server.decode_rows, run only as the test lets it once held
    (the warm-up runs free): each step then waits for step(). Between two steps the scheduler
    stands still, at the gate or without work, so what a test sees there is the same on any
    machine, however fast. jobs: the jobs the scheduler accepted, in order; refused: how many it
    refused (queue full)."""

    def __init__(self):
        self.scheduler = None
        self.jobs, self.refused = [], 0
        self.changed = threading.Condition()
        self.allowed, self.started, self.finished, self.parked = math.inf, 0, 0, False

    def __call__(self, *args):
        with self.changed:
            self.parked = True
            self.changed.wait_for(lambda: self.started < self.allowed)
            self.parked, self.started = False, self.started + 1
        try:
            return decode_rows(*args)
        finally:
            with self.changed:
                self.finished += 1
                self.changed.notify_all()

    def hold(self):
        with self.changed:
            self.allowed = self.started

    def free(self):
        with self.changed:
            self.allowed = math.inf
            self.changed.notify_all()

    def idle(self) -> bool:
        """No job waits or holds a row: no step comes until a request does."""
        with self.scheduler.changed:
            return not self.scheduler.waiting and not any(self.scheduler.rows)

    def settle(self):
        """Wait until the scheduler stands still: at the gate, or without work."""
        wait_until(lambda: self.parked or self.idle(), "the scheduler stands still")

    def step(self):
        """Let the scheduler take one step; return once it stands still again."""
        self.settle()
        with self.changed:
            assert self.parked, "the scheduler has no step to take"
            self.allowed = self.started + 1
            self.changed.notify_all()
            assert self.changed.wait_for(lambda: self.finished == self.allowed, timeout=60)
        self.settle()

    def ended(self, job: Job) -> bool:
        """The job took a row and left it: its answer is complete, or it was cancelled."""
        return job.admitted > 0 and all(j is not job for j in self.scheduler.rows)

    def step_until(self, condition: Callable[[], bool], limit: int = 100):
        self.settle()
        for _ in range(limit):
            if condition():
                return
            self.step()
        assert condition(), f"not so after {limit} steps"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for: {what}"
        time.sleep(0.002)


@contextmanager
def stepped_server(model: Transformer, tokenizer, eos_ids: list, max_queue: int,
                   prefill_chunk: int = 32):
    """server.py's app over `model` (its cache set up: rows and context) in this process, uvicorn
    on a thread of its own, the scheduler stepping through a StepGate held from the first request
    on. Yields (base URL, gate)."""
    import uvicorn
    gate = StepGate()
    scheduler = Scheduler(model, eos_ids, max_queue, prefill_chunk, gate, static_chunks=False)
    gate.scheduler, submit = scheduler, scheduler.submit

    def recorded(job) -> bool:
        accepted = submit(job)
        if accepted:
            gate.jobs.append(job)
        else:
            gate.refused += 1
        return accepted
    scheduler.submit = recorded
    app = make_app(scheduler, tokenizer, "tiny", model.max_seq_length, None, None)
    listener = listen("127.0.0.1", 0)
    http = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=http.run, kwargs=dict(sockets=[listener]), daemon=True)
    thread.start()
    try:
        wait_until(lambda: http.started or not thread.is_alive(), "uvicorn's start")
        assert thread.is_alive()
        gate.hold()
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", gate
    finally:
        gate.free()
        http.should_exit = True
        thread.join(timeout=60)
        listener.close()
        gc.unfreeze()  # the scheduler froze what its warm-up left alive: this process collects on


def tiny_model(vocab_size: int, block_size: int) -> Transformer:
    """A tiny random model, its weights peaked (no near-ties between the likeliest tokens, so a
    greedy token is the same computed in a batch of any size)."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_heads=2,
                                  vocab_size=vocab_size, intermediate_size=128,
                                  block_size=block_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model.eval()


def never_ending(rows: int) -> tuple:
    """(model, tokenizer, eos ids) of a server whose answers never end before their max_tokens:
    --random_weights' byte tokenizer, which has no end of sequence, and a tiny model of 256 slots
    a row."""
    model = tiny_model(256, 256)
    model.setup_caches(rows, 256)
    return model, RandomWeightsTokenizer(), []
