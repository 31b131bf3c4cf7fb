"""Quantize a checkpoint's linear layers to int8, int4 (rounded, or GPTQ) or fp8: weight-only, the
activations stay in the model's dtype.

    python quantize.py --checkpoint_path checkpoints/REPO --mode int8
    python quantize.py --checkpoint_path checkpoints/REPO --mode int4 --groupsize 32
    python quantize.py --checkpoint_path checkpoints/REPO --mode int4-gptq --calibration_file a.txt
    python generate.py --checkpoint_path checkpoints/REPO/model_int4.g32.pth --prompt "Hello"

Decoding at batch 1 reads every weight once per token, so it runs about as much faster as the
weights get smaller: int8 and fp8 halve the bytes of bf16; int4 reads 5 bits a weight with groups
of 32 (a bfloat16 scale and zero per 32 weights), 4.25 with groups of 128.

Modes (N output features, K input features; each weight row is one output channel); the stored
layouts and the layers that multiply by them are in kernels.py:
  int8  symmetric per channel: q = round(w / s), s = amax|w[n]| / 127.
  int4  asymmetric per group of `groupsize` input columns, in the convention of PyTorch's int4
        kernels: scale = (max - min) / 15, zero = min + 8 * scale,
        q = round((w - zero) / scale) + 8 in [0, 15].
        Rounding to nearest has no error compensation, so small groups are where its accuracy comes
        from (default 32); 128 reads 15 % fewer bytes and suits GPTQ, which compensates.
  fp8   e4m3 per channel: s = amax|w[n]| / 448. e4m3 keeps 3 mantissa bits: for the same bytes its
        rounding error is larger than int8's. Loads on GPUs of compute capability >= 8.9 and on
        CPUs.
  int4-gptq  int4's format, with the nibbles and group parameters chosen by GPTQ (Frantar et al.
        2022): each layer is quantized column by column, every column's rounding error pushed onto
        the columns still to come through the inverse Hessian of the layer's inputs,
        H = 2/n sum x^T x over calibration text. Blocks are done one at a time, the calibration
        activations flowing on through each quantized block, so memory holds one block's float
        weights plus the activations.

The output layer is a few percent of the bytes read per token in large models (a fifth of SmolLM2's
in float32, over half once its other layers are int4), and the layer that picks the token is the
most sensitive to rounding: every mode quantizes it to int8 per channel by default (--output_layer),
which costs next to nothing in accuracy; it can also stay in float or take the mode of the other
layers.

Files go next to the input unless --out says otherwise (another folder also gets copies of the
tokenizer files): model_int8.pth, model_int4.g32.pth, model_int4-gptq.g128.pth, model_fp8.pth
(plain tensors, torch.save; loaded with weights_only=True), each with a sidecar config of the same
stem (model_int8.json): the ModelArgs fields plus a "quantization" record, so that nothing is
guessed from the file name. They are written as one set.
"""
import argparse
import json
import math
import re
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from checkpoint import (JOURNAL, TOKENIZER_FILES, WEIGHT_FILES, ArgumentParser, Checkpoint,
                        InputError, WeightsFile, check_device, check_readable, check_tensors,
                        check_writable, copier, empty_model, on_meta, read_checkpoint, read_json,
                        script_exits, write_files, write_pth)
from kernels import (FORMAT, FP8_MAX, GROUPSIZES, INT4_MODES, int4_dequantize, int4_padded_k,
                     layer_mode, record_padding)
from model import (Experts, KVCache, ModelArgs, RMSNorm, Rows, TransformerBlock,
                   attention_mask, rope_table)
from tokenizer import check_ids_fit, load_tokenizer

MODES = ("int8", "int4", "int4-gptq", "fp8")
DEFAULT_GROUPSIZE = 32
# GPTQ compensates its rounding error: large groups keep most of g32's accuracy
GPTQ_DEFAULT_GROUPSIZE = 128
# see --output_layer
DEFAULT_OUTPUT_MODE = "int8"
# weights are quantized this many rows at a time: float32 temporaries stay small
ROWS_PER_CHUNK = 4096


# ---- int8 ----------------------------------------------------------------------------------------

def quantize_int8(w: Tensor) -> dict:
    """w (N, K) -> weight int8 (N, K) and per-channel scales (N,) in w's dtype: w ~ weight *
    scales[:, None]."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1)  # (N,)
    # q is rounded against the scale as stored (w's dtype), the value the model will multiply by.
    scales = torch.where(amax > 0, amax / 127, 1.0).to(w.dtype)
    q = (w32 / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)  # (N, K)
    return {"weight": q, "scales": scales}


# ---- int4 ----------------------------------------------------------------------------------------
# The pieces GPTQ reuses: it quantizes column by column with group parameters set as it goes.

def int4_group_params(w: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and zero of each group of weights along the last dim of w (..., G), float32 (...,)
    holding bfloat16 values: they are stored as bfloat16, and q must be rounded against the stored
    values."""
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    # the clamp keeps constant groups finite
    scales = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
    zeros = (lo + 8 * scales).to(torch.bfloat16).float()
    # zero's rounding (up to |zero| / 512) moves a group that lies far from 0 for its width past
    # the nibbles' range at one end by more than half a step: such a group takes a wider step
    past = ((hi - zeros) / scales > 7.5) | ((zeros - lo) / scales > 8.5)
    wider = torch.maximum((hi - zeros) / 7, (zeros - lo) / 8).to(torch.bfloat16).float()
    return torch.where(past, wider, scales), zeros


def int4_quantize(w: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """Nibbles (uint8 in [0, 15]) of w given broadcastable scales and zeros: round((w - zero) /
    scale) + 8."""
    return ((w - zeros) / scales + 8).round().clamp(0, 15).to(torch.uint8)


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) nibbles -> (N, K / 2) uint8, column 2i in the high nibble: the order
    _convert_weight_to_int4pack (CUDA) reads its uint8 input in."""
    return q[:, 0::2] << 4 | q[:, 1::2]


def int4_tensors(q: Tensor, scales: Tensor, zeros: Tensor) -> dict:
    """What a file stores per int4 layer (RTN and GPTQ alike): nibbles (N, K_pad) packed two to a
    byte, scales and zeros (N, n_groups) as bfloat16 (exact: int4_group_params made them bfloat16
    values)."""
    return {"weight": pack_int4(q), "scales": scales.to(torch.bfloat16),
            "zeros": zeros.to(torch.bfloat16)}


def quantize_int4(w: Tensor, groupsize: int) -> dict:
    """w (N, K) -> packed weight (N, K_pad / 2), scales and zeros bfloat16 (N, K_pad /
    groupsize)."""
    N, K = w.shape
    k_pad = int4_padded_k(K, groupsize)
    w32 = F.pad(w.float(), (0, k_pad - K))  # (N, K_pad): zero columns, met by a zero-padded input
    groups = w32.view(N, k_pad // groupsize, groupsize)  # (N, n_groups, G)
    scales, zeros = int4_group_params(groups)  # (N, n_groups)
    q = int4_quantize(groups, scales[..., None], zeros[..., None]).view(N, k_pad)
    return int4_tensors(q, scales, zeros)


# ---- fp8 -----------------------------------------------------------------------------------------

def quantize_fp8(w: Tensor) -> dict:
    """w (N, K) -> e4m3 bit patterns uint8 (N, K) and float32 per-channel scales (N,) as int32 bit
    patterns."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1)  # (N,)
    scales = torch.where(amax > 0, amax / FP8_MAX, 1.0)  # (N,) float32
    # e4m3 has no inf: clamp, never NaN
    w8 = (w32 / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": w8.view(torch.uint8), "scale_bits": scales.view(torch.int32)}


# ---- a checkpoint's weights ----------------------------------------------------------------------

QUANTIZERS = {"int8": lambda w, g: quantize_int8(w), "int4": quantize_int4,
              "fp8": lambda w, g: quantize_fp8(w)}


def linear_names(args: ModelArgs, include_output: bool) -> list:
    """The layers to quantize: the linear layers and stacked experts. A mixture's router
    (feed_forward.gate) stays in float: it is a few kilobytes, and a rounding there picks other
    experts."""
    model = empty_model(args)
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Experts)) and (include_output or name != "output")
            and not name.endswith("feed_forward.gate")]


def quantize_weight(mode: str, w: Tensor, groupsize: Optional[int]) -> dict:
    """One weight (N, K) -> its quantized tensors, ROWS_PER_CHUNK rows at a time (every scheme is
    per row, and float32 temporaries stay small); stacked experts (n_experts, N, K) one expert at a
    time, their tensors stacked alike."""
    if w.dim() == 3:
        experts = [quantize_weight(mode, e, groupsize) for e in w]
        return {k: torch.stack([e[k] for e in experts]) for k in experts[0]}
    parts = [QUANTIZERS[mode](rows, groupsize) for rows in w.split(ROWS_PER_CHUNK)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def float_weights(source: WeightsFile, args: ModelArgs) -> Callable[[str], Tensor]:
    """get(name) -> one tensor of a float checkpoint whose every tensor was checked, by name and
    shape, against the config's model; a tied output layer reads the embedding."""
    check_tensors(source.shapes, empty_model(args), f"{source.path} does not match its config")

    def get(name: str) -> Tensor:
        if name == "output.weight" and args.tie_embeddings:
            name = "tok_embeddings.weight"
        t = source.tensor(name)
        if not t.is_floating_point():
            raise InputError(f"{source.path}: {name} is {t.dtype}, not float: quantize a float "
                             "checkpoint")
        return t
    return get


def unquantized_weights(get: Callable, args: ModelArgs, layers: list) -> dict:
    """The weights that stay as they are (embedding, norms, biases): every one but the layers'."""
    quantized = {f"{layer}.weight" for layer in layers}
    return {name: get(name) for name in empty_model(args).state_dict()
            if name not in quantized and not (name == "output.weight" and args.tie_embeddings)}


def quantize_state_dict(source: WeightsFile, args: ModelArgs, mode: str, groupsize: Optional[int],
                        output_mode: Optional[str], progress: bool = False):
    """Quantize a float checkpoint read a tensor at a time, so no second float copy exists; the
    output layer to output_mode (None: kept in float). Returns (state_dict, config of the
    quantized model, its "quantization" record)."""
    get = float_weights(source, args)
    layers = linear_names(args, include_output=output_mode is not None)
    qargs, quantization = quantized_config(args, mode, groupsize, output_mode, layers, {})
    out = unquantized_weights(get, args, layers)
    # disable=None: the bar shows on a terminal only, never in logs or captured output.
    for layer in tqdm(layers, desc=f"quantizing to {mode}", unit="layer",
                      disable=None if progress else True):
        w = get(f"{layer}.weight")  # (N, K)
        this_mode = layer_mode(quantization, layer)
        for key, t in quantize_weight(this_mode, w, groupsize).items():
            out[f"{layer}.{key}"] = t
        if this_mode == "int4":
            record_padding(quantization["padded"], layer, w.shape[-1], groupsize)
    return out, qargs, quantization


def quantized_config(args: ModelArgs, mode: str, groupsize: Optional[int],
                     output_mode: Optional[str], layers: list,
                     padded: dict) -> tuple[ModelArgs, dict]:
    """The quantized checkpoint's ModelArgs and its sidecar's quantization record. A quantized
    output layer no longer shares the embedding (which is only looked up, and stays in the model's
    dtype)."""
    qargs = replace(args, tie_embeddings=args.tie_embeddings and output_mode is None)
    quantization = dict(format=FORMAT, mode=mode,
                        groupsize=groupsize if mode in INT4_MODES else None,
                        output_mode=output_mode, layers=layers, padded=padded)
    return qargs, quantization


# ---- GPTQ: int4 with error compensation (Frantar et al. 2022) ------------------------------------

# columns quantized between two updates of the rest of the matrix (the paper's lazy batches)
GPTQ_BLOCKSIZE = 128
# calibration tokens per block forward: bounds the attention and FFN temporaries
GPTQ_TOKENS_PER_FORWARD = 4096
# the layers GPTQ quantizes in each block
GPTQ_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")
DEFAULT_DAMP = 0.01
DEFAULT_CALIBRATION_SAMPLES = 128
DEFAULT_CALIBRATION_SEQ_LEN = 512


@torch.no_grad()
def gptq_int4(w: Tensor, hessian: Tensor, groupsize: int, damp: float = DEFAULT_DAMP,
              act_order: bool = False, blocksize: int = GPTQ_BLOCKSIZE) -> tuple[dict, Tensor]:
    """GPTQ one weight w (N, K) given the Hessian of its layer's inputs H = 2/n sum x^T x (K, K).
    Returns the int4 tensors (quantize_int4's layout) and the float32 weights (N, K) they dequantize
    to, bit for bit what Int4Linear.dequantize() computes from them.

    Columns are rounded one at a time; each one's error is pushed onto the columns not yet rounded,
    weighted by the inverse Hessian, so that correlated inputs cancel it. The weights come from the
    upper Cholesky factor U of H^-1: column j's error is (w_j - dq_j) / U_jj and row j of U holds
    the updates of the later columns."""
    N, K = w.shape
    assert hessian.shape == (K, K), (
        f"Hessian {tuple(hessian.shape)} does not match weight {tuple(w.shape)}")
    assert blocksize % groupsize == 0 or groupsize % blocksize == 0, (
        f"blocksize {blocksize} and groupsize {groupsize}: one must divide the other")
    k_pad = int4_padded_k(K, groupsize)
    # W is updated in place and ends up holding the dequantized weights, column by column: no second
    # copy. (N, K_pad): padding columns are zero, as in quantize_int4
    W = F.pad(w.float(), (0, k_pad - K))
    # (K_pad, K_pad): padding inputs are zero
    H = F.pad(hessian.float(), (0, k_pad - K, 0, k_pad - K))
    # Dead inputs (always zero, padding included): a unit diagonal keeps H invertible and leaves
    # their rows and columns of H, hence of U, empty, so their error reaches no other column. Their
    # weights never matter: zero.
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    n_groups = k_pad // groupsize
    if act_order:
        # Largest inputs first, while many columns are left to absorb their error. The kernels need
        # each group to be its contiguous columns, whose members are now processed at scattered
        # times, so each group's scale and zero are fixed up front from the weights as they are
        # ("static groups").
        scales, zeros = int4_group_params(W.view(N, n_groups, groupsize))  # (N, n_groups)
        # (K_pad,) processing order
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        scales, zeros = W.new_zeros(N, n_groups), W.new_zeros(N, n_groups)
        perm = torch.arange(k_pad, device=W.device)
    group = (perm // groupsize).tolist()  # the file's group of each column, in processing order
    # dampening: a well-conditioned inverse for few samples, a fraction of the live inputs' mean
    # (the dead ones' unit diagonal is no input's: 64 of 640 columns would raise it ~50-fold)
    damping = damp * (H.diagonal()[~dead].mean() if not dead.all() else H.new_ones(()))
    if not damping.isfinite():
        raise InputError(f"GPTQ: --damp {damp} overflows float32 (a damp that large is rounding to "
                         "nearest: --mode int4)")
    H.diagonal().add_(damping)
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        # H^-1 = U^T U, (K_pad, K_pad)
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise InputError("GPTQ: the Hessian of the layer's inputs is not positive definite with "
                         f"--damp {damp}: raise it")
    q = torch.empty(N, k_pad, dtype=torch.uint8, device=W.device)  # nibbles, processing order
    for i1 in range(0, k_pad, blocksize):
        i2 = min(i1 + blocksize, k_pad)
        block, U_block = W[:, i1:i2], U[i1:i2, i1:i2]  # views: updates land in W
        err = torch.empty(N, i2 - i1, device=W.device)  # (N, B) the block's scaled errors
        for c in range(i2 - i1):
            j, g = i1 + c, group[i1 + c]
            if not act_order and j % groupsize == 0:
                # Standard GPTQ groups: the parameters of the weights as every earlier column left
                # them. All of the group is current: it lies inside this block, or starts it
                # (blocksize divides groupsize).
                scales[:, g], zeros[:, g] = int4_group_params(W[:, j:j + groupsize])
            s, z = scales[:, g], zeros[:, g]  # (N,)
            q[:, j] = int4_quantize(block[:, c], s, z)
            dq = int4_dequantize(q[:, j], s, z)  # (N,)
            err[:, c] = (block[:, c] - dq) / U_block[c, c]
            block[:, c] = dq
            # (N, B - c - 1): the block, at once
            block[:, c + 1:] -= err[:, c, None] * U_block[None, c, c + 1:]
        # the columns after the block, lazily: one matmul per block
        W[:, i2:] -= err @ U[i1:i2, i2:]
    if act_order:
        inverse = torch.argsort(perm)
        q, W = q[:, inverse], W[:, inverse]
    return int4_tensors(q, scales, zeros), W[:, :K]


class Hessian:
    """H = 2/n sum x^T x over the n input rows x added so far: (K, K), float32."""

    def __init__(self):
        self.sum, self.rows = None, 0

    def add(self, x: Tensor):
        x = x.reshape(-1, x.shape[-1]).float()  # (rows, K)
        self.sum = x.t() @ x if self.sum is None else self.sum.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def value(self) -> Tensor:
        return self.sum * (2 / self.rows)


def collect_hessians(linears: dict, run: Callable[[], None]) -> dict:
    """{name: Hessian of the inputs of linears[name]} over what run() feeds them (forward hooks,
    removed after)."""
    hessians = {name: Hessian() for name in linears}
    handles = [linear.register_forward_hook(
                   lambda module, inputs, output, h=hessians[name]: h.add(inputs[0]))
               for name, linear in linears.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: h.value() for name, h in hessians.items()}


def calibration_tokens(tokenizer, text: str, samples: int, seq_len: int) -> Tensor:
    """(n, seq_len) token ids: up to `samples` windows spread evenly over the text, apart from each
    other (fewer if the text is short; an InputError if it holds less than one). Each window starts
    with BOS where the tokenizer adds one, as a prompt does."""
    ids = tokenizer.encode(text)
    bos = ids[:1] if ids and tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id else []
    ids = ids[len(bos):]
    span = seq_len - len(bos)
    if span < 1:
        raise InputError(f"--calibration_seq_len {seq_len} leaves no token after the BOS token "
                         "each sample starts with")
    n = min(samples, len(ids) // span)
    if n == 0:
        raise InputError(f"the calibration text has {len(ids)} tokens, fewer than one sample of "
                         f"--calibration_seq_len {seq_len}")
    stride = len(ids) // n  # >= span
    return torch.tensor([bos + ids[i * stride:i * stride + span] for i in range(n)])


@torch.no_grad()
def gptq_quantize_state_dict(source: WeightsFile, args: ModelArgs, groupsize: int,
                             output_mode: Optional[str], tokens: Tensor, damp: float = DEFAULT_DAMP,
                             act_order: bool = False, device="cpu", progress: bool = False):
    """GPTQ int4 of a float checkpoint (source) read tensor by tensor, one transformer
    block at a time: memory holds one block's float weights (float32), the calibration activations
    (samples, seq_len, dim) and the output built so far, never the float model. Returns what
    quantize_state_dict returns.

    The calibration tokens (samples, seq_len) are embedded, then for each block: its float weights
    are read; a forward over the activations collects each linear layer's Hessian; GPTQ quantizes
    the four linears; and a forward through the block with its dequantized weights makes the next
    block's inputs, so that each block compensates the errors of those before it. An output layer
    of mode int4-gptq gets GPTQ too, on the final norm's output; one of int8 is rounded per
    channel (where its weight is, the CPU). The blocks and GPTQ run in float32 on `device`; the
    files hold what RTN's hold."""
    get = float_weights(source, args)
    layers = linear_names(args, include_output=output_mode is not None)
    out = unquantized_weights(get, args, layers)
    samples, seq_len = tokens.shape
    batch = max(1, GPTQ_TOKENS_PER_FORWARD // seq_len)  # samples per forward
    x = out["tok_embeddings.weight"][tokens].to(device, torch.float32)  # (samples, seq_len, dim)
    # What Transformer.forward gives its blocks for a prefill of seq_len tokens from position 0.
    rope = rope_table(args, seq_len).to(device)[None]  # (1, seq_len, 2, 1, head_dim)
    input_pos = torch.arange(seq_len, device=device)
    mask = attention_mask(input_pos[None], seq_len, torch.float32)  # (1, 1, T, S): causal
    # shared by the blocks
    kv_cache = KVCache(batch, args.n_kv_heads, seq_len, args.head_dim, torch.float32, device)

    def forward(module: nn.Module, write: bool):
        for b in range(0, samples, batch):
            rows = Rows(input_pos.expand(min(batch, samples - b), seq_len), rope, mask)
            y = module(x[b:b + batch], [rows])  # (batch, seq_len, dim)
            if write:
                x[b:b + batch] = y

    def quantize(name: str, w: Tensor, hessian: Tensor) -> Tensor:
        try:
            tensors, dq = gptq_int4(w.to(device), hessian, groupsize, damp, act_order)
        except InputError as e:
            raise InputError(f"{name}: {e}") from None
        for key, t in tensors.items():
            out[f"{name}.{key}"] = t.cpu()
        record_padding(padded, name, w.shape[1], groupsize)
        return dq  # (N, K) float32

    padded = {}
    # disable=None: the bar shows on a terminal only, never in logs or captured output.
    for i in tqdm(range(args.n_layer), desc=f"GPTQ int4 g{groupsize}", unit="block",
                  disable=None if progress else True):
        prefix = f"layers.{i}."
        with on_meta():
            block = TransformerBlock(args)
        state = {k: out[prefix + k] if prefix + k in out else get(prefix + k)
                 for k in block.state_dict()}
        block.load_state_dict(state, strict=True, assign=True)
        del state
        block = block.to(device, torch.float32)
        block.attention.kv_cache = kv_cache
        linears = {name: block.get_submodule(name) for name in GPTQ_LINEARS}
        hessians = collect_hessians(linears, partial(forward, block, write=False))
        for name, linear in linears.items():
            linear.weight = nn.Parameter(quantize(prefix + name, linear.weight, hessians.pop(name)),
                                         requires_grad=False)
        forward(block, write=True)  # through the quantized block: the next block's inputs
        del block, linears
    if output_mode is not None:  # a tied output layer is the embedding
        w = out["tok_embeddings.weight"] if args.tie_embeddings else get("output.weight")
    if output_mode == "int8":
        out.update({f"output.{key}": t for key, t in quantize_weight("int8", w, None).items()})
    elif output_mode == "int4-gptq":
        norm = RMSNorm(args.dim, args.norm_eps).to(device)
        norm.weight = nn.Parameter(out["norm.weight"].to(device, torch.float32),
                                   requires_grad=False)
        hessian = Hessian()
        for b in range(0, samples, batch):
            hessian.add(norm(x[b:b + batch]))  # (batch, seq_len, dim): the output layer's inputs
        quantize("output", w, hessian.value())
    qargs, quantization = quantized_config(args, "int4-gptq", groupsize, output_mode, layers,
                                           padded)
    quantization["gptq"] = dict(damp=damp, act_order=act_order, static_groups=act_order,
                                blocksize=GPTQ_BLOCKSIZE, samples=samples, seq_len=seq_len)
    return out, qargs, quantization


# ---- the command line ----------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Quantize a checkpoint's linear layers (weight-only); "
                       "generate.py loads the result like any checkpoint. The top of quantize.py "
                       "and kernels.py describe the formats.")
    p.add_argument("--checkpoint_path", type=Path, required=True,
                   help="float checkpoint folder, or the weights file inside it")
    p.add_argument("--mode", default="int8",
                   help="int8 (per channel), int4 (groups, rounded to nearest), int4-gptq (the "
                   "int4 format, GPTQ's error compensation from calibration text) or fp8 "
                   "(e4m3 per channel; GPUs of compute capability >= 8.9 and CPUs); default int8")
    p.add_argument("--groupsize", type=int, default=None,
                   help="int4 and int4-gptq: input columns per scale and zero (default "
                   f"{DEFAULT_GROUPSIZE} for int4: rounding to nearest has no error "
                   "compensation, so small groups are its accuracy; "
                   f"{GPTQ_DEFAULT_GROUPSIZE} for int4-gptq, which compensates)")
    p.add_argument("--output_layer", default=DEFAULT_OUTPUT_MODE,
                   help="the output layer's format: int8 (per channel: it picks the token, the "
                   "layer most sensitive to rounding, and int8 costs it next to nothing), "
                   "float (kept as it is), or the --mode of the other layers (default "
                   f"{DEFAULT_OUTPUT_MODE}). A tied output layer is untied when quantized; the "
                   "embedding stays in the model's dtype")
    p.add_argument("--out", type=Path,
                   help="output weights file, a .pth (default: model_MODE.pth or "
                   "model_MODE.gSIZE.pth beside the input); its config goes beside it with "
                   "the same stem and .json; in another folder, the checkpoint's tokenizer "
                   "files are copied beside it")
    gptq = p.add_argument_group("int4-gptq", "GPTQ (Frantar et al. 2022) quantizes one transformer "
                                "block at a time: memory holds one block's float weights and the "
                                "calibration activations, never the whole float model")
    gptq.add_argument("--calibration_file", type=Path, default=None,
                      help="UTF-8 text whose inputs the quantized layers should reproduce "
                      "(default: Python's own documentation, pydoc_data.topics)")
    gptq.add_argument("--calibration_samples", type=int, default=None,
                      help=f"sequences taken from the text, spread evenly over it (default "
                      f"{DEFAULT_CALIBRATION_SAMPLES}; fewer if the text is short)")
    gptq.add_argument("--calibration_seq_len", type=int, default=None,
                      help=f"tokens per sequence (default {DEFAULT_CALIBRATION_SEQ_LEN}: with "
                      "the default samples, several times the widest layer input of a "
                      "7B-8B model, so every Hessian is well determined)")
    gptq.add_argument("--damp", type=float, default=None,
                      help="added to the Hessian's diagonal, as a fraction of its mean (default "
                      f"{DEFAULT_DAMP})")
    gptq.add_argument("--act_order", action="store_true", default=None,
                      help="quantize columns in order of decreasing input energy (diag H); each "
                      "group's scale and zero are fixed up front (static groups) so groups "
                      "stay contiguous for the int4 kernels (default off)")
    gptq.add_argument("--device", default=None,
                      help="where GPTQ computes, in float32 (default: cuda if available, else cpu)")
    args = p.parse_args(argv)
    check_args(args)
    return args


GPTQ_OPTIONS = ("calibration_file", "calibration_samples", "calibration_seq_len", "damp",
                "act_order", "device")


def check_args(args):
    """Fill in the defaults that depend on the mode; refuse bad values in one sentence."""
    if args.mode not in MODES:
        raise InputError(f"unknown --mode {args.mode!r}: choose one of {', '.join(MODES)}")
    if args.groupsize is not None and args.groupsize not in GROUPSIZES:
        raise InputError(f"--groupsize must be one of {', '.join(map(str, GROUPSIZES))}, got "
                         f"{args.groupsize}")
    if args.mode not in INT4_MODES and args.groupsize is not None:
        raise InputError(f"--groupsize is for --mode int4 and int4-gptq, not {args.mode}")
    if args.mode in INT4_MODES and args.groupsize is None:
        args.groupsize = GPTQ_DEFAULT_GROUPSIZE if args.mode == "int4-gptq" else DEFAULT_GROUPSIZE
    choices = list(dict.fromkeys(["int8", "float", args.mode]))  # the --mode's own, if not int8
    if args.output_layer not in choices:
        raise InputError(f"--output_layer {args.output_layer!r}: choose one of "
                         f"{', '.join(choices)} (with --mode {args.mode})")
    args.output_mode = None if args.output_layer == "float" else args.output_layer
    given = [f"--{name}" for name in GPTQ_OPTIONS if getattr(args, name) is not None]
    if args.mode != "int4-gptq" and given:
        raise InputError(f"{', '.join(given)}: for --mode int4-gptq, not {args.mode}")
    if args.mode == "int4-gptq":
        for name, default in (("calibration_samples", DEFAULT_CALIBRATION_SAMPLES),
                              ("damp", DEFAULT_DAMP),
                              ("calibration_seq_len", DEFAULT_CALIBRATION_SEQ_LEN),
                              ("act_order", False)):
            if getattr(args, name) is None:
                setattr(args, name, default)
        if args.calibration_samples < 1 or args.calibration_seq_len < 1:
            raise InputError("--calibration_samples and --calibration_seq_len must be at least 1")
        if not args.damp >= 0 or args.damp == math.inf:
            raise InputError(f"--damp must be a finite number >= 0, got {args.damp}")
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(args.device, "--device")
    if args.out is not None and args.out.suffix != ".pth":
        raise InputError(f"--out {args.out}: name the weights file, ending in .pth (its config "
                         "goes beside it as .json)")


def output_path(args, ckpt: Checkpoint) -> Path:
    """Where the quantized weights go, checked before any work: never over the source checkpoint's
    files (model.pth / model.safetensors are float weights described by config.json, so a
    quantized file of that name would hijack it; its sidecar must not replace config.json, the
    source's own config, another weights file's or a tokenizer file) nor over the calibration
    text, in a folder that exists and is writable."""
    name = (f"model_{args.mode}.g{args.groupsize}.pth" if args.mode in INT4_MODES
            else f"model_{args.mode}.pth")
    out = args.out or ckpt.weights.parent / name
    sidecar = out.with_suffix(".json").name
    written = (out.resolve(), out.with_suffix(".json").resolve())
    if out.resolve() == ckpt.weights.resolve():
        problem = "is the source checkpoint's weights"
    elif out.name in WEIGHT_FILES:
        problem = "is named as a folder's float weights (the ones config.json describes)"
    elif sidecar in ("config.json", JOURNAL) or sidecar in TOKENIZER_FILES:
        problem = f"would have its config written to {sidecar}, a file of the folder's own"
    elif ckpt.config.resolve() in written:
        problem = f"would have its config written over the source's config {ckpt.config.name}"
    elif out.with_suffix(".safetensors").is_file() and out.with_suffix(".json").is_file():
        problem = (f"would have its config written over {sidecar}, the config of "
                   f"{out.with_suffix('.safetensors').name}")
    elif args.calibration_file is not None and args.calibration_file.resolve() in written:
        problem = "would write over the calibration file"
    elif ((out.is_file() or out.with_suffix(".json").is_file())
          and not is_quantized_config(out.with_suffix(".json"))):  # a quantized file is replaced
        problem = (f"would write over {out.name} or {sidecar}, files that are not a quantized "
                   "checkpoint's")
    else:
        problem = None
    if problem is not None:
        raise InputError(f"--out {out} {problem}; choose another name" + (
            f", e.g. the default {name}" if out.name != name else ""))
    check_writable(out, "--out")
    check_writable(out.with_suffix(".json"), "--out's config")
    return out


def is_quantized_config(path: Path) -> bool:
    """Whether path holds the config that quantize.py writes beside its weights."""
    try:
        return "quantization" in read_json(path)
    except InputError:  # not a file, not text, not a JSON object
        return False


def tokenizer_copies(ckpt: Checkpoint, out: Path) -> dict:
    """The checkpoint's tokenizer files to write beside an --out in another folder, so that the
    quantized file loads with its tokenizer ({name: writer}); refused before any work where that
    folder holds a tokenizer file of its own that differs."""
    if out.parent.resolve() == ckpt.folder.resolve():
        return {}
    copies = {}
    for name in TOKENIZER_FILES:
        source, there = ckpt.folder / name, out.parent / name
        for f in (source, there):  # read after the quantization: refused before it
            if f.is_file():
                check_readable(f)
        if there.exists() and not (source.is_file() and there.is_file()
                                   and there.read_bytes() == source.read_bytes()):
            raise InputError(f"--out {out}: its folder holds a {name} that is not the "
                             "checkpoint's; write into the checkpoint's folder or another one")
        if source.is_file() and not there.exists():
            copies[name] = copier(source)
    return copies


def read_calibration(args, folder: Path) -> tuple[Tensor, str]:
    """The calibration token ids (at most samples rows of seq_len: fewer from a short text) for GPTQ
    and the name of their source."""
    if args.calibration_file is None:
        import pydoc_data.topics
        text, source = "\n".join(pydoc_data.topics.topics.values()), "pydoc_data.topics"
    else:
        try:
            text, source = (args.calibration_file.read_text(encoding="utf-8"),
                            args.calibration_file.name)
        except UnicodeDecodeError as e:
            raise InputError(f"calibration file {args.calibration_file} is not UTF-8 text "
                             f"({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise InputError(f"cannot read calibration file {args.calibration_file}: {e}") from None
    tokens = calibration_tokens(load_tokenizer(folder), text, args.calibration_samples,
                                args.calibration_seq_len)
    return tokens, source


def run(args):
    ckpt = read_checkpoint(args.checkpoint_path)
    if ckpt.quantization is not None:
        raise InputError(f"{ckpt.weights} is quantized already: quantize the float checkpoint "
                         "instead")
    if args.mode == "int4-gptq" and ckpt.args.n_experts:
        raise InputError("int4-gptq does not calibrate a mixture of experts (each expert would "
                         "need the tokens routed to it): use --mode int4, int8 or fp8")
    out = output_path(args, ckpt)
    tokenizer_files = tokenizer_copies(ckpt, out)
    source = WeightsFile(ckpt.weights)
    if args.mode == "int4-gptq":
        if args.calibration_seq_len > ckpt.args.block_size:
            raise InputError(f"--calibration_seq_len {args.calibration_seq_len} is longer than the "
                             f"model's block_size {ckpt.args.block_size}")
        # before the weights: fail at once
        tokens, calibration = read_calibration(args, ckpt.folder)
        check_ids_fit(tokens.flatten().tolist(), ckpt.args.vocab_size)
        if len(tokens) < args.calibration_samples:
            print(f"calibration: the text holds {len(tokens)} samples of "
                  f"{args.calibration_seq_len} tokens, not {args.calibration_samples}")
        started = time.perf_counter()
        state_dict, qconfig, quantization = gptq_quantize_state_dict(source, ckpt.args,
                                                                     args.groupsize,
                                                                     args.output_mode, tokens,
                                                                     args.damp, args.act_order,
                                                                     args.device, progress=True)
        quantization["gptq"]["calibration"] = calibration
        print(f"GPTQ: {len(tokens)} x {tokens.shape[1]} tokens of {calibration}, damp {args.damp}"
              f"{', act_order (static groups)' if args.act_order else ''}, on {args.device}: "
              f"{time.perf_counter() - started:.0f} s")
    else:
        state_dict, qconfig, quantization = quantize_state_dict(
            source, ckpt.args, args.mode, args.groupsize, args.output_mode, progress=True)
    quantization["source"] = ckpt.weights.name
    config = json.dumps({**asdict(qconfig), "quantization": quantization}, indent=2) + "\n"
    write_files(out.parent, {out.name: partial(write_pth, state_dict),
                             out.with_suffix(".json").name: lambda tmp: tmp.write_text(config),
                             **tokenizer_files})
    for pattern, (k, k_pad) in {re.sub(r"\.\d+\.", ".*.", name): ks
                                for name, ks in quantization["padded"].items()}.items():
        print(f"padded: {pattern} K {k} -> {k_pad} (zero columns, to whole groups of "
              f"{args.groupsize})")
    size = f"{ckpt.weights.stat().st_size / 1e6:.1f} MB -> {out.stat().st_size / 1e6:.1f} MB"
    print(f"{args.mode}{f' g{args.groupsize}' if args.groupsize else ''}: "
          f"{len(quantization['layers'])} linear layers, output layer "
          f"{args.output_mode or 'kept in float'}; {size}; wrote {out} and "
          f"{', '.join([out.with_suffix('.json').name, *tokenizer_files])}")


def main(argv=None):
    with script_exits():
        run(parse_args(argv))


if __name__ == "__main__":
    main()
