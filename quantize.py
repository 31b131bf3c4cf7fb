"""Quantize a checkpoint's linear layers to int8, int4 or fp8 (weight-only: activations stay in the model dtype).

    python quantize.py --checkpoint_path checkpoints/REPO/model.safetensors --mode int8
    python quantize.py --checkpoint_path checkpoints/REPO --mode int4 --groupsize 32
    python quantize.py --checkpoint_path checkpoints/REPO --mode fp8 --include_output
    python generate.py --checkpoint_path checkpoints/REPO/model_int4.g32.pth --prompt "Hello"

Decoding at batch 1 reads every weight once per token, so it runs about as much faster as the weights get
smaller: int8 and fp8 halve the bytes of bf16; int4 reads 5 bits a weight with groups of 32 (a bfloat16 scale
and zero per 32 weights), 4.25 with groups of 128.

Modes (N output features, K input features; each weight row is one output channel):
  int8  symmetric per channel: q = round(w / s), s = amax|w[n]| / 127. Forward: linear(x, q) * s.
  int4  asymmetric per group of `groupsize` input columns, in the convention of PyTorch's int4 kernels
        (tinygemm on CUDA, the _for_cpu op on CPU): scale = (max - min) / 15, zero = min + 8 * scale,
        q = round((w - zero) / scale) + 8 in [0, 15], w ~ (q - 8) * scale + zero. On CUDA in bfloat16 the
        tinygemm kernel does the matmul; elsewhere the weights are dequantized and F.linear does it.
        Default group size 32: rounding to nearest (RTN) has no error compensation, so small groups are
        where its accuracy comes from; 128 reads 15 % fewer bytes and suits GPTQ, which compensates.
        One Llama-2-7B-shaped FFN at decode on an H100 (compiled, CUDA graphs): g32 55 us, g128 45 us
        (int8 73-78 us, bfloat16 100-109 us).
        On SmolLM2-135M (perplexity 11.91 in float32): g32 11.93, g64 15.75, g128 18.23, g256 22.86; its
        weights came from a Q4_1 file (4-bit groups of 32), which exaggerates the gap.
  fp8   e4m3 per channel: s = amax|w[n]| / 448. Forward: linear(x, w8) * s, or, with FP8_SCALED_MM set and a
        GPU of compute capability >= 9.0, the activations are quantized per token too and torch._scaled_mm
        runs one fp8 tensor-core matmul (slower at decode: see FP8_SCALED_MM). Refused at load on GPUs of
        compute capability < 8.9, which have no fp8 hardware (use int8 there); runs on the CPU. e4m3 keeps 3
        mantissa bits: its rounding error is ~4x int8's for the same bytes (SmolLM2: +1.9 % against +0.2 %).
  int4-gptq  reserved for GPTQ (same int4 file format); not yet supported.

The output layer (--include_output / --no-include_output) is 2-7 % of the bytes read per token in 7B-70B
models and 21 % in SmolLM2-135M, but the layer that picks the token is the most sensitive to rounding. Measured
on SmolLM2-135M (perplexity, first 2048 tokens of Python's pydoc topics; float32 11.91):
                output quantized    output kept in the model dtype
    int8        11.94 (+0.27 %)     11.93 (+0.21 %)
    fp8         12.47 (+4.7 %)      12.13 (+1.9 %)
    int4 g32    12.54 (+5.3 %)      11.93 (+0.15 %)
So by default it is quantized for int8 only, where it costs next to nothing. A tied output layer is untied by
quantization: the embedding table (only looked up, never quantized) stays in the model dtype.

Files, next to the input unless --out says otherwise: model_int8.pth, model_int4.g32.pth, model_fp8.pth (plain
tensors, torch.save; loaded with weights_only=True and mmap) and a config of the same stem, model_int8.json:
the ModelArgs fields plus "quantization": {format, mode, groupsize, layers, padded, ...}. model.read_config
prefers that sidecar over config.json, so the file name is never parsed. Stored per quantized layer:
  int8  weight int8 (N, K), scales (N,) in the checkpoint's float dtype
  int4  weight uint8 (N, K_pad / 2) nibble pairs (column 2i in the high nibble, 2i + 1 in the low one),
        scales and zeros bfloat16 (N, K_pad / groupsize); K_pad is K rounded up to the group size, the extra
        columns are zeros and the input is zero-padded to meet them (recorded in "padded", and printed)
  fp8   weight uint8 (N, K) (the e4m3 bit patterns), scale_bits int32 (N,) (the float32 bit patterns)
Integer storage keeps `model.to(dtype)` from ever casting quantized values; only the float layers and the
int8/int4 scales follow the model dtype. Layouts that depend on the device (tinygemm's) are made at load
time, after the move to the device, so a file quantized on one device loads on any other.
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import (CheckpointError, ModelArgs, Transformer, atomic_path, load_state_dict, read_config,
                   read_quantization, resolve_checkpoint)

FORMAT = 1  # version of the file layout above; a loader refuses versions it does not know
MODES = ("int8", "int4", "fp8")  # and "int4-gptq", reserved
GROUPSIZES = (32, 64, 128, 256)  # the group sizes tinygemm supports
DEFAULT_GROUPSIZE = 32
OUTPUT_BY_DEFAULT = {"int8": True, "int4": False, "fp8": False}  # see --include_output
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# fp8 forward on CUDA (compute capability >= 9.0): True quantizes activations per token and calls
# torch._scaled_mm; False converts the weight to the model dtype inside the compiled matmul (F.linear).
# At decode (M = 1) on an H100 (torch 2.11, compiled with CUDA graphs, one Llama-2-7B-shaped FFN, two runs):
# F.linear 78 / 91 us, _scaled_mm 90 / 93 us (bfloat16 100 / 109 us). _scaled_mm is the one to try for prefill.
FP8_SCALED_MM = False
ROWS_PER_CHUNK = 4096  # weights are quantized this many rows at a time: float32 temporaries stay small


def frozen(t: Tensor) -> nn.Parameter:
    # Parameters rather than buffers: generate.py counts the bytes read per step over model.parameters().
    return nn.Parameter(t, requires_grad=False)


# ---- int8 ---------------------------------------------------------------------------------------------

def quantize_int8(w: Tensor) -> dict:
    """w (N, K) -> weight int8 (N, K) and per-channel scales (N,) in w's dtype: w ~ weight * scales[:, None]."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1)  # (N,)
    # q is rounded against the scale as stored (w's dtype), the value the model will multiply by.
    scales = torch.where(amax > 0, amax / 127, 1.0).to(w.dtype)
    q = (w32 / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)  # (N, K)
    return {"weight": q, "scales": scales}


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, **_):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = frozen(torch.empty(out_features, in_features, dtype=torch.int8))
        self.scales = frozen(torch.empty(out_features))
        self.bias = frozen(torch.empty(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        # The int8 -> x.dtype conversion fuses into the matmul under torch.compile: int8 bytes are read.
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales  # (..., N)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> Tensor:
        return self.weight.float() * self.scales.float()[:, None]  # (N, K)


# ---- int4 (the pieces GPTQ reuses: it quantizes column by column with group parameters set as it goes) ----

def int4_padded_k(in_features: int, groupsize: int) -> int:
    """K rounded up to a whole number of groups (which also meets tinygemm's K % (16 * inner_k_tiles))."""
    return -(-in_features // groupsize) * groupsize


def int4_group_params(w: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and zero of each group of weights along the last dim of w (..., G), float32 (...,) holding
    bfloat16 values: they are stored as bfloat16, and q must be rounded against the stored values."""
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()  # the clamp keeps constant groups finite
    zeros = (lo + 8 * scales).to(torch.bfloat16).float()
    return scales, zeros


def int4_quantize(w: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """Nibbles (uint8 in [0, 15]) of w given broadcastable scales and zeros: round((w - zero) / scale) + 8."""
    return ((w - zeros) / scales + 8).round().clamp(0, 15).to(torch.uint8)


def int4_dequantize(q: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """(q - 8) * scale + zero, in float32: the convention tinygemm and the CPU int4 op share."""
    return (q.float() - 8) * scales + zeros


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) nibbles -> (N, K / 2) uint8, column 2i in the high nibble: the order _convert_weight_to_int4pack
    (CUDA) reads its uint8 input in."""
    return q[:, 0::2] << 4 | q[:, 1::2]


def unpack_int4(packed: Tensor) -> Tensor:
    """(N, K / 2) uint8 -> (N, K) nibbles."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).view(packed.shape[0], -1)


def quantize_int4(w: Tensor, groupsize: int) -> dict:
    """w (N, K) -> packed weight (N, K_pad / 2), scales and zeros bfloat16 (N, K_pad / groupsize)."""
    N, K = w.shape
    k_pad = int4_padded_k(K, groupsize)
    w32 = F.pad(w.float(), (0, k_pad - K))  # (N, K_pad): zero columns, met by a zero-padded input
    groups = w32.view(N, k_pad // groupsize, groupsize)  # (N, n_groups, G)
    scales, zeros = int4_group_params(groups)  # (N, n_groups)
    q = int4_quantize(groups, scales[..., None], zeros[..., None]).view(N, k_pad)
    return {"weight": pack_int4(q), "scales": scales.to(torch.bfloat16), "zeros": zeros.to(torch.bfloat16)}


# Per device type: (convert the stored (N, K / 2) nibble pairs to the kernel's layout, the matmul op).
# tinygemm on CUDA; the CPU op shares its (q - 8) * scale + zero convention and stands in for it in CPU tests.
INT4_KERNELS = {
    "cuda": (lambda packed, tiles: torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), tiles),
             torch.ops.aten._weight_int4pack_mm),
    "cpu": (lambda packed, tiles: torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).int(), tiles),
            torch.ops.aten._weight_int4pack_mm_for_cpu),
}


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, groupsize: int,
                 padded_in_features: Optional[int] = None, **_):
        super().__init__()
        k_pad = padded_in_features or in_features
        assert k_pad % groupsize == 0 and k_pad >= in_features, f"K {in_features} padded to {k_pad}: not whole groups of {groupsize}"
        self.in_features, self.out_features, self.groupsize, self.padded_in_features = in_features, out_features, groupsize, k_pad
        self.weight = frozen(torch.empty(out_features, k_pad // 2, dtype=torch.uint8))
        self.scales = frozen(torch.empty(out_features, k_pad // groupsize, dtype=torch.bfloat16))
        self.zeros = frozen(torch.empty(out_features, k_pad // groupsize, dtype=torch.bfloat16))
        self.bias = frozen(torch.empty(out_features)) if bias else None
        self.kernel = None  # the int4 matmul op, once use_kernel() has repacked the weights for it

    def forward(self, x: Tensor) -> Tensor:
        y = self.kernel_forward(x) if self.kernel is not None else F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> Tensor:
        """The weights as float32 (N, K), padding dropped: the reference the kernels are compared with."""
        q = unpack_int4(self.weight).view(self.out_features, -1, self.groupsize)  # (N, n_groups, G)
        w = int4_dequantize(q, self.scales.float()[..., None], self.zeros.float()[..., None])
        return w.view(self.out_features, -1)[:, :self.in_features]

    def use_kernel(self, device_type: str):
        """Repack the weights for the device's int4 matmul (once, after the move to the device). The kernel
        takes scales and zeros in x's dtype (bfloat16 for tinygemm). The packed layout is device-specific, so
        the module's state_dict is no longer a checkpoint afterwards."""
        convert, self.kernel = INT4_KERNELS[device_type]
        n_pad = -self.out_features % 16  # the CPU op needs N % 16 == 0, tinygemm N % 8 == 0
        inner_k_tiles = next(t for t in (8, 4, 2) if self.padded_in_features % (16 * t) == 0)
        weight = F.pad(self.weight, (0, 0, 0, n_pad))  # (N_pad, K_pad / 2)
        scales_and_zeros = torch.stack([self.scales, self.zeros], dim=-1)  # (N, n_groups, 2)
        scales_and_zeros = F.pad(scales_and_zeros, (0, 0, 0, 0, 0, n_pad)).transpose(0, 1).contiguous()  # (n_groups, N_pad, 2)
        self.packed = frozen(convert(weight, inner_k_tiles))
        self.scales_and_zeros = frozen(scales_and_zeros)
        del self.weight, self.scales, self.zeros  # the packed copy replaces them: no second copy in memory

    def kernel_forward(self, x: Tensor) -> Tensor:
        K, N = self.in_features, self.out_features
        x2 = x.reshape(-1, K)  # (M, K)
        if self.padded_in_features != K:
            x2 = F.pad(x2, (0, self.padded_in_features - K))  # (M, K_pad): zeros meet the zero weight columns
        y = self.kernel(x2.contiguous(), self.packed, self.groupsize, self.scales_and_zeros)  # (M, N_pad)
        return y[:, :N].reshape(*x.shape[:-1], N)


# ---- fp8 ----------------------------------------------------------------------------------------------

def quantize_fp8(w: Tensor) -> dict:
    """w (N, K) -> e4m3 bit patterns uint8 (N, K) and float32 per-channel scales (N,) as int32 bit patterns."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1)  # (N,)
    scales = torch.where(amax > 0, amax / FP8_MAX, 1.0)  # (N,) float32
    w8 = (w32 / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # e4m3 has no inf: clamp, never NaN
    return {"weight": w8.view(torch.uint8), "scale_bits": scales.view(torch.int32)}


def fp8_scaled_mm(x: Tensor, w8: Tensor, w_scales: Tensor) -> Tensor:
    """x (..., K) -> (..., N) with one fp8 matmul: x is quantized to e4m3 per token (row) on the fly and
    torch._scaled_mm applies both scales in its epilogue. w8 (N, K) e4m3, w_scales (N,) float32."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    x_scales = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)  # (M, 1); all-zero rows stay zero
    x8 = (x2.float() / x_scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # (M, K)
    # w8.t() is column-major (K, N), the layout _scaled_mm wants for its second operand.
    y = torch._scaled_mm(x8, w8.t(), scale_a=x_scales, scale_b=w_scales[None, :], out_dtype=x.dtype)  # (M, N)
    return y.reshape(*x.shape[:-1], -1)


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, **_):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = frozen(torch.empty(out_features, in_features, dtype=torch.uint8))  # e4m3 bit patterns
        # float32 bit patterns: model.to(dtype) leaves integer tensors alone, and _scaled_mm takes float32 scales.
        self.scale_bits = frozen(torch.empty(out_features, dtype=torch.int32))
        self.bias = frozen(torch.empty(out_features)) if bias else None
        self.scaled_mm = False  # set by prepare_for_device

    def forward(self, x: Tensor) -> Tensor:
        w8, scales = self.weight.view(torch.float8_e4m3fn), self.scale_bits.view(torch.float32)  # (N, K), (N,)
        if self.scaled_mm:
            y = fp8_scaled_mm(x, w8, scales)
        else:
            y = (F.linear(x, w8.to(x.dtype)) * scales).to(x.dtype)  # (..., N)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> Tensor:
        return self.weight.view(torch.float8_e4m3fn).float() * self.scale_bits.view(torch.float32)[:, None]


# ---- models and checkpoints ---------------------------------------------------------------------------

QUANTIZERS = {"int8": lambda w, g: quantize_int8(w), "int4": quantize_int4, "fp8": lambda w, g: quantize_fp8(w)}
LINEARS = {"int8": Int8Linear, "int4": Int4Linear, "int4-gptq": Int4Linear, "fp8": Fp8Linear}  # GPTQ writes int4's format


def swap_linears(model: Transformer, quantization: dict):
    """Replace the nn.Linear layers that `quantization` lists by empty quantized ones of the same shapes
    (call it on the meta device; load_state_dict(assign=True) then brings the weights)."""
    if quantization.get("format") != FORMAT:
        raise CheckpointError(f"quantization format {quantization.get('format')!r} is not {FORMAT}: quantize the checkpoint again with this quantize.py")
    mode = quantization.get("mode")
    if mode not in LINEARS:
        raise CheckpointError(f"unknown quantization mode {mode!r}")
    padded = quantization.get("padded", {})
    for name in quantization["layers"]:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"quantized layer {name} is not a linear layer of this model")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LINEARS[mode](
            linear.in_features, linear.out_features, linear.bias is not None, groupsize=quantization.get("groupsize"),
            padded_in_features=padded.get(name, (None, None))[1]))


def prepare_for_device(model: Transformer):
    """After the model reached its device and dtype: pack int4 weights for tinygemm (CUDA, bfloat16) and
    choose the fp8 matmul, or refuse fp8 on a GPU that has no fp8."""
    dtype = model.tok_embeddings.weight.dtype  # the activations' dtype
    for module in model.modules():
        if isinstance(module, Int4Linear) and module.kernel is None and module.weight.is_cuda and dtype == torch.bfloat16:
            module.use_kernel("cuda")  # tinygemm takes bfloat16 only; other dtypes dequantize
        elif isinstance(module, Fp8Linear) and module.weight.is_cuda:
            device = module.weight.device
            capability = torch.cuda.get_device_capability(device)
            if capability < (8, 9):
                raise CheckpointError(f"fp8 weights need a GPU of compute capability 8.9 or newer; {torch.cuda.get_device_name(device)} "
                                      f"is {capability[0]}.{capability[1]}: quantize with --mode int8 instead")
            # _scaled_mm: both matrix dims of the weight % 16, row-wise scales on 9.0+ with bfloat16 output.
            module.scaled_mm = (FP8_SCALED_MM and capability >= (9, 0) and dtype == torch.bfloat16
                                and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def linear_names(args: ModelArgs, include_output: bool) -> list:
    with torch.device("meta"):
        model = Transformer(args)
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and (include_output or name != "output")]


def quantize_weight(mode: str, w: Tensor, groupsize: Optional[int]) -> dict:
    """One weight (N, K) -> its quantized tensors; ROWS_PER_CHUNK rows at a time (every scheme is per row)."""
    parts = [QUANTIZERS[mode](rows, groupsize) for rows in w.split(ROWS_PER_CHUNK)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def quantize_state_dict(names: list, get: Callable[[str], Tensor], args: ModelArgs, mode: str,
                        groupsize: Optional[int], include_output: bool, progress: bool = False):
    """Quantize a float state dict read tensor by tensor through get(name), so that no second full float copy
    exists. Returns (state_dict, config of the quantized model, its "quantization" record)."""
    from tqdm import tqdm
    layers = linear_names(args, include_output)
    if args.tie_embeddings:
        names = [name for name in names if name != "output.weight"]  # some writers store the tied copy too
    expected = set(_float_keys(args))
    missing, unexpected = expected - set(names), set(names) - expected
    if any(name.rpartition(".")[2] in ("scales", "zeros", "scale_bits") for name in unexpected):
        raise CheckpointError("the checkpoint is quantized already: quantize the float checkpoint instead")
    if missing or unexpected:
        raise CheckpointError(f"the weights do not match the config: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    quantized = {f"{layer}.weight" for layer in layers}
    out = {name: get(name) for name in names if name not in quantized}
    padded = {}
    # disable=None: the bar shows on a terminal only, never in logs or captured output.
    for layer in tqdm(layers, desc=f"quantizing to {mode}", unit="layer", disable=None if progress else True):
        source = "tok_embeddings.weight" if layer == "output" and args.tie_embeddings else f"{layer}.weight"
        w = get(source)  # (N, K)
        if not w.is_floating_point():
            raise CheckpointError(f"{source} is {w.dtype}, not float: the checkpoint is quantized already")
        for key, t in quantize_weight(mode, w, groupsize).items():
            out[f"{layer}.{key}"] = t
        if mode == "int4" and int4_padded_k(w.shape[1], groupsize) != w.shape[1]:
            padded[layer] = [w.shape[1], int4_padded_k(w.shape[1], groupsize)]
    untie = args.tie_embeddings and include_output  # the quantized output layer no longer shares the embedding
    qargs = ModelArgs(**{**args.to_dict(), "tie_embeddings": args.tie_embeddings and not untie})
    quantization = dict(format=FORMAT, mode=mode, groupsize=groupsize if mode == "int4" else None,
                        include_output=include_output, layers=layers, padded=padded)
    return out, qargs, quantization


def _float_keys(args: ModelArgs) -> list:
    """The names a float checkpoint of this config stores (a tied output layer is stored once, as the embedding)."""
    with torch.device("meta"):
        keys = list(Transformer(args).state_dict())
    return [k for k in keys if not (args.tie_embeddings and k == "output.weight")]


# ---- the command line ---------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Quantize a checkpoint's linear layers (weight-only); generate.py loads the "
                                "result like any checkpoint. See the top of quantize.py for the formats.")
    p.add_argument("--checkpoint_path", type=Path, required=True, help="float checkpoint folder, or the weights file inside it")
    p.add_argument("--mode", default="int8", help="int8 (per channel), int4 (groupwise, tinygemm's convention) or fp8 "
                   "(e4m3 per channel; runs on GPUs of compute capability >= 8.9 and on the CPU); default int8")
    p.add_argument("--groupsize", type=int, default=None, help=f"int4 only: input columns per scale and zero, one of "
                   f"{', '.join(map(str, GROUPSIZES))}. Default {DEFAULT_GROUPSIZE} (5 bits a weight): rounding to nearest "
                   "has no error compensation, so small groups are its accuracy; 128 reads 4.25 bits a weight (SmolLM2-135M "
                   "perplexity 11.91 in float32: g32 11.93, g128 18.23)")
    p.add_argument("--include_output", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the output layer too (2-7%% of the bytes read per token in 7B-70B models, 21%% in "
                   "SmolLM2-135M). Default: yes for int8, no for int4 and fp8, from SmolLM2-135M's perplexity with and "
                   "without it: int8 +0.27%% / +0.21%%, fp8 +4.7%% / +1.9%%, int4 g32 +5.3%% / +0.15%%. A tied output "
                   "layer is untied; the embedding stays in the model dtype")
    p.add_argument("--out", type=Path, help="output weights file (default: model_MODE.pth, model_int4.gSIZE.pth next to the "
                   "input); its config goes beside it with the same stem and .json. Keep it in the checkpoint folder: "
                   "generate.py reads the tokenizer from the weights file's folder")
    return p.parse_args(argv)


def check_args(args):
    """Fill in the defaults that depend on the mode; reject bad values with one sentence (ValueError)."""
    if args.mode == "int4-gptq":
        raise ValueError("--mode int4-gptq is not yet supported")
    if args.mode not in MODES:
        raise ValueError(f"unknown --mode {args.mode!r}: choose one of {', '.join(MODES)}")
    if args.mode != "int4" and args.groupsize is not None:
        raise ValueError(f"--groupsize is for --mode int4, not {args.mode}")
    if args.mode == "int4":
        args.groupsize = DEFAULT_GROUPSIZE if args.groupsize is None else args.groupsize
        if args.groupsize not in GROUPSIZES:
            raise ValueError(f"--groupsize must be one of {', '.join(map(str, GROUPSIZES))}, got {args.groupsize}")
    if args.include_output is None:
        args.include_output = OUTPUT_BY_DEFAULT[args.mode]
    if args.out is not None and args.out.suffix != ".pth":
        raise ValueError(f"--out {args.out}: name the weights file, ending in .pth (its config goes beside it as .json)")


def open_weights(weights: Path) -> tuple[list, Callable[[str], Tensor]]:
    """(names, get) of a float checkpoint: get(name) reads one tensor. safetensors are read one tensor at a
    time; a .pth is memory-mapped, so its pages are read as they are used."""
    if weights.suffix != ".safetensors":
        state_dict = load_state_dict(weights)
        return list(state_dict), state_dict.__getitem__
    from safetensors import safe_open
    try:
        f = safe_open(weights, "pt")  # checks the header and that the file covers every tensor
        return list(f.keys()), f.get_tensor
    except Exception as e:  # corrupt or truncated files raise many different errors
        raise CheckpointError(f"cannot read weights {weights}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def default_out(weights: Path, mode: str, groupsize: Optional[int]) -> Path:
    return weights.parent / (f"model_int4.g{groupsize}.pth" if mode == "int4" else f"model_{mode}.pth")


def run(args):
    check_args(args)
    folder, config = read_config(args.checkpoint_path)
    _, weights = resolve_checkpoint(args.checkpoint_path)
    if read_quantization(args.checkpoint_path) is not None:
        raise CheckpointError(f"{weights} is quantized already: quantize the float checkpoint instead")
    out = args.out or default_out(weights, args.mode, args.groupsize)
    names, get = open_weights(weights)
    state_dict, qconfig, quantization = quantize_state_dict(names, get, config, args.mode, args.groupsize,
                                                            args.include_output, progress=True)
    quantization["source"] = weights.name
    # Both files are written under temp names and renamed only once both are complete; the weights first,
    # so that a config never describes weights that are not there.
    with atomic_path(out.with_suffix(".json")) as tmp_config, atomic_path(out) as tmp_weights:
        torch.save(state_dict, tmp_weights)
        Path(tmp_config).write_text(json.dumps({**qconfig.to_dict(), "quantization": quantization}, indent=2) + "\n")
    for pattern, (k, k_pad) in {re.sub(r"\.\d+\.", ".*.", name): ks for name, ks in quantization["padded"].items()}.items():
        print(f"padded: {pattern} K {k} -> {k_pad}")
    print(f"{args.mode}{f' g{args.groupsize}' if args.groupsize else ''}: {len(quantization['layers'])} linear layers, "
          f"output layer {'included' if args.include_output else 'kept in float'}; {weights.stat().st_size / 1e6:.1f} MB -> "
          f"{out.stat().st_size / 1e6:.1f} MB; wrote {out} and {out.with_suffix('.json').name}")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (OSError, ValueError) as e:  # bad input: one line, no traceback (CheckpointError is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
