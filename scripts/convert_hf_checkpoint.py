"""Convert a Hugging Face Llama / Mistral / Qwen2 checkpoint into gpt-blitz's format.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/REPO [--hf_dir DIR]

Reads the raw snapshot in hf_dir (default checkpoint_dir/hf, where scripts/download.py puts it) and writes
checkpoint_dir/model.safetensors + config.json (see model.py) plus copies of the tokenizer files.

Weights may be sharded or single safetensors, pytorch_model*.bin, or Meta's original/consolidated.00.pth.
Tensors are streamed one shard at a time and only the converted result is kept, so converting a 70B
model holds one copy of it in memory, never two. The source dtype is kept.

Two layout changes happen on the way:
  * HF stores q/k rows in "rotate-half" order (its conversion permuted Meta's rows so that each head's
    first half pairs with its second half); model.py rotates adjacent pairs (Meta's interleaved order),
    so q and k rows (and Qwen2's q/k bias) are permuted back per head. Meta's own files need nothing.
  * q, k, v become one wqkv matrix and gate, up one w13 matrix. The pieces of one layer may live in
    different shards, so they wait in `pending` until the set is complete.
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: import model.py from the repo root

import torch
from tqdm import tqdm

from model import CheckpointError, ModelArgs, Transformer, atomic_path, error_summary, save_checkpoint
from tokenizer import TOKENIZER_FILES

SUPPORTED = ("llama", "mistral", "qwen2")


class ConvertError(Exception):
    """Bad input; main() prints it as one `error:` line."""


# ---- names ---------------------------------------------------------------------------------------------
# source name -> (gpt-blitz name, part). part names the slice of a fused tensor; None means copied whole.
HF_NAMES = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", None),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", None),
}
HF_LAYER_NAMES = {
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
    "self_attn.q_proj.weight": ("attention.wqkv.weight", "q"),
    "self_attn.k_proj.weight": ("attention.wqkv.weight", "k"),
    "self_attn.v_proj.weight": ("attention.wqkv.weight", "v"),
    "self_attn.q_proj.bias": ("attention.wqkv.bias", "q"),
    "self_attn.k_proj.bias": ("attention.wqkv.bias", "k"),
    "self_attn.v_proj.bias": ("attention.wqkv.bias", "v"),
    "self_attn.o_proj.weight": ("attention.wo.weight", None),
    "mlp.gate_proj.weight": ("feed_forward.w13.weight", "gate"),
    "mlp.up_proj.weight": ("feed_forward.w13.weight", "up"),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", None),
}
META_NAMES = {name: (name, None) for name in ("tok_embeddings.weight", "norm.weight", "output.weight")}
META_LAYER_NAMES = {
    "attention_norm.weight": ("attention_norm.weight", None),
    "ffn_norm.weight": ("ffn_norm.weight", None),
    "attention.wq.weight": ("attention.wqkv.weight", "q"),
    "attention.wk.weight": ("attention.wqkv.weight", "k"),
    "attention.wv.weight": ("attention.wqkv.weight", "v"),
    "attention.wo.weight": ("attention.wo.weight", None),
    "feed_forward.w1.weight": ("feed_forward.w13.weight", "gate"),
    "feed_forward.w3.weight": ("feed_forward.w13.weight", "up"),
    "feed_forward.w2.weight": ("feed_forward.w2.weight", None),
}
LAYOUTS = {"hf": (HF_NAMES, "model.layers.", HF_LAYER_NAMES), "meta": (META_NAMES, "layers.", META_LAYER_NAMES)}
FUSED_PARTS = {"wqkv": ("q", "k", "v"), "w13": ("gate", "up")}  # row order inside each fused tensor
IGNORED = re.compile(r"(rotary_emb\.inv_freq|^rope\.freqs)$")  # precomputed rotary tables some files carry


def target_name(name: str, layout: str) -> tuple[str, str | None] | None:
    """(gpt-blitz name, part) for a source tensor name; None for tensors we skip."""
    if IGNORED.search(name):
        return None
    top, layer_prefix, layer_names = LAYOUTS[layout]
    if name in top:
        return top[name]
    m = re.fullmatch(re.escape(layer_prefix) + r"(\d+)\.(.+)", name)
    if m and m.group(2) in layer_names:
        dest, part = layer_names[m.group(2)]
        return f"layers.{m.group(1)}.{dest}", part
    raise ConvertError(f"unexpected tensor {name}: not a weight gpt-blitz's model has")


def source_name(dest: str, part: str | None, layout: str) -> str:
    """The inverse of target_name, for error messages that name what the input lacks."""
    top, layer_prefix, layer_names = LAYOUTS[layout]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", dest)
    table, prefix = (layer_names, f"{layer_prefix}{m.group(1)}.") if m else (top, "")
    suffix = m.group(2) if m else dest
    return next((prefix + src for src, want in table.items() if want == (suffix, part)), dest)


# ---- config --------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot read {path}: {e}") from e


def rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(rope_base, rope_scaling) from an HF config. transformers 5 writes rope_parameters (theta inside);
    older configs have a top-level rope_theta and an optional rope_scaling dict."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConvertError(f"unsupported rope type {rope_type!r} (gpt-blitz implements default and llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in rope]
    if missing:
        raise ConvertError(f"llama3 rope scaling lacks {', '.join(missing)}")
    scaling = {k: float(rope[k]) for k in keys[:3]}
    scaling["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    return float(theta), scaling


def hf_config_to_args(cfg: dict, where: str = "config.json") -> ModelArgs:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise ConvertError(f"unsupported model_type {model_type!r} in {where} (supported: {', '.join(SUPPORTED)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"unsupported hidden_act {cfg['hidden_act']!r} in {where} (gpt-blitz uses silu)")
    if (model_type != "qwen2" and cfg.get("attention_bias")) or cfg.get("mlp_bias"):
        # Llama's attention_bias also puts a bias on o_proj, which model.py does not have.
        raise ConvertError(f"{where}: attention_bias / mlp_bias on a {model_type} model is not supported")
    try:
        n_head = cfg["num_attention_heads"]
        rope_base, rope_scaling = rope_settings(cfg)
        args = ModelArgs(
            dim=cfg["hidden_size"],
            n_layer=cfg["num_hidden_layers"],
            n_head=n_head,
            n_kv_heads=cfg.get("num_key_value_heads") or n_head,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_head,
            vocab_size=cfg["vocab_size"],
            intermediate_size=cfg["intermediate_size"],
            block_size=cfg.get("max_position_embeddings", 2048),
            rope_base=rope_base,
            rope_scaling=rope_scaling,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            attention_bias=model_type == "qwen2",  # Qwen2 always has q/k/v bias
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ConvertError(f"{where} lacks {e.args[0]}") from e
    except AssertionError as e:  # ModelArgs checks that the heads divide evenly
        raise ConvertError(f"{where}: {e}") from e
    # Mistral v0.1 (and Qwen2 with use_sliding_window) attend to a sliding window only; model.py attends to
    # everything, which matches only while the sequence fits in the window, so don't allow longer ones.
    window = cfg.get("sliding_window")
    sliding = cfg.get("use_sliding_window", True) is not False and "sliding_attention" in cfg.get("layer_types", ["sliding_attention"])
    if window and sliding and window < args.block_size:
        print(f"note: {model_type} uses sliding-window attention ({window} tokens) and gpt-blitz does not; "
              f"capping block_size at {window} (from {args.block_size}), where the two agree exactly")
        args.block_size = window
    return args


def meta_params_to_args(params: dict, shapes: dict, where: str) -> ModelArgs:
    """Meta's params.json when the snapshot has no HF config.json. Vocabulary and FFN sizes come from the
    tensor shapes (params.json derives the FFN size from multiple_of rules and may say vocab_size -1)."""
    try:
        scaled = params.get("use_scaled_rope", False)
        block_size = params.get("max_seq_len") or (131072 if scaled else 8192)
        if "max_seq_len" not in params:
            print(f"note: {where} gives no context length; assuming block_size {block_size} (Llama-3 defaults)")
        return ModelArgs(
            dim=params["dim"],
            n_layer=params["n_layers"],
            n_head=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            vocab_size=shapes["tok_embeddings.weight"][0],
            intermediate_size=shapes["layers.0.feed_forward.w1.weight"][0],
            block_size=block_size,
            rope_base=float(params.get("rope_theta", 10000.0)),
            rope_scaling=dict(factor=float(params.get("rope_scaling_factor", 8.0)), low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=8192) if scaled else None,
            norm_eps=params.get("norm_eps", 1e-5),
            tie_embeddings="output.weight" not in shapes,
        )
    except KeyError as e:
        raise ConvertError(f"{where} (or the weights) lacks {e.args[0]}") from e
    except AssertionError as e:
        raise ConvertError(f"{where}: {e}") from e


# ---- reading -------------------------------------------------------------------------------------------

def find_weights(hf_dir: Path) -> tuple[list[Path], str]:
    """The weight files to read, in order, and their naming layout ("hf" or "meta")."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (hf_dir / index_name).is_file():
            weight_map = read_json(hf_dir / index_name).get("weight_map") or {}
            files = [hf_dir / f for f in sorted(set(weight_map.values()))]
            if not files:
                raise ConvertError(f"{hf_dir / index_name} lists no weights")
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConvertError(f"shard {missing[0]} listed in {index_name} is missing from {hf_dir}")
            return files, "hf"
        if (hf_dir / single).is_file():
            return [hf_dir / single], "hf"
    for folder in (hf_dir / "original", hf_dir):
        consolidated = sorted(folder.glob("consolidated.*.pth"))
        if len(consolidated) > 1:
            # Model-parallel shards split each matrix along different dims (and the embedding differently
            # across Llama versions); the HF safetensors of the same model need no merging, so use those.
            raise ConvertError(f"{folder} holds {len(consolidated)} model-parallel consolidated.*.pth shards; "
                               f"merging them is not supported, download the HF safetensors weights instead")
        if consolidated:
            return consolidated, "meta"
    raise ConvertError(f"no weights in {hf_dir} (looked for model.safetensors[.index.json], "
                       f"pytorch_model.bin[.index.json], original/consolidated.00.pth)")


def load_torch(path: Path) -> dict:
    # mmap: the file's pages are read lazily, only when a tensor is touched.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt files raise many different error types
        raise ConvertError(f"cannot read {path}: {error_summary(e)}") from e


def open_shard(path: Path) -> tuple[list[str], callable]:
    """(tensor names, get(name)) for one weights file; tensors are read one at a time on demand."""
    if path.suffix != ".safetensors":
        state_dict = load_torch(path)
        # clone() gives each tensor its own memory so the mapping can go once the shard is done.
        return list(state_dict), lambda name: state_dict.pop(name).clone()
    from safetensors import safe_open
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:
        raise ConvertError(f"cannot read {path}: {error_summary(e)}") from e
    return list(f.keys()), f.get_tensor


def read_hf_config(hf_dir: Path, files: list[Path], layout: str) -> ModelArgs:
    if (hf_dir / "config.json").is_file():
        return hf_config_to_args(read_json(hf_dir / "config.json"), str(hf_dir / "config.json"))
    if layout == "meta" and (files[0].parent / "params.json").is_file():
        shapes = {name: tuple(t.shape) for name, t in load_torch(files[0]).items()}  # mmap: reads no data
        return meta_params_to_args(read_json(files[0].parent / "params.json"), shapes, str(files[0].parent / "params.json"))
    raise ConvertError(f"no config.json in {hf_dir}")


# ---- converting ----------------------------------------------------------------------------------------

def unpermute(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """HF rotate-half row order -> Meta interleaved, per head. HF row r * head_dim/2 + i of a head holds
    Meta row 2i + r (r = 0, 1), so split rows as (head, r, i) and swap r and i. Works on weights and biases."""
    return w.unflatten(0, (n_heads, 2, head_dim // 2)).transpose(1, 2).reshape(w.shape)  # (n_heads * head_dim, ...)


def convert(files: list[Path], layout: str, args: ModelArgs) -> dict:
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")  # the embedding serves as the output layer
    heads = {"q": args.n_head, "k": args.n_kv_heads}
    out, pending = {}, {}  # pending: fused name -> {part: tensor} until every part has arrived
    # disable=None: a bar only on a terminal, so logs and error output stay clean.
    bar = tqdm(total=0, unit="tensor", desc="converting", disable=None)
    for path in files:
        names, get = open_shard(path)
        bar.total += len(names)
        bar.set_postfix_str(path.name)  # also redraws the bar with the new total
        for name in names:
            bar.update()
            target = target_name(name, layout)
            if target is None or target[0] not in expected:  # skipped, or a tied output layer's copy
                continue
            dest, part = target
            tensor = get(name)
            if part in heads and layout == "hf":
                if tensor.shape[0] != heads[part] * args.head_dim:
                    raise ConvertError(f"{name} has {tensor.shape[0]} rows; config.json says {heads[part]} heads of {args.head_dim}")
                tensor = unpermute(tensor, heads[part], args.head_dim)
            if part is not None:
                pieces = pending.setdefault(dest, {})
                pieces[part] = tensor
                order = FUSED_PARTS[dest.split(".")[-2]]
                if len(pieces) < len(order):
                    continue
                del pending[dest]
                tensor = torch.cat([pieces[p] for p in order])  # (sum of the parts' rows, in_features) or (rows,)
                del pieces
            if tensor.shape != expected[dest]:
                raise ConvertError(f"{dest} (from {name}) has shape {tuple(tensor.shape)}; config.json implies {tuple(expected[dest])}")
            out[dest] = tensor
        del get  # drop the shard's file handle / mapping before opening the next
    bar.close()
    for dest, pieces in pending.items():
        part = next(p for p in FUSED_PARTS[dest.split(".")[-2]] if p not in pieces)
        raise ConvertError(f"missing tensor {source_name(dest, part, layout)}")
    for dest in expected:
        if dest not in out:
            raise ConvertError(f"missing tensor {source_name(dest, None, layout)}")
    return out


def copy_tokenizer_files(hf_dir: Path, checkpoint_dir: Path, layout: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = hf_dir / name
        if not src.is_file() and name == "tokenizer.model" and layout == "meta":
            src = hf_dir / "original" / name  # Llama-3's tiktoken file ships beside consolidated.00.pth
        if src.is_file():
            with atomic_path(checkpoint_dir / name) as tmp:
                shutil.copyfile(src, tmp)
            copied.append(name)
    return copied


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="where the gpt-blitz checkpoint goes, e.g. checkpoints/REPO")
    parser.add_argument("--hf_dir", type=Path, default=None, help="the raw HF snapshot (default: CHECKPOINT_DIR/hf)")
    opts = parser.parse_args(argv)
    checkpoint_dir, hf_dir = opts.checkpoint_dir, opts.hf_dir or opts.checkpoint_dir / "hf"
    try:
        if not hf_dir.is_dir():
            raise ConvertError(f"no HF checkpoint folder at {hf_dir} (download it with scripts/download.py)")
        if hf_dir.resolve() == checkpoint_dir.resolve():
            raise ConvertError("--hf_dir must differ from --checkpoint_dir (the output would overwrite config.json)")
        files, layout = find_weights(hf_dir)
        args = read_hf_config(hf_dir, files, layout)
        state_dict = convert(files, layout, args)
        save_checkpoint(checkpoint_dir, args, state_dict)
        copied = copy_tokenizer_files(hf_dir, checkpoint_dir, layout)
    except (ConvertError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    n_bytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in state_dict.values()}))
    print(f"wrote {checkpoint_dir / 'model.safetensors'} ({len(state_dict)} tensors, {n_bytes / 1e9:.2f} GB, {dtypes}) "
          f"and config.json; tokenizer files: {', '.join(copied) or 'none found'}")


if __name__ == "__main__":
    main()
