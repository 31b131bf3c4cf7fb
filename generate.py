"""Generate text: prefill the prompt, then decode one token at a time against the static KV cache.

    python generate.py --compile --checkpoint_path checkpoints/REPO --prompt "Hello, my name is"
    python generate.py --compile --random_weights Llama-2-7B --prompt_tokens 5 --max_new_tokens 200

Decoding at batch 1 reads every weight once per token, so its speed is set by memory bandwidth;
the work here is to keep the GPU busy: `decode_one_token` is compiled into one CUDA graph, sampling
happens on the device, and the host reads each token one step late so that it never waits on the
step in flight. Read top to bottom: sampling, the generation loop, speculative decoding, the
command line, speculative decoding's set-up and the flags.
"""
import argparse
import gzip
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import kernels
import tp
from checkpoint import (CONFIGS, ArgumentParser, InputError, check_device, check_output, load_model,
                        open_weights, random_model, read_checkpoint, script_exits, write_files)
from model import ModelArgs, MoEFeedForward, Transformer
from tokenizer import TextStreamer, check_ids_fit, is_text, load_tokenizer


# ---- sampling (on the device, no host sync) ------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8  # 0 means greedy
    top_k: Optional[int] = 200
    top_p: Optional[float] = None


def sample(logits: Tensor, s: Sampling) -> Tensor:
    """logits (B, vocab) -> next token ids (B, 1)."""
    if s.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if s.top_k is not None and s == Sampling(s.temperature, s.top_k):
        # Top-k and no other filter (every other field at its default, so a new field's default must
        # be "off"): only the top k can be drawn, so race among them alone. Over the whole
        # vocabulary, sampling took 1.5x as long for Llama-2's 32k tokens, 2.6x for a 152k
        # vocabulary (BENCHMARKS.md).
        probs, ids = top_k_probabilities(logits, s)  # (B, k) each
        return ids.gather(-1, sample_from(probs))
    return sample_from(probabilities(logits, s))


def top_k_probabilities(logits: Tensor, s: Sampling) -> tuple[Tensor, Tensor]:
    """logits (B, vocab) -> the s.top_k most likely ids (B, k), unsorted (sorting is a kernel of
    its own), and their probabilities at s.temperature (B, k), float32. Exactly k: of tokens tied
    for the k-th place (bfloat16 logits tie often), the kernel keeps some, where transformers'
    top-k keeps them all; the mass that moves is the ties' share of the k-th value's, small."""
    # In the logits' own dtype: the same values are picked, and on a GPU in less time than in
    # float32 (PyTorch's top-k a third less, BENCHMARKS.md; the kernel's keys have half the bits).
    values, ids = kernels.top_k(logits, min(s.top_k, logits.size(-1)))
    return scaled_softmax(values.float(), s), ids


def scaled_softmax(logits: Tensor, s: Sampling) -> Tensor:
    # Scaled after subtracting the row's maximum: a tiny temperature then sends the others to -inf
    # (near-greedy), where dividing the logits themselves overflows to inf / inf.
    return torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / s.temperature, dim=-1)


def probabilities(logits: Tensor, s: Sampling) -> Tensor:
    """logits (B, vocab) -> the distribution `sample` draws from, float32 (B, vocab), each row
    summing to 1; greedy is all the mass on the argmax. Speculative decoding weighs target and draft
    by it."""
    if s.temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    if s.top_k is not None:
        top_probs, ids = top_k_probabilities(logits, s)  # (B, k) each
        probs = torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, ids, top_probs)
    else:
        probs = scaled_softmax(logits.float(), s)
    if s.top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # The fewest most likely tokens whose mass reaches top_p, as transformers keeps them: a
        # token goes when it and the tokens less likely than it hold at most 1 - top_p. Summed from
        # the least likely up: summed from the top, the mass rounds to 1 before the tail's tokens,
        # which top_p = 1 would then cut. The most likely token always stays.
        tail = sorted_probs.flip(-1).cumsum(-1).flip(-1)  # (B, vocab)
        drop = (tail <= 1 - s.top_p) & (torch.arange(probs.size(-1), device=probs.device) > 0)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_from(weights: Tensor) -> Tensor:
    """weights (B, vocab), non-negative, not necessarily summing to 1 -> one id per row drawn in
    proportion to them (B, 1). argmax(w / E) with E ~ Exp(1) is such a draw (an exponential race)
    and, unlike torch.multinomial, never synchronises with the host. A one-hot row always gives its
    id."""
    return (weights / exponential_noise(weights)).argmax(dim=-1, keepdim=True)


def exponential_noise(like: Tensor) -> Tensor:
    """Exp(1) noise shaped like `like` (float32): E = -log(1 - V), V uniform in [0, 1) from two of
    rand's 24-bit draws, so that E comes as near 0, where a rare token's chance is decided, as 48
    bits allow: from one draw E stays above 6e-8, and a token under ~1e-7 of the mass would almost
    never win. V is held in [the smallest float, 1 - 2**-24], so E is positive (a weight of 0 never
    wins, not even as 0 / 0) and finite. (exponential_'s CPU kernel takes over twice as long for a
    vocabulary: BENCHMARKS.md.)"""
    v = torch.rand_like(like) + torch.rand_like(like) * 2**-24
    return -torch.log1p(-v.clamp_(min=torch.finfo(like.dtype).tiny, max=1 - 2**-24))


def prefill(model: Transformer, idx: Tensor, input_pos: Tensor, last: Tensor, s: Sampling
            ) -> Tensor:
    """Run the prompts idx (B, T) through the model, filling the cache; sample each row's first new
    token from its logits at column last[b], its last real token."""
    logits = model(idx, input_pos, last)  # (B, 1, vocab)
    return sample(logits[:, -1], s)


def decode_one_token(model: Transformer, token: Tensor, input_pos: Tensor, s: Sampling) -> Tensor:
    """token (B, 1) at cache slots input_pos (B, 1), each row its own -> next token (B, 1)."""
    logits = model(token, input_pos)  # (B, 1, vocab)
    return sample(logits[:, -1], s)


# ---- the generation loop -------------------------------------------------------------------------

@dataclass
class Generation:
    tokens: list  # per row: the new tokens, up to and excluding the first end-of-sequence token
    generated: int  # tokens sampled over all rows, each row's end-of-sequence token included
    prompt_tokens: list  # per row: the prompt's tokens that were prefilled
    ttft_s: float  # time to first token
    decode_s: float  # time for the remaining tokens
    # forward passes after the prefill (each serves every row; speculating, the target's verifies)
    decode_steps: int
    # speculative: [n] = rounds in which the target kept n drafts
    accepted_lengths: Optional[list] = None


@torch.inference_mode()
def generate(model: Transformer, prompts: list, max_new_tokens: int, sampling: Sampling, eos_ids=(),
             prefill_fn: Callable = prefill, decode_fn: Callable = decode_one_token,
             on_tokens: Optional[Callable] = None, cached: int = 0) -> Generation:
    """Generate up to max_new_tokens for each prompt (lists of ids, any lengths). Every row starts
    at cache slot 0 and moves on at its own position, so prompts of different lengths are padded on
    the right (the padding sits after a row's real tokens, where they never look) and every row gets
    the tokens it would get alone, up to rounding (a matmul's last bits depend on its row count, so
    a near-tie can go either way). on_tokens(one new id per row, None for rows that have ended) is
    called as tokens reach the host. cached: the first tokens of a single prompt that the KV cache
    holds already (a conversation's earlier turns): only the rest is prefilled."""
    assert max_new_tokens >= 1, "the prefill samples one token: max_new_tokens must be at least 1"
    device = model.tok_embeddings.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)  # (B, T)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)

    rows = [[] for _ in range(B)]
    finished = [False] * B
    eos = set(eos_ids)
    generated = steps = 0

    start = time.perf_counter()
    positions = torch.arange(cached, T, device=device)
    token = prefill_fn(model, idx[:, cached:], positions, lengths - 1 - cached, sampling)  # (B, 1)
    host, copied = token.cpu(), None  # the one deliberate sync: it times the first token
    ttft = time.perf_counter() - start
    input_pos = lengths[:, None].clone()  # (B, 1): each row's cache slot of `token`
    while host is not None:
        # Queue the next step before reading `host`: the GPU computes it while the host reads.
        following, following_copied = None, None
        if steps < max_new_tokens - 1:
            # CUDA graphs reuse outputs
            token = decode_fn(model, token, input_pos, sampling).clone()
            input_pos += 1
            steps += 1
            following = token
            if device.type == "cuda":  # copy the token to the host behind the work already queued
                following = torch.empty(token.shape, dtype=token.dtype, pin_memory=True)
                following.copy_(token, non_blocking=True)
                following_copied = torch.cuda.Event()
                following_copied.record()
        if copied is not None:
            copied.synchronize()
        # One new token per row, None for the rows that have ended.
        new = [None if done else tok for done, tok in zip(finished, host.view(-1).tolist())]
        for b, tok in enumerate(new):
            if tok is not None:
                generated += 1
                finished[b] = tok in eos
                if not finished[b]:
                    rows[b].append(tok)
        if on_tokens is not None:
            on_tokens(new)
        host, copied = (None, None) if all(finished) else (following, following_copied)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a step queued after the end may still run
    decode_s = time.perf_counter() - start - ttft
    return Generation(rows, generated, [len(p) - cached for p in prompts], ttft, decode_s, steps)


# ---- speculative decoding ------------------------------------------------------------------------
#
# A cheap proposer guesses k tokens; the target scores all of them in one forward (at batch 1 that
# costs about one decode step: both read every weight once) and keeps a prefix of them plus one
# token of its own. Rejection sampling (Leviathan et al. 2023, Chen et al. 2023) makes every kept
# token follow the target's own distribution exactly, whatever the proposer; greedy, the output is
# the target's greedy output.

DEFAULT_SPECULATE_K = 5
# A draft must split text into the target's ids; this text touches words, digits, punctuation, code
# and accents.
TOKENIZER_PROBE = ("The quick brown fox, 1234567890 times: def f(x): "
                   "return {'naïve': x[-1]} # café 東京")


def draft_one_token(model: Transformer, token: Tensor, input_pos: Tensor,
                    s: Sampling) -> tuple[Tensor, Tensor]:
    """decode_one_token for a draft model: also returns the distribution it drew from. token (B, 1)
    at cache slots input_pos (B, 1) -> (next token (B, 1), its distribution (B, vocab))."""
    logits = model(token, input_pos)  # (B, 1, vocab)
    probs = probabilities(logits[:, -1], s)  # (B, vocab)
    return sample_from(probs), probs


def accept_drafts(drafts: Tensor, draft_probs: Tensor,
                  target_probs: Tensor) -> tuple[Tensor, Tensor]:
    """drafts (k,) drawn from draft_probs (k, vocab); target_probs (k + 1, vocab): the target's
    distribution at each draft's position and at the one after the last. Returns (n, new): n ()
    drafts kept, and new (k + 1,), the drafts with the target's own next token at index n (only
    new[:n + 1] means anything)."""
    k = drafts.size(0)
    p = target_probs[:k].gather(1, drafts[:, None])[:, 0]  # (k,) target probability of each draft
    q = draft_probs.gather(1, drafts[:, None])[:, 0]  # (k,) draft probability of each draft
    # Keep draft i with probability min(1, p / q); strictly below, so a token the target never picks
    # is never kept.
    kept = torch.rand_like(p) * q < p  # (k,)
    n = kept.long().cumprod(0).sum()  # () drafts kept before the first rejection
    # The token after a rejection comes from max(0, p - q): the mass the target puts on tokens
    # beyond what the draft already offered. After k kept drafts it comes from p itself: a zero
    # draft row at index k makes both one formula. (index_select, not [n]: indexing by a tensor's
    # value would make the host read it.)
    target_n = target_probs.index_select(0, n[None])  # (1, vocab)
    # (1, vocab)
    residual = (target_n - F.pad(draft_probs, (0, 0, 0, 1)).index_select(0, n[None])).clamp(min=0)
    # With p = q up to rounding nothing is left over (and a rejection is all but impossible): then
    # use p.
    residual = torch.where(residual.sum() > 0, residual, target_n)
    token = sample_from(residual)[0]  # (1,)
    slots = torch.arange(k + 1, device=drafts.device)
    return n, torch.where(slots == n, token, F.pad(drafts, (0, 1)))


def verify(model: Transformer, tokens: Tensor, input_pos: Tensor, draft_probs: Tensor,
           s: Sampling) -> tuple[Tensor, Tensor]:
    """The target's check of k drafts in one forward. tokens (1, k + 1): the last token already
    chosen, then the drafts, at cache slots input_pos (1, k + 1); draft_probs (k, vocab) as in
    accept_drafts, which gives the result."""
    logits = model(tokens, input_pos)  # (1, k + 1, vocab)
    return accept_drafts(tokens[0, 1:], draft_probs, probabilities(logits[0], s))


class DraftModel:
    """Proposes k tokens by running a smaller model of the same vocabulary (or a quantized copy of
    the target) k steps ahead. Its cache mirrors the target's: slots of rejected drafts are
    overwritten by the next round."""

    def __init__(self, model: Transformer, k: int, sampling: Sampling,
                 step_fn: Callable = draft_one_token, prefill_fn: Callable = prefill):
        (self.model, self.k, self.sampling, self.step_fn,
         self.prefill_fn) = model, k, sampling, step_fn, prefill_fn

    def prefill(self, idx: Tensor, input_pos: Tensor, last: Tensor):
        # fills the cache; its token is unused
        self.prefill_fn(self.model, idx, input_pos, last, self.sampling)

    def propose(self, token: Tensor, input_pos: Tensor, history: list) -> tuple[Tensor, Tensor]:
        """token (1, 1), the last token chosen, at cache slot input_pos (1, 1) -> drafts (1, k),
        their distributions (k, vocab)."""
        drafts, probs = [], []
        for i in range(self.k):
            token, p = self.step_fn(self.model, token, input_pos + i, self.sampling)
            token = token.clone()  # clone: CUDA graphs reuse outputs
            drafts.append(token)
            probs.append(p.clone())
        return torch.cat(drafts, dim=1), torch.cat(probs)

    def accepted(self, n: int, drafts: Tensor, input_pos: Tensor):
        """The target kept n drafts of the round that began at slot input_pos."""
        # the last draft was drawn but never fed back: its cache slot is still empty
        if n == self.k:
            self.step_fn(self.model, drafts[:, -1:], input_pos + self.k, self.sampling)


class PromptLookup:
    """Proposes the k tokens that followed the most recent earlier occurrence of the last n tokens
    of the prompt and generated text, with no draft model: summaries, code edits and answers that
    quote the prompt repeat it."""

    def __init__(self, n: int, k: int, vocab_size: int, device: torch.device):
        self.n, self.k, self.vocab_size, self.device = n, k, vocab_size, device
        self.prefill()

    def prefill(self, *_):
        self.latest = {}  # n-gram -> where its latest occurrence with a token after it starts
        self.indexed = 0  # the n-grams starting before this index of the history are in `latest`

    def lookup(self, history: list) -> list:
        n = self.n
        # each n-gram that has a token after it, once
        for i in range(self.indexed, len(history) - n):
            self.latest[tuple(history[i:i + n])] = i
        self.indexed = max(self.indexed, len(history) - n)
        start = self.latest.get(tuple(history[-n:]))
        if start is None:
            return history[-1:] * self.k  # nothing to copy: a guess that costs nothing
        # What followed; copying on past its end repeats it, as the text has repeated so far.
        follow = history[start + n:]
        return [follow[i % len(follow)] for i in range(self.k)]

    def propose(self, token: Tensor, input_pos: Tensor, history: list) -> tuple[Tensor, Tensor]:
        # (1, k)
        drafts = torch.tensor([self.lookup(history)], dtype=torch.long, device=self.device)
        # a sure guess: all its mass on one token
        return drafts, F.one_hot(drafts[0], self.vocab_size).float()

    def accepted(self, *_):
        pass


@torch.inference_mode()
def speculative_generate(model: Transformer, proposer, prompts: list, max_new_tokens: int,
                         sampling: Sampling, eos_ids=(), prefill_fn: Callable = prefill,
                         verify_fn: Callable = verify, on_tokens: Optional[Callable] = None,
                         cached: int = 0) -> Generation:
    """generate() for one prompt (prompts holds one list of ids), up to proposer.k + 1 tokens per
    target forward. Each round the proposer (DraftModel or PromptLookup) guesses k tokens after the
    last chosen one, the target verifies them all at once, and the host reads how many it kept (the
    round's one sync). `cached` is accepted and ignored: the whole prompt is prefilled, so that a
    draft model's cache holds it too."""
    (prompt,) = prompts
    device = model.tok_embeddings.weight.device
    k, T = proposer.k, len(prompt)
    assert max_new_tokens >= 1, "the prefill samples one token: max_new_tokens must be at least 1"
    assert T + max_new_tokens + k - 1 <= model.max_seq_length, (
        "setup_caches() too small: a round writes k slots ahead")
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    last = torch.tensor([T - 1], device=device)  # (1,) the prefill's logits at the prompt's end
    history, row, eos = list(prompt), [], set(eos_ids)
    accepted_lengths = [0] * (k + 1)

    def take(tokens: list) -> bool:
        """Record new tokens up to an end-of-sequence token or max_new_tokens; True once generation
        is over."""
        for tok in tokens:
            history.append(tok)
            if on_tokens is not None:
                on_tokens([tok])
            if tok in eos:
                return True
            row.append(tok)
            if len(history) - T == max_new_tokens:
                return True
        return False

    start = time.perf_counter()
    positions = torch.arange(T, device=device)
    token = prefill_fn(model, idx, positions, last, sampling)  # (1, 1)
    done = take(token.view(-1).tolist())
    ttft = time.perf_counter() - start
    # after the first token is out: the draft's prefill is decode time
    proposer.prefill(idx, positions, last)
    input_pos = torch.tensor([[T]], device=device)  # (1, 1) cache slot of `token`
    offsets = torch.arange(k + 1, device=device)
    while not done:
        # (1, k), (k, vocab)
        drafts, draft_probs = proposer.propose(token, input_pos, history)
        n, new = verify_fn(model, torch.cat([token, drafts], dim=1), input_pos + offsets,
                           draft_probs, sampling)
        result = torch.cat([n[None], new])  # (k + 2,), a copy: CUDA graphs reuse their outputs
        n, *new = result.tolist()  # the round's one sync
        accepted_lengths[n] += 1
        proposer.accepted(n, drafts, input_pos)
        # the target's own token: the next round starts from it
        token = result[n + 1:n + 2].view(1, 1)
        input_pos += n + 1
        done = take(new[:n + 1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    decode_s = time.perf_counter() - start - ttft
    return Generation([row], len(history) - T, [T], ttft, decode_s, sum(accepted_lengths),
                      accepted_lengths)


def speculation_metrics(accepted_lengths: list, round_tokens: int) -> dict:
    """Acceptance statistics of speculative rounds; accepted_lengths[n] counts the rounds that kept
    n drafts, round_tokens the tokens they gave: their kept drafts and the target's own token, less
    those past an end-of-sequence token or max_new_tokens."""
    rounds, k = sum(accepted_lengths), len(accepted_lengths) - 1
    kept = sum(n * count for n, count in enumerate(accepted_lengths))
    return dict(acceptance_rate=kept / (k * rounds) if rounds else None,
                tokens_per_verify=round_tokens / rounds if rounds else None,
                accepted_lengths=accepted_lengths, round_tokens=round_tokens)


# ---- the command line ----------------------------------------------------------------------------

def main(argv=None):
    """One run of generate.py. Bad input raises InputError, which the script prints as one line."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    distributed = dist.is_torchelastic_launched()  # under torchrun: split the model
    if distributed:
        tp.quiet_other_ranks()
    # The config and tokenizer come first, so that bad input fails before gigabytes of weights load.
    if args.random_weights:
        ckpt, tokenizer, config = None, None, ModelArgs(**CONFIGS[args.random_weights])
    else:
        ckpt = read_checkpoint(args.checkpoint_path)
        tokenizer, config = load_tokenizer(ckpt.folder), ckpt.args
    speculative = args.draft_checkpoint_path is not None or args.speculate_ngram is not None
    context, slack, draft = config.block_size, 0, None
    if speculative:
        context, slack, draft = speculation_limits(args, tokenizer, config)
    whose = ("the draft model's" if draft is not None and draft.block_size < config.block_size
             else "the model's")
    room = f"{context} tokens" + (f" ({context + slack} less {slack} for speculation's drafts)"
                                  if slack else "")
    if (args.prompt_tokens or 0) >= context:  # before drawing that many random ids
        raise InputError(f"the prompt has {args.prompt_tokens} tokens but {whose} context is "
                         f"{room}")
    prompts = [[0]] if args.interactive else encode_prompts(args, tokenizer, config.vocab_size)
    if args.interactive and args.chat:  # no chat template: refused now rather than at every turn
        tokenizer.encode_chat([{"role": "user", "content": DEFAULT_PROMPT}])
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise InputError(f"the prompt has {longest} tokens but {whose} context is {room}")
    if args.interactive:
        # Interactive prompts are unknown up front: size the cache for a generous conversation
        # turn, not for the whole context (131k positions for Llama-3.1 would cost gigabytes, and
        # slow every decode step where PyTorch's attention attends over all of them).
        max_seq = min(context, 4096)
        max_new = min(args.max_new_tokens, max_seq - 1)
    else:
        max_new = min(args.max_new_tokens, context - longest)
        max_seq = longest + max_new
    cache_length = max_seq + slack  # the target's and the draft's caches alike
    batch_size = len(prompts)  # a prompt a row: --prompt texts, one repeated, or random ones
    # Under torchrun the processes join here, after every check all ranks make alike (one error
    # line, rank 0's) and before what each meets on its own.
    device = tp.start(args, config, args.device) if distributed else args.device
    model = load_weights(args, ckpt, config, device, batch_size, cache_length, draft)

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    compiled = args.compile or args.compile_prefill
    prefill_fn, decode_fn = (compile_functions(args.compile, args.compile_prefill) if compiled
                             else (prefill, decode_one_token))
    eos_ids = tokenizer.eos_ids if tokenizer is not None else []
    if not speculative:
        generate_fn = partial(generate, model, sampling=sampling, eos_ids=eos_ids,
                              prefill_fn=prefill_fn, decode_fn=decode_fn)
    else:
        proposer = load_proposer(args, config, device, sampling, prefill_fn, cache_length)
        generate_fn = partial(speculative_generate, model, proposer, sampling=sampling,
                              eos_ids=eos_ids, prefill_fn=prefill_fn,
                              verify_fn=compile_verify() if args.compile else verify)
    # the tokens of a decode step, or of a speculative round's verify (the steps timed)
    step_tokens = speculate_k(args) + 1 if speculative else batch_size
    model_bytes = bytes_read_per_step(model, step_tokens)
    if max_new < args.max_new_tokens:  # here, after every refusal: bad input prints one line
        print(f"note: answers of at most {max_new} tokens, all that fit the {max_seq}-token cache"
              if args.interactive else
              f"note: generating {max_new} tokens, all that fit {whose} context of {room}",
              file=sys.stderr)
    if args.interactive:
        return interactive(args, tokenizer, generate_fn, max_seq, max_new, model_bytes, device,
                           config.vocab_size)
    run_samples(args, prompts, generate_fn, tokenizer, max_new, model_bytes, device, compiled)


def check_cache_fits(config: ModelArgs, batch_size: int, cache_length: int, dtype: torch.dtype,
                     device: torch.device, draft: Optional[ModelArgs] = None,
                     weight_bytes: int = 0):
    """Refuse KV caches larger than the device's free memory, before any weight loads: the model's
    and, given a draft model's config, the draft's (one row as long); weight_bytes: weights this
    process is to make there too (random ones), counted with them. Under torchrun, after the
    processes joined: each GPU holds its rank's share of the model's KV heads and a whole draft,
    where processes on a CPU share one memory."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    share = world if device.type == "cuda" else 1
    slots = -(-cache_length // 8) * 8  # as setup_caches rounds up (at most block_size, below)
    caches = [(config, batch_size * config.n_kv_heads // share)]  # (model, its rows x KV heads)
    if draft is not None:
        caches.append((draft, world // share * draft.n_kv_heads))  # a whole draft in each process
    kv_bytes = sum(2 * c.n_layer * heads * min(slots, c.block_size) * c.head_dim  # K and V
                   for c, heads in caches)
    kv_bytes *= torch.empty(0, dtype=dtype).element_size()
    weight_bytes *= world // share  # every process's on a CPU
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_memory_available()
    if kv_bytes + weight_bytes > free:
        drafts = "" if draft is None else ", the draft model's included,"
        weights = f"{weight_bytes / 1e9:.1f} GB of random weights and " if weight_bytes else ""
        # processes on a CPU share its memory: under torchrun rank 0 speaks for all
        error = InputError if device.type == "cuda" else tp.AlikeOnEveryRank
        rows = f"{batch_size} row{'s' * (batch_size > 1)}"
        raise error(f"{weights}the KV cache for {rows} of {cache_length} tokens{drafts} "
                    f"need{'' if weight_bytes else 's'} {(kv_bytes + weight_bytes) / 1e9:.1f} GB, "
                    f"more than the {free / 1e9:.1f} GB of free memory on {device}")


def host_memory_available() -> int:
    """Bytes this machine's memory can give a process now: Linux's MemAvailable (free memory and
    the page cache it would drop; free memory alone reads low on a machine that has read files),
    elsewhere the free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def load_weights(args, ckpt, config: ModelArgs, device: torch.device, batch_size: int,
                 cache_length: int, draft: Optional[ModelArgs] = None) -> Transformer:
    """The model the flags name (under torchrun this process's part, read from its slices) on its
    device, with a KV cache of batch_size rows of cache_length slots; a cache that would not fit the
    free memory (with a draft's cache, given the draft's config) is refused before any weight
    loads."""
    weight_bytes = 0
    if args.random_weights:  # made on the device, where a model too large would end the process
        shard = tp.empty_shard(*tp.random_config(args.random_weights, args.random_quantization),
                               tp.world_size()).to(args.dtype)  # on meta: sizes only
        weight_bytes = sum(t.nbytes for t in [*shard.parameters(), *shard.buffers()])
    check_cache_fits(config, batch_size, cache_length, args.dtype, device, draft, weight_bytes)
    t0 = time.perf_counter()
    # tp.py builds these: a rank's part of the model, or a randomly quantized one
    if dist.is_torchelastic_launched() or args.random_quantization:
        model = tp.load_model(args, device, args.dtype)
    elif args.random_weights:
        model = random_model(args.random_weights, device, args.dtype)
    else:
        model = load_model(ckpt, device, args.dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"Loaded {args.random_weights or ckpt.weights} in "
          f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
    model.setup_caches(max_batch_size=batch_size, max_seq_length=cache_length)
    return model


def compiling_run(generate_fn: Callable, prompts: list, max_new: int) -> float:
    """One untimed run that compiles what the timed ones will run; its seconds, printed."""
    t0 = time.perf_counter()
    generate_fn(prompts, max_new)
    compile_s = time.perf_counter() - t0
    print(f"Compilation time: {compile_s:.2f} s", file=sys.stderr)
    return compile_s


def print_row0(streamer: TextStreamer, eos_ids, new: list):
    """on_tokens for generate (bound with partial): row 0's text printed as it arrives, its
    end-of-sequence token left out."""
    if new[0] is not None and new[0] not in eos_ids:
        print(streamer.put(new[0]), end="", flush=True)


def run_samples(args, prompts: list, generate_fn: Callable, tokenizer, max_new: int,
                model_bytes: int, device: torch.device, compiled: bool):
    """--num_samples timed generations of the same prompts (after one untimed compiling run where
    compiled), with their metrics: a single row's text streamed to the terminal as it comes, a
    batch's rows printed after each sample (no text without a tokenizer)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    # Under torchrun each process holds and reads its own part of the weights.
    where = (f"per {'GPU' if device.type == 'cuda' else 'process'}, tensor parallel over {world}"
             if world > 1 else f"on {device.type}")
    compile_s = compiling_run(generate_fn, prompts, max_new) if compiled else None
    results = []
    echo = args.prompt and not args.chat  # the answer continues the prompt's text: both printed
    for i in range(args.num_samples):
        streamer = None
        if tokenizer is not None and len(prompts) == 1:
            streamer = (TextStreamer.continuing(tokenizer, prompts[0]) if echo
                        else TextStreamer(tokenizer))
            if echo:
                print(args.prompt[0], end="", flush=True)
        on_tokens = None if streamer is None else partial(print_row0, streamer, tokenizer.eos_ids)
        profiling = args.profile is not None and i == args.num_samples - 1
        with torch.profiler.profile() if profiling else nullcontext() as prof:
            gen = generate_fn(prompts, max_new, on_tokens=on_tokens)
        if streamer is not None:
            print(streamer.flush(), flush=True)
        if profiling:
            write_trace(prof, args.profile)
        if len(prompts) > 1 and tokenizer is not None:
            for b, row in enumerate(gen.tokens):
                if echo:  # (the --prompt texts, repeated --batch_size times)
                    text = args.prompt[b % len(args.prompt)]
                    streamer = TextStreamer.continuing(tokenizer, prompts[b])
                    text += "".join(map(streamer.put, row)) + streamer.flush()
                else:
                    text = tokenizer.decode(row)
                print(f"[{b}] {text}")
        m = metrics(gen, model_bytes, device)
        results.append(m)
        print(f"Sample {i}: {describe(m, f' ({where})' if world > 1 else '')}", file=sys.stderr)
    summary = {k: sum(r[k] for r in results) / len(results) for k in ("ttft_s", "decode_tok_s",
                                                                      "bandwidth_gb_s")}
    print(f"Average over {len(results)} samples: decode {summary['decode_tok_s']:.2f} tok/s, "
          f"weights read {summary['bandwidth_gb_s']:.1f} GB/s; a decode step reads "
          f"{model_bytes / 1e9:.3f} GB of weights {where}", file=sys.stderr)
    if "accepted_lengths" in results[0]:  # pooled over the rounds of every sample
        summary.update(speculation_metrics(
            [sum(n) for n in zip(*(r["accepted_lengths"] for r in results))],
            sum(r["round_tokens"] for r in results)))
        print(f"All {len(results)} samples: {describe_speculation(summary)}", file=sys.stderr)
    if args.json:
        # the flags as JSON has them; paths, the device and the dtype as their text
        flags = {k: str(v) if isinstance(v, (Path, torch.device, torch.dtype)) else v
                 for k, v in vars(args).items()}
        write_json(args.json, dict(args=flags,
                                   device=device_name(device), torch=torch.__version__,
                                   model_bytes=model_bytes, compile_s=compile_s,
                                   # model_bytes and GB/s: per GPU (per process on a CPU)
                                   tensor_parallel=world,
                                   samples=results, average=summary))


def bytes_read_per_step(model: Transformer, tokens: int) -> float:
    """The bytes of weights one forward of `tokens` tokens reads (a decode step: one a row; a
    speculative verify: k + 1): each tensor once (a tied embedding table as the output layer),
    but not the embedding table's looked-up rows (a few KB) nor the experts no token chose. A
    quantized layer names what its route for that many rows reads (weights_read)."""
    read = {id(t): t for m in model.modules() if m is not model.tok_embeddings
            for t in (m.weights_read(tokens) if hasattr(m, "weights_read")
                      else m.parameters(recurse=False))}
    weights = sum(t.nbytes for t in read.values())
    return weights - unchosen_expert_bytes(model, tokens) if model.args.n_experts else weights


def unchosen_expert_bytes(model: Transformer, tokens: int) -> float:
    """The bytes of a mixture's experts that a forward of `tokens` tokens (a decode step's rows, a
    verify's k + 1) does not read: all but n_active_experts of n_experts for one token; for T all
    but the distinct experts that T tokens routed uniformly would choose, on average."""
    args = model.args
    experts = sum(p.nbytes for m in model.modules() if isinstance(m, MoEFeedForward)
                  for p in [*m.w13.parameters(), *m.w2.parameters()])
    chosen = 1 - (1 - args.n_active_experts / args.n_experts) ** tokens
    return experts * (1 - chosen)


def metrics(gen: Generation, model_bytes: int, device: torch.device) -> dict:
    decode_s = max(gen.decode_s, 1e-9)
    decode_tokens = gen.generated - len(gen.tokens)  # every row's first token came from the prefill
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux
    return dict(
        new_tokens=[len(r) for r in gen.tokens],
        prompt_tokens=gen.prompt_tokens,
        ttft_s=gen.ttft_s,
        prefill_tok_s=sum(gen.prompt_tokens) / gen.ttft_s,
        decode_tok_s=decode_tokens / decode_s,  # over the whole batch
        # Weights are read once per forward pass, whatever the batch (also for the one step that may
        # run past an end-of-sequence token before the host sees it).
        # speculative: the verifies only
        bandwidth_gb_s=model_bytes * gen.decode_steps / decode_s / 1e9,
        # GPU: allocated by PyTorch; CPU: the process's peak resident set
        peak_memory_gb=peak / 1e9,
        **(speculation_metrics(gen.accepted_lengths, decode_tokens)
           if gen.accepted_lengths is not None else {}),
    )


def describe(m: dict, scope: str = "") -> str:
    """One sample's metrics as a line, each figure naming what it counts (scope: whose bandwidth
    and memory they are, under torchrun)."""
    rows = m["new_tokens"]
    tokens = f"{rows[0]} new tokens" if len(rows) == 1 else (
        f"{sum(rows)} new tokens over {len(rows)} rows ({min(rows)} to {max(rows)} per row)")
    per_row = m["decode_tok_s"] / len(rows)
    batch = "" if len(rows) == 1 else f" over the batch ({per_row:.2f} per row)"
    line = (f"{tokens}, time to first token {m['ttft_s'] * 1000:.1f} ms, prefill "
            f"{m['prefill_tok_s']:.1f} tok/s, decode {m['decode_tok_s']:.2f} tok/s{batch}, weights "
            f"read {m['bandwidth_gb_s']:.1f} GB/s, peak memory {m['peak_memory_gb']:.2f} GB{scope}")
    return line + (f"; {describe_speculation(m)}" if "accepted_lengths" in m else "")


def describe_speculation(m: dict) -> str:
    if m["acceptance_rate"] is None:
        return "speculative decoding: no rounds (the first token ended the sample)"
    k = len(m["accepted_lengths"]) - 1
    histogram = ", ".join(f"{n}: {count}" for n, count in enumerate(m["accepted_lengths"]) if count)
    others = " (none kept any other number)" if 0 in m["accepted_lengths"] else ""
    return (f"speculative decoding, {k} drafts a round: {m['acceptance_rate']:.1%} accepted, "
            f"{m['tokens_per_verify']:.2f} tokens per target forward, rounds by drafts kept "
            f"{{{histogram}}}{others}")


def interactive(args, tokenizer, generate_fn: Callable, max_seq: int, max_new: int,
                model_bytes: int, device: torch.device, vocab_size: int):
    """A conversation from the terminal until end of input. With --chat the chat template is
    rendered over every turn so far and the KV cache keeps what it already holds: only the new part
    of the conversation is prefilled (speculating, all of it, so that the draft's cache holds it
    too). When the conversation leaves too little room in the cache for an answer (max_new tokens,
    or half the cache if less), its oldest turns are dropped; an answer cut short by the cache's end
    says so. /clear starts over; Ctrl-C stops an answer. Without --chat each line is a prompt of
    its own."""
    if args.compile or args.compile_prefill:  # no answer's metrics count the compiling
        compiling_run(generate_fn, [[0]], min(max_new, 8))
    # Bytes that are not UTF-8 read as lone surrogates, a line at a time: a strict decoder's error
    # would lose every line of the read they came in.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    messages, in_cache = [], []  # the conversation; the token ids the KV cache holds, in order
    kept_room = min(max_new, max_seq // 2)  # cache slots an answer keeps from a long conversation
    while True:
        try:
            text = input("> ")
            text.encode("utf-8")  # raises for lone surrogates
        except (EOFError, KeyboardInterrupt):
            print()
            return
        except UnicodeEncodeError:  # skip the line, keep the conversation
            print("error: the input is not UTF-8 text", file=sys.stderr)
            continue
        if not text.strip():  # an empty line asks nothing
            continue
        if text.strip() == "/clear":
            messages, in_cache = [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        try:  # Ctrl-C from here on stops this turn, whether it is encoding or answering
            # The conversation with this question, its oldest turns dropped if need be; it
            # replaces `messages` only once the question is answered: a question skipped or
            # stopped leaves the conversation as it was.
            asked = messages + [{"role": "user", "content": text}]
            try:
                ids = tokenizer.encode_chat(asked) if args.chat else tokenizer.encode(text)
                while args.chat and len(ids) + kept_room > max_seq and len(asked) > 2:
                    asked = asked[2:]  # the oldest question and its answer
                    ids = tokenizer.encode_chat(asked)
                check_ids_fit(ids, vocab_size)
            except InputError as e:  # a turn refused (by the template, say): skip it
                print(f"error: {e}", file=sys.stderr)
                continue
            if not ids or len(ids) >= max_seq:
                print(f"(skipped: the prompt has {len(ids)} tokens; 1 to {max_seq - 1} fit)",
                      file=sys.stderr)
                continue
            dropped = (len(messages) + 1 - len(asked)) // 2
            if dropped:
                print(f"(dropped the {'' if dropped == 1 else f'{dropped} '}oldest "
                      f"turn{'' if dropped == 1 else 's'}: the conversation left too little room "
                      f"for an answer in the {max_seq}-token cache)", file=sys.stderr)
            cached = 0  # the longest prefix the cache holds already; 1 token at least prefilled
            while cached < min(len(in_cache), len(ids) - 1) and in_cache[cached] == ids[cached]:
                cached += 1
            streamer = TextStreamer(tokenizer)
            room = min(max_new, max_seq - len(ids))
            gen = generate_fn([ids], room,
                              on_tokens=partial(print_row0, streamer, tokenizer.eos_ids),
                              cached=cached if args.chat else 0)
            print(streamer.flush(), flush=True)
            answer = gen.tokens[0]
            if len(answer) == room < max_new:
                print(f"(the answer stopped at the end of the {max_seq}-token cache)",
                      file=sys.stderr)
            # The cache holds every token fed to the model: the prompt and each sampled token but
            # the last (an end-of-sequence token, when the answer ended with one, is not in
            # `answer`).
            in_cache = ids + (answer if gen.generated > len(answer) else answer[:-1])
            if args.chat:
                messages = asked + [{"role": "assistant", "content": tokenizer.decode(answer)}]
            if args.metrics:
                print(describe(metrics(gen, model_bytes, device)), file=sys.stderr)
        except KeyboardInterrupt:  # the conversation goes on without this turn
            print(flush=True)  # ends the answer's line
            print("(answer stopped)", file=sys.stderr)
            in_cache = []  # what the cache holds now is not known: prefill it all next time


def compile_functions(compile_decode: bool, compile_prefill: bool, *,
                      decode_step: Callable = decode_one_token,
                      decode_dynamic: Optional[bool] = None):
    """The prefill and the decode step, each compiled if asked (server.py passes its own step, and
    decode_dynamic=False: a static graph for each row count), handed back as values rather than
    installed over module globals."""
    if compile_decode or compile_prefill:
        # The model's float constants (the norms' eps) as constants from the start: traced as
        # symbols, as a dynamic compile does by default, they fail a later pass, which traces the
        # prefill again.
        torch._dynamo.config.specialize_float = True
    decode_fn = (torch.compile(decode_step, mode="reduce-overhead", fullgraph=True,
                               dynamic=decode_dynamic) if compile_decode else decode_step)
    prefill_fn = (torch.compile(prefill, fullgraph=True, dynamic=True) if compile_prefill
                  else prefill)
    return prefill_fn, decode_fn


def compile_verify():
    """The target's verify of k drafts, one CUDA graph at its fixed shape (1, k + 1)."""
    return torch.compile(verify, mode="reduce-overhead", fullgraph=True, dynamic=False)


def encode_prompts(args, tokenizer, vocab_size: int) -> list:
    """Token ids for each row of the batch: the --prompt texts (a single one repeated --batch_size
    times), or --prompt_tokens random ids of a row's own, as a server's batch holds different
    requests (a mixture's rows then choose their experts as independently as bytes_read_per_step
    counts them; rows of one prompt choose alike)."""
    if args.prompt and tokenizer is None:
        raise InputError("a text prompt needs a tokenizer (use --checkpoint_path); random weights "
                         "take one prompt of N random tokens: --prompt N or --prompt_tokens N")
    if args.prompt_tokens is not None or tokenizer is None:
        return [torch.randint(0, vocab_size, (args.prompt_tokens or 5,)).tolist()
                for _ in range(args.batch_size)]
    prompts = []
    for text in args.prompt:
        if not is_text(text):  # bytes the terminal could not decode arrive as lone surrogates
            raise InputError(f"--prompt {text.encode('utf-8', 'surrogateescape')!r} is not valid "
                             "UTF-8 text")
        prompts.append(tokenizer.encode_chat([{"role": "user", "content": text}]) if args.chat
                       else tokenizer.encode(text))
        if not prompts[-1]:
            raise InputError(f"prompt {text!r} has no tokens (the model needs at least one)")
        check_ids_fit(prompts[-1], vocab_size)
    return prompts * args.batch_size


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_trace(prof, path: Path):
    """The profiler's trace at path as JSON, written whole or not at all, gzip-compressed for a
    name ending in .gz (export_chrome_trace would see the temp file's name)."""
    def write(tmp: Path):
        prof.export_chrome_trace(str(tmp))
        if path.suffix == ".gz":
            tmp.write_bytes(gzip.compress(tmp.read_bytes()))
    write_files(path.parent, {path.name: write})


def write_json(path: Path, data: dict):
    text = json.dumps(data, indent=2) + "\n"
    write_files(path.parent, {path.name: lambda tmp: tmp.write_text(text)})


# ---- speculative decoding's set-up ---------------------------------------------------------------

def speculate_k(args) -> int:
    return DEFAULT_SPECULATE_K if args.speculate_k is None else args.speculate_k


def check_speculation_args(args):
    if args.draft_checkpoint_path is not None and args.speculate_ngram is not None:
        raise InputError("give --draft_checkpoint_path or --speculate_ngram, not both")
    speculative = args.draft_checkpoint_path is not None or args.speculate_ngram is not None
    if args.speculate_k is not None and not speculative:
        raise InputError("--speculate_k needs a proposer: --draft_checkpoint_path or "
                         "--speculate_ngram")
    if args.speculate_k is not None and args.speculate_k < 1:
        raise InputError(f"--speculate_k must be >= 1, got {args.speculate_k}")
    if args.speculate_ngram is not None and args.speculate_ngram < 1:
        raise InputError(f"--speculate_ngram must be >= 1, got {args.speculate_ngram}")
    if speculative and (args.batch_size > 1 or args.prompt and len(args.prompt) > 1):
        raise InputError("speculative decoding generates one sequence at a time: use "
                         "--batch_size 1 and one --prompt")


def check_draft(path: Path, tokenizer, config: ModelArgs) -> ModelArgs:
    """The draft's config, once its vocabulary is known to be the target's and its weights file
    to match its config (before any weights load: the target's come first)."""
    draft = read_checkpoint(path)
    if draft.args.vocab_size != config.vocab_size:
        raise InputError(f"the draft {path} has a vocabulary of {draft.args.vocab_size} tokens, "
                         f"the target {config.vocab_size}: speculative decoding needs a draft "
                         "with the target's tokenizer")
    open_weights(draft)
    if tokenizer is None or not any((draft.folder / n).is_file() for n in ("tokenizer.json",
                                                                           "tokenizer.model")):
        # weights without tokenizer files: the vocabulary size is all there is to check
        return draft.args
    if load_tokenizer(draft.folder).encode(TOKENIZER_PROBE) != tokenizer.encode(TOKENIZER_PROBE):
        raise InputError(f"the draft {path} tokenizes text differently from the target: "
                         "speculative decoding needs a draft with the target's tokenizer")
    return draft.args


def speculation_limits(args, tokenizer, config: ModelArgs) -> tuple[int, int, Optional[ModelArgs]]:
    """(context, slack, draft): the tokens a prompt and its generation may fill, the cache slots
    beyond them that a speculative round may write (k - 1: a round may start at the next-to-last
    token and write k slots past it), and the draft model's config (None: prompt lookup)."""
    context, draft = config.block_size, None
    if args.draft_checkpoint_path is not None:
        draft = check_draft(args.draft_checkpoint_path, tokenizer, config)
        context = min(context, draft.block_size)
    slack = speculate_k(args) - 1
    if slack >= context - 1:
        raise InputError(f"--speculate_k {speculate_k(args)} does not fit the model's "
                         f"{context}-token context")
    if args.speculate_ngram is not None and args.speculate_ngram >= context:
        # an n-gram and a token after it must fit in the context for a lookup to find one
        raise InputError(f"--speculate_ngram {args.speculate_ngram} can never match in the "
                         f"model's {context}-token context")
    return context - slack, slack, draft


def load_proposer(args, config: ModelArgs, device: torch.device, sampling: Sampling,
                  prefill_fn: Callable, cache_length: int):
    """The proposer the flags ask for, with a draft model loaded and its cache allocated."""
    k = speculate_k(args)
    if args.speculate_ngram is not None:
        return PromptLookup(args.speculate_ngram, k, config.vocab_size, device)
    t0 = time.perf_counter()
    ckpt = read_checkpoint(args.draft_checkpoint_path)
    draft = load_model(ckpt, device, args.dtype)
    draft.setup_caches(max_batch_size=1, max_seq_length=cache_length)
    step_fn = (torch.compile(draft_one_token, mode="reduce-overhead",
                             fullgraph=True) if args.compile else draft_one_token)
    print(f"Loaded draft {ckpt.weights} in {time.perf_counter() - t0:.2f} s",
          file=sys.stderr)
    return DraftModel(draft, k, sampling, step_fn, prefill_fn)


# ---- the flags -----------------------------------------------------------------------------------

DEFAULT_PROMPT = "Hello, my name is"

# Where a model runs and in which dtype: generate.py's, server.py's and eval.py's, through
# argparse's `parents`.
DEVICE_FLAGS = ArgumentParser(add_help=False)
DEVICE_FLAGS.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                          help="where the model runs (default: cuda when there is a GPU, else cpu)")
DEVICE_FLAGS.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                          help="weights and activations (default: bfloat16 on a GPU, float32 on a "
                          "CPU)")

# The flags that choose the model and how it runs: generate.py's, and server.py's, with
# DEVICE_FLAGS after them.
MODEL_FLAGS = ArgumentParser(add_help=False)
MODEL_FLAGS.add_argument("--checkpoint_path", type=Path,
                         help="checkpoint folder, or the weights file inside it")
MODEL_FLAGS.add_argument("--random_weights", metavar="NAME",
                         help="build the named config (checkpoint.py CONFIGS) with random weights "
                         "on the device")
MODEL_FLAGS.add_argument("--random_quantization", choices=tp.RANDOM_QUANTIZATIONS,
                         help="with --random_weights: quantize the random weights as quantize.py "
                         "would (int4.g32: int4 in groups of 32), one layer at a time on the "
                         "device")
MODEL_FLAGS.add_argument("--compile", action="store_true",
                         help="compile the decode step (on a GPU, each step replays a CUDA graph)")


def resolve_device_flags(args):
    """DEVICE_FLAGS in place: --device a torch.device this machine has, --dtype a torch.dtype."""
    args.device = check_device(args.device, "--device")
    args.dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if args.device.type == "cuda" else torch.float32)


def check_model_flags(args):
    """Check the MODEL_FLAGS of parsed args; resolve --device and --dtype in place."""
    if (args.checkpoint_path is None) == (args.random_weights is None):
        raise InputError("give exactly one of --checkpoint_path and --random_weights")
    if args.random_weights is not None and args.random_weights not in CONFIGS:
        raise InputError(f"unknown model name {args.random_weights!r}; known: {', '.join(CONFIGS)}")
    if args.random_quantization and not args.random_weights:
        raise InputError("--random_quantization goes with --random_weights (a checkpoint records "
                         "its own)")
    resolve_device_flags(args)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Generate text with a gpt-blitz checkpoint (or random "
                       "weights, to benchmark).", parents=[MODEL_FLAGS, DEVICE_FLAGS])
    p.add_argument("--compile_prefill", action="store_true",
                   help="also compile the prefill (dynamic shapes)")
    p.add_argument("--prompt", action="append",
                   help="prompt text; repeat the flag for a batch of different prompts (default: "
                   f"{DEFAULT_PROMPT!r})")
    p.add_argument("--prompt_tokens", type=int, metavar="N",
                   help="a synthetic prompt of N random tokens instead of text (default with "
                   "--random_weights: 5; there --prompt N says the same)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the model's chat template")
    p.add_argument("--metrics", action="store_true",
                   help="with --interactive: print each answer's metrics (timed runs always do)")
    p.add_argument("--interactive", action="store_true",
                   help="read prompts from the terminal and stream answers; with --chat a "
                   "conversation that remembers its turns (/clear starts over) in a cache of the "
                   "model's context up to 4096 tokens")
    p.add_argument("--num_samples", type=int, default=1,
                   help="timed generations of the same prompts (default 1)")
    p.add_argument("--max_new_tokens", type=int, default=200,
                   help="new tokens per row (default 200)")
    p.add_argument("--batch_size", type=int, default=1,
                   help="rows of one prompt text, or of random prompts of their own (default 1)")
    p.add_argument("--temperature", type=float, default=Sampling.temperature,
                   help=f"0 decodes greedily (default {Sampling.temperature})")
    p.add_argument("--top_k", type=int, default=Sampling.top_k,
                   help=f"sample among the k most likely tokens (default {Sampling.top_k}; the "
                   "vocabulary's size or more: every token)")
    p.add_argument("--top_p", type=float, default=Sampling.top_p,
                   help="nucleus sampling: keep the fewest most likely tokens whose probability "
                   "reaches this (default: off)")
    p.add_argument("--seed", type=int, default=1234, help="random seed (default 1234)")
    p.add_argument("--profile", type=Path,
                   help="write a torch.profiler trace of the last sample to this path")
    p.add_argument("--json", type=Path, help="write the metrics of every sample to this JSON file")
    p.add_argument("--draft_checkpoint_path", type=Path,
                   help="speculative decoding: a draft model sharing the target's tokenizer (a "
                   "smaller model of the family, or a quantized copy of the target)")
    p.add_argument("--speculate_ngram", type=int, metavar="N",
                   help="speculative decoding without a draft model: propose the tokens that "
                   "followed the last earlier occurrence of the last N tokens")
    p.add_argument("--speculate_k", type=int, default=None,
                   help=f"tokens proposed per target forward (default {DEFAULT_SPECULATE_K})")
    args = p.parse_args(argv)
    check_model_flags(args)
    if (args.random_weights and args.prompt_tokens is None and args.prompt
            and len(args.prompt) == 1 and args.prompt[0].isdecimal()):
        # random weights have no tokenizer to read text: a number is the prompt's length
        args.prompt_tokens, args.prompt = int(args.prompt[0]), None
    # The logits are divided by it in float32, and a compiled step on a GPU multiplies them by its
    # reciprocal: one whose reciprocal float32 cannot hold (below ~3e-39) samples as greedy, as 0
    # does, rather than as 0 * inf = NaN; one too large is inf there, and a -inf logit over it NaN.
    given = args.temperature
    args.temperature = torch.tensor(given, dtype=torch.float32).item()
    if not 0 <= args.temperature < math.inf:
        raise InputError(f"--temperature must be a number >= 0 that float32 holds, got {given}")
    if args.temperature < 1 / torch.finfo(torch.float32).max:
        args.temperature = 0.0
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise InputError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise InputError(f"--top_k must be >= 1, got {args.top_k}")
    if min(args.max_new_tokens, args.num_samples, args.batch_size,
           1 if args.prompt_tokens is None else args.prompt_tokens) < 1:
        raise InputError("--max_new_tokens, --num_samples, --batch_size and --prompt_tokens must "
                         "be >= 1")
    if args.prompt and (args.prompt_tokens is not None
                        or len(args.prompt) > 1 and args.batch_size > 1):
        raise InputError("give --prompt or --prompt_tokens, and several --prompt flags or "
                         "--batch_size, not both")
    if not -2**63 <= args.seed < 2**64:  # what torch.manual_seed takes
        raise InputError(f"--seed must fit in 64 bits, got {args.seed}")
    if args.interactive and args.random_weights:
        raise InputError("--interactive needs --checkpoint_path (a tokenizer), not "
                         "--random_weights")
    if args.interactive and sys.stdin is None:  # started with its input closed (`<&-`)
        raise InputError("--interactive reads its prompts from standard input, which is closed")
    given_prompt_flags = (args.prompt, args.prompt_tokens is not None, args.json, args.profile,
                          args.num_samples > 1, args.batch_size > 1)
    if args.interactive and any(given_prompt_flags):
        raise InputError("--interactive reads its prompts from the terminal and answers them one "
                         "at a time: not with --prompt, --prompt_tokens, --num_samples, "
                         "--batch_size, --json or --profile")
    if args.chat and (args.prompt_tokens is not None or args.random_weights):
        raise InputError("--chat puts prompt text in the checkpoint's chat template: not with "
                         "--prompt_tokens or --random_weights")
    if (args.draft_checkpoint_path, args.speculate_ngram, args.speculate_k) != (None, None, None):
        check_speculation_args(args)
    if args.json is not None:
        check_output(args.json, "--json")
    if args.profile is not None:
        check_output(args.profile, "--profile", [args.json])
    if not (args.prompt or args.prompt_tokens is not None or args.random_weights
            or args.interactive):
        args.prompt = [DEFAULT_PROMPT]  # named here, so that the answer is printed after it
    return args


if __name__ == "__main__":
    with script_exits(tp.exit_with_error):
        main()
