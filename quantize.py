"""Quantize a checkpoint's linear layers to int8, int4 (rounded, or GPTQ) or fp8 (weight-only: activations stay
in the model dtype).

    python quantize.py --checkpoint_path checkpoints/REPO/model.safetensors --mode int8
    python quantize.py --checkpoint_path checkpoints/REPO --mode int4 --groupsize 32
    python quantize.py --checkpoint_path checkpoints/REPO --mode int4-gptq --groupsize 128 --calibration_file text.txt
    python quantize.py --checkpoint_path checkpoints/REPO --mode fp8 --include_output
    python generate.py --checkpoint_path checkpoints/REPO/model_int4.g32.pth --prompt "Hello"

Decoding at batch 1 reads every weight once per token, so it runs about as much faster as the weights get
smaller: int8 and fp8 halve the bytes of bf16; int4 reads 5 bits a weight with groups of 32 (a bfloat16 scale
and zero per 32 weights), 4.25 with groups of 128.

Modes (N output features, K input features; each weight row is one output channel):
  int8  symmetric per channel: q = round(w / s), s = amax|w[n]| / 127. Forward: linear(x, q) * s (at decode on a
        GPU, 1 to 64 rows, Triton kernels: kernels.py).
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
  fp8   e4m3 per channel: s = amax|w[n]| / 448. Forward: linear(x, w8) * s (at decode on a GPU, int8's
        Triton kernels, kernels.py, with fp8 weights), or, with FP8_SCALED_MM set and a
        GPU of compute capability >= 9.0, the activations are quantized per token too and torch._scaled_mm
        runs one fp8 tensor-core matmul (slower at decode: see FP8_SCALED_MM). Refused at load on GPUs of
        compute capability < 8.9, which have no fp8 hardware (use int8 there); runs on the CPU. e4m3 keeps 3
        mantissa bits: its rounding error is ~4x int8's for the same bytes (SmolLM2: +1.9 % against +0.2 %).
  int4-gptq  int4's format and kernels, with the nibbles and group parameters chosen by GPTQ (Frantar et al.
        2022): each block's layers are quantized column by column, pushing every column's rounding error onto
        the columns still to come through the inverse Hessian of the layer's inputs, H = 2/n sum x^T x over
        calibration text (default 128 x 512 tokens of Python's pydoc topics). Transformer blocks are done one at
        a time, the calibration activations flowing on through each quantized block, so memory holds one
        block's float weights plus the activations, never the float model. Default group size 128. On
        SmolLM2-135M, calibrated on pydoc text other than the 2048 evaluated tokens: g128 13.98 (RTN 18.23)
        with 16 x 256 tokens, 13.21 with --act_order; g64 13.70 with 32 x 256, 12.93 with --act_order (RTN
        15.75); the output layer too (--include_output) 14.16. The defaults (128 x 512 tokens): 15.33, 10
        minutes on 2 CPU cores. More or longer calibration sequences did not reliably help this small model.

The output layer (--include_output / --no-include_output) is 2-7 % of the bytes read per token in 7B-70B
models and 21 % in SmolLM2-135M, but the layer that picks the token is the most sensitive to rounding. Measured
on SmolLM2-135M (perplexity, first 2048 tokens of Python's pydoc topics; float32 11.91):
                output quantized    output kept in the model dtype
    int8        11.94 (+0.27 %)     11.93 (+0.21 %)
    fp8         12.47 (+4.7 %)      12.13 (+1.9 %)
    int4 g32    12.54 (+5.3 %)      11.93 (+0.15 %)
So by default it is quantized for int8 only, where it costs next to nothing. A tied output layer is untied by
quantization: the embedding table (only looked up, never quantized) stays in the model dtype.

Files, next to the input unless --out says otherwise: model_int8.pth, model_int4.g32.pth,
model_int4-gptq.g128.pth, model_fp8.pth (plain tensors, torch.save; loaded with weights_only=True and mmap) and a
config of the same stem, model_int8.json: the ModelArgs fields plus "quantization": {format, mode, groupsize,
layers, padded, ...}, and for int4-gptq "gptq": {damp, act_order, static_groups, blocksize, samples, seq_len,
calibration}. model.read_config prefers that sidecar over config.json, so the file name is never parsed. Stored
per quantized layer (int4-gptq exactly as int4):
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
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kernels import kernel_available, scaled_matmul
from model import (CheckpointError, ModelArgs, Transformer, atomic_path, error_summary, exit_on_bad_input, load_state_dict, read_config,
                   read_quantization, resolve_checkpoint)

FORMAT = 1  # version of the file layout above; a loader refuses versions it does not know
MODES = ("int8", "int4", "int4-gptq", "fp8")
INT4_MODES = ("int4", "int4-gptq")  # the same file format, the same layers
GROUPSIZES = (32, 64, 128, 256)  # the group sizes tinygemm supports
DEFAULT_GROUPSIZE = 32
GPTQ_DEFAULT_GROUPSIZE = 128  # GPTQ compensates its rounding error: large groups keep most of g32's accuracy
OUTPUT_BY_DEFAULT = {"int8": True, "int4": False, "int4-gptq": False, "fp8": False}  # see --include_output
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


def one_byte_linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x (..., K) times one-byte weights (N, K), int8 or float8_e4m3fn, scaled per output row: (..., N) in x's
    dtype. At decode on a GPU (1 to 64 rows) Triton kernels stream the weights (kernels.py); otherwise PyTorch,
    scaling in float32, which also keeps torch.compile from matching inductor's weight-only int8 pattern
    (`F.linear(x, w.to(bf16)) * bf16 scales` -> aten._weight_int8pack_mm, whose CUDA kernel took 1.16 ms a layer
    for 8 rows on an H100: BENCHMARKS.md)."""
    if kernel_available(x):
        return scaled_matmul(x, weight, scales)
    return (F.linear(x, weight.to(x.dtype)).float() * scales).to(x.dtype)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, **_):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = frozen(torch.empty(out_features, in_features, dtype=torch.int8))
        self.scales = frozen(torch.empty(out_features))
        self.bias = frozen(torch.empty(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = one_byte_linear(x, self.weight, self.scales)  # (..., N)
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


def int4_tensors(q: Tensor, scales: Tensor, zeros: Tensor) -> dict:
    """What a file stores per int4 layer (RTN and GPTQ alike): nibbles (N, K_pad) packed two to a byte,
    scales and zeros (N, n_groups) as bfloat16 (exact: int4_group_params made them bfloat16 values)."""
    return {"weight": pack_int4(q), "scales": scales.to(torch.bfloat16), "zeros": zeros.to(torch.bfloat16)}


def quantize_int4(w: Tensor, groupsize: int) -> dict:
    """w (N, K) -> packed weight (N, K_pad / 2), scales and zeros bfloat16 (N, K_pad / groupsize)."""
    N, K = w.shape
    k_pad = int4_padded_k(K, groupsize)
    w32 = F.pad(w.float(), (0, k_pad - K))  # (N, K_pad): zero columns, met by a zero-padded input
    groups = w32.view(N, k_pad // groupsize, groupsize)  # (N, n_groups, G)
    scales, zeros = int4_group_params(groups)  # (N, n_groups)
    q = int4_quantize(groups, scales[..., None], zeros[..., None]).view(N, k_pad)
    return int4_tensors(q, scales, zeros)


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
        y = fp8_scaled_mm(x, w8, scales) if self.scaled_mm else one_byte_linear(x, w8, scales)  # (..., N)
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
    names = checked_float_names(names, args)
    quantized = {f"{layer}.weight" for layer in layers}
    out = {name: get(name) for name in names if name not in quantized}
    padded = {}
    # disable=None: the bar shows on a terminal only, never in logs or captured output.
    for layer in tqdm(layers, desc=f"quantizing to {mode}", unit="layer", disable=None if progress else True):
        source = "tok_embeddings.weight" if layer == "output" and args.tie_embeddings else f"{layer}.weight"
        w = require_float(source, get(source))  # (N, K)
        for key, t in quantize_weight(mode, w, groupsize).items():
            out[f"{layer}.{key}"] = t
        if mode == "int4":
            record_padding(padded, layer, w.shape[1], groupsize)
    return (out, *quantized_config(args, mode, groupsize, include_output, layers, padded))


def require_float(name: str, w: Tensor) -> Tensor:
    if not w.is_floating_point():
        raise CheckpointError(f"{name} is {w.dtype}, not float: the checkpoint is quantized already")
    return w


def quantized_config(args: ModelArgs, mode: str, groupsize: int, include_output: bool, layers: list,
                     padded: dict) -> tuple[ModelArgs, dict]:
    """The quantized checkpoint's ModelArgs and its config's quantization record (read back by build_model)."""
    untie = args.tie_embeddings and include_output  # the quantized output layer no longer shares the embedding
    qargs = ModelArgs(**{**args.to_dict(), "tie_embeddings": args.tie_embeddings and not untie})
    quantization = dict(format=FORMAT, mode=mode, groupsize=groupsize if mode in INT4_MODES else None,
                        include_output=include_output, layers=layers, padded=padded)
    return qargs, quantization


def checked_float_names(names: list, args: ModelArgs) -> list:
    """The names of a float checkpoint of this config (a stored tied copy dropped), or a CheckpointError."""
    if args.tie_embeddings:
        names = [name for name in names if name != "output.weight"]  # some writers store the tied copy too
    expected = set(_float_keys(args))
    missing, unexpected = expected - set(names), set(names) - expected
    if any(name.rpartition(".")[2] in ("scales", "zeros", "scale_bits") for name in unexpected):
        raise CheckpointError("the checkpoint is quantized already: quantize the float checkpoint instead")
    if missing or unexpected:
        raise CheckpointError(f"the weights do not match the config: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    return names


def record_padding(padded: dict, layer: str, k: int, groupsize: int):
    """Note in `padded` (the config's record) an int4 layer whose K is no whole number of groups."""
    if int4_padded_k(k, groupsize) != k:
        padded[layer] = [k, int4_padded_k(k, groupsize)]


def _float_keys(args: ModelArgs) -> list:
    """The names a float checkpoint of this config stores (a tied output layer is stored once, as the embedding)."""
    with torch.device("meta"):
        keys = list(Transformer(args).state_dict())
    return [k for k in keys if not (args.tie_embeddings and k == "output.weight")]


# ---- GPTQ: int4 with error compensation (Frantar et al. 2022) ----------------------------------------------

GPTQ_BLOCKSIZE = 128  # columns quantized between two updates of the rest of the matrix (the paper's lazy batches)
GPTQ_TOKENS_PER_FORWARD = 4096  # calibration tokens per block forward: bounds the attention and FFN temporaries
GPTQ_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")  # of each block
DEFAULT_DAMP = 0.01
DEFAULT_CALIBRATION_SAMPLES = 128
DEFAULT_CALIBRATION_SEQ_LEN = 512


@torch.no_grad()
def gptq_int4(w: Tensor, hessian: Tensor, groupsize: int, damp: float = DEFAULT_DAMP, act_order: bool = False,
              blocksize: int = GPTQ_BLOCKSIZE) -> tuple[dict, Tensor]:
    """GPTQ one weight w (N, K) given the Hessian of its layer's inputs H = 2/n sum x^T x (K, K).
    Returns the int4 tensors (quantize_int4's layout) and the float32 weights (N, K) they dequantize to, bit for
    bit what Int4Linear.dequantize() computes from them.

    Columns are rounded one at a time; each one's error is pushed onto the columns not yet rounded, weighted by
    the inverse Hessian, so that correlated inputs cancel it. The weights come from the upper Cholesky factor U
    of H^-1: column j's error is (w_j - dq_j) / U_jj and row j of U holds the updates of the later columns."""
    N, K = w.shape
    assert hessian.shape == (K, K), f"Hessian {tuple(hessian.shape)} does not match weight {tuple(w.shape)}"
    assert blocksize % groupsize == 0 or groupsize % blocksize == 0, f"blocksize {blocksize} and groupsize {groupsize}: one must divide the other"
    k_pad = int4_padded_k(K, groupsize)
    # W is updated in place and ends up holding the dequantized weights, column by column: no second copy.
    W = F.pad(w.float(), (0, k_pad - K))  # (N, K_pad): padding columns are zero, as in quantize_int4
    H = F.pad(hessian.float(), (0, k_pad - K, 0, k_pad - K))  # (K_pad, K_pad): padding inputs are zero
    # Dead inputs (always zero, padding included): a unit diagonal keeps H invertible and leaves their rows and
    # columns of H, hence of U, empty, so their error reaches no other column. Their weights never matter: zero.
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    n_groups = k_pad // groupsize
    if act_order:
        # Largest inputs first, while many columns are left to absorb their error. The kernels need each group
        # to be its contiguous columns, whose members are now processed at scattered times, so each group's
        # scale and zero are fixed up front from the weights as they are ("static groups").
        scales, zeros = int4_group_params(W.view(N, n_groups, groupsize))  # (N, n_groups)
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)  # (K_pad,) processing order
        W, H = W[:, perm], H[perm][:, perm]
    else:
        scales, zeros = W.new_zeros(N, n_groups), W.new_zeros(N, n_groups)
        perm = torch.arange(k_pad, device=W.device)
    group = (perm // groupsize).tolist()  # the file's group of each column, in processing order
    H.diagonal().add_(damp * H.diagonal().mean())  # dampening: a well-conditioned inverse for few samples
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)  # H^-1 = U^T U, (K_pad, K_pad)
    if info.item() != 0:
        raise ValueError(f"GPTQ: the Hessian of the layer's inputs is not positive definite with --damp {damp}: raise it")
    q = torch.empty(N, k_pad, dtype=torch.uint8, device=W.device)  # nibbles, processing order
    for i1 in range(0, k_pad, blocksize):
        i2 = min(i1 + blocksize, k_pad)
        block, U_block = W[:, i1:i2], U[i1:i2, i1:i2]  # views: updates land in W
        err = torch.empty(N, i2 - i1, device=W.device)  # (N, B) the block's scaled errors
        for c in range(i2 - i1):
            j, g = i1 + c, group[i1 + c]
            if not act_order and j % groupsize == 0:
                # Standard GPTQ groups: the parameters of the weights as every earlier column left them. All of
                # the group is current: it lies inside this block, or starts it (blocksize divides groupsize).
                scales[:, g], zeros[:, g] = int4_group_params(W[:, j:j + groupsize])
            s, z = scales[:, g], zeros[:, g]  # (N,)
            q[:, j] = int4_quantize(block[:, c], s, z)
            dq = int4_dequantize(q[:, j], s, z)  # (N,)
            err[:, c] = (block[:, c] - dq) / U_block[c, c]
            block[:, c] = dq
            block[:, c + 1:] -= err[:, c, None] * U_block[None, c, c + 1:]  # (N, B - c - 1): the block, at once
        W[:, i2:] -= err @ U[i1:i2, i2:]  # the columns after the block, lazily: one matmul per block
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
    """{name: Hessian of the inputs of linears[name]} over what run() feeds them (forward hooks, removed after)."""
    hessians = {name: Hessian() for name in linears}
    handles = [linear.register_forward_hook(lambda module, inputs, output, h=hessians[name]: h.add(inputs[0]))
               for name, linear in linears.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: h.value() for name, h in hessians.items()}


def calibration_tokens(tokenizer, text: str, samples: int, seq_len: int) -> Tensor:
    """(n, seq_len) token ids: up to `samples` windows spread evenly over the text, apart from each other (fewer if
    the text is short; a ValueError if it holds less than one). Each window starts with BOS where the tokenizer
    adds one, as a prompt does."""
    ids = tokenizer.encode(text)
    bos = ids[:1] if ids and tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id else []
    ids = ids[len(bos):]
    span = seq_len - len(bos)
    n = min(samples, len(ids) // span) if span > 0 else 0
    if n == 0:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one sample of --calibration_seq_len {seq_len}")
    stride = len(ids) // n  # >= span
    return torch.tensor([bos + ids[i * stride:i * stride + span] for i in range(n)])


@torch.no_grad()
def gptq_quantize_state_dict(names: list, get: Callable[[str], Tensor], args: ModelArgs, groupsize: int,
                             include_output: bool, tokens: Tensor, damp: float = DEFAULT_DAMP, act_order: bool = False,
                             device="cpu", progress: bool = False):
    """GPTQ int4 of a float checkpoint read tensor by tensor through get(name), one transformer block at a time:
    memory holds one block's float weights (float32), the calibration activations (samples, seq_len, dim) and
    the output built so far, never the float model. Returns what quantize_state_dict returns.

    The calibration tokens (samples, seq_len) are embedded, then for each block: its float weights are read;
    a forward over the activations collects each linear layer's Hessian; GPTQ quantizes the four linears; and a
    forward through the block with its dequantized weights makes the next block's inputs, so that each block
    compensates the errors of those before it. The output layer (include_output) gets GPTQ too, on the final
    norm's output. Everything is computed in float32 on `device`; the files hold what RTN's hold."""
    from tqdm import tqdm
    from model import KVCache, RMSNorm, TransformerBlock, rope_table
    layers = linear_names(args, include_output)
    names = checked_float_names(names, args)
    quantized = {f"{layer}.weight" for layer in layers}
    out = {name: get(name) for name in names if name not in quantized}  # embedding, norms, biases: kept as they are
    samples, seq_len = tokens.shape
    assert seq_len <= args.block_size, f"calibration seq_len {seq_len} > block_size {args.block_size}"
    batch = max(1, GPTQ_TOKENS_PER_FORWARD // seq_len)  # samples per forward
    x = out["tok_embeddings.weight"][tokens].to(device, torch.float32)  # (samples, seq_len, dim)
    # What Transformer.forward gives its blocks for a prefill of seq_len tokens from position 0.
    rope = rope_table(args, seq_len).to(device)[None]  # (1, seq_len, head_dim // 2, 2)
    input_pos = torch.arange(seq_len, device=device)
    mask = (input_pos[None, :] <= input_pos[:, None])[None, None]  # (1, 1, T, S): causal
    kv_cache = KVCache(batch, args.n_kv_heads, seq_len, args.head_dim, torch.float32, device)  # shared by the blocks

    def forward(module: nn.Module, write: bool):
        for b in range(0, samples, batch):
            y = module(x[b:b + batch], rope, mask, input_pos)  # (batch, seq_len, dim)
            if write:
                x[b:b + batch] = y

    def quantize(name: str, w: Tensor, hessian: Tensor) -> Tensor:
        try:
            tensors, dq = gptq_int4(w.to(device), hessian, groupsize, damp, act_order)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        for key, t in tensors.items():
            out[f"{name}.{key}"] = t.cpu()
        record_padding(padded, name, w.shape[1], groupsize)
        return dq  # (N, K) float32

    padded = {}
    # disable=None: the bar shows on a terminal only, never in logs or captured output.
    for i in tqdm(range(args.n_layer), desc=f"GPTQ int4 g{groupsize}", unit="block", disable=None if progress else True):
        prefix = f"layers.{i}."
        with torch.device("meta"):
            block = TransformerBlock(args)
        state = {k: out[prefix + k] if prefix + k in out else get(prefix + k) for k in block.state_dict()}
        for name in GPTQ_LINEARS:
            require_float(f"{prefix}{name}.weight", state[f"{name}.weight"])
        block.load_state_dict(state, strict=True, assign=True)
        del state
        block = block.to(device, torch.float32)
        block.attention.kv_cache = kv_cache
        linears = {name: block.get_submodule(name) for name in GPTQ_LINEARS}
        hessians = collect_hessians(linears, partial(forward, block, write=False))
        for name, linear in linears.items():
            linear.weight = nn.Parameter(quantize(prefix + name, linear.weight, hessians.pop(name)), requires_grad=False)
        forward(block, write=True)  # through the quantized block: the next block's inputs
        del block, linears
    if include_output:
        norm = RMSNorm(args.dim, args.norm_eps).to(device)
        norm.weight = nn.Parameter(out["norm.weight"].to(device, torch.float32), requires_grad=False)
        hessian = Hessian()
        for b in range(0, samples, batch):
            hessian.add(norm(x[b:b + batch]))  # (batch, seq_len, dim): the output layer's inputs
        quantize("output", out["tok_embeddings.weight"] if args.tie_embeddings else get("output.weight"), hessian.value())
    qargs, quantization = quantized_config(args, "int4-gptq", groupsize, include_output, layers, padded)
    quantization["gptq"] = dict(damp=damp, act_order=act_order, static_groups=act_order, blocksize=GPTQ_BLOCKSIZE,
                                samples=samples, seq_len=seq_len)
    return out, qargs, quantization


# ---- the command line ---------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Quantize a checkpoint's linear layers (weight-only); generate.py loads the "
                                "result like any checkpoint. See the top of quantize.py for the formats.")
    p.add_argument("--checkpoint_path", type=Path, required=True, help="float checkpoint folder, or the weights file inside it")
    p.add_argument("--mode", default="int8", help="int8 (per channel), int4 (groupwise, tinygemm's convention, rounded to "
                   "nearest), int4-gptq (the int4 format, with GPTQ's error compensation from calibration text) or fp8 "
                   "(e4m3 per channel; runs on GPUs of compute capability >= 8.9 and on the CPU); default int8")
    p.add_argument("--groupsize", type=int, default=None, help=f"int4 and int4-gptq: input columns per scale and zero, one "
                   f"of {', '.join(map(str, GROUPSIZES))}. Default {DEFAULT_GROUPSIZE} for int4 (5 bits a weight): rounding "
                   "to nearest has no error compensation, so small groups are its accuracy; 128 reads 4.25 bits a weight "
                   f"(SmolLM2-135M perplexity 11.91 in float32: g32 11.93, g128 18.23). Default {GPTQ_DEFAULT_GROUPSIZE} for "
                   "int4-gptq, which compensates (SmolLM2-135M g128: 13.98)")
    p.add_argument("--include_output", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the output layer too (2-7%% of the bytes read per token in 7B-70B models, 21%% in "
                   "SmolLM2-135M). Default: yes for int8, no for int4, int4-gptq and fp8, from SmolLM2-135M's perplexity "
                   "with and without it: int8 +0.27%% / +0.21%%, fp8 +4.7%% / +1.9%%, int4 g32 +5.3%% / +0.15%%. A tied "
                   "output layer is untied; the embedding stays in the model dtype. int4-gptq quantizes it with GPTQ too, "
                   "on the final norm's outputs")
    p.add_argument("--out", type=Path, help="output weights file (default: model_MODE.pth, model_int4.gSIZE.pth, "
                   "model_int4-gptq.gSIZE.pth next to the input); its config goes beside it with the same stem and .json. "
                   "Keep it in the checkpoint folder: generate.py reads the tokenizer from the weights file's folder")
    gptq = p.add_argument_group("int4-gptq", "GPTQ (Frantar et al. 2022) quantizes one transformer block at a time: "
                                "memory holds one block's float weights and the calibration activations, not the model")
    gptq.add_argument("--calibration_file", type=Path, default=None, help="UTF-8 text whose inputs the quantized layers "
                      "should reproduce; a text file is the supported source (no lm-eval tasks). Default: Python's "
                      "own English documentation, pydoc_data.topics (~113k tokens for Llama-style tokenizers)")
    gptq.add_argument("--calibration_samples", type=int, default=None, help=f"sequences taken from the text, spread "
                      f"evenly over it (default {DEFAULT_CALIBRATION_SAMPLES}; fewer if the text is short)")
    gptq.add_argument("--calibration_seq_len", type=int, default=None, help=f"tokens per sequence (default "
                      f"{DEFAULT_CALIBRATION_SEQ_LEN}: {DEFAULT_CALIBRATION_SAMPLES} x {DEFAULT_CALIBRATION_SEQ_LEN} = "
                      f"{DEFAULT_CALIBRATION_SAMPLES * DEFAULT_CALIBRATION_SEQ_LEN} tokens fit the default text and are 4x "
                      "the widest layer input of a 7B-8B model (11008-14336), so every Hessian is well determined)")
    gptq.add_argument("--damp", type=float, default=None, help=f"added to the Hessian's diagonal, as a fraction of its "
                      f"mean (default {DEFAULT_DAMP})")
    gptq.add_argument("--act_order", action="store_true", default=None, help="quantize columns in order of decreasing "
                      "input energy (diag H). Groups stay contiguous for the int4 kernels, so their scales and zeros are "
                      "fixed up front from the unquantized weights (static groups). Default off; on SmolLM2-135M it helps: "
                      "g128 13.21 against 13.98")
    gptq.add_argument("--device", default=None, help="where GPTQ computes (float32): default cuda if available, else cpu")
    return p.parse_args(argv)


GPTQ_OPTIONS = ("calibration_file", "calibration_samples", "calibration_seq_len", "damp", "act_order", "device")


def check_args(args):
    """Fill in the defaults that depend on the mode; reject bad values with one sentence (ValueError)."""
    if args.mode not in MODES:
        raise ValueError(f"unknown --mode {args.mode!r}: choose one of {', '.join(MODES)}")
    if args.mode not in INT4_MODES and args.groupsize is not None:
        raise ValueError(f"--groupsize is for --mode int4 and int4-gptq, not {args.mode}")
    if args.mode in INT4_MODES:
        default = GPTQ_DEFAULT_GROUPSIZE if args.mode == "int4-gptq" else DEFAULT_GROUPSIZE
        args.groupsize = default if args.groupsize is None else args.groupsize
        if args.groupsize not in GROUPSIZES:
            raise ValueError(f"--groupsize must be one of {', '.join(map(str, GROUPSIZES))}, got {args.groupsize}")
    if args.mode != "int4-gptq":
        given = [f"--{name}" for name in GPTQ_OPTIONS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: for --mode int4-gptq, not {args.mode}")
    else:
        for name, default in (("calibration_samples", DEFAULT_CALIBRATION_SAMPLES), ("calibration_seq_len", DEFAULT_CALIBRATION_SEQ_LEN),
                              ("damp", DEFAULT_DAMP), ("act_order", False)):
            if getattr(args, name) is None:
                setattr(args, name, default)
        if args.calibration_samples < 1 or args.calibration_seq_len < 1:
            raise ValueError("--calibration_samples and --calibration_seq_len must be at least 1")
        if not args.damp >= 0:
            raise ValueError(f"--damp must be >= 0, got {args.damp}")
        if args.calibration_file is not None and not args.calibration_file.is_file():
            raise ValueError(f"calibration file not found: {args.calibration_file}")
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device!r} is not a device") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA GPU here")
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
        raise CheckpointError(f"cannot read weights {weights}: {error_summary(e)}") from e


def default_out(weights: Path, mode: str, groupsize: Optional[int]) -> Path:
    return weights.parent / (f"model_{mode}.g{groupsize}.pth" if mode in INT4_MODES else f"model_{mode}.pth")


def read_calibration(args, folder: Path) -> tuple[Tensor, str]:
    """The calibration token ids (samples, seq_len) for GPTQ and the name of their source."""
    from tokenizer import load_tokenizer
    if args.calibration_file is None:
        import pydoc_data.topics
        text, source = "\n".join(pydoc_data.topics.topics.values()), "pydoc_data.topics"
    else:
        try:
            text, source = args.calibration_file.read_text(encoding="utf-8"), args.calibration_file.name
        except UnicodeDecodeError as e:
            raise ValueError(f"calibration file {args.calibration_file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    tokens = calibration_tokens(load_tokenizer(folder), text, args.calibration_samples, args.calibration_seq_len)
    return tokens, source


def run(args):
    check_args(args)
    folder, config = read_config(args.checkpoint_path)
    _, weights = resolve_checkpoint(args.checkpoint_path)
    if read_quantization(args.checkpoint_path) is not None:
        raise CheckpointError(f"{weights} is quantized already: quantize the float checkpoint instead")
    out = args.out or default_out(weights, args.mode, args.groupsize)
    if args.mode == "int4-gptq":
        if args.calibration_seq_len > config.block_size:
            raise ValueError(f"--calibration_seq_len {args.calibration_seq_len} is longer than the model's block_size {config.block_size}")
        tokens, calibration = read_calibration(args, folder)  # before the weights: a bad text fails at once
        if len(tokens) < args.calibration_samples:
            print(f"calibration: the text holds {len(tokens)} samples of {args.calibration_seq_len} tokens, not {args.calibration_samples}")
    names, get = open_weights(weights)
    if args.mode == "int4-gptq":
        started = time.perf_counter()
        state_dict, qconfig, quantization = gptq_quantize_state_dict(
            names, get, config, args.groupsize, args.include_output, tokens, args.damp, args.act_order, args.device, progress=True)
        quantization["gptq"]["calibration"] = calibration
        print(f"GPTQ: {len(tokens)} x {tokens.shape[1]} tokens of {calibration}, damp {args.damp}"
              f"{', act_order (static groups)' if args.act_order else ''}, on {args.device}: {time.perf_counter() - started:.0f} s")
    else:
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
    exit_on_bad_input(run, args)


if __name__ == "__main__":
    main()
