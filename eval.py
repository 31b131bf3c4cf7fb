"""Check that a checkpoint still works: perplexity on any text, and lm-evaluation-harness tasks.

    python eval.py --checkpoint_path checkpoints/REPO/model_int8.pth        # perplexity, pydoc text
    python eval.py --checkpoint_path checkpoints/REPO --text_file notes.txt --limit 4096
    python eval.py --checkpoint_path checkpoints/REPO --tasks hellaswag winogrande --download
    python eval.py --checkpoint_path checkpoints/REPO --tasks capitals --include_path tests/data

--tasks needs lm-evaluation-harness (pip install lm_eval). Everything is scored by one batched loop
over the static-KV-cache model: a request is a token sequence of which the last few tokens are
scored, given all the tokens before them. Rows of similar length share a forward pass, padded on
the right (a row never attends to the slots after it), and one full-sequence forward returns every
position's logits.
Perplexity cuts long texts into overlapping windows of --max_seq_length tokens; lm-eval's
loglikelihood requests are (context, continuation) pairs; its generate_until requests run
generate.py's loop (greedy unless the task samples) and stop at the task's stop strings.
"""
import argparse
import functools
import math
import os
import re
import sys
import time
import traceback
from itertools import groupby
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import tp
from checkpoint import (ArgumentParser, InputError, check_output, load_model, one_line,
                        read_checkpoint, script_exits)
from generate import (DEVICE_FLAGS, Sampling, check_cache_fits, compile_functions, device_name,
                      generate, resolve_device_flags, write_json)
from model import Transformer
from tokenizer import check_ids_fit, load_tokenizer

LM_EVAL_VERSION = "0.4.13"  # the version eval.py is tested with (requirements-test.txt)


# ---- scoring: batches of token sequences, the last tokens of each scored -------------------------

def rolling_windows(n_tokens: int, max_seq_length: int, stride: int) -> list:
    """Cut a sequence of n_tokens into windows the model can read, so that every token but the
    first (which has no context) is scored exactly once. Returns (start, end, n_scored) per window:
    the model reads tokens[start:end - 1] (at most max_seq_length tokens) and scores the last
    n_scored of tokens[start + 1:end]. After the first window each one scores `stride` new tokens
    (fewer at the end) and reads as much context before them as fits, so every scored token sees
    at least max_seq_length - stride + 1 tokens of context (all of them in the first window)."""
    if not 1 <= stride <= max_seq_length:  # check_args keeps --stride in range: a caller's bug
        raise ValueError(f"stride {stride} must be in 1..max_seq_length {max_seq_length}")
    windows, scored_until = [], 1  # token 0 is context only
    while scored_until < n_tokens:
        step = stride if windows else max_seq_length
        end = min(scored_until + step, n_tokens)
        start = max(0, end - max_seq_length - 1)
        windows.append((start, end, end - scored_until))
        scored_until = end
    return windows


def forward_logits(model: Transformer, idx: Tensor, input_pos: Tensor) -> Tensor:
    """Logits at every position: idx (B, T) -> (B, T, vocab_size); --compile wraps this."""
    return model(idx, input_pos)


class StopGeneration(Exception):
    """Raised from generate()'s token callback once every row has hit a stop string or its end
    of sequence: generate() itself only knows end-of-sequence ids, and the rest would be thrown
    away."""


def empty_context_token(tokenizer) -> Optional[int]:
    """The token that stands for an empty context: BOS, else the first end-of-sequence token."""
    if tokenizer.bos_id is not None:
        return tokenizer.bos_id
    return tokenizer.eos_ids[0] if tokenizer.eos_ids else None


class EvalModel:
    """A model and its tokenizer answering the three kinds of request lm-evaluation-harness
    makes, as plain Python (lm_eval is only needed to wrap this, see harness_model)."""

    def __init__(self, model: Transformer, tokenizer, max_seq_length: int, batch_size: int,
                 compiled: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_length, self.batch_size = max_seq_length, batch_size
        self.device = model.tok_embeddings.weight.device
        self.cache_request = None  # the length fit_cache last sized the cache for
        self.fit_cache(max_seq_length)
        # Dynamic shapes: rows and lengths change from batch to batch; one graph serves them all.
        self.forward = torch.compile(forward_logits, dynamic=True) if compiled else forward_logits
        self.prefill_fn, self.decode_fn = compile_functions(compiled, compiled)
        # What encode() puts before every text (BOS for Llama, nothing for SmolLM2), and the token
        # that stands for an empty context: BOS when the model has one, else its end of sequence, as
        # lm-eval's HF model does (None: neither; perplexity needs none, and run refuses tasks).
        self.special_prefix = self.encode("")
        self.prefix_token = empty_context_token(tokenizer)
        check_ids_fit([] if self.prefix_token is None else [self.prefix_token],
                      model.args.vocab_size)

    def fit_cache(self, length: int):
        """Size the KV cache for sequences of up to `length` tokens: the next power of two, at least
        64 and at most max_seq_length (setup_caches rounds it up to whole 8s; model.max_seq_length
        is the result). Attention reads every slot of the cache, so short requests in a 2048-slot
        cache would spend most of their time on empty slots. Requests come longest first, so a call
        reallocates only a few times."""
        size = min(self.max_seq_length, max(64, 1 << (length - 1).bit_length()))
        if size != self.cache_request:
            self.model.setup_caches(max_batch_size=self.batch_size, max_seq_length=size)
            self.cache_request = size

    def encode(self, text: str) -> list:
        """The tokenizer's ids for text, each one the model embeds."""
        ids = self.tokenizer.encode(text)
        check_ids_fit(ids, self.model.args.vocab_size)
        return ids

    def encode_plain(self, text: str) -> list:
        """Token ids of text without the BOS that encode() adds for some tokenizers."""
        ids = self.encode(text)
        n = len(self.special_prefix)
        return ids[n:] if ids[:n] == self.special_prefix else ids

    @torch.inference_mode()
    def score(self, requests: list, desc: str = "scoring", progress: bool = True) -> list:
        """requests: (tokens, n_scored) pairs. Returns, for each, (sum of the log-probabilities of
        the last n_scored tokens given all the tokens before them, whether each was the greedy
        choice)."""
        results = [None] * len(requests)
        longest_first = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
        total = sum(n for _, n in requests)
        with tqdm(total=total, desc=desc, unit="tok", disable=not progress) as bar:
            for b in range(0, len(requests), self.batch_size):
                batch = longest_first[b:b + self.batch_size]
                for i, result in zip(batch, self._score_batch([requests[i] for i in batch])):
                    results[i] = result
                bar.update(sum(requests[i][1] for i in batch))
        return results

    def _score_batch(self, requests: list) -> list:
        inputs = [tokens[:-1] for tokens, _ in requests]  # the last token is only ever a target
        T = max(len(x) for x in inputs)
        if T > self.max_seq_length:  # every request is cut to fit before it gets here: a bug
            raise ValueError(f"{T} input tokens do not fit max_seq_length {self.max_seq_length}")
        self.fit_cache(T)
        idx = torch.tensor([x + [0] * (T - len(x)) for x in inputs], device=self.device)  # (B, T)
        positions = torch.arange(T, device=self.device)
        logits = self.forward(self.model, idx, positions)  # (B, T, vocab)
        results = []
        for row, (tokens, n) in enumerate(requests):
            # The row's inputs end at column L - 1: the logits predicting its last n tokens are the
            # n before column L.
            L = len(tokens) - 1
            logprobs = F.log_softmax(logits[row, L - n:L].float(), dim=-1)  # (n, vocab)
            targets = torch.tensor(tokens[len(tokens) - n:], device=self.device)  # (n,)
            total = logprobs.gather(-1, targets[:, None]).sum().item()
            results.append((total, bool((logprobs.argmax(-1) == targets).all())))
        return results

    def loglikelihood(self, pairs: list, progress: bool = True) -> list:
        """(context, continuation) text pairs -> (log P(continuation | context), whether it is the
        greedy one)."""
        requests = [self.encode_pair(context, continuation) for context, continuation in pairs]
        return self.score(requests, "loglikelihood", progress)

    def encode_pair(self, context: str, continuation: str) -> tuple:
        """(tokens, n_scored) for a continuation after its context, the context cut to what fits."""
        if context.strip():
            # Spaces at the end of the context go with the continuation (" Paris", not "Paris"
            # after "is "), and the whole text is encoded at once, so the continuation's tokens are
            # the ones the model would read.
            tokens = self.encode(context + continuation)
            n = len(tokens) - len(self.tokenizer.encode(context.rstrip()))
        else:  # nothing to condition on: the prefix token stands in
            tokens = [self.prefix_token] + self.encode_plain(context + continuation)
            n = len(tokens) - 1
        if n > self.max_seq_length:
            raise InputError(f"a task's continuation of {n} tokens does not fit --max_seq_length "
                             f"{self.max_seq_length}")
        return tokens[-self.max_seq_length - 1:], n

    def loglikelihood_rolling(self, texts: list, progress: bool = True) -> list:
        """log P(text) of whole texts, every token scored, the first one after the prefix token.
        Windows do not overlap (stride = max_seq_length), as in lm-eval's own models, so that its
        numbers compare."""
        requests, owner = [], []
        for i, text in enumerate(texts):
            tokens = [self.prefix_token] + self.encode_plain(text)
            n_ctx = self.max_seq_length
            for start, end, n in rolling_windows(len(tokens), n_ctx, n_ctx):
                requests.append((tokens[start:end], n))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (logprob, _) in zip(owner, self.score(requests, "loglikelihood_rolling", progress)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests: list, progress: bool = True) -> list:
        """(context, generation kwargs) pairs -> generated text, cut before the first of the
        kwargs' `until` strings. Greedy unless the kwargs ask for sampling; rows with the same
        kwargs share a batch."""
        outputs = [None] * len(requests)

        def same_kwargs(i: int) -> str:
            return repr(sorted(requests[i][1].items()))

        order = sorted(range(len(requests)), key=lambda i: (same_kwargs(i), -len(requests[i][0])))
        with tqdm(total=len(requests), desc="generate_until", disable=not progress) as bar:
            for _, group in groupby(order, key=same_kwargs):
                group = list(group)
                for b in range(0, len(group), self.batch_size):
                    batch = group[b:b + self.batch_size]
                    kwargs = requests[batch[0]][1]
                    texts = self._generate_batch([requests[i][0] for i in batch], kwargs)
                    for i, text in zip(batch, texts):
                        outputs[i] = text
                    bar.update(len(batch))
        return outputs

    def _generate_batch(self, contexts: list, kwargs: dict) -> list:
        until = kwargs.get("until") or []
        # Empty stop strings are dropped: "" would stop at once.
        until = [s for s in ([until] if isinstance(until, str) else until) if s]
        asked = int(kwargs.get("max_gen_toks", 256))
        if asked < 1:
            raise InputError(f"a task asks for max_gen_toks {asked}: at least 1 token is needed")
        max_new = min(asked, self.max_seq_length - 1)
        keep = self.max_seq_length - max_new  # contexts lose their beginning, never the end
        prompts = [(self.encode(c) or [self.prefix_token])[-keep:] for c in contexts]
        sampling = Sampling(temperature=0)
        temperature = kwargs.get("temperature", 1.0)
        if kwargs.get("do_sample") and temperature > 0:
            top_k = kwargs.get("top_k")  # Hugging Face's top_k=0 means no top-k
            sampling = Sampling(temperature, top_k if top_k and top_k > 0 else None,
                                kwargs.get("top_p"))
        rows = [[] for _ in prompts]
        done = [False] * len(prompts)
        eos = set(self.tokenizer.eos_ids)

        def on_tokens(new_tokens: list):
            for b, token in enumerate(new_tokens):
                if token is None or done[b]:
                    continue
                done[b] = token in eos
                if not done[b]:
                    rows[b].append(token)
                    done[b] = any(s in self.tokenizer.decode(rows[b]) for s in until)
            if all(done):
                raise StopGeneration

        self.fit_cache(max(len(p) for p in prompts) + max_new)
        try:
            generate(self.model, prompts, max_new, sampling, self.tokenizer.eos_ids,
                     self.prefill_fn, self.decode_fn, on_tokens)
        except StopGeneration:
            pass
        return [cut_at_stop_strings(self.tokenizer.decode(row), until) for row in rows]


def cut_at_stop_strings(text: str, until: list) -> str:
    """text up to (not including) the earliest occurrence of any stop string."""
    return text[:min([text.index(s) for s in until if s in text], default=len(text))]


# ---- perplexity ----------------------------------------------------------------------------------

def default_text() -> tuple[str, str]:
    """(name, text) of the standard library's pydoc topics: English prose and code, on every
    machine."""
    import pydoc_data.topics
    return "pydoc_data.topics", "\n".join(pydoc_data.topics.topics.values())


def read_text(path: Optional[Path]) -> tuple[str, str]:
    if path is None:
        return default_text()
    if path.is_dir() or not path.exists():  # a pipe or /dev/stdin reads as a file does
        raise InputError(f"--text_file: {path} {'is a folder' if path.is_dir() else 'not found'}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no text to score
    except UnicodeDecodeError as e:
        raise InputError(f"--text_file: {path} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None
    except OSError as e:  # e.g. no permission to read it
        raise InputError(f"--text_file: cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        raise InputError(f"--text_file: {path} is empty")
    return str(path), text


def perplexity(em: EvalModel, ids: list, stride: int) -> dict:
    """Perplexity of the token ids (the first is context only) and bits per byte of the text they
    predict."""
    windows = rolling_windows(len(ids), em.max_seq_length, stride)
    results = em.score([(ids[start:end], n) for start, end, n in windows], "perplexity")
    nll = -sum(logprob for logprob, _ in results)  # nats, summed in float64
    scored = len(ids) - 1
    decode = em.tokenizer.decode
    predicted_bytes = len(decode(ids).encode("utf-8")) - len(decode(ids[:1]).encode("utf-8"))
    return dict(tokens=len(ids), scored_tokens=scored, windows=len(windows),
                max_seq_length=em.max_seq_length, stride=stride, nll=nll,
                perplexity=math.exp(nll / scored),
                bits_per_byte=nll / math.log(2) / max(predicted_bytes, 1), bytes=predicted_bytes)


def text_ids(args, tokenizer, vocab_size: int) -> tuple[str, list]:
    """The text to measure, as token ids cut to --limit; fails before any weights are loaded."""
    name, text = read_text(args.text_file)
    every = tokenizer.encode(text)
    ids = every[:args.limit]
    check_ids_fit(ids, vocab_size)
    if len(ids) < 2:
        cause = f"--limit {args.limit} leaves" if len(every) >= 2 else f"--text_file: {name} has"
        raise InputError(f"{cause} {len(ids)} token(s); perplexity needs at least 2")
    return name, ids


# ---- lm-evaluation-harness -----------------------------------------------------------------------

def import_lm_eval(download: bool):
    """lm_eval is optional: imported only for --tasks. Task data is read offline (local files and
    the Hugging Face cache) unless --download: without network, datasets would retry the hub for
    ~25 s before failing."""
    if not download:
        # Set before datasets is imported: it reads them once.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise InputError(f"--tasks needs lm-evaluation-harness: pip install "
                         f"lm_eval=={LM_EVAL_VERSION} ({e})") from None
    return lm_eval, TaskManager


@functools.cache
def task_index(TaskManager, include_paths: tuple):
    """lm-eval's index of its tasks and those under include_paths: some 15,000 task files read (8 s
    on 2 cores), so made once per process for each set of folders (main may run more than once in
    one process: a notebook, the tests)."""
    return TaskManager(include_path=list(include_paths) or None)


def unparsed_task_files(folders: list) -> list:
    """(path, why) for each task file (*.yaml) under the folders that is not YAML: lm-eval's index
    passes over such a file without a word, so that the task it defines reads as unknown."""
    import yaml  # lm_eval's own dependency

    class TaskFile(yaml.SafeLoader):  # lm-eval's tags (!function) parse, unresolved
        pass
    TaskFile.add_multi_constructor("!", lambda loader, suffix, node: None)
    unparsed = []
    for path in sorted(p for folder in folders for p in Path(folder).glob("**/*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), TaskFile)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            unparsed.append((path, f"line {mark.line + 1}: {e.problem or e.context}"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            unparsed.append((path, one_line(e)))
    return unparsed


def raised_in(e: BaseException, path_end: str) -> bool:
    """Whether e was raised in a file whose path ends in path_end: an error of a kind too broad
    to take for the user's everywhere (a KeyError), known by where it comes from."""
    return traceback.extract_tb(e.__traceback__)[-1].filename.endswith(path_end)


def load_tasks(task_manager, names: list, include_paths: list = (), download: bool = False) -> list:
    """The tasks, groups and tags named, built with their data: an unknown name or unreachable
    data fails here, before the model loads. Returns the objects lm_eval.simple_evaluate takes in
    place of names. download: --download's, for the hint an unreadable task's error gives."""
    unknown = [n for n in names if n not in task_manager.all_tasks and not Path(n).is_file()]
    if unknown:
        unparsed = "".join(f"; {path} does not parse: {why}"
                           for path, why in unparsed_task_files(include_paths))
        raise InputError(f"--tasks: unknown task {', '.join(unknown)} (not an lm-eval task, "
                         "group, tag or task YAML file; `lm_eval ls tasks` lists them, "
                         f"--include_path adds a folder of your own){unparsed}")
    import jinja2  # lm_eval's own dependencies
    import yaml
    from datasets.exceptions import DatasetsError
    built, named_in = [], {}
    for name in names:
        try:
            loaded = task_manager.load([name])
        # OSError: data offline, not on the hub or missing (FileNotFoundError, ConnectionError,
        # huggingface_hub's errors); DatasetsError, ValueError: data that does not parse, a setting
        # lm_eval refuses; RuntimeError: a dataset script; ImportError: a !function's module;
        # YAMLError, TemplateError: a task file's YAML or Jinja. Other kinds keep their traceback.
        except (OSError, DatasetsError, ValueError, RuntimeError, ImportError, yaml.YAMLError,
                jinja2.TemplateError) as e:
            where = ("local files, the Hugging Face cache and, with --download, the hub"
                     if download else "local files and the Hugging Face cache; --download "
                     "allows the hub")
            cwd = os.getcwd()
            if isinstance(e, FileNotFoundError) and os.path.join(cwd, "") in str(e):
                where += ("; relative data_files paths in a task file start from the folder "
                          f"eval.py runs in, {cwd}")
            raise InputError(f"--tasks: cannot load task {name}: {one_line(e)} (data is read "
                             f"from {where})") from None
        except KeyError as e:  # the task's file names a split that its data does not have
            if not raised_in(e, os.path.join("datasets", "dataset_dict.py")):
                raise
            raise InputError(f"--tasks: cannot load task {name}: its data has no split "
                             f"{e.args[0]!r} (the split its task file names)") from None
        for task in loaded["tasks"]:  # lm_eval refuses a task that two names reach, when it runs
            if named_in.setdefault(task, name) != name:
                raise InputError(f"--tasks: {named_in[task]} and {name} both hold task {task}; "
                                 "name it once")
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        # A tag stands for its tasks.
        built += [top] if top is not None else list(loaded["tasks"].values())
    return built


def harness_model(em: EvalModel):
    """em as an lm-evaluation-harness model (LM subclass), built here: lm_eval is optional."""
    from lm_eval.api.model import LM

    class GptBlitzLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return em.loglikelihood([r.args for r in requests], progress=not disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            texts = [r.args[0] for r in requests]
            return em.loglikelihood_rolling(texts, progress=not disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return em.generate_until([r.args for r in requests], progress=not disable_tqdm)

    return GptBlitzLM()


def run_tasks(em: EvalModel, lm_eval, task_manager, tasks: list, args) -> dict:
    try:
        results = lm_eval.simple_evaluate(model=harness_model(em), tasks=tasks,
                                          task_manager=task_manager, num_fewshot=args.num_fewshot,
                                          limit=args.limit, log_samples=False)
    except ValueError as e:  # random.sample's: more examples asked of a task than it holds
        if not raised_in(e, os.sep + "random.py"):
            raise
        asked = ("the task's own num_fewshot" if args.num_fewshot is None
                 else f"--num_fewshot {args.num_fewshot}")
        raise InputError(f"--tasks: a task has fewer examples to draw than {asked} asks for"
                         ) from None
    if results is None:  # not the reporting rank under torchrun
        return {}
    print(lm_eval.utils.make_table(results))
    if results.get("groups"):
        print(lm_eval.utils.make_table(results, "groups"))
    return {k: results[k] for k in ("results", "groups", "n-shot", "versions") if k in results}


# ---- the command line ----------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        description="Perplexity and lm-evaluation-harness tasks for a gpt-blitz checkpoint.",
        parents=[DEVICE_FLAGS])
    p.add_argument("--checkpoint_path", type=Path, required=True, help="checkpoint folder, or a "
                   "weights file in it (model_int8.pth etc. from quantize.py)")
    p.add_argument("--text_file", type=Path, help="UTF-8 text to measure perplexity on (default: "
                   "Python's pydoc topics text; with --tasks, perplexity runs only when this is "
                   "given)")
    p.add_argument("--tasks", nargs="+",
                   help="lm-eval tasks, groups or tags (needs pip install lm_eval)")
    p.add_argument("--include_path", action="append", default=[], type=Path,
                   help="a folder of lm-eval task YAML files (e.g. local `dataset_path: json` "
                   "tasks); repeatable")
    p.add_argument("--num_fewshot", type=int, default=None,
                   help="few-shot examples per task (default: the task's)")
    p.add_argument("--limit", type=int, default=None, help="perplexity: the first N tokens of the "
                   "text only; --tasks: the first N examples of each task only (a quick check, not "
                   "a comparable score)")
    p.add_argument("--download", action="store_true",
                   help="let lm-eval fetch task data from the Hugging Face hub")
    p.add_argument("--max_seq_length", type=int, default=None, help="tokens the model reads at "
                   "once (default: the model's context, at most 2048)")
    p.add_argument("--stride", type=int, default=None, help="perplexity: new tokens scored per "
                   "window after the first (default: half of --max_seq_length, so every token sees "
                   "at least half a context)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="sequences per forward pass (default 8)")
    p.add_argument("--compile", action="store_true",
                   help="compile the forward pass and the prefill (dynamic shapes) and the decode "
                   "step")
    p.add_argument("--output", type=Path, help="write the results to this JSON file")
    return p.parse_args(argv)


def check_args(args, block_size: int):
    """Fill in the defaults that depend on the model and reject bad values, each with one sentence.
    Afterwards args.device is a torch.device and args.dtype a torch.dtype."""
    if args.max_seq_length is None:
        args.max_seq_length = min(block_size, 2048)
    if not 2 <= args.max_seq_length <= block_size:
        raise InputError(f"--max_seq_length must be in 2..{block_size} (the model's context), got "
                         f"{args.max_seq_length}")
    if args.tasks and not args.text_file:  # no perplexity
        if args.stride is not None:
            raise InputError("--stride sets up the perplexity, which --tasks without --text_file "
                             "does not measure")
    elif args.stride is None:
        args.stride = max(1, args.max_seq_length // 2)
    elif not 1 <= args.stride <= args.max_seq_length:
        raise InputError(f"--stride must be in 1..{args.max_seq_length} (--max_seq_length), got "
                         f"{args.stride}")
    if args.limit is not None and args.tasks and args.text_file:
        raise InputError("--limit counts a text's tokens and a task's examples: with both --tasks "
                         "and --text_file, run them apart")
    for flag in ("limit", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag} must be >= 1, got {value}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise InputError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    ignored = [flag for flag, given in (("--num_fewshot", args.num_fewshot is not None),
                                        ("--include_path", args.include_path),
                                        ("--download", args.download)) if given]
    if ignored and not args.tasks:
        raise InputError(f"{', '.join(ignored)} only set{'s' if len(ignored) == 1 else ''} up "
                         "--tasks, and no --tasks is given")
    for folder in args.include_path:
        if not folder.is_dir():
            raise InputError(f"--include_path: folder {folder} does not exist")
    if args.output is not None:
        task_files = [Path(name) for name in args.tasks or () if Path(name).is_file()]
        check_output(args.output, "--output", [args.text_file, *task_files])
        for folder in args.include_path:  # its task files, and the data files they name, are inputs
            if args.output.exists() and args.output.resolve().is_relative_to(folder.resolve()) and (
                    args.output.suffix in (".yaml", ".yml")
                    or any(names_file(task.read_text(errors="replace"), args.output.name)
                           for task in folder.glob("**/*.y*ml"))):
                raise InputError(f"--output {args.output} is a task file of --include_path "
                                 f"{folder}, or data one names; name another file")
    resolve_device_flags(args)


def names_file(text: str, name: str) -> bool:
    """Whether text (a task file) holds the file name whole: alone or at a path's end, not inside
    a longer name (data.json in my_data.jsonl)."""
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text) is not None


def load_eval_model(args, ckpt, device: torch.device) -> Transformer:
    """The checkpoint's model on the device, of any kind checkpoint.load_model reads (float, int8,
    int4, GPTQ, fp8); under torchrun, this process's part of it (tp.py): every rank scores the same
    requests with its share of the weights and ends each forward with the whole logits, so the
    scoring code is the same."""
    if tp.world_size() > 1:
        return tp.load_model(args, device, args.dtype).eval()
    return load_model(ckpt, device, args.dtype)


def run(args) -> dict:
    ckpt = read_checkpoint(args.checkpoint_path)
    check_args(args, ckpt.args.block_size)
    tokenizer = load_tokenizer(ckpt.folder)

    # Everything that can fail on bad input is read before the weights.
    text_name, ids = (text_ids(args, tokenizer, ckpt.args.vocab_size)
                      if args.text_file or not args.tasks else (None, None))
    if args.tasks:
        if empty_context_token(tokenizer) is None:
            raise InputError("--tasks: the tokenizer has neither a beginning- nor an "
                             "end-of-sequence token, one of which the tasks' empty contexts need")
        lm_eval, TaskManager = import_lm_eval(args.download)
        task_manager = task_index(TaskManager, tuple(str(p.resolve()) for p in args.include_path))
        tasks = load_tasks(task_manager, args.tasks, args.include_path, args.download)

    device = args.device
    if tp.world_size() > 1:  # under torchrun: check the model splits, join the process group
        device = tp.start(args, ckpt.args, device)
    check_cache_fits(ckpt.args, args.batch_size, args.max_seq_length, args.dtype, device)
    t0 = time.perf_counter()
    model = load_eval_model(args, ckpt, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"Loaded {ckpt.weights} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    em = EvalModel(model, tokenizer, args.max_seq_length, args.batch_size, args.compile)

    report = dict(checkpoint=str(args.checkpoint_path),
                  quantization=(ckpt.quantization or {}).get("mode"), device=device_name(device),
                  dtype=str(args.dtype).removeprefix("torch."), torch=torch.__version__)
    if ids is not None:
        t0 = time.perf_counter()
        result = perplexity(em, ids, args.stride)
        report["perplexity"] = dict(text=text_name, seconds=time.perf_counter() - t0, **result)
        windows = ("one window" if result["windows"] == 1 else
                   f"{result['windows']} windows of {args.max_seq_length}, stride {args.stride}")
        print(f"{text_name}: {result['tokens']} tokens ({result['scored_tokens']} scored in "
              f"{windows}): perplexity "
              f"{result['perplexity']:.4f}, bits per byte {result['bits_per_byte']:.4f}")
    if args.tasks:
        report["tasks"] = run_tasks(em, lm_eval, task_manager, tasks, args)
    if args.output:
        write_json(args.output, report)
    return report


def main(argv=None):
    """One run of eval.py: bad input ends in one `error:` line (rank 0's under torchrun), exit 1."""
    if tp.world_size() > 1:
        tp.quiet_other_ranks()  # under torchrun only rank 0 prints
    with script_exits(tp.exit_with_error):
        run(parse_args(argv))


if __name__ == "__main__":
    main()
