"""A plain decoder-only Transformer (Llama / Mistral / Qwen2 / SmolLM2 family) with a static KV cache.

One forward serves prefill (many positions) and decode (one position): both write their keys and values
into the preallocated cache at `input_pos` and attend over it with a mask. Everything here is ordinary
PyTorch so `torch.compile` can fuse it; generate.py owns compilation.

Checkpoint layout (what the scripts in scripts/ write and `load_checkpoint` reads): a folder holding
`config.json` (the fields of ModelArgs), `model.safetensors` (or `model.pth`) and the tokenizer files.
Weights are stored exactly as `Transformer.state_dict()` names them, with q/k rows in Meta's interleaved
rotary order and the q/k/v and gate/up projections already fused. A quantized weights file written by
quantize.py (model_int8.pth, ...) sits in the same folder with its own config beside it (model_int8.json),
which records the quantization scheme; `read_config` prefers that sidecar.
"""
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    dim: int
    n_layer: int
    n_head: int
    vocab_size: int
    intermediate_size: int
    n_kv_heads: Optional[int] = None  # None: same as n_head (plain multi-head attention)
    head_dim: Optional[int] = None  # None: dim // n_head
    block_size: int = 2048  # longest sequence (prompt + generated) the model supports
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama-3.1 "llama3" scaling: factor, low/high_freq_factor, original_max_position_embeddings
    norm_eps: float = 1e-5
    attention_bias: bool = False  # bias on the q/k/v projection (Qwen2)
    tie_embeddings: bool = False  # output layer shares the token embedding matrix

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head
        assert self.n_head % self.n_kv_heads == 0, f"n_head {self.n_head} must be a multiple of n_kv_heads {self.n_kv_heads}"

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in CONFIGS:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(CONFIGS)}")
        return cls(**CONFIGS[name])

    @classmethod
    def from_json(cls, path: Path) -> "ModelArgs":
        try:
            data = json.loads(Path(path).read_text())
        except ValueError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"quantization"}  # the quantization record is read by quantize.py
        if unknown:
            raise CheckpointError(f"{path}: unknown config keys {sorted(unknown)} (is this an HF config.json? convert the checkpoint first)")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, AssertionError) as e:  # missing fields, heads that do not divide
            raise CheckpointError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


_LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
CONFIGS = {
    "stories15M": dict(dim=288, n_layer=6, n_head=6, vocab_size=32000, intermediate_size=768, block_size=256),
    "stories110M": dict(dim=768, n_layer=12, n_head=12, vocab_size=32000, intermediate_size=2048, block_size=1024),
    "TinyLlama-1.1B": dict(dim=2048, n_layer=22, n_head=32, n_kv_heads=4, vocab_size=32000, intermediate_size=5632),
    "Llama-2-7B": dict(dim=4096, n_layer=32, n_head=32, vocab_size=32000, intermediate_size=11008, block_size=4096),
    "Llama-2-13B": dict(dim=5120, n_layer=40, n_head=40, vocab_size=32000, intermediate_size=13824, block_size=4096),
    "Llama-2-70B": dict(dim=8192, n_layer=80, n_head=64, n_kv_heads=8, vocab_size=32000, intermediate_size=28672, block_size=4096),
    "CodeLlama-7B": dict(dim=4096, n_layer=32, n_head=32, vocab_size=32016, intermediate_size=11008, block_size=16384, rope_base=1e6),
    "CodeLlama-34B": dict(dim=8192, n_layer=48, n_head=64, n_kv_heads=8, vocab_size=32000, intermediate_size=22016, block_size=16384, rope_base=1e6),
    "Mistral-7B": dict(dim=4096, n_layer=32, n_head=32, n_kv_heads=8, vocab_size=32000, intermediate_size=14336, block_size=4096),
    "Llama-3-8B": dict(dim=4096, n_layer=32, n_head=32, n_kv_heads=8, vocab_size=128256, intermediate_size=14336, block_size=8192, rope_base=5e5),
    "Llama-3-70B": dict(dim=8192, n_layer=80, n_head=64, n_kv_heads=8, vocab_size=128256, intermediate_size=28672, block_size=8192, rope_base=5e5),
    "Llama-3.1-8B": dict(dim=4096, n_layer=32, n_head=32, n_kv_heads=8, vocab_size=128256, intermediate_size=14336, block_size=131072, rope_base=5e5, rope_scaling=_LLAMA3_SCALING),
    "Llama-3.1-70B": dict(dim=8192, n_layer=80, n_head=64, n_kv_heads=8, vocab_size=128256, intermediate_size=28672, block_size=131072, rope_base=5e5, rope_scaling=_LLAMA3_SCALING),
    "Llama-3.1-405B": dict(dim=16384, n_layer=126, n_head=128, n_kv_heads=8, vocab_size=128256, intermediate_size=53248, block_size=131072, rope_base=5e5, rope_scaling=_LLAMA3_SCALING),
    "Llama-3.2-1B": dict(dim=2048, n_layer=16, n_head=32, n_kv_heads=8, vocab_size=128256, intermediate_size=8192, block_size=131072, rope_base=5e5, rope_scaling={**_LLAMA3_SCALING, "factor": 32.0}, tie_embeddings=True),
    "Llama-3.2-3B": dict(dim=3072, n_layer=28, n_head=24, n_kv_heads=8, vocab_size=128256, intermediate_size=8192, block_size=131072, rope_base=5e5, rope_scaling={**_LLAMA3_SCALING, "factor": 32.0}, tie_embeddings=True),
    "SmolLM2-135M": dict(dim=576, n_layer=30, n_head=9, n_kv_heads=3, vocab_size=49152, intermediate_size=1536, block_size=8192, rope_base=1e5, tie_embeddings=True),
    "SmolLM2-360M": dict(dim=960, n_layer=32, n_head=15, n_kv_heads=5, vocab_size=49152, intermediate_size=2560, block_size=8192, rope_base=1e5, tie_embeddings=True),
    "SmolLM2-1.7B": dict(dim=2048, n_layer=24, n_head=32, vocab_size=49152, intermediate_size=8192, block_size=8192, rope_base=130000, tie_embeddings=True),
    "Qwen2.5-0.5B": dict(dim=896, n_layer=24, n_head=14, n_kv_heads=2, vocab_size=151936, intermediate_size=4864, block_size=32768, rope_base=1e6, norm_eps=1e-6, attention_bias=True, tie_embeddings=True),
    "Qwen2.5-1.5B": dict(dim=1536, n_layer=28, n_head=12, n_kv_heads=2, vocab_size=151936, intermediate_size=8960, block_size=32768, rope_base=1e6, norm_eps=1e-6, attention_bias=True, tie_embeddings=True),
    "Qwen2.5-7B": dict(dim=3584, n_layer=28, n_head=28, n_kv_heads=4, vocab_size=152064, intermediate_size=18944, block_size=32768, rope_base=1e6, norm_eps=1e-6, attention_bias=True),
}


class KVCache(nn.Module):
    """Keys and values for every position up to max_seq_length, allocated once; writes happen in place."""

    def __init__(self, max_batch_size: int, n_kv_heads: int, max_seq_length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k, v: (B, n_kv_heads, T, head_dim); input_pos: (T,) cache slots shared by every row.
        B = k.shape[0]
        self.k[:B, :, input_pos] = k
        self.v[:B, :, input_pos] = v
        return self.k[:B], self.v[:B]  # (B, n_kv_heads, S, head_dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 (bf16 squares lose too much), scale in the model's dtype, as HF's Llama does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = args.n_head, args.n_kv_heads, args.head_dim
        qkv_dim = (args.n_head + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_dim, bias=args.attention_bias)  # one matmul for q, k and v
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), rope)  # (B, T, n_head, head_dim)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), rope)  # (B, T, n_kv_heads, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv_heads, S, head_dim)
        # enable_gqa lets each group of query heads read its shared kv head without copying the cache.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_kv_heads)
        y = y.transpose(1, 2).reshape(B, T, q_dim)  # (B, T, n_head * head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate (w1) and up (w3) fused
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = self.max_seq_length = -1

    def cache_length(self, max_seq_length: int) -> int:
        """The slots setup_caches allocates for sequences of up to max_seq_length tokens: a multiple of 8 keeps the
        attention mask's rows aligned as inductor's attention lowering asks (with 205 slots the decode profiles show
        a mask kernel in every layer; BENCHMARKS.md: its removal is not yet profiled). The slots past the requested
        length are never written and always masked."""
        return min(-(-max_seq_length // 8) * 8, self.args.block_size)

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the KV cache and rotary table once; later forwards write into them in place."""
        assert max_seq_length <= self.args.block_size, f"max_seq_length {max_seq_length} > block_size {self.args.block_size}"
        max_seq_length = self.cache_length(max_seq_length)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(max_batch_size, a.n_kv_heads, max_seq_length, a.head_dim, weight.dtype, weight.device)
        rope = rope_table(self.args, max_seq_length).to(weight.device)
        self.register_buffer("rope", rope, persistent=False)  # (S, head_dim // 2, 2), float32

    def forward(self, idx: Tensor, input_pos: Tensor, row_start: Optional[Tensor] = None, last_only: bool = False) -> Tensor:
        """idx (B, T) token ids at cache slots input_pos (T,). Row b's real tokens start at slot row_start[b]
        (left padding, so prompts of different lengths share one batch); its rotary positions count from there.
        Returns logits (B, T, vocab_size), or (B, 1, vocab_size) for the last position only with last_only
        (a prefill needs no more: a 128k vocabulary times a long prompt is gigabytes of logits)."""
        assert self.max_seq_length > 0, "call setup_caches() first"
        B, T = idx.shape
        if row_start is None:
            row_start = torch.zeros(B, dtype=input_pos.dtype, device=idx.device)
        positions = (input_pos[None, :] - row_start[:, None]).clamp(min=0)  # (B, T) rotary positions
        rope = self.rope[positions]  # (B, T, head_dim // 2, 2)
        slots = torch.arange(self.max_seq_length, device=idx.device)
        causal = slots[None, None, :] <= input_pos[None, :, None]  # (1, T, S)
        real = slots[None, None, :] >= row_start[:, None, None]  # (B, 1, S): not left padding
        # A padding query attends to itself only, so no softmax row is empty (an empty row gives NaN).
        own = slots[None, None, :] == input_pos[None, :, None]
        allowed = (causal & (real | own)).unsqueeze(1)  # (B, 1, T, S)
        # Additive, in the activations' dtype, made once here rather than converted from booleans in every layer.
        dtype = self.tok_embeddings.weight.dtype
        mask = torch.zeros_like(allowed, dtype=dtype).masked_fill(~allowed, float("-inf"))  # (B, 1, T, S)

        x = self.tok_embeddings(idx)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, rope, mask, input_pos)
        if last_only:
            x = x[:, -1:]  # (B, 1, dim)
        return self.output(self.norm(x))  # (B, T or 1, vocab_size)


def rope_table(args: ModelArgs, seq_len: int) -> Tensor:
    """cos and sin of every (position, frequency) pair, in float32: (seq_len, head_dim // 2, 2)."""
    freqs = rope_freqs(args.rope_base, args.head_dim)
    if args.rope_scaling is not None:
        freqs = llama3_scale(freqs, **args.rope_scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)  # (seq_len, head_dim // 2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def rope_freqs(base: float, head_dim: int) -> Tensor:
    """The rotary frequency of each pair of dimensions, in float64: (head_dim // 2,)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def llama3_scale(freqs: Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                 original_max_position_embeddings: int, **_) -> Tensor:
    """Llama-3.1's rope scaling: slow long-wavelength frequencies by `factor`, keep short ones, blend between."""
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by position-dependent angles (Meta's interleaved layout).
    x (B, T, heads, head_dim), rope (B, T, head_dim // 2, 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, heads, head_dim // 2, 2)
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]  # (B, T, 1, head_dim // 2)
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)


# ---- checkpoints -------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or unreadable; the scripts print it as one line."""


def error_summary(e: Exception) -> str:
    """An exception as one line (type and first line of its message), for `error:` messages about files
    whose readers raise many different exception types."""
    message = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {message}"


WEIGHT_FILES = ("model.safetensors", "model.pth")


def exit_on_bad_input(run: Callable, args):
    """A script's run(args), where bad input (OSError, ValueError: CheckpointError is one) ends in one
    `error: ...` line and exit status 1 instead of a traceback."""
    try:
        return run(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def resolve_checkpoint(path) -> tuple[Path, Path]:
    """(folder, weights file) for a checkpoint folder or a weights file inside one.
    `checkpoints/REPO/model.pth` keeps working when the folder holds model.safetensors instead."""
    path = Path(path)
    if path.is_file():
        return path.parent, path
    folder = path if path.is_dir() else path.parent
    if not path.is_dir() and path.name not in WEIGHT_FILES or not folder.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder, folder / name
    raise CheckpointError(f"no weights ({' or '.join(WEIGHT_FILES)}) in {folder}")


def load_state_dict(weights: Path) -> dict:
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(weights)
        return torch.load(weights, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # corrupt or truncated files raise many different errors
        raise CheckpointError(f"cannot read weights {weights}: {error_summary(e)}") from e


def config_file(folder: Path, weights: Path) -> Path:
    """The config that describes a checkpoint's weights: the sidecar beside a quantized weights file
    (model_int8.pth -> model_int8.json, written by quantize.py), else the folder's config.json."""
    sidecar = weights.with_suffix(".json")
    return sidecar if sidecar.is_file() else folder / "config.json"


def read_config(path) -> tuple[Path, ModelArgs]:
    """(folder, config) of a checkpoint, without touching its weights."""
    folder, weights = resolve_checkpoint(path)
    config = config_file(folder, weights)
    if not config.is_file():
        raise CheckpointError(f"no config.json in {folder}: convert the model with scripts/convert_hf_checkpoint.py first")
    return folder, ModelArgs.from_json(config)


def read_quantization(path) -> Optional[dict]:
    """The quantization scheme a checkpoint's config records (see quantize.py), or None for float weights."""
    config = config_file(*resolve_checkpoint(path))
    return json.loads(config.read_text()).get("quantization") if config.is_file() else None


def load_checkpoint(path, device="cpu", dtype=None) -> tuple[Transformer, Path]:
    """Build the model described by the checkpoint's config and load its weights. Returns (model, folder)."""
    folder, args = read_config(path)  # validates the config before any weights are read
    _, weights = resolve_checkpoint(path)
    state_dict = load_state_dict(weights)
    model = build_model(args, state_dict, read_quantization(path), device, dtype,
                        mismatch=f"{weights} does not match {config_file(folder, weights)}")
    return model, folder


def build_model(args: ModelArgs, state_dict: dict, quantization: Optional[dict] = None, device="cpu", dtype=None,
                mismatch: str = "the weights do not match the config") -> Transformer:
    """The model on the meta device (no memory), with quantized layers swapped in where `quantization` lists
    them; the weights are assigned, not copied, then moved to device and dtype (quantized weights keep
    their integer dtypes) and, last, repacked for the device's kernels."""
    with torch.device("meta"):
        model = Transformer(args)
        if quantization is not None:
            from quantize import swap_linears  # imported here: quantize.py imports this module
            swap_linears(model, quantization)
    if args.tie_embeddings and "tok_embeddings.weight" in state_dict:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]  # stored once, see save_checkpoint
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise CheckpointError(f"{mismatch}: {(lines[1] if len(lines) > 1 else lines[0]).strip()}") from e
    if args.tie_embeddings:  # before the move, so a shared table is converted once
        model.output.weight = model.tok_embeddings.weight  # assign=True replaced the shared parameter
    return finish_model(model, device, dtype, quantization)


def finish_model(model: Transformer, device, dtype, quantization: Optional[dict]) -> Transformer:
    """The last steps of loading (build_model's, and tp.py's for a rank's part): device and dtype (quantized
    weights keep their integer dtypes), a tied output layer tied again (assign=True and to_empty replace the
    shared parameter), quantized weights repacked for the device's kernels."""
    model = model.to(device=device, dtype=dtype)
    if model.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    if quantization is not None:
        from quantize import prepare_for_device
        prepare_for_device(model)
    return model


def save_checkpoint(folder, args: ModelArgs, state_dict: dict, extra_config: Optional[dict] = None):
    """Write config.json and model.safetensors into folder, each under a temp name and then renamed,
    so an interrupted write never leaves a half-written checkpoint behind."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state_dict.items() if not (args.tie_embeddings and k == "output.weight")}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, tmp)
    with atomic_path(folder / "config.json") as tmp:
        Path(tmp).write_text(json.dumps({**args.to_dict(), **(extra_config or {})}, indent=2) + "\n")


class atomic_path:
    """`with atomic_path(dest) as tmp:` write to tmp; on success it is renamed to dest, on failure removed."""

    def __init__(self, dest):
        self.dest = Path(dest)

    def __enter__(self) -> str:
        fd, self.tmp = tempfile.mkstemp(dir=self.dest.parent, prefix=f".{self.dest.name}.", suffix=".tmp")
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes files private; a checkpoint is an ordinary file
            os.replace(self.tmp, self.dest)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def random_model(name: str, device, dtype) -> Transformer:
    """A named config with random weights, built directly on the device: benchmarks need no download.
    Speed is the same as with real weights; the std keeps activations finite through many layers."""
    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)  # cast on meta: no full-size float32 copy is ever allocated
    model = model.to_empty(device=device)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return randomize_(model)


@torch.no_grad()
def randomize_(model: nn.Module, skip_layers=()) -> nn.Module:
    """Fill the parameters in place: norm weights 1, the rest N(0, 0.02), except the parameters of the layers
    named in skip_layers (quantized ones, which their caller fills)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.rpartition(".")[0] not in skip_layers:
            p.normal_(0.0, 0.02)
    return model
