"""Convert a llama.cpp GGUF file into a gpt-blitz checkpoint folder.

    python scripts/convert_gguf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --out checkpoints/SmolLM2-135M-Instruct [--force]

Quantized tensors are dequantized (their exact values, stored as floats); the config comes from the
GGUF metadata and the tokenizer is rebuilt from it as tokenizer.json + tokenizer_config.json +
generation_config.json. All of them are written as one set (see checkpoint.save_checkpoint); a
folder that holds a checkpoint already is replaced only with --force. The `llama` (Mixtral's
experts too), `qwen3` and `qwen3moe` architectures with a byte-level BPE ("gpt2") or sentencepiece
BPE ("llama") vocabulary are supported so far.

Layout facts this relies on: GGUF lists a tensor's dims fastest-first, so numpy's shape is the
reverse, (out_features, in_features), which is exactly nn.Linear's weight, and (n_experts,
out_features, in_features) for stacked experts, exactly model.Experts'; llama.cpp stores llama q/k
rows in Meta's interleaved rotary order, which is this repo's layout too, but Qwen's in HF's
rotate-half order (llama.cpp rotates them "neox"-style), so those are permuted as the HF converter
does, Qwen3's q/k norm weights with them.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from checkpoint import (ArgumentParser, InputError, check_output_folder,  # noqa: E402
                        check_tensors, empty_model, one_line, parse_config, save_checkpoint,
                        script_exits, unpermute)
from model import ModelArgs, llama3_scale  # noqa: E402
from tokenizer import LLAMA3_PATTERN  # noqa: E402

ARCHITECTURES = ("llama", "qwen3", "qwen3moe")
ROTATE_HALF = ("qwen3", "qwen3moe")  # q/k rows in HF's order: see the top

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Pre-tokenizer splits, by the name llama.cpp writes as `tokenizer.ggml.pre`. Each entry: regexes
# that isolate pieces before the byte-level step, and whether ByteLevel then applies GPT-2's own
# split regex. (A GPT-2 style vocabulary is trained on text cut this way; cutting it differently
# changes the ids.)
GPT2_ONLY = dict(splits=[], gpt2_regex=True)
DIGITS_THEN_GPT2 = dict(splits=[r"\p{N}"], gpt2_regex=True)  # StarCoder family: every digit alone
# Llama-3 looks a whole piece up in the vocabulary before merging (ignore_merges) and adds BOS by
# default.
LLAMA3 = dict(splits=[LLAMA3_PATTERN], gpt2_regex=False, ignore_merges=True, add_bos=True)
PRE_TOKENIZERS = {
    "default": GPT2_ONLY, "gpt2": GPT2_ONLY,
    "smollm": DIGITS_THEN_GPT2, "starcoder": DIGITS_THEN_GPT2,
    "llama-bpe": LLAMA3, "llama3": LLAMA3, "llama-v3": LLAMA3,
    # Qwen2 / Qwen3: Llama-3's split, but every digit alone
    "qwen2": dict(splits=[LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")], gpt2_regex=False),
}
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # llama.cpp token types

# GGUF tensor name (inside blk.N.) -> (our name inside layers.N., fused group or None)
LAYER_TENSORS = {
    "attn_norm.weight": ("attention_norm.weight", None),
    "attn_q.weight": ("attention.wqkv.weight", "q"),
    "attn_k.weight": ("attention.wqkv.weight", "k"),
    "attn_v.weight": ("attention.wqkv.weight", "v"),
    "attn_q.bias": ("attention.wqkv.bias", "q"), "attn_k.bias": ("attention.wqkv.bias", "k"),
    "attn_v.bias": ("attention.wqkv.bias", "v"),
    "attn_output.weight": ("attention.wo.weight", None),
    "ffn_norm.weight": ("ffn_norm.weight", None),
    "ffn_gate.weight": ("feed_forward.w13.weight", "gate"),
    "ffn_up.weight": ("feed_forward.w13.weight", "up"),
    "ffn_down.weight": ("feed_forward.w2.weight", None),
    "attn_q_norm.weight": ("attention.q_norm.weight", None),  # Qwen3
    "attn_k_norm.weight": ("attention.k_norm.weight", None),
    # a mixture of experts: the router, and every expert's matrices stacked
    "ffn_gate_inp.weight": ("feed_forward.gate.weight", None),
    "ffn_gate_exps.weight": ("feed_forward.w13.weight", "gate"),
    "ffn_up_exps.weight": ("feed_forward.w13.weight", "up"),
    "ffn_down_exps.weight": ("feed_forward.w2.weight", None),
}
FUSE_ORDER = {"attention.wqkv.weight": ("q", "k", "v"), "attention.wqkv.bias": ("q", "k", "v"),
              "feed_forward.w13.weight": ("gate", "up")}  # along the rows: dim 1 of experts
TOP_TENSORS = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
               "output.weight": "output.weight"}
REQUIRED = object()  # get()'s default for metadata a file must have
INT_KEYS = ("embedding_length", "block_count", "attention.head_count", "attention.head_count_kv",
            "attention.key_length", "feed_forward_length", "context_length", "expert_count",
            "expert_used_count", "expert_feed_forward_length")


# ---- metadata -----------------------------------------------------------------------------------

def open_gguf(path: Path):
    import gguf
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a GGUF file")
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    try:
        return gguf.GGUFReader(path)
    # ValueError: bad magic or version, an empty file, a truncated tensor, a name not UTF-8;
    # IndexError: a header cut short; KeyError: a key twice; OSError: no permission
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise InputError(f"{path} is not a readable GGUF file ({one_line(e)})") from None


def read_metadata(reader) -> dict:
    """Every key -> value, except the big tokenizer arrays, which build_tokenizer() reads itself."""
    big = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
           "tokenizer.ggml.scores"}
    return {k: f.contents() for k, f in reader.fields.items()
            if k not in big and not k.startswith("GGUF.")}


def float32_value(x):
    """GGUF stores float32: 1e-5 arrives as 9.99999974e-06. The shortest decimal that rounds to the
    same float32 is the number the model's authors wrote. Anything that is not a finite float32
    (a string, inf) is passed on for parse_config to refuse."""
    if type(x) not in (int, float) or not abs(x) < 3e38:
        return x
    return float(str(np.float32(x)))


def model_args(meta: dict, reader, path: Path) -> ModelArgs:
    """ModelArgs from the metadata, every field checked by parse_config before any tensor is
    read."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(f"unsupported architecture {arch!r} in {path.name}: only "
                         f"{', '.join(map(repr, ARCHITECTURES))} GGUF files can be converted")

    def get(key, default=REQUIRED):
        value = meta.get(f"{arch}.{key}", default)
        if value is REQUIRED:
            raise InputError(f"{path.name} lacks metadata {arch}.{key}")
        if isinstance(value, list):
            raise InputError(f"{path.name}: per-layer {arch}.{key} is not supported")
        return value

    if "tokenizer.ggml.tokens" not in reader.fields:
        raise InputError(f"{path.name} has no vocabulary (tokenizer.ggml.tokens)")
    for key in INT_KEYS:
        value = get(key, None)  # checked here too so that the error names the key as the file does
        if value is not None and (type(value) is not int or value < 1):
            raise InputError(f"{path.name}: {arch}.{key} must be a positive integer, got {value!r}")
    tensors = {t.name: t for t in reader.tensors}
    # experts: llama.cpp normalises the chosen experts' weights for Mixtral and Qwen3-MoE alike
    experts = dict(n_experts=get("expert_count"), n_active_experts=get("expert_used_count"),
                   intermediate_size=get("expert_feed_forward_length", None)
                   or get("feed_forward_length"),
                   norm_topk_prob=True) if get("expert_count", 0) else {}
    fields = dict(
        dim=get("embedding_length"), n_layer=get("block_count"), n_head=get("attention.head_count"),
        n_kv_heads=get("attention.head_count_kv", None),  # None: as many as query heads
        head_dim=get("attention.key_length", None),  # None: dim // n_head
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        intermediate_size=get("feed_forward_length"), block_size=get("context_length", 2048),
        rope_base=float32_value(get("rope.freq_base", 10000.0)),
        norm_eps=float32_value(get("attention.layer_norm_rms_epsilon", 1e-5)),
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        tie_embeddings="output.weight" not in tensors)
    fields.update(experts)
    args = parse_config(fields, path.name)
    if get("attention.value_length", args.head_dim) != args.head_dim:
        raise InputError(f"{path.name}: key and value head sizes differ, which this model does not "
                         "support")
    rotary = get("rope.dimension_count", args.head_dim)
    if rotary != args.head_dim:
        raise InputError(f"{path.name}: rotary embedding on {rotary!r} of {args.head_dim} head "
                         "dims (partial rotary) is not supported")
    scaling = rope_scaling(meta, arch, tensors, args.head_dim, args.rope_base, path)
    return parse_config({**fields, "rope_scaling": scaling}, path.name)


def rope_scaling(meta: dict, arch: str, tensors: dict, head_dim: int, rope_base: float,
                 path: Path):
    """None, or the Llama-3.1 scaling dict ModelArgs takes. Anything else is refused, not ignored:
    a model run with the wrong rotary frequencies still talks, just worse."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    # A factor without a type is linear scaling to llama.cpp (older files: rope.scale_linear);
    # 0 or none is no scaling.
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 0))
    if kind == "none" and factor not in (0, 1):
        kind = "linear"
    if kind != "none":  # linear, yarn, longrope: llama.cpp writes no type for Llama-3.1's scaling
        raise InputError(f"{path.name}: rope scaling type {kind!r} is not supported (gpt-blitz "
                         "implements plain rotary embeddings and Llama-3.1 scaling)")
    if "rope_freqs.weight" not in tensors:
        return None
    # llama.cpp stores Llama-3.1 scaling as one divisor per frequency
    from gguf.quants import dequantize
    t = tensors["rope_freqs.weight"]
    check_convertible(t, path)
    divisors = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float64))
    original = meta.get(f"{arch}.rope.scaling.original_context_length", 8192)
    if type(original) is not int or original < 1:
        raise InputError(f"{path.name}: {arch}.rope.scaling.original_context_length must be a "
                         f"positive integer, got {original!r}")
    return llama3_scaling_from_divisors(divisors.flatten(), head_dim, rope_base, original,
                                        path.name)


def llama3_scaling_from_divisors(divisors, head_dim: int, rope_base: float, original_context: int,
                                 name: str) -> dict:
    """GGUF keeps only the result of Llama-3.1 scaling (freq / divisor), not its parameters. Every
    released Llama-3.1/3.2 uses low=1, high=4 with an 8192 original context, and the factor is the
    largest divisor; accept those parameters only if they reproduce the stored divisors."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    freqs = 1.0 / rope_base ** exponents  # (head_dim // 2,): rope_table's unscaled frequencies
    if divisors.shape != freqs.shape:
        raise InputError(f"{name}: rope_freqs holds {divisors.numel()} values for "
                         f"{freqs.numel()} rotary frequencies")
    scaling = dict(factor=float32_value(divisors.max().item()), low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=int(original_context))
    if not torch.allclose(freqs / llama3_scale(freqs, **scaling), divisors, rtol=1e-4):
        raise InputError(f"{name}: rope_freqs is not Llama-3.1 rope scaling with {scaling}; not "
                         "supported")
    return scaling


# ---- weights ------------------------------------------------------------------------------------

def our_name(gguf_name: str):
    """(our state-dict name, fused group or None) for a GGUF tensor name."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in LAYER_TENSORS:
        ours, group = LAYER_TENSORS[m.group(2)]
        return f"layers.{m.group(1)}.{ours}", group
    if gguf_name in TOP_TENSORS:
        return TOP_TENSORS[gguf_name], None
    raise InputError(f"unexpected tensor {gguf_name!r} for this architecture")


# Tensor types gguf cannot dequantize: integers, float64, blocks llama.cpp keeps for activations.
UNCONVERTIBLE_TYPES = ("F64", "I8", "I16", "I32", "I64", "Q8_1", "Q8_K", "Q1_0")


def check_convertible(t, path: Path):
    if t.tensor_type.name in UNCONVERTIBLE_TYPES:
        raise InputError(f"{path.name}: {t.name} is of type {t.tensor_type.name}, which cannot be "
                         "converted")


def plan_tensors(reader, args: ModelArgs, path: Path) -> list:
    """(GGUF tensor, our name, fused group) for every tensor to convert. The shapes they will have
    are checked against the model first, from the header alone: a file that does not match its
    metadata fails before anything is dequantized. rope_freqs is already folded into
    args.rope_scaling."""
    plan = [(t, *our_name(t.name)) for t in reader.tensors if t.name != "rope_freqs.weight"]
    # Counted first: a block_count far beyond the file's blocks is refused before a model of that
    # many layers is built to compare with.
    blocks = {name.split(".")[1] for _, name, _ in plan if name.startswith("layers.")}
    if len(blocks) != args.n_layer:
        raise InputError(f"{path.name}: block_count is {args.n_layer} but the file holds "
                         f"tensors of {len(blocks)} blocks")
    shapes, parts = {}, {}  # parts: our fused name -> {group: shape}
    for t, name, group in plan:
        check_convertible(t, path)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        if group is None:
            shapes[name] = shape
        else:
            parts.setdefault(name, {})[group] = shape
    for name, groups in parts.items():
        order = FUSE_ORDER[name.split(".", 2)[2]]
        if set(groups) != set(order):
            raise InputError(f"{path.name}: {name}: found {sorted(groups)} of {list(order)}; the "
                             "GGUF file is incomplete")
        shape = groups[order[0]]
        dim = rows_dim(shape)
        if len({groups[g][:dim] + groups[g][dim + 1:] for g in order}) != 1:
            raise InputError(f"{path.name}: the parts of {name} have shapes "
                             f"{[list(groups[g]) for g in order]}, which do not stack")
        # rows stacked
        shapes[name] = (*shape[:dim], sum(groups[g][dim] for g in order), *shape[dim + 1:])
    check_tensors(shapes, empty_model(args), f"{path.name} does not match its metadata")
    return plan


def rows_dim(shape) -> int:
    """The dim of a weight's rows (output features): 0, or 1 for stacked experts."""
    return max(0, len(shape) - 2)


def convert_weights(plan: list, args: ModelArgs, arch: str, dtype: torch.dtype) -> dict:
    from gguf.quants import dequantize
    from tqdm import tqdm
    state_dict, parts = {}, {}  # parts: our fused name -> {group: tensor}
    # disable=None: a bar only on a terminal, so logs and error output stay clean.
    for t, name, group in tqdm(plan, desc="dequantizing", unit="tensor", disable=None):
        # dequantize gives numpy's shape: GGUF's dims reversed = (out_features, in_features).
        # np.array copies, since unquantized tensors come back as read-only views of the
        # memory-mapped file.
        array = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        weight = torch.from_numpy(array).to(dtype)
        if arch in ROTATE_HALF and group in ("q", "k"):
            weight = unpermute(weight, args.n_head if group == "q" else args.n_kv_heads,
                               args.head_dim)
        if arch in ROTATE_HALF and name.endswith(("q_norm.weight", "k_norm.weight")):
            weight = unpermute(weight, 1, args.head_dim)
        if group is None:
            state_dict[name] = weight
        else:
            parts.setdefault(name, {})[group] = weight
    for name, groups in parts.items():
        order = FUSE_ORDER[name.split(".", 2)[2]]
        # rows: q, k, v / gate, up
        pieces = [groups[g] for g in order]
        state_dict[name] = torch.cat(pieces, dim=rows_dim(pieces[0].shape))
    return state_dict


# ---- tokenizer ----------------------------------------------------------------------------------

def build_tokenizer(meta: dict, reader, path: Path):
    """(tokenizers.Tokenizer, tokenizer_config dict, generation_config dict) from the GGUF
    vocabulary: a byte-level BPE ("gpt2": Llama-3, Qwen, SmolLM) or a sentencepiece BPE ("llama":
    Llama-2, Mistral, Mixtral)."""
    from tokenizers import AddedToken, processors
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise InputError(f"{path.name}: tokenizer model {kind!r} is not supported yet (only "
                         "byte-level BPE 'gpt2' and sentencepiece BPE 'llama')")
    fields = reader.fields
    # gpt2: in GPT-2's byte alphabet (Ġ = space); llama: sentencepiece's pieces (▁ = space)
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents() \
        if "tokenizer.ggml.token_type" in fields else []
    if not all(isinstance(t, str) for t in tokens):
        raise InputError(f"{path.name}: tokenizer.ggml.tokens must be a list of strings")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise InputError(f"{path.name}: the vocabulary has duplicate tokens")
    if kind == "gpt2":
        tok, bos_by_default = byte_level_bpe(meta, fields, vocab, path)
    else:
        tok, bos_by_default = sentencepiece_bpe(meta, fields, tokens, types, vocab, path)
    # Control tokens (<|im_start|>, <s>, ...) and user-defined ones are matched whole in text,
    # never merged into.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def token_id(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return i if type(i) is int and 0 <= i < len(tokens) else None

    def token(key):
        i = token_id(key)
        return None if i is None else tokens[i]

    add_bos = typed(meta, "tokenizer.ggml.add_bos_token", bool, path, bos_by_default)
    add_eos = typed(meta, "tokenizer.ggml.add_eos_token", bool, path, False)
    bos, eos = token("bos"), token("eos")
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise InputError(f"{path.name}: the tokenizer adds BOS/EOS but the file gives no valid id "
                         "for it")
    if add_bos or add_eos:
        # The post-processor, not the caller, decides on BOS/EOS: encode(add_special_tokens=True)
        # does the right thing.
        before, after = ([f"{bos}:0"] if add_bos else []), ([f"{eos}:0"] if add_eos else [])
        specials = {*([bos] if add_bos else []), *([eos] if add_eos else [])}
        tok.post_processor = processors.TemplateProcessing(
            single=before + ["$A:0"] + after,
            pair=before + ["$A:0"] + after + before + ["$B:1"] + after,
            special_tokens=[(t, vocab[t]) for t in specials])

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
              "add_eos_token": add_eos, "bos_token": bos, "eos_token": eos,
              "unk_token": token("unknown"), "pad_token": token("padding"),
              "model_max_length": meta.get(f"{meta.get('general.architecture')}.context_length"),
              "chat_template": typed(meta, "tokenizer.chat_template", str, path)}
    config = {k: v for k, v in config.items() if v is not None}
    # Instruct models often end a turn with a token other than EOS (Llama-3's <|eot_id|>): stop on
    # all of them.
    stop_ids = [token_id(k) for k in ("eos", "eot", "eom")]
    stop_ids = list(dict.fromkeys(i for i in stop_ids if i is not None))
    generation = {"bos_token_id": token_id("bos"),
                  "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else stop_ids or None}
    return tok, config, {k: v for k, v in generation.items() if v is not None}


def typed(meta: dict, key: str, kind: type, path: Path, default=None):
    """meta[key], which must be of type kind when given."""
    value = meta.get(key, default)
    if value is not None and type(value) is not kind:
        raise InputError(f"{path.name}: {key} must be a {kind.__name__}, got {value!r}")
    return value


def byte_level_bpe(meta: dict, fields, vocab: dict, path: Path):
    """(tokenizers.Tokenizer, whether it adds BOS unless the file says) of a GPT-2 style BPE: the
    text cut by the pre-tokenizer's regexes, each piece's UTF-8 bytes merged by the file's
    merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre_name, str) or pre_name not in PRE_TOKENIZERS:
        raise InputError(f"{path.name}: unknown pre-tokenizer {pre_name!r}; known: "
                         f"{', '.join(PRE_TOKENIZERS)}")
    pre = PRE_TOKENIZERS[pre_name]
    if "tokenizer.ggml.merges" not in fields:
        raise InputError(f"{path.name}: a BPE vocabulary without tokenizer.ggml.merges is not "
                         "supported")
    merges = fields["tokenizer.ggml.merges"].contents()
    if not all(isinstance(m, str) for m in merges):
        raise InputError(f"{path.name}: tokenizer.ggml.merges must be a list of strings")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    # tokenizers answers a merge that is not two tokens with a TypeError, and one whose join is
    # not a token with a Rust panic: both refused here
    bad = next((m for m, pair in zip(merges, pairs)
                if len(pair) != 2 or "".join(pair) not in vocab), None)
    if bad is not None:
        raise InputError(f"{path.name}: the merge {bad!r} is not two tokens that join into a token "
                         "of the vocabulary")
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.get("ignore_merges", False))
    except Exception as e:
        # the Rust side raises a bare Exception for a merge of tokens not in the vocabulary; any
        # other kind is a bug
        if type(e) is not Exception:
            raise
        raise InputError(f"{path.name}: the BPE vocabulary does not load ({e})") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre["splits"]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre["gpt2_regex"])])
    tok.decoder = decoders.ByteLevel()
    return tok, pre.get("add_bos", False)


def sentencepiece_bpe(meta: dict, fields, tokens: list, types: list, vocab: dict, path: Path):
    """(tokenizers.Tokenizer, whether it adds BOS unless the file says) of a sentencepiece BPE:
    spaces become ▁ (and one goes in front of the text), then the adjacent pair of pieces whose
    join scores highest is merged, again and again; a character no piece holds becomes its UTF-8
    bytes' pieces (<0x0A>), or the unknown piece. As tokenizers' merges: every split of a piece into
    two pieces, ranked by the piece's score (equal scores by id, where sentencepiece merges the
    leftmost pair first: real vocabularies tie only on their runs of ▁, where both agree)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    scores = fields["tokenizer.ggml.scores"].contents() \
        if "tokenizer.ggml.scores" in fields else None
    if (not isinstance(scores, list) or len(scores) != len(tokens)
            or not all(type(s) is float and math.isfinite(s) for s in scores)):
        raise InputError(f"{path.name}: a sentencepiece vocabulary needs tokenizer.ggml.scores, "
                         "a finite number for each token")
    if typed(meta, "tokenizer.ggml.remove_extra_whitespaces", bool, path, False):
        raise InputError(f"{path.name}: a sentencepiece vocabulary that removes extra whitespace "
                         "is not supported yet")
    # Only normal pieces merge: control, byte and unused pieces never come out of text.
    normal = {t for i, t in enumerate(tokens) if i >= len(types) or types[i] == NORMAL}
    merges = [(piece[:i], piece[i:])
              for piece in sorted(normal, key=lambda piece: (-scores[vocab[piece]], vocab[piece]))
              for i in range(1, len(piece)) if piece[:i] in normal and piece[i:] in normal]
    unknown = meta.get("tokenizer.ggml.unknown_token_id", 0)  # llama.cpp's default too
    if not (type(unknown) is int and 0 <= unknown < len(tokens)):
        raise InputError(f"{path.name}: a sentencepiece vocabulary needs a valid "
                         f"tokenizer.ggml.unknown_token_id, got {unknown!r}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unknown],
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    if typed(meta, "tokenizer.ggml.add_space_prefix", bool, path, True):
        # Text begins as if after a space, so that a word has the same pieces at the start; so does
        # text after a control or user-defined token, as llama.cpp reads it (sentencepiece itself
        # reads no control token in text, and adds no space after a user-defined one).
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), tok.normalizer])
        tok.decoder = decoders.Sequence([tok.decoder, decoders.Strip(" ", 1, 0)])
    return tok, True


# ---- main ---------------------------------------------------------------------------------------

def write_json(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert(gguf_path: Path, out: Path, dtype: torch.dtype, force: bool = False):
    check_output_folder(out, "--out", force)
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    args = model_args(meta, reader, gguf_path)
    # cheap, so before dequantizing: a file that cannot be converted fails fast
    tokenizer, tok_config, gen_config = build_tokenizer(meta, reader, gguf_path)
    plan = plan_tensors(reader, args, gguf_path)
    print(f"{gguf_path.name}: {meta['general.architecture']}, {args.n_layer} layers, "
          f"dim {args.dim}, "
          f"{args.n_head}/{args.n_kv_heads} heads, vocab {args.vocab_size}, tokenizer "
          f"{meta.get('tokenizer.ggml.model')!r} pre={meta.get('tokenizer.ggml.pre', 'default')!r}")
    state_dict = convert_weights(plan, args, meta["general.architecture"], dtype)
    # the tokenizer files in the same set as the weights
    tokenizer_files = {"tokenizer.json": lambda path: tokenizer.save(str(path)),
                       "tokenizer_config.json": lambda path: write_json(path, tok_config),
                       "generation_config.json": lambda path: write_json(path, gen_config)}
    save_checkpoint(out, args, state_dict, tokenizer_files, force=force)
    print(f"wrote {out}")


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help="the .gguf file")
    parser.add_argument("--out", type=Path, required=True,
                        help="checkpoint folder to write, e.g. checkpoints/NAME")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weight dtype (default float32: dequantized Q4/Q8 values are exact in "
                             "float32, and GGUF models are usually small enough to afford it; "
                             "bfloat16 rounds them)")
    parser.add_argument("--force", action="store_true",
                        help="replace the checkpoint OUT holds already: its files that this "
                             "conversion does not write (quantized copies too) are removed")
    with script_exits():
        args = parser.parse_args(argv)
        convert(args.gguf, args.out, DTYPES[args.dtype], args.force)


if __name__ == "__main__":
    main()
