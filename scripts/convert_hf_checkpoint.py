"""Convert a Hugging Face Llama / Mistral / Mixtral / Qwen2 / Qwen3 / Qwen3-MoE checkpoint into
gpt-blitz's format.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/REPO [--hf_dir DIR] \
        [--force]

Reads the raw snapshot in hf_dir (default checkpoint_dir/hf, where scripts/download.py puts it) and
writes checkpoint_dir/model.safetensors + config.json (see checkpoint.py) plus copies of the
tokenizer files, as one set. A folder that holds a checkpoint already is replaced only with --force.

Weights may be sharded or single safetensors, pytorch_model*.bin, or Meta's
original/consolidated.00.pth. Tensors are streamed one shard at a time and only the converted result
is kept, so converting a 70B model holds one copy of it in memory, never two. The source dtype is
kept.

Two layout changes happen on the way:
  * HF stores q/k rows in "rotate-half" order (its conversion permuted Meta's rows so that each
    head's first half pairs with its second half); model.py rotates adjacent pairs (Meta's
    interleaved order), so q and k rows (and Qwen2's q/k bias, Qwen3's per-head q/k norm weights)
    are permuted back per head. Meta's own files need nothing.
  * q, k, v become one wqkv matrix and gate, up one w13 matrix; a mixture of experts' per-expert
    matrices are stacked, (n_experts, rows, columns). The pieces of one layer may live in
    different shards, so they wait in `pending` until the set is complete.
"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import (NAME_MAX, TOKENIZER_FILES, ArgumentParser, InputError,  # noqa: E402
                        check_output_folder, check_readable, check_utf8, copier, empty_model,
                        is_file_name, one_line, parse_config, read_json, read_weights,
                        save_checkpoint, script_exits, unpermute, unreadable)
from model import ModelArgs  # noqa: E402

# What transformers' config class of each family (LlamaConfig, MistralConfig, ...) gives the keys
# read here that a config.json may leave out: a trimmed config reads as transformers reads it
# (Mixtral's rotary base is 1e6, Mistral attends to a window of 4096 unless the file says null;
# Llama's key/value heads default to its query heads, the others' to a number of their own).
QWEN_DEFAULTS = dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
                     use_sliding_window=False, sliding_window=4096, num_key_value_heads=32)
FAMILY_DEFAULTS = {
    "llama": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "mistral": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=131072,
                    sliding_window=4096, num_key_value_heads=8),
    "mixtral": dict(rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=131072,
                    num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=8),
    "qwen2": QWEN_DEFAULTS,
    "qwen3": dict(QWEN_DEFAULTS, head_dim=128),
    # the experts' count under transformers 5's name: a file's num_experts wins too (experts_config)
    "qwen3_moe": dict(QWEN_DEFAULTS, num_key_value_heads=4, num_local_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False),
}
SUPPORTED = tuple(FAMILY_DEFAULTS)
ROPE_TYPES = ("default", "llama3")  # the rotary embeddings model.py implements
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
            "intermediate_size")


# ---- names ---------------------------------------------------------------------------------------
# source name -> (gpt-blitz name, part). part names the slice of a fused tensor; None: copied whole.
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
    "self_attn.q_norm.weight": ("attention.q_norm.weight", None),
    "self_attn.k_norm.weight": ("attention.k_norm.weight", None),
    "mlp.gate_proj.weight": ("feed_forward.w13.weight", "gate"),
    "mlp.up_proj.weight": ("feed_forward.w13.weight", "up"),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", None),
    "block_sparse_moe.gate.weight": ("feed_forward.gate.weight", None),  # Mixtral's router
    "mlp.gate.weight": ("feed_forward.gate.weight", None),  # Qwen3-MoE's router
    # transformers 5 holds a layer's experts stacked, gate and up fused, as model.py does
    "mlp.experts.gate_up_proj": ("feed_forward.w13.weight", None),
    "mlp.experts.down_proj": ("feed_forward.w2.weight", None),
}
# One expert's matrices: Mixtral's block_sparse_moe.experts.N.w1, Qwen3-MoE's
# mlp.experts.N.gate_proj, ...; their part is "gate.N", "up.N" or "down.N".
HF_EXPERT = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
HF_EXPERT_NAMES = {
    **dict.fromkeys(("w1", "gate_proj"), ("feed_forward.w13.weight", "gate")),
    **dict.fromkeys(("w3", "up_proj"), ("feed_forward.w13.weight", "up")),
    **dict.fromkeys(("w2", "down_proj"), ("feed_forward.w2.weight", "down")),
}
META_NAMES = {name: (name, None)
              for name in ("tok_embeddings.weight", "norm.weight", "output.weight")}
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
LAYOUTS = {"hf": (HF_NAMES, "model.layers.", HF_LAYER_NAMES),
           "meta": (META_NAMES, "layers.", META_LAYER_NAMES)}
FUSED_PARTS = {"wqkv": ("q", "k", "v"), "w13": ("gate", "up")}  # row order inside each fused tensor


def fused_parts(dest: str, args: ModelArgs) -> list:
    """The parts of fused tensor dest in row order. A mixture of experts' w13 and w2 hold every
    expert's, expert by expert; they are then stacked, (n_experts, rows, columns)."""
    kind = dest.split(".")[-2]
    if args.n_experts and kind in ("w13", "w2"):
        pieces = FUSED_PARTS[kind] if kind == "w13" else ("down",)
        return [f"{piece}.{e}" for e in range(args.n_experts) for piece in pieces]
    return FUSED_PARTS[kind]


# precomputed rotary tables some files carry: model.py computes its own
IGNORED = re.compile(r"(rotary_emb\.inv_freq|^rope\.freqs)$")


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
    expert = m and layout == "hf" and HF_EXPERT.fullmatch(m.group(2))
    if expert and expert.group(2) in HF_EXPERT_NAMES:
        dest, part = HF_EXPERT_NAMES[expert.group(2)]
        return f"layers.{m.group(1)}.{dest}", f"{part}.{int(expert.group(1))}"
    raise InputError(f"unexpected tensor {name}: not a weight gpt-blitz's model has")


def source_name(dest: str, part: str | None, layout: str) -> str:
    """The inverse of target_name, for error messages that name what the input lacks."""
    if part is not None and "." in part:  # an expert's matrix
        piece, expert = part.split(".")
        return f"{dest.removesuffix('.weight')} {piece} of expert {expert}"
    top, layer_prefix, layer_names = LAYOUTS[layout]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", dest)
    table, prefix = (layer_names, f"{layer_prefix}{m.group(1)}.") if m else (top, "")
    suffix = m.group(2) if m else dest
    return next((prefix + src for src, want in table.items() if want == (suffix, part)), dest)


# ---- config --------------------------------------------------------------------------------------

def as_float(value):
    """A JSON number as a float (8 and 8.0 give the same config.json); anything else is passed on
    for parse_config to refuse with the file's name."""
    return float(value) if type(value) in (int, float) else value


def rope_settings(cfg: dict, where) -> tuple:
    """(rope_base, rope_scaling) from an HF config. transformers 5 writes rope_parameters (theta
    inside); older configs have a top-level rope_theta and an optional rope_scaling dict. Both are
    checked: a scaling model.py does not implement is refused, not ignored, since a model run with
    the wrong rotary frequencies still talks, just worse."""
    found = {}
    for key in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise InputError(f"{where}: {key} must be an object, got {rope!r}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise InputError(f"{where}: rope scaling type {kind!r} ({key}) is not supported "
                             f"(gpt-blitz implements {' and '.join(ROPE_TYPES)})")
        found[key] = kind, rope
    parameters = found.get("rope_parameters", (None, {}))[1]
    theta = parameters.get("rope_theta", cfg["rope_theta"])
    llama3 = next((rope for kind, rope in found.values() if kind == "llama3"), None)
    if llama3 is None:
        return as_float(theta), None
    missing = [k for k in LLAMA3_KEYS if k not in llama3]
    if missing:
        raise InputError(f"{where}: llama3 rope scaling lacks {', '.join(missing)}")
    scaling = {k: as_float(llama3[k]) for k in LLAMA3_KEYS[:3]}
    original = llama3["original_max_position_embeddings"]
    is_whole = type(original) is float and original.is_integer()
    scaling["original_max_position_embeddings"] = int(original) if is_whole else original
    return as_float(theta), scaling


def hf_config_to_args(cfg: dict, where="config.json") -> ModelArgs:
    """ModelArgs from an HF config.json, every field checked by parse_config before any weight is
    read: a wrong type or an absurd size is one error naming the file."""
    model_type = cfg.get("model_type")
    if model_type is None and {"dim", "n_layer"} <= cfg.keys():
        raise InputError(f"{where} is a gpt-blitz config: that folder is converted already")
    if model_type not in SUPPORTED:
        raise InputError(f"unsupported model_type {model_type!r} in {where} "
                         f"(supported: {', '.join(SUPPORTED)})")
    cfg = {**FAMILY_DEFAULTS[model_type], **cfg}
    if cfg.get("hidden_act", "silu") != "silu":
        raise InputError(f"unsupported hidden_act {cfg['hidden_act']!r} in {where} "
                         "(gpt-blitz uses silu)")
    if (model_type != "qwen2" and cfg.get("attention_bias")) or cfg.get("mlp_bias"):
        # Llama's (and Qwen3's) attention_bias also puts a bias on o_proj, which model.py does not
        # have.
        raise InputError(f"{where}: attention_bias / mlp_bias on a {model_type} model is not "
                         "supported")
    missing = [key for key in REQUIRED if key not in cfg]
    if missing:
        raise InputError(f"{where} lacks {', '.join(missing)}")
    for key in (*REQUIRED, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = cfg.get(key)  # checked here too so that the error names the field as the file does
        if value is not None and (type(value) is not int or value < 1):
            raise InputError(f"{where}: {key} must be a positive integer, got {value!r}")
    rope_base, rope_scaling = rope_settings(cfg, where)
    args = parse_config(dict(
        **experts_config(cfg, model_type, where),
        dim=cfg["hidden_size"],
        n_layer=cfg["num_hidden_layers"],
        n_head=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"),  # None: as many as query heads
        head_dim=cfg.get("head_dim"),  # None: hidden_size // num_attention_heads, as transformers
        vocab_size=cfg["vocab_size"],
        block_size=cfg.get("max_position_embeddings") or 2048,
        rope_base=rope_base,
        rope_scaling=rope_scaling,
        norm_eps=cfg["rms_norm_eps"],
        attention_bias=model_type == "qwen2",  # Qwen2 always has q/k/v bias
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
    ), where)
    # Mistral v0.1 (and Qwen2 with use_sliding_window) attend to a sliding window only; model.py
    # attends to everything, which matches only while the sequence fits in the window, so don't
    # allow longer ones.
    window = cfg.get("sliding_window")
    if window is not None and (type(window) is not int or window < 1):
        raise InputError(f"{where}: sliding_window must be a positive integer or null, "
                         f"got {window!r}")
    layer_types = cfg.get("layer_types")
    if layer_types is None:  # left out, or null: derived as transformers derives them
        # Qwen2 and Qwen3 slide from layer max_window_layers on, the others in every layer
        first = cfg.get("max_window_layers", 28) if model_type in ("qwen2", "qwen3") else 0
        if type(first) is not int or first < 0:
            raise InputError(f"{where}: max_window_layers must be an integer >= 0, got {first!r}")
        layer_types = ["sliding_attention"] * (first < args.n_layer)
    if not isinstance(layer_types, list):
        raise InputError(f"{where}: layer_types must be a list, got {layer_types!r}")
    sliding = cfg.get("use_sliding_window", True) is not False
    if window and sliding and "sliding_attention" in layer_types and window < args.block_size:
        print(f"note: {model_type} uses sliding-window attention ({window} tokens) and gpt-blitz "
              f"does not; capping block_size at {window} (from {args.block_size}), where the two "
              "agree exactly")
        args.block_size = window
    return args


def experts_config(cfg: dict, model_type: str, where) -> dict:
    """The feed-forward fields of ModelArgs: one dense FFN, or Mixtral's / Qwen3-MoE's experts
    (every layer's: Qwen3-MoE configs that keep some layers dense are refused)."""
    # one field, two names: num_experts (older files) and num_local_experts (transformers 5)
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if model_type == "mixtral":
        return dict(intermediate_size=cfg["intermediate_size"], n_experts=experts,
                    n_active_experts=cfg.get("num_experts_per_tok"), norm_topk_prob=True)
    if model_type != "qwen3_moe":
        return dict(intermediate_size=cfg["intermediate_size"])
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise InputError(f"{where}: dense layers among the experts' (mlp_only_layers, "
                         "decoder_sparse_step) are not supported")
    return dict(intermediate_size=cfg.get("moe_intermediate_size"), n_experts=experts,
                n_active_experts=cfg.get("num_experts_per_tok"),
                norm_topk_prob=cfg["norm_topk_prob"])


def meta_params_to_args(params: dict, shapes: dict, where) -> ModelArgs:
    """Meta's params.json when the snapshot has no HF config.json. Vocabulary and FFN sizes come
    from the tensor shapes (params.json derives the FFN size from multiple_of rules and may say
    vocab_size -1)."""
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    missing += [k for k in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight")
                if k not in shapes]
    if missing:
        raise InputError(f"{where} (or the weights) lacks {missing[0]}")

    def rows(name):  # 0 for a tensor without rows, which parse_config refuses as a size
        return shapes[name][0] if shapes[name] else 0
    scaled = params.get("use_scaled_rope", False)
    block_size = params.get("max_seq_len") or (131072 if scaled else 8192)
    if "max_seq_len" not in params:
        print(f"note: {where} gives no context length; assuming block_size {block_size} "
              "(Llama-3 defaults)")
    factor = params.get("rope_scaling_factor")
    if scaled and factor is None:
        # Meta's params.json names no factor: Llama 3.1's is 8, but Llama 3.2's 1B and 3B (the only
        # Llama 3 of these widths and depths) take 32, as their HF configs say.
        factor = 32.0 if (params["dim"], params["n_layers"]) in ((2048, 16), (3072, 28)) else 8.0
        print(f"note: {where} gives no rope_scaling_factor; assuming {factor:g} "
              f"(Llama {'3.2' if factor == 32 else '3.1'}'s)")
    scaling = dict(factor=as_float(factor), low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    return parse_config(dict(
        dim=params["dim"],
        n_layer=params["n_layers"],
        n_head=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),  # None: as many as query heads
        vocab_size=rows("tok_embeddings.weight"),
        intermediate_size=rows("layers.0.feed_forward.w1.weight"),
        block_size=block_size,
        rope_base=as_float(params.get("rope_theta", 10000.0)),
        rope_scaling=scaling if scaled else None,
        norm_eps=params.get("norm_eps", 1e-5),
        tie_embeddings="output.weight" not in shapes,
    ), where)


# ---- reading -------------------------------------------------------------------------------------

def find_weights(hf_dir: Path) -> tuple[list[Path], str]:
    """The weight files to read, in order, and their naming layout ("hf" or "meta")."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = hf_dir / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or \
                    not all(isinstance(f, str) for f in weight_map.values()):
                raise InputError(f"{index} lists no weights (its weight_map must map names to "
                                 "files)")
            for name in weight_map.values():  # "model-00001-of-00002.safetensors" and the like
                if not is_file_name(name):
                    shown = repr(name) if len(name) <= 60 else repr(name[:60]) + "..."
                    raise InputError(f"{index} lists shard {shown}: not the name of a file in "
                                     f"{hf_dir} (one name of at most {NAME_MAX} bytes)")
            files = [hf_dir / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InputError(f"shard {missing[0]} listed in {index_name} is missing from "
                                 f"{hf_dir}")
            return files, "hf"
        if (hf_dir / single).is_file():
            return [hf_dir / single], "hf"
    for folder in (hf_dir / "original", hf_dir):
        consolidated = sorted(folder.glob("consolidated.*.pth"))
        if len(consolidated) > 1:
            # Model-parallel shards split each matrix along different dims (and the embedding
            # differently across Llama versions); the HF safetensors of the same model need no
            # merging, so use those.
            raise InputError(f"{folder} holds {len(consolidated)} model-parallel "
                             "consolidated.*.pth shards; merging them is not supported, "
                             "download the HF safetensors weights instead")
        if consolidated:
            return consolidated, "meta"
    raise InputError(f"no weights in {hf_dir} (looked for model.safetensors[.index.json], "
                     "pytorch_model.bin[.index.json], original/consolidated.00.pth)")


def open_shard(path: Path) -> tuple[list[str], callable]:
    """(tensor names, get(name)) for one weights file; tensors are read one at a time on demand."""
    if path.suffix != ".safetensors":
        state_dict = read_weights(path)
        # clone() gives each tensor its own memory so the mapping can go once the shard is done.
        return list(state_dict), lambda name: state_dict.pop(name).clone()
    from safetensors import SafetensorError, safe_open
    try:
        f = safe_open(str(path), framework="pt")  # checks the header covers the whole file
    except (SafetensorError, OSError) as e:  # as in checkpoint.read_weights
        raise unreadable(path, e) from None

    def get(name):
        try:
            return f.get_tensor(name)
        except SafetensorError as e:  # a dtype it makes no tensor of (F6_E2M3, ...)
            raise InputError(f"cannot read {name} from {path}: {one_line(e)}") from None
    return list(f.keys()), get


def read_hf_config(hf_dir: Path, files: list[Path], layout: str) -> ModelArgs:
    if (hf_dir / "config.json").is_file():
        return hf_config_to_args(read_json(hf_dir / "config.json"), hf_dir / "config.json")
    params = files[0].parent / "params.json"
    if layout == "meta" and params.is_file():
        # mmap: no data read
        shapes = {name: tuple(t.shape) for name, t in read_weights(files[0]).items()}
        return meta_params_to_args(read_json(params), shapes, params)
    raise InputError(f"no config.json in {hf_dir}")


def tokenizer_sources(hf_dir: Path, layout: str) -> dict:
    """{checkpoint file name: source file} of the tokenizer files the snapshot has."""
    sources = {}
    for name in TOKENIZER_FILES:
        source = hf_dir / name
        if not source.is_file() and name == "tokenizer.model" and layout == "meta":
            source = hf_dir / "original" / name  # Llama-3's tiktoken file ships beside the .pth
        if source.is_file():
            check_readable(source)
            sources[name] = source
    return sources


# ---- converting ----------------------------------------------------------------------------------

def convert(files: list[Path], layout: str, args: ModelArgs) -> dict:
    expected = {name: t.shape for name, t in empty_model(args).state_dict().items()}
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
            if target is None:
                continue
            dest, part = target
            if dest == "output.weight" and dest not in expected:  # a tied model's embedding copy
                continue
            # (a part: an expert's matrix in a dense model, or a dense FFN's in a mixture)
            if dest not in expected or part is not None and part not in fused_parts(dest, args):
                raise InputError(f"unexpected tensor {name}: the config describes no such weight")
            tensor = get(name)
            if not tensor.is_floating_point():
                raise InputError(f"{name} is {str(tensor.dtype).removeprefix('torch.')}: the "
                                 "converter takes float weights (a quantized snapshot? convert "
                                 "its float release, then quantize.py)")
            # Shapes checked before any reshaping, which would fail on a wrong one with an error of
            # its own.
            shape = expected[dest]
            if part is None:
                fits = tensor.shape == shape
            elif len(shape) == 1:  # a piece of a norm or a bias
                fits = tensor.dim() == 1
            else:  # a block of dest's rows (for experts, one expert's matrix)
                fits = tensor.dim() == 2 and tensor.shape[-1] == shape[-1]
            if not fits:
                raise InputError(f"{name} has shape {tuple(tensor.shape)}, which cannot be "
                                 f"{'part of ' if part else ''}{dest} {tuple(shape)}")
            if part in heads and layout == "hf":
                if tensor.shape[0] != heads[part] * args.head_dim:
                    raise InputError(f"{name} has {tensor.shape[0]} rows; config.json says "
                                     f"{heads[part]} heads of {args.head_dim}")
                tensor = unpermute(tensor, heads[part], args.head_dim)
            if dest.endswith(("q_norm.weight", "k_norm.weight")) and layout == "hf":
                tensor = unpermute(tensor, 1, args.head_dim)  # one head's dims, rotary order
            if part is not None:
                pieces = pending.setdefault(dest, {})
                pieces[part] = tensor
                order = fused_parts(dest, args)
                if len(pieces) < len(order):
                    continue
                del pending[dest]
                dtypes = {pieces[p].dtype for p in order}
                if len(dtypes) > 1 and any(d.itemsize == 1 for d in dtypes):  # cat cannot mix them
                    raise InputError(f"the pieces of {dest} ({', '.join(map(str, order))}) come in "
                                     f"different dtypes ({', '.join(sorted(map(str, dtypes)))})")
                # (sum of the parts' rows, in_features) or (rows,)
                tensor = torch.cat([pieces[p] for p in order])
                if len(expected[dest]) == 3:  # experts: (n_experts, rows, in_features)
                    tensor = tensor.unflatten(0, (args.n_experts, -1))
                del pieces
            if tensor.shape != expected[dest]:
                raise InputError(f"{dest} (from {name}) has shape {tuple(tensor.shape)}; the "
                                 f"config implies {tuple(expected[dest])}")
            out[dest] = tensor
        del get  # drop the shard's file handle / mapping before opening the next
    bar.close()
    for dest, pieces in pending.items():
        part = next(p for p in fused_parts(dest, args) if p not in pieces)
        raise InputError(f"missing tensor {source_name(dest, part, layout)}")
    for dest in expected:
        if dest not in out:
            raise InputError(f"missing tensor {source_name(dest, None, layout)}")
    return out


# ---- main ----------------------------------------------------------------------------------------

def run(opts) -> tuple[dict, list]:
    """Convert as opts say; returns (the converted tensors, the tokenizer files copied)."""
    checkpoint_dir, hf_dir = opts.checkpoint_dir, opts.hf_dir or opts.checkpoint_dir / "hf"
    if hf_dir.resolve() == checkpoint_dir.resolve():
        raise InputError("--hf_dir must differ from --checkpoint_dir (the output would overwrite "
                         "config.json)")
    # before the output's check, which would take a snapshot downloaded into --checkpoint_dir
    # itself for a checkpoint to --force over
    if not hf_dir.is_dir():
        raise InputError(f"no HF checkpoint folder at {hf_dir} (download it with "
                         "scripts/download.py, or name the snapshot's folder with --hf_dir)")
    check_utf8(hf_dir, "--hf_dir")
    check_output_folder(checkpoint_dir, "--checkpoint_dir", opts.force)
    files, layout = find_weights(hf_dir)
    args = read_hf_config(hf_dir, files, layout)
    copies = tokenizer_sources(hf_dir, layout)
    state_dict = convert(files, layout, args)
    save_checkpoint(checkpoint_dir, args, state_dict,
                    {name: copier(source) for name, source in copies.items()}, force=opts.force)
    return state_dict, list(copies)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True,
                        help="where the gpt-blitz checkpoint goes, e.g. checkpoints/REPO")
    parser.add_argument("--hf_dir", type=Path, default=None,
                        help="the raw HF snapshot (default: CHECKPOINT_DIR/hf)")
    parser.add_argument("--force", action="store_true",
                        help="replace the checkpoint CHECKPOINT_DIR holds already: its files "
                             "that this conversion does not write (quantized copies too) are "
                             "removed; sub-folders such as hf/ are left alone")
    with script_exits():
        opts = parser.parse_args(argv)
        state_dict, copied = run(opts)
    n_bytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in state_dict.values()}))
    print(f"wrote {opts.checkpoint_dir / 'model.safetensors'} ({len(state_dict)} tensors, "
          f"{n_bytes / 1e9:.2f} GB, {dtypes}) and {', '.join(['config.json', *copied])}")
    if not {"tokenizer.json", "tokenizer.model"} & set(copied):
        print(f"note: the snapshot has no tokenizer.json or tokenizer.model; text prompts need "
              f"one of them in {opts.checkpoint_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
