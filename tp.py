"""Tensor parallelism: one model split over the processes that torchrun starts, one GPU each (gloo
on CPU).

    torchrun --standalone --nproc_per_node=4 generate.py --compile WEIGHTS

where WEIGHTS is `--checkpoint_path checkpoints/REPO`, or random weights for benchmarks:
`--random_weights Llama-2-70B --random_quantization int8`.

Each transformer block is split the Megatron way, so that a block costs two all-reduces and nothing
else:
  column-parallel (each rank holds some output rows; no communication): attention.wqkv, each rank
      computing its own heads' q, k and v (and its own KV heads' cache), and feed_forward.w13, each
      rank its own gate and up rows;
  row-parallel (each rank holds the matching input columns, its partial products are summed):
      attention.wo and feed_forward.w2, each followed by one all-reduce (RowParallel).
A mixture of experts is split the same way inside every expert (each rank holds its slice of every
expert's w13 rows and w2 columns, so a step reads 1/world of the chosen experts' bytes per rank);
the router is replicated, so every rank picks the same experts, and the one all-reduce follows the
weighted sum of the experts' partial outputs.

The token embedding is replicated: a step reads only the looked-up rows, so copies cost memory, not
bandwidth. The output layer is split by vocabulary rows, each rank's logits padded with zeros to the
whole vocabulary and summed by one all-reduce (VocabParallel), so that each rank reads 1/world of it
per token: of the bytes each rank reads per token, that saves about 1 % for Llama-2-70B on 4 GPUs
and up to about 10 % for Llama-3-70B (128k vocabulary) on 8, for one more small collective per step.
TP_OUTPUT=replicated in the environment keeps a whole copy on every rank instead, to measure the
difference (scripts/bench_tp.sh).

Every rank ends each step with the same logits, bit for bit (an all-reduce hands every rank the
same result: NVIDIA/nccl#855), and every rank seeds its generator alike, so all ranks sample the
same token without talking. Each rank reads only its own slices of the checkpoint (safetensors
slices, or a memory-mapped .pth), so no process ever holds the whole model.

Quantized checkpoints (quantize.py) are split in their stored form: column-parallel layers by rows
(the per-row scales and int4 groups go with their rows), row-parallel layers by input columns,
which for int4 must fall on group boundaries (else a clear error), while per-output-channel scales
(int8, fp8) are copied to every rank.
"""
import atexit
import os
import sys
import time
import traceback
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import kernels
from checkpoint import (CONFIGS, InputError, empty_model, on_meta, open_weights, randomize_,
                        read_checkpoint, to_device)
from model import ModelArgs, Transformer
from quantize import DEFAULT_OUTPUT_MODE, linear_names, quantize_weight, quantized_config

COLUMN_PARALLEL = ("attention.wqkv", "feed_forward.w13")  # and the output layer, when SHARD_OUTPUT
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")
SHARD_OUTPUT = os.environ.get("TP_OUTPUT", "sharded") != "replicated"


# ---- the processes -------------------------------------------------------------------------------

def world_size() -> int:
    """Processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def quiet_other_ranks():
    """Under torchrun only rank 0 prints text and metrics, which every rank would print alike. A
    crash still shows its traceback, from whichever rank it happens on; errors: see
    exit_with_error."""
    if rank() == 0:
        return
    sys.stdout = sys.stderr = open(os.devnull, "w")
    sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)


STARTED = False  # set by start(): from then on a rank's errors may be its own


class AlikeOnEveryRank(InputError):
    """Bad input that every rank meets alike even after start(): a check against the one memory
    that the processes on a CPU share."""


def exit_with_error(e: InputError):
    """One `error:` line and exit status 1. Before start() every rank checks the same input and
    fails alike, so rank 0 speaks for all; after it (its GPU, its slices) each rank says what it
    met, unless the error is AlikeOnEveryRank."""
    if rank() == 0:
        print(f"error: {e}", file=sys.stderr)
    elif STARTED and not isinstance(e, AlikeOnEveryRank):
        print(f"error: rank {rank()}: {e}", file=sys.__stderr__)
    else:
        # torchrun stops every process once one exits with an error: let rank 0, which met the
        # same error, print it and exit first.
        time.sleep(5)
    sys.exit(1)


def init_process_group(device: torch.device) -> torch.device:
    """Join torchrun's process group: NCCL with one GPU per local rank on CUDA, gloo on the CPU.
    Returns this rank's device."""
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"local rank {local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; give torchrun at most that many "
                             f"--nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # device_id creates the NCCL communicator now, not lazily inside the first collective
        # (which may be one that a CUDA graph is capturing).
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(shutdown)
    return device


def shutdown():
    """Leave the process group at exit. CUDA graphs that captured NCCL collectives must go first,
    or destroying the communicator hangs (pytorch/pytorch#115388)."""
    torch._dynamo.reset()  # frees the compiled functions and their CUDA graphs
    dist.destroy_process_group()


# ---- shapes --------------------------------------------------------------------------------------

def shard_args(args: ModelArgs, world: int) -> ModelArgs:
    """The shape of each rank's part of the model: 1/world of the heads, KV heads and FFN width."""
    split = {"n_head": args.n_head, "n_kv_heads": args.n_kv_heads,
             "intermediate_size": args.intermediate_size}
    if any(value % world for value in split.values()):
        fits = [n for n in range(1, args.n_kv_heads + 1)
                if all(value % n == 0 for value in split.values())]
        raise InputError(f"tensor parallelism over {world} processes needs the attention heads "
                         f"({args.n_head}), KV heads ({args.n_kv_heads}) and FFN width "
                         f"({args.intermediate_size}) to divide by {world}; this model splits over "
                         f"{', '.join(map(str, fits))} processes (torchrun --nproc_per_node)")
    # The output layer of a rank is no longer the embedding table once it holds only some
    # vocabulary rows.
    return replace(args, **{name: value // world for name, value in split.items()},
                   tie_embeddings=args.tie_embeddings and not (SHARD_OUTPUT and world > 1))


def vocab_per_rank(args: ModelArgs, world: int) -> int:
    """Output rows of each rank: the vocabulary split evenly, the last rank's share padded with
    zero rows; the whole vocabulary where the output layer is replicated (SHARD_OUTPUT off)."""
    return -(-args.vocab_size // world) if SHARD_OUTPUT else args.vocab_size


def check_split_groups(args: ModelArgs, quantization: Optional[dict], world: int):
    """int4 row-parallel layers are split along their input columns: each rank's share must be
    whole groups (one process may pad the columns to whole groups, as quantize.py does; a split
    cannot)."""
    if world == 1 or quantization is None or quantization.get("groupsize") is None:
        return
    groupsize = quantization["groupsize"]
    for layer, k in (("attention.wo", args.n_head * args.head_dim),
                     ("feed_forward.w2", args.intermediate_size)):
        if (k // world) % groupsize:
            fits = [g for g in kernels.GROUPSIZES if (k // world) % g == 0]
            instead = (f"use a group size that divides it ({', '.join(map(str, fits))}) or "
                       if fits else "use ")
            raise InputError(f"tensor parallelism over {world} processes splits {layer}'s {k} "
                             f"input columns into {k // world} per process, which is not whole "
                             f"int4 groups of {groupsize}: {instead}another number of processes")


# ---- which part of each checkpoint tensor a rank holds -------------------------------------------

def layer_kind(name: str) -> str:
    """'column', 'row' or 'replicated': how a parameter (by its state_dict name) is split."""
    layer = name.rpartition(".")[0]
    if layer.endswith(COLUMN_PARALLEL) or (layer == "output" and SHARD_OUTPUT):
        return "column"
    return "row" if layer.endswith(ROW_PARALLEL) else "replicated"


def stacked_parts(layer: str, args: ModelArgs, world: int) -> list:
    """The row counts of the parts stacked in a column-parallel layer; each part is split evenly
    over the ranks."""
    if layer.endswith("attention.wqkv"):
        return [args.n_head * args.head_dim, args.n_kv_heads * args.head_dim,
                args.n_kv_heads * args.head_dim]
    if layer.endswith("feed_forward.w13"):
        return [args.intermediate_size, args.intermediate_size]  # gate, up
    return [vocab_per_rank(args, world) * world]  # the output layer, padded


def rank_slice(name: str, shape: tuple, args: ModelArgs, rank: int,
               world: int) -> tuple[int, list]:
    """Where rank's part of checkpoint tensor `name` of `shape` lies: (dim, [(start, stop), ...]),
    ranges along dim to concatenate; a stop past the end means zero rows (padding)."""
    kind = layer_kind(name)
    experts = int(args.n_experts > 0 and ".feed_forward.w" in name)  # 1: a leading n_experts dim
    if kind == "column":
        ranges, offset = [], 0
        for rows in stacked_parts(name.rpartition(".")[0], args, world):
            share = rows // world
            ranges.append((offset + rank * share, offset + (rank + 1) * share))
            offset += rows
        return experts, ranges
    # weight (N, K), or int4's (N, K / 2) and (N, K / groupsize); experts': (n_experts, ...)
    if kind == "row" and len(shape) == 2 + experts:
        share = shape[-1] // world
        return len(shape) - 1, [(rank * share, (rank + 1) * share)]
    return 0, [(0, shape[0])]  # replicated, and the row-parallel layers' per-output-channel scales


def read_part(source, dim: int, ranges: list, length: int) -> Tensor:
    """Concatenate ranges of a tensor along dim, reading only them (`source[index]` is a
    safetensors slice or a memory-mapped tensor). A range past `length`, the tensor's size along
    dim, reads as zeros."""
    pieces = []
    for start, stop in ranges:
        piece = source[(slice(None),) * dim + (slice(start, min(stop, length)),)]
        if stop > length:  # the last rank's share of a vocabulary that does not divide
            piece = F.pad(piece, [0, 0] * (piece.dim() - 1 - dim) + [0, stop - max(start, length)])
        pieces.append(piece)
    return torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0].contiguous()


# ---- building a rank's model ---------------------------------------------------------------------

def empty_shard(args: ModelArgs, quantization: Optional[dict], world: int) -> Transformer:
    """A rank's model on the meta device (no memory), quantized layers swapped in where
    `quantization` lists them."""
    with on_meta():
        model = Transformer(shard_args(args, world))
        if SHARD_OUTPUT and world > 1:
            model.output = nn.Linear(args.dim, vocab_per_rank(args, world), bias=False)
        if quantization is not None:
            kernels.swap_linears(model, quantization)
    return model


def load_shard(path, rank: int, world: int, device, dtype=None) -> Transformer:
    """Rank's part of a checkpoint (float or quantized), read slice by slice straight onto the
    device."""
    ckpt = read_checkpoint(path)
    args, quantization = ckpt.args, ckpt.quantization
    check_split_groups(args, quantization, world)
    model = empty_shard(args, quantization, world)
    source = open_weights(ckpt)
    state = {}
    # disable=None: the bar shows on a terminal only, never in logs or captured output.
    for name in tqdm(model.state_dict(), desc=f"loading part {rank + 1} of {world}", unit="tensor",
                     disable=None):
        stored = ("tok_embeddings.weight" if name == "output.weight" and args.tie_embeddings
                  else name)
        shape = source.shapes[stored]
        dim, ranges = rank_slice(name, shape, args, rank, world)
        part = read_part(source.part(stored), dim, ranges, shape[dim])
        # Cast as it arrives: a float32 checkpoint never sits whole on the device in float32.
        state[name] = part.to(device, dtype if dtype is not None and part.is_floating_point()
                              else part.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return to_device(model, device, dtype)


RANDOM_QUANTIZATIONS = ("int8", "int4.g32", "int4.g64", "int4.g128", "int4.g256", "fp8")


def random_config(name: str, precision: Optional[str]) -> tuple[ModelArgs, Optional[dict]]:
    """The named config and, for a precision of RANDOM_QUANTIZATIONS, the quantization record that
    quantize.py would write for it (same layers, same padding, the output layer by quantize.py's
    default)."""
    args = ModelArgs(**CONFIGS[name])
    if precision is None:
        return args, None
    mode, _, group = precision.partition(".g")
    groupsize = int(group) if group else None
    layers = linear_names(args, include_output=True)
    qargs, quantization = quantized_config(args, mode, groupsize, DEFAULT_OUTPUT_MODE, layers, {})
    quantization["padded"] = kernels.padding_record(quantization, empty_model(args))
    return qargs, quantization


@torch.no_grad()
def random_shard(name: str, precision: Optional[str], world: int, device, dtype) -> Transformer:
    """Rank's part of a named config with random weights, made on the device (benchmarks need no
    file). Quantized layers get random float weights quantized by quantize.py one layer at a time,
    so memory never holds a float copy of the model. Every rank draws the same sequence (same seed,
    same shapes), so the replicated weights agree across ranks."""
    args, quantization = random_config(name, precision)
    check_split_groups(args, quantization, world)
    # Cast on meta: no float32 copy is ever allocated.
    model = empty_shard(args, quantization, world).to(dtype)
    model = model.to_empty(device=device)
    quantized = quantization["layers"] if quantization is not None else []
    randomize_(model, skip_layers=quantized)
    for layer in quantized:
        module = model.get_submodule(layer)
        experts = (module.n_experts,) if hasattr(module, "n_experts") else ()
        w = torch.empty(*experts, module.out_features, module.in_features, device=device,
                        dtype=dtype).normal_(0.0, 0.02)
        for key, t in quantize_weight(kernels.layer_mode(quantization, layer), w,
                                      quantization["groupsize"]).items():
            getattr(module, key).copy_(t)
        if getattr(module, "bias", None) is not None:
            module.bias.normal_(0.0, 0.02)
    return to_device(model, device, dtype)


# ---- the layers that talk ------------------------------------------------------------------------

class RowParallel(nn.Module):
    """A row-parallel linear layer: this rank's partial product x_r @ W_r^T, summed over the ranks.
    A functional collective, so torch.compile traces it into the graph (and the CUDA graph) of the
    decode step."""

    def __init__(self, linear: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        assert getattr(linear, "bias", None) is None, (
            "a row-parallel bias would be added once per rank")
        self.linear, self.group = linear, group

    def forward(self, x: Tensor) -> Tensor:
        return funcol.all_reduce(self.linear(x), "sum", self.group)  # (..., out_features)


class VocabParallel(nn.Module):
    """The output layer split by vocabulary rows: each rank's logits placed at its rows of a zero
    row of the whole vocabulary, then one all-reduce, the collective RowParallel uses too (adding
    zeros is exact). At decode a row of logits is a few hundred kilobytes: the collective's
    latency, not its bytes, is what it costs."""

    def __init__(self, linear: nn.Module, vocab_size: int, rank: int, world: int,
                 group: dist.ProcessGroup):
        super().__init__()
        self.linear, self.vocab_size, self.group = linear, vocab_size, group
        self.rank, self.world = rank, world

    def forward(self, x: Tensor) -> Tensor:
        logits = self.linear(x)  # (B, T, vocab_per_rank)
        share = logits.size(-1)
        # (B, T, world * vocab_per_rank)
        logits = F.pad(logits, (self.rank * share, (self.world - 1 - self.rank) * share))
        # The last rank's padding dropped.
        return funcol.all_reduce(logits, "sum", self.group)[..., :self.vocab_size]


def parallelize(model: Transformer, rank: int, world: int, group: dist.ProcessGroup) -> Transformer:
    """Put the collectives in: after each row-parallel layer, and after a vocabulary-split output
    layer."""
    for layer in model.layers:
        layer.attention.wo = RowParallel(layer.attention.wo, group)
        if model.args.n_experts:  # the experts' partial outputs, weighted and summed, then reduced
            layer.feed_forward = RowParallel(layer.feed_forward, group)
        else:
            layer.feed_forward.w2 = RowParallel(layer.feed_forward.w2, group)
    if SHARD_OUTPUT:
        model.output = VocabParallel(model.output, model.args.vocab_size, rank, world, group)
    return model


# ---- the scripts' entry points ------------------------------------------------------------------

def start(args, config: ModelArgs, device: torch.device) -> torch.device:
    """Under torchrun, before any weights are read: check that the model splits over the
    processes (every rank fails alike, and rank 0 says why), then join the process group. Returns
    this rank's device. args: generate.py's, eval.py's or server.py's command line, with
    checkpoint_path and, where the script has them, random_weights, random_quantization,
    interactive, json, profile and output."""
    global STARTED
    if getattr(args, "interactive", False):
        raise InputError("--interactive is not supported under torchrun: every process would need "
                         "the prompt")
    world = world_size()
    shard_args(config, world)
    if getattr(args, "random_weights", None):
        quantization = random_config(args.random_weights,
                                     getattr(args, "random_quantization", None))[1]
    else:
        ckpt = read_checkpoint(args.checkpoint_path)
        open_weights(ckpt)  # a weights file that cannot load: every rank fails alike
        quantization = ckpt.quantization
    check_split_groups(config, quantization, world)
    STARTED = True
    if rank() != 0:
        for output in ("json", "profile", "output"):  # rank 0 writes them
            if hasattr(args, output):
                setattr(args, output, None)
    return init_process_group(device)


def load_model(args, device: torch.device, dtype) -> Transformer:
    """This rank's part of the model that args (as for start) asks for, its collectives in place;
    the whole model when there is one process (generate.py --random_quantization without
    torchrun)."""
    world = world_size()
    if getattr(args, "random_weights", None):
        model = random_shard(args.random_weights, getattr(args, "random_quantization", None), world,
                             device, dtype)
    else:
        model = load_shard(args.checkpoint_path, rank(), world, device, dtype)
    return parallelize(model, rank(), world, dist.group.WORLD) if world > 1 else model
