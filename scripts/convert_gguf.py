"""Convert a llama.cpp GGUF file into a gpt-blitz checkpoint folder.

    python scripts/convert_gguf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out checkpoints/SmolLM2-135M-Instruct

Quantized tensors are dequantized (their exact values, stored as floats); the config comes from the
GGUF metadata and the tokenizer is rebuilt from it as tokenizer.json + tokenizer_config.json. Only the
`llama` architecture with a byte-level BPE ("gpt2") vocabulary is supported so far.

Layout facts this relies on: GGUF lists a tensor's dims fastest-first, so numpy's shape is the reverse,
(out_features, in_features), which is exactly nn.Linear's weight; and llama.cpp stores llama q/k rows in
Meta's interleaved rotary order, which is this repo's layout too, so q/k need no permutation.
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts run as `python scripts/x.py`

import numpy as np
import torch

from model import ModelArgs, atomic_path, error_summary, llama3_scale, rope_freqs, save_checkpoint
from tokenizer import LLAMA3_PATTERN

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Pre-tokenizer splits, by the name llama.cpp writes as `tokenizer.ggml.pre`. Each entry: regexes that
# isolate pieces before the byte-level step, and whether ByteLevel then applies GPT-2's own split regex.
# (A GPT-2 style vocabulary is trained on text cut this way; cutting it differently changes the ids.)
GPT2_ONLY = dict(splits=[], gpt2_regex=True)
DIGITS_THEN_GPT2 = dict(splits=[r"\p{N}"], gpt2_regex=True)  # StarCoder family: every digit on its own
# Llama-3 looks a whole piece up in the vocabulary before merging (ignore_merges) and adds BOS by default.
LLAMA3 = dict(splits=[LLAMA3_PATTERN], gpt2_regex=False, ignore_merges=True, add_bos=True)
PRE_TOKENIZERS = {
    "default": GPT2_ONLY, "gpt2": GPT2_ONLY,
    "smollm": DIGITS_THEN_GPT2, "starcoder": DIGITS_THEN_GPT2,
    "llama-bpe": LLAMA3, "llama3": LLAMA3, "llama-v3": LLAMA3,
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

# GGUF tensor name (inside blk.N.) -> (our name inside layers.N., fused group or None)
LAYER_TENSORS = {
    "attn_norm.weight": ("attention_norm.weight", None),
    "attn_q.weight": ("attention.wqkv.weight", "q"), "attn_k.weight": ("attention.wqkv.weight", "k"),
    "attn_v.weight": ("attention.wqkv.weight", "v"),
    "attn_q.bias": ("attention.wqkv.bias", "q"), "attn_k.bias": ("attention.wqkv.bias", "k"),
    "attn_v.bias": ("attention.wqkv.bias", "v"),
    "attn_output.weight": ("attention.wo.weight", None),
    "ffn_norm.weight": ("ffn_norm.weight", None),
    "ffn_gate.weight": ("feed_forward.w13.weight", "gate"), "ffn_up.weight": ("feed_forward.w13.weight", "up"),
    "ffn_down.weight": ("feed_forward.w2.weight", None),
}
FUSE_ORDER = {"attention.wqkv.weight": ("q", "k", "v"), "attention.wqkv.bias": ("q", "k", "v"),
              "feed_forward.w13.weight": ("gate", "up")}
TOP_TENSORS = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight", "output.weight": "output.weight"}


# ---- metadata -------------------------------------------------------------------------------------

def open_gguf(path: Path):
    import gguf
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated header, ... all mean the same thing to the user
        raise ValueError(f"{path} is not a readable GGUF file ({error_summary(e)})") from None


def read_metadata(reader) -> dict:
    """Every key -> value, except the three big tokenizer arrays, which build_tokenizer() reads itself."""
    big = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
    return {k: f.contents() for k, f in reader.fields.items() if k not in big and not k.startswith("GGUF.")}


def float32_value(x: float) -> float:
    # GGUF stores float32: 1e-5 arrives as 9.99999974e-06. The shortest decimal that rounds to the
    # same float32 is the number the model's authors wrote.
    return float(str(np.float32(x)))


def model_args(meta: dict, reader, path: Path) -> ModelArgs:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported architecture {arch!r} in {path.name}: only 'llama' GGUF files can be converted")
    if meta.get("llama.expert_count", 0):
        raise ValueError(f"{path.name} is a mixture-of-experts model ({meta['llama.expert_count']} experts): not supported")

    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{path.name} lacks metadata llama.{key}")
        if isinstance(value, list):
            raise ValueError(f"{path.name}: per-layer llama.{key} is not supported")
        return value

    dim, n_head = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", dim // n_head)
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{path.name}: key and value head sizes differ, which this model does not support")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path.name}: rotary embedding on {get('rope.dimension_count')} of {head_dim} head dims "
                         "(partial rotary) is not supported")
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"{path.name} has no vocabulary (tokenizer.ggml.tokens)")
    tensors = {t.name: t for t in reader.tensors}
    rope_base = float32_value(get("rope.freq_base", 10000.0))
    return ModelArgs(
        dim=dim, n_layer=get("block_count"), n_head=n_head, n_kv_heads=get("attention.head_count_kv", n_head),
        head_dim=head_dim, vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        intermediate_size=get("feed_forward_length"), block_size=get("context_length", 2048),
        rope_base=rope_base, rope_scaling=rope_scaling(meta, tensors, head_dim, rope_base, path),
        norm_eps=float32_value(get("attention.layer_norm_rms_epsilon", 1e-5)),
        attention_bias="blk.0.attn_q.bias" in tensors, tie_embeddings="output.weight" not in tensors,
    )


def rope_scaling(meta: dict, tensors: dict, head_dim: int, rope_base: float, path: Path):
    """None, or the Llama-3.1 scaling dict ModelArgs takes. Anything else is refused, not ignored:
    a model run with the wrong rotary frequencies still talks, just worse."""
    kind = meta.get("llama.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:  # llama.cpp stores Llama-3.1 scaling as one divisor per frequency
        from gguf.quants import dequantize
        t = tensors["rope_freqs.weight"]
        divisors = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float64)).flatten()
        original = meta.get("llama.rope.scaling.original_context_length", 8192)
        return llama3_scaling_from_divisors(divisors, head_dim, rope_base, original, path.name)
    if kind != "none":
        raise ValueError(f"{path.name}: rope scaling {kind!r} is not supported (only Llama-3.1 style rope_freqs)")
    return None


def llama3_scaling_from_divisors(divisors, head_dim: int, rope_base: float, original_context: int, name: str) -> dict:
    """GGUF keeps only the result of Llama-3.1 scaling (freq / divisor), not its parameters. Every released
    Llama-3.1/3.2 uses low=1, high=4 with an 8192 original context, and the factor is the largest divisor;
    accept those parameters only if they reproduce the stored divisors."""
    freqs = rope_freqs(rope_base, head_dim)
    scaling = dict(factor=float32_value(divisors.max().item()), low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=int(original_context))
    if divisors.shape != freqs.shape or not torch.allclose(freqs / llama3_scale(freqs, **scaling), divisors, rtol=1e-4):
        raise ValueError(f"{name}: rope_freqs is not Llama-3.1 rope scaling with {scaling}; not supported")
    return scaling


# ---- weights ----------------------------------------------------------------------------------------

def expected_shapes(args: ModelArgs) -> dict:
    q, kv = args.n_head * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,),
              "output.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layer):
        p = f"layers.{i}."
        shapes |= {p + "attention_norm.weight": (args.dim,), p + "ffn_norm.weight": (args.dim,),
                   p + "attention.wqkv.weight": (q + 2 * kv, args.dim), p + "attention.wqkv.bias": (q + 2 * kv,),
                   p + "attention.wo.weight": (args.dim, q),
                   p + "feed_forward.w13.weight": (2 * args.intermediate_size, args.dim),
                   p + "feed_forward.w2.weight": (args.dim, args.intermediate_size)}
    return shapes


def our_name(gguf_name: str):
    """(our state-dict name, fused group or None) for a GGUF tensor name."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in LAYER_TENSORS:
        ours, group = LAYER_TENSORS[m.group(2)]
        return f"layers.{m.group(1)}.{ours}", group
    if gguf_name in TOP_TENSORS:
        return TOP_TENSORS[gguf_name], None
    raise ValueError(f"unexpected tensor {gguf_name!r} for a llama model")


def convert_weights(reader, args: ModelArgs, dtype: torch.dtype) -> dict:
    from gguf.quants import dequantize
    from tqdm import tqdm
    # rope_freqs is already folded into args.rope_scaling. Names are mapped up front so that an odd
    # file fails before the slow part.
    plan = [(t, *our_name(t.name)) for t in reader.tensors if t.name != "rope_freqs.weight"]
    state_dict, parts = {}, {}  # parts: our fused name -> {group: tensor}
    for t, name, group in tqdm(plan, desc="dequantizing", unit="tensor"):
        # dequantize gives numpy's shape: GGUF's dims reversed = (out_features, in_features). np.array
        # copies, since unquantized tensors come back as read-only views of the memory-mapped file.
        weight = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).to(dtype)
        if group is None:
            state_dict[name] = weight
        else:
            parts.setdefault(name, {})[group] = weight
    for name, groups in parts.items():
        order = FUSE_ORDER[name.split(".", 2)[2]]
        if set(groups) != set(order):
            raise ValueError(f"{name}: found {sorted(groups)} of {list(order)}; the GGUF file is incomplete")
        state_dict[name] = torch.cat([groups[g] for g in order])  # rows: q, k, v / gate, up
    check_shapes(state_dict, args)
    return state_dict


def check_shapes(state_dict: dict, args: ModelArgs):
    shapes = expected_shapes(args)
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the metadata implies {shapes[name]}")
    optional = {"output.weight"} if args.tie_embeddings else set()
    optional |= {n for n in shapes if n.endswith(".bias")} if not args.attention_bias else set()
    missing = sorted(set(shapes) - set(state_dict) - optional, key=len)
    if missing:
        raise ValueError(f"the GGUF file lacks the tensor for {missing[0]} (and {len(missing) - 1} more)")


# ---- tokenizer --------------------------------------------------------------------------------------

def build_tokenizer(meta: dict, reader, path: Path):
    """(tokenizers.Tokenizer, tokenizer_config dict, generation_config dict) from the GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path.name}: tokenizer model {kind!r} is not supported yet (only byte-level BPE 'gpt2')")
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    if pre_name not in PRE_TOKENIZERS:
        raise ValueError(f"{path.name}: unknown pre-tokenizer {pre_name!r}; known: {', '.join(PRE_TOKENIZERS)}")
    pre = PRE_TOKENIZERS[pre_name]

    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()  # already spelled in GPT-2's byte alphabet (Ġ = space)
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else []
    if "tokenizer.ggml.merges" not in fields:
        raise ValueError(f"{path.name}: a BPE vocabulary without tokenizer.ggml.merges is not supported")
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path.name}: the vocabulary has duplicate tokens")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.get("ignore_merges", False)))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre["splits"]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre["gpt2_regex"])])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) and user-defined ones are matched whole in text, never merged into.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None or not 0 <= i < len(tokens) else tokens[i]

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre.get("add_bos", False)))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = token("bos"), token("eos")
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise ValueError(f"{path.name}: the tokenizer adds BOS/EOS but the file gives no valid id for it")
    if add_bos or add_eos:
        # The post-processor, not the caller, decides on BOS/EOS: encode(add_special_tokens=True) does the right thing.
        before, after = ([f"{bos}:0"] if add_bos else []), ([f"{eos}:0"] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(
            single=before + ["$A:0"] + after, pair=before + ["$A:0"] + after + before + ["$B:1"] + after,
            special_tokens=[(t, vocab[t]) for t in {*([bos] if add_bos else []), *([eos] if add_eos else [])}])

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
              "bos_token": bos, "eos_token": eos, "unk_token": token("unknown"), "pad_token": token("padding"),
              "model_max_length": meta.get("llama.context_length"), "chat_template": meta.get("tokenizer.chat_template")}
    config = {k: v for k, v in config.items() if v is not None}
    # Instruct models often end a turn with a token other than EOS (Llama-3's <|eot_id|>): stop on all of them.
    stop_ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    stop_ids = list(dict.fromkeys(i for i in stop_ids if i is not None))
    generation = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
                  "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else stop_ids or None}
    return tok, config, {k: v for k, v in generation.items() if v is not None}


# ---- main -------------------------------------------------------------------------------------------

def convert(gguf_path: Path, out: Path, dtype: torch.dtype):
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    args = model_args(meta, reader, gguf_path)
    tokenizer, tok_config, gen_config = build_tokenizer(meta, reader, gguf_path)  # cheap: fail before dequantizing
    print(f"{gguf_path.name}: llama, {args.n_layer} layers, dim {args.dim}, {args.n_head}/{args.n_kv_heads} heads, "
          f"vocab {args.vocab_size}, tokenizer pre={meta.get('tokenizer.ggml.pre', 'default')!r}")
    state_dict = convert_weights(reader, args, dtype)

    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, args, state_dict)
    with atomic_path(out / "tokenizer.json") as tmp:
        tokenizer.save(tmp)
    for name, data in (("tokenizer_config.json", tok_config), ("generation_config.json", gen_config)):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help="the .gguf file")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write, e.g. checkpoints/NAME")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weight dtype (default float32: dequantized Q4/Q8 values are exact in float32, "
                             "and GGUF models are usually small enough to afford it; bfloat16 rounds them)")
    args = parser.parse_args()
    try:
        convert(args.gguf, args.out, DTYPES[args.dtype])
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
