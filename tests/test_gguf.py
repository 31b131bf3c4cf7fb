"""scripts/convert_gguf.py against transformers' own GGUF loader, on the real SmolLM2-135M-Instruct
Q4_1 file; the converter's handling of existing output and bad metadata on tiny GGUF files written
here. The conversion and transformers' GGUF load take most of the time."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_fails_with_one_line, load_script, main_error, run_script
from checkpoint import InputError, load_model, read_checkpoint
import model

# Texts the tokenizers must agree on. Non-ASCII numerals are left out on purpose: see
# test_digits_split_alone.
TEXTS = [
    "Hello world! How are you today?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # slow\n\n\tprint(fib(30))",
    "Numbers: 12345 678,90 3.14159 1e-5 0x1F -42 2024-11-27 $1,000,000.00 v2.0.1",
    "Café naïve résumé façade Ωμέγα Привет мир",
    "你好，世界。日本語のテキストも。한국어",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "   leading   and trailing   \n\n\n  tabs\t\there  ",
    "don't I'll we've they're it's",
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>",
]
MESSAGES = [{"role": "user",
             "content": "What is the capital of France? Answer in one short sentence."}]


@pytest.fixture(scope="module")
def gguf_meta(smollm2_gguf):
    import gguf
    fields = gguf.GGUFReader(smollm2_gguf).fields
    keys = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")
    return {k: fields[k].contents() for k in keys}


@pytest.fixture(scope="module")
def hf_tokenizer(hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer  # conftest.py: transformers' tokenizer from the GGUF file


@pytest.fixture(scope="module")
def our_tokenizer(smollm2_checkpoint):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json"))


# ---- (a) weights and config ----------------------------------------------------------------------

@pytest.mark.slow
def test_logits_match_transformers(smollm2_checkpoint, hf_smollm2, hf_tokenizer, our_tokenizer):
    hf = hf_smollm2  # conftest.py: transformers' model from the GGUF file, float32
    ours = load_model(read_checkpoint(smollm2_checkpoint), "cpu", torch.float32)
    args = ours.args

    # Same architecture read from the same metadata.
    c = hf.config
    assert (args.dim, args.n_layer, args.n_head, args.n_kv_heads, args.head_dim,
            args.intermediate_size, args.vocab_size) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
        c.head_dim, c.intermediate_size, c.vocab_size)
    assert args.rope_base == c.rope_parameters["rope_theta"] == 1e5 and args.rope_scaling is None
    assert args.block_size == c.max_position_embeddings == 8192
    # 1e-5; the GGUF float32 is 9.9999997e-06
    assert args.norm_eps == pytest.approx(c.rms_norm_eps, rel=1e-6)
    assert args.tie_embeddings and c.tie_word_embeddings and not args.attention_bias

    prompt = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    idx = torch.tensor([our_tokenizer.encode(prompt).ids])  # (1, T), T = 43
    T = idx.shape[1]
    assert 20 <= T <= 64
    with torch.no_grad():
        ours.setup_caches(1, T)
        a = ours(idx, torch.arange(T))  # (1, T, vocab)
        b = hf(idx).logits  # (1, T, vocab)
    diff = (a - b).abs().max().item()
    print(f"max |logits delta| = {diff:.2e} (max |logit| {b.abs().max().item():.1f}, T={T})")
    # Both run the same dequantized weights in float32, so only summation order differs. 1e-3 leaves
    # room for other BLAS builds / thread counts while still catching any real mistake (a wrong q/k
    # order or fused-row order moves logits by whole units).
    assert diff < 1e-3, diff
    assert torch.equal(a.argmax(-1), b.argmax(-1))


# ---- (d) tokenizer -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(our_tokenizer, hf_tokenizer, text):
    assert our_tokenizer.encode(text).ids == hf_tokenizer(text)["input_ids"]
    assert our_tokenizer.decode(our_tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_chat_prompt_matches_transformers(our_tokenizer, hf_tokenizer):
    prompt = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = our_tokenizer.encode(prompt).ids
    assert ids == hf_tokenizer.apply_chat_template(MESSAGES, tokenize=True,
                                                   add_generation_prompt=True, return_dict=False)
    # specials stay whole, never split into text
    assert ids.count(our_tokenizer.token_to_id("<|im_start|>")) == 3


def test_digits_split_alone(our_tokenizer):
    # tokenizer.ggml.pre = "smollm": llama.cpp isolates every \p{N} character before the GPT-2
    # split, as SmolLM2's own tokenizer does (individual digits). transformers' GGUF loader doesn't
    # know "smollm" and uses the plain GPT-2 split, so on a space before a non-ASCII numeral
    # ("x² 3½ ٣٤") its ids differ.
    pieces = [p for p, _ in our_tokenizer.pre_tokenizer.pre_tokenize_str("a 123 x² ٣٤")]
    assert pieces == ["a", "Ġ", "1", "2", "3", "Ġx", "Â²", "Ġ", "Ù£", "Ù¤"]


def test_special_tokens_and_template(smollm2_checkpoint, gguf_meta, our_tokenizer, hf_tokenizer):
    config = json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())
    bos, eos = gguf_meta["tokenizer.ggml.bos_token_id"], gguf_meta["tokenizer.ggml.eos_token_id"]
    assert our_tokenizer.token_to_id(config["bos_token"]) == bos == 1
    assert our_tokenizer.token_to_id(config["eos_token"]) == eos == 2
    assert (config["bos_token"], config["eos_token"]) == (hf_tokenizer.bos_token,
                                                          hf_tokenizer.eos_token)
    assert config["chat_template"] == gguf_meta["tokenizer.chat_template"] \
        == hf_tokenizer.chat_template
    # SmolLM2 adds no BOS: the post-processor must not either.
    assert config["add_bos_token"] is gguf_meta["tokenizer.ggml.add_bos_token"] is False
    assert our_tokenizer.encode("Hello", add_special_tokens=True).ids \
        == hf_tokenizer("Hello")["input_ids"] == [19556]
    generation = json.loads((smollm2_checkpoint / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    # specials reuse their vocab ids
    assert our_tokenizer.get_vocab_size(with_added_tokens=True) == 49152


# ---- (e) output folder and bad input -------------------------------------------------------------

def convert_cli(gguf_file: Path, out: Path, *flags):
    return run_script("scripts/convert_gguf.py", "--gguf", gguf_file, "--out", out, *flags)


def convert_error(gguf_file: Path, out: Path, capsys) -> str:
    """The one error line of convert_gguf.py's main, run in this process (the real command line:
    test_a_file_that_is_not_gguf_is_one_error_line_and_no_output)."""
    return main_error(load_script("convert_gguf").main, ["--gguf", gguf_file, "--out", out], capsys)


def test_a_file_that_is_not_gguf_is_one_error_line_and_no_output(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_text("this is not a GGUF file\n")
    line = assert_fails_with_one_line(convert_cli(bad, tmp_path / "out"))
    assert "not a readable GGUF" in line
    assert not (tmp_path / "out").exists()


TINY_TOKENS = ["a", "b", "ab"]
TINY_DIM, TINY_FFN = 8, 16


def write_tiny_gguf(path: Path, arch: str, tensors=False, **settings):
    """A tiny GGUF: metadata enough to reach the architecture and tokenizer checks and, with
    tensors=True, random float32 weights of one tied layer, enough to convert and load. settings:
    model / pre (tokenizer; a list: stored as an array), merges, block_count, head_count,
    rope_scaling (a gguf.RopeScalingType), dtype (numpy's, of blk.0.attn_q.weight), rope_freqs (an
    array stored as rope_freqs.weight), extra (GGUFWriter method, key, value) triples; tokens (the
    byte-level vocabulary, in place of TINY_TOKENS); sentencepiece
    (a tokenizer.model: its vocabulary as llama.cpp's converter writes it; scores and unknown, the
    unknown piece's id, in place of its own, None: left out)."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(settings.get("block_count", 1))
    w.add_embedding_length(TINY_DIM)
    w.add_feed_forward_length(TINY_FFN)
    w.add_head_count(settings.get("head_count", 2))
    w.add_context_length(32)
    tokens = TINY_TOKENS
    if "sentencepiece" in settings:
        tokens = write_sentencepiece_vocabulary(w, settings["sentencepiece"], settings)
    else:
        tokens = settings.get("tokens", TINY_TOKENS)
        w.add_token_list(tokens)
        w.add_tokenizer_model(settings.get("model", "gpt2"))
        w.add_token_merges(settings.get("merges", ["a b"]))
    if isinstance(settings.get("pre"), list):
        w.add_array("tokenizer.ggml.pre", settings["pre"])
    elif "pre" in settings:
        w.add_tokenizer_pre(settings["pre"])
    if "rope_scaling" in settings:
        w.add_rope_scaling_type(settings["rope_scaling"])
    for method, key, value in settings.get("extra", ()):
        getattr(w, method)(key, value)
    if tensors:
        rng = np.random.default_rng(0)
        shapes = {"token_embd.weight": (len(tokens), TINY_DIM),
                  "output_norm.weight": (TINY_DIM,), "blk.0.attn_norm.weight": (TINY_DIM,),
                  "blk.0.ffn_norm.weight": (TINY_DIM,),
                  "blk.0.ffn_down.weight": (TINY_DIM, TINY_FFN),
                  "blk.0.ffn_gate.weight": (TINY_FFN, TINY_DIM),
                  "blk.0.ffn_up.weight": (TINY_FFN, TINY_DIM),
                  **{f"blk.0.attn_{p}.weight": (TINY_DIM, TINY_DIM)
                     for p in ("q", "k", "v", "output")}}
        for name, shape in shapes.items():  # numpy's shape: (out_features, in_features)
            dtype = settings.get("dtype", np.float32) if name == "blk.0.attn_q.weight" else np.float32
            w.add_tensor(name, rng.standard_normal(shape).astype(dtype))
        if "rope_freqs" in settings:
            w.add_tensor("rope_freqs.weight", settings["rope_freqs"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_sentencepiece_vocabulary(w, model_file: Path, settings: dict) -> list:
    """A sentencepiece model's pieces, scores and types (sentencepiece's numbers are llama.cpp's),
    BOS / EOS / unknown ids, as llama.cpp's converter writes them; returns the pieces."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    tokens = [piece.piece for piece in proto.pieces]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    scores = settings.get("scores", [piece.score for piece in proto.pieces])
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types([piece.type for piece in proto.pieces])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    unknown = settings.get("unknown", sp.unk_id())
    if unknown is not None:
        w.add_unk_token_id(unknown)
    return tokens


@pytest.mark.parametrize("cut", ["header", "tensor-data"])
def test_a_truncated_gguf_file_is_one_error_line(tmp_path, capsys, cut):
    path = write_tiny_gguf(tmp_path / "cut.gguf", "llama", tensors=True)
    data = path.read_bytes()
    path.write_bytes(data[:100] if cut == "header" else data[:-10])
    assert "not a readable GGUF" in convert_error(path, tmp_path / "out", capsys)


def test_a_bug_inside_the_gguf_reader_keeps_its_traceback(tmp_path, monkeypatch):
    import gguf
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")

    def broken(*args, **kwargs):
        raise TypeError("a bug inside GGUFReader")
    monkeypatch.setattr(gguf, "GGUFReader", broken)
    with pytest.raises(TypeError, match="a bug inside GGUFReader"):
        load_script("convert_gguf").open_gguf(path)


@pytest.mark.parametrize("merges, message", [
    (["ab"], "the merge 'ab' is not two tokens"),  # tokenizers: a TypeError
    (["b a"], "the merge 'b a' is not two tokens"),  # its join is no token; tokenizers: a panic
    (["ab "], "the BPE vocabulary does not load"),  # "" is no token: tokenizers' bare Exception
], ids=["one-part", "join-not-a-token", "part-not-a-token"])
def test_merges_the_vocabulary_cannot_use_are_refused(tmp_path, capsys, merges, message):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tensors=True, merges=merges)
    assert message in convert_error(path, tmp_path / "out", capsys)


def test_a_bug_inside_the_bpe_builder_keeps_its_traceback(tmp_path, monkeypatch):
    from tokenizers import models
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tensors=True)

    def broken(*args, **kwargs):
        raise TypeError("a bug inside BPE")
    monkeypatch.setattr(models, "BPE", broken)
    with pytest.raises(TypeError, match="a bug inside BPE"):
        load_script("convert_gguf").convert(path, tmp_path / "out", torch.float32)


def test_a_tokenizer_without_bos_or_eos_measures_perplexity_and_refuses_tasks(tmp_path, capsys):
    """A converted GGUF may have neither token: perplexity needs none, eval.py's tasks (whose empty
    contexts stand for one of them) are refused in one line before the weights load."""
    from eval import main as eval_main
    load_script("convert_gguf").convert(write_tiny_gguf(tmp_path / "tiny.gguf", "llama",
                                                        tensors=True), tmp_path / "out",
                                        torch.float32)
    (tmp_path / "text.txt").write_text("ab a b " * 20)
    argv = ["--checkpoint_path", tmp_path / "out", "--device", "cpu", "--max_seq_length", 16]
    eval_main([str(a) for a in argv + ["--text_file", tmp_path / "text.txt", "--output",
                                       tmp_path / "report.json"]])
    assert json.loads((tmp_path / "report.json").read_text())["perplexity"]["perplexity"] > 1
    main_error(eval_main, argv + ["--tasks", "capitals"], capsys, "--tasks", "end-of-sequence")


def test_an_unsupported_architecture_is_one_error_line_naming_it(tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "qwen.gguf", "qwen2")
    line = convert_error(path, tmp_path / "out", capsys)
    assert "unsupported architecture 'qwen2'" in line


@pytest.mark.parametrize("tokenizer, message", [
    (dict(model="bert"), "tokenizer model 'bert' is not supported yet"),
    (dict(pre="some-new-model"), "unknown pre-tokenizer 'some-new-model'"),
    (dict(pre=["gpt2"]), "unknown pre-tokenizer \\['gpt2'\\]"),
])
def test_an_unsupported_tokenizer_is_an_input_error_naming_it(tmp_path, tokenizer, message):
    convert_gguf = load_script("convert_gguf")
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tensors=True, **tokenizer)
    with pytest.raises(InputError, match=message):
        convert_gguf.convert(path, tmp_path / "out", torch.float32)


# ---- a sentencepiece vocabulary (Llama-2, Mistral, Mixtral) -------------------------------------

MISTRAL_DATA = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
SENTENCEPIECE_V1 = MISTRAL_DATA / "tokenizer.model.v1"  # Llama-2's layout: 32000 pieces, byte fallback
SENTENCEPIECE_V3 = MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3"  # [INST] a control piece
SENTENCEPIECE_V7 = MISTRAL_DATA / "mistral_instruct_tokenizer_241114.model.v7"  # [REF] a user-defined one


def convert_sentencepiece_gguf(model_file: Path, folder: Path):
    """(the sentencepiece processor, the gpt-blitz tokenizer) of a tiny GGUF with that vocabulary."""
    import sentencepiece
    from tokenizer import load_tokenizer
    path = write_tiny_gguf(folder / "spm.gguf", "llama", tensors=True, sentencepiece=model_file)
    load_script("convert_gguf").convert(path, folder / "out", torch.float32)
    return sentencepiece.SentencePieceProcessor(model_file=str(model_file)), load_tokenizer(folder / "out")


@pytest.mark.parametrize("model_file", [SENTENCEPIECE_V1, SENTENCEPIECE_V3], ids=["v1", "v3"])
def test_a_sentencepiece_vocabulary_reads_and_writes_text_as_sentencepiece_does(model_file, tmp_path):
    """Every Python help topic, the GPL and the texts above: the same ids as sentencepiece itself (BOS
    first), characters outside the vocabulary as their bytes' pieces, and the same text back."""
    import pydoc_data.topics
    sp, ours = convert_sentencepiece_gguf(model_file, tmp_path)
    texts = [*pydoc_data.topics.topics.values(), Path("/usr/share/common-licenses/GPL-3").read_text(),
             *TEXTS, "", " ", "a" * 300, "Ye olde 𝔉𝔯𝔞𝔨𝔱𝔲𝔯 text", "<unk> is text"]
    for text in texts:
        ids = sp.encode(text)
        assert ours.encode(text) == [sp.bos_id()] + ids, text[:80]
        assert ours.decode(ids) == sp.decode(ids) == text, text[:80]


def test_text_after_a_control_or_user_defined_piece_starts_as_after_a_space_as_llama_cpp_reads_it(tmp_path):
    """llama.cpp puts a space in front of the text and of every run of text after a control or
    user-defined piece: "[INST] Hi" is [INST], then " " + " Hi" (sentencepiece's own encode adds the
    one in front)."""
    sp, ours = convert_sentencepiece_gguf(SENTENCEPIECE_V7, tmp_path)
    inst, end, ref = sp.piece_to_id("[INST]"), sp.piece_to_id("[/INST]"), sp.piece_to_id("[REF]")
    assert sp.is_control(inst) and sp.is_control(end) and not sp.is_control(ref)
    assert ours.encode("[INST] Hi there [/INST]") == [sp.bos_id(), inst, *sp.encode(" Hi there "), end]
    assert ours.encode("a [REF] b") == [sp.bos_id(), *sp.encode("a "), ref, *sp.encode(" b")]


def test_a_sentencepiece_vocabulary_without_an_unknown_id_takes_piece_0_as_llama_cpp_does(tmp_path):
    path = write_tiny_gguf(tmp_path / "spm.gguf", "llama", tensors=True, sentencepiece=SENTENCEPIECE_V1,
                           unknown=None)
    load_script("convert_gguf").convert(path, tmp_path / "out", torch.float32)
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["unk_token"] == "<unk>"


@pytest.mark.parametrize("settings, message", [
    (dict(scores=None), "needs tokenizer.ggml.scores"),
    (dict(scores=[0.5]), "needs tokenizer.ggml.scores, a finite number for each token"),
    (dict(extra=[("add_bool", "tokenizer.ggml.remove_extra_whitespaces", True)]),
     "removes extra whitespace is not supported"),
    (dict(unknown=32000), "needs a valid tokenizer.ggml.unknown_token_id, got 32000"),
], ids=["no-scores", "too-few-scores", "removes-whitespace", "unknown-past-the-vocabulary"])
def test_a_sentencepiece_vocabulary_it_cannot_read_as_written_is_refused(tmp_path, settings, message):
    path = write_tiny_gguf(tmp_path / "spm.gguf", "llama", tensors=True, sentencepiece=SENTENCEPIECE_V1,
                           **settings)
    with pytest.raises(InputError, match=message):
        load_script("convert_gguf").convert(path, tmp_path / "out", torch.float32)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (("add_uint32", "tokenizer.chat_template", 5), "tokenizer.chat_template must be a str"),
    (("add_string", "tokenizer.ggml.add_bos_token", "no"), "add_bos_token must be a bool"),
], ids=["template-number", "add-bos-string"])
def test_tokenizer_metadata_of_the_wrong_type_is_refused_before_writing(tmp_path, extra, message):
    """Else the checkpoint would be written and then refused by every load (a template that is not
    text), or read the wrong way (the string "no" as true)."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tensors=True, extra=[extra])
    with pytest.raises(InputError, match=message):
        load_script("convert_gguf").convert(path, tmp_path / "out", torch.float32)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings, tensor", [
    (dict(dtype=np.float64), "blk.0.attn_q.weight is of type F64"),
    (dict(rope_freqs=np.ones(2, dtype=np.int32)), "rope_freqs.weight is of type I32"),
], ids=["weight", "rope-freqs"])
def test_a_tensor_type_gguf_cannot_dequantize_is_refused_naming_it(tmp_path, capsys, settings,
                                                                  tensor):
    path = write_tiny_gguf(tmp_path / "f64.gguf", "llama", tensors=True, **settings)
    line = convert_error(path, tmp_path / "out", capsys)
    assert tensor in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, extra", [
    ("yarn", []), ("linear", [("add_float32", "llama.rope.scaling.factor", 4.0)]),
    ("linear", [("add_float32", "llama.rope.scale_linear", 4.0)])],
    ids=["yarn", "a-factor-without-a-type", "the-older-scale_linear"])
def test_an_unsupported_rope_scaling_is_one_error_line_and_no_output(kind, extra, tmp_path, capsys):
    """A factor with no type is linear scaling, as llama.cpp reads it: refused, not dropped."""
    import gguf
    typed = dict(rope_scaling=gguf.RopeScalingType.YARN) if kind == "yarn" else {}
    path = write_tiny_gguf(tmp_path / "scaled.gguf", "llama", tensors=True, extra=extra, **typed)
    line = convert_error(path, tmp_path / "out", capsys)
    assert f"'{kind}'" in line and "scaled.gguf" in line
    assert not (tmp_path / "out").exists()


def test_a_rope_scaling_factor_of_1_is_no_scaling(tmp_path):
    path = write_tiny_gguf(tmp_path / "unscaled.gguf", "llama", tensors=True,
                           extra=[("add_float32", "llama.rope.scaling.factor", 1.0)])
    load_script("convert_gguf").convert(path, tmp_path / "out", torch.float32)
    assert read_checkpoint(tmp_path / "out").args.rope_scaling is None


def generation_config_of(tmp_path, **ids) -> dict:
    """generation_config.json of a tiny GGUF converted, whose tokenizer.ggml.KEY_token_id are ids."""
    extra = [("add_uint32", f"tokenizer.ggml.{key}_token_id", i) for key, i in ids.items()]
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tensors=True, extra=extra)
    load_script("convert_gguf").convert(path, tmp_path / "out", torch.float32)
    return json.loads((tmp_path / "out" / "generation_config.json").read_text())


def test_generation_stops_at_every_end_token_the_gguf_names(tmp_path):
    """An end of sequence (eos) and an end of turn (eot) token, as Llama-3's chat models have."""
    assert generation_config_of(tmp_path, eos=1, eot=2)["eos_token_id"] == [1, 2]


def test_an_end_token_id_past_the_vocabulary_is_no_end_token(tmp_path):
    assert generation_config_of(tmp_path, eos=1, eot=len(TINY_TOKENS))["eos_token_id"] == 1


def test_bfloat16_output_holds_the_float32_weights_rounded_to_bfloat16(tmp_path):
    convert_gguf = load_script("convert_gguf")
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tensors=True)
    convert_gguf.main(["--gguf", str(path), "--out", str(tmp_path / "f32")])
    convert_gguf.main(["--gguf", str(path), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    full, rounded = (load_file(tmp_path / out / "model.safetensors") for out in ("f32", "bf16"))
    assert full.keys() == rounded.keys()
    for name, t in full.items():
        assert t.dtype == torch.float32 and torch.equal(rounded[name], t.to(torch.bfloat16)), name


def test_llama_3_1_rope_freqs_convert_to_its_scaling_with_the_files_original_context(tmp_path):
    """One head of 8 dims, base 1e6: wavelengths 200, 6283 and 198692 tokens, so that an original
    context of 4096 scales the second fully where 8192 would only blend it."""
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=4096)
    freqs = 1.0 / (1e6 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    divisors = (freqs / model.llama3_scale(freqs, **scaling)).float().numpy()
    path = write_tiny_gguf(tmp_path / "scaled.gguf", "llama", tensors=True, head_count=1,
                           rope_freqs=divisors,
                           extra=[("add_float32", "llama.rope.freq_base", 1e6),
                                  ("add_uint32", "llama.rope.scaling.original_context_length", 4096)])
    load_script("convert_gguf").convert(path, tmp_path / "out", torch.float32)
    assert read_checkpoint(tmp_path / "out").args.rope_scaling == scaling


@pytest.mark.parametrize("key, words", [("llama.attention.value_length", "key and value head sizes differ"),
                                        ("llama.rope.dimension_count", "partial rotary")],
                         ids=["value-heads-narrower", "partial-rotary"])
def test_head_geometry_model_py_lacks_is_one_error_line_and_no_output(key, words, tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tensors=True, extra=[("add_uint32", key, 2)])
    assert words in convert_error(path, tmp_path / "out", capsys)
    assert not (tmp_path / "out").exists()


def test_float32_metadata_reads_as_the_decimal_its_authors_wrote_and_no_rope_base_as_10000(tmp_path):
    convert_gguf = load_script("convert_gguf")
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama",
                           extra=[("add_float32", "llama.attention.layer_norm_rms_epsilon", 1e-5)])
    reader = convert_gguf.open_gguf(path)
    meta = convert_gguf.read_metadata(reader)
    assert meta["llama.attention.layer_norm_rms_epsilon"] != 1e-5  # float32's nearest value
    args = convert_gguf.model_args(meta, reader, path)
    assert args.norm_eps == 1e-5 and args.rope_base == 10000.0


def gguf_tokenizer(path: Path):
    convert_gguf = load_script("convert_gguf")
    reader = convert_gguf.open_gguf(path)
    return convert_gguf.build_tokenizer(convert_gguf.read_metadata(reader), reader, path)[0]


@pytest.mark.parametrize("pre, pieces", [("qwen2", ["1", "2", "3"]), ("llama-bpe", ["123"])])
def test_qwen2s_pre_tokenizer_cuts_every_digit_alone_where_llama_3s_keeps_three(pre, pieces, tmp_path):
    path = write_tiny_gguf(tmp_path / "digits.gguf", "qwen3", pre=pre, tokens=["1", "2", "3", "12", "123"],
                           merges=["1 2", "12 3"], extra=[("add_bool", "tokenizer.ggml.add_bos_token", False)])
    assert gguf_tokenizer(path).encode("123", add_special_tokens=False).tokens == pieces


def test_control_and_user_defined_tokens_are_matched_whole_and_only_control_ones_are_special(tmp_path):
    """llama.cpp's token types: a control token (an end of turn) and a user-defined one (a tool tag) are
    never cut into pieces; decoding without special tokens drops the control one and keeps the other."""
    path = write_tiny_gguf(tmp_path / "types.gguf", "llama", tokens=["a", "b", "ab", "<tool>", "<|end|>"],
                           extra=[("add_array", "tokenizer.ggml.token_type", [1, 1, 1, 4, 3]),
                                  ("add_bool", "tokenizer.ggml.add_bos_token", False)])
    tok = gguf_tokenizer(path)
    ids = tok.encode("ab<tool>b<|end|>").ids
    assert ids == [2, 3, 1, 4]
    assert tok.decode(ids, skip_special_tokens=True) == "ab<tool>b"


def test_the_files_bos_id_goes_into_generation_config(tmp_path):
    generation = generation_config_of(tmp_path, bos=2, eos=1)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (2, 1)


def test_a_llama_3_vocabulary_adds_bos_unless_told_and_takes_a_whole_word_before_merging(tmp_path):
    path = write_tiny_gguf(tmp_path / "llama3.gguf", "llama", pre="llama-bpe",
                           tokens=["a", "b", "c", "ab", "abc", "<|begin_of_text|>"], merges=["a b"],
                           extra=[("add_uint32", "tokenizer.ggml.bos_token_id", 5)])
    assert gguf_tokenizer(path).encode("abc").tokens == ["<|begin_of_text|>", "abc"]


@pytest.mark.parametrize("metadata", [dict(head_count=0), dict(block_count=10 ** 9)],
                         ids=["zero-heads", "1e9-blocks"])
def test_absurd_metadata_is_refused_before_any_work(tmp_path, monkeypatch, metadata):
    """Refused from the header alone, before any model is built: zero heads by parse_config; 10**9
    blocks of this tiny size would fit its limits, but the file holds tensors of one."""
    convert_gguf = load_script("convert_gguf")
    path = write_tiny_gguf(tmp_path / "huge.gguf", "llama", tensors=True, **metadata)
    monkeypatch.setattr(convert_gguf, "empty_model", None)  # building the model would fail here
    with pytest.raises(InputError, match="huge.gguf"):
        convert_gguf.convert(path, tmp_path / "out", torch.float32)


def test_a_folder_given_as_the_gguf_file_is_refused_as_a_folder(tmp_path, capsys):
    assert "is a folder, not a GGUF file" in convert_error(tmp_path, tmp_path / "out", capsys)


def test_output_that_is_a_file_is_refused_before_converting(tmp_path, monkeypatch, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tensors=True)
    (tmp_path / "out").write_text("a file")
    convert_gguf = load_script("convert_gguf")

    def convert_weights(*args, **kwargs):
        raise AssertionError("the tensors were converted before the output was refused")
    monkeypatch.setattr(convert_gguf, "convert_weights", convert_weights)
    for out, words in ((tmp_path / "out", ["is a file"]),
                       (tmp_path / "out" / "sub", [str(tmp_path / "out")])):
        main_error(convert_gguf.main, ["--gguf", path, "--out", out], capsys, *words)
    assert (tmp_path / "out").read_text() == "a file"


def test_llama3_rope_scaling_from_divisors():
    convert_gguf = load_script("convert_gguf")
    scaling = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    freqs = 1.0 / (5e5 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    divisors = (freqs / model.llama3_scale(freqs, **scaling)).float().double()  # as stored: float32
    assert convert_gguf.llama3_scaling_from_divisors(divisors, 64, 5e5, 8192, "x") == scaling
    with pytest.raises(InputError, match="not Llama-3.1 rope scaling"):
        convert_gguf.llama3_scaling_from_divisors(divisors.flip(0), 64, 5e5, 8192, "x")


# ---- Qwen3, Qwen3-MoE and Mixtral, written in llama.cpp's layout -----------------------------

def write_gguf_like_llama_cpp(hf, path: Path, arch: str) -> Path:
    """The tiny transformers model as llama.cpp's converter writes it: Qwen3's q/k rows left in
    HF's rotate-half order (llama.cpp rotates Qwen "neox"-style, as transformers' GGUF loader, which
    permutes only llama's q/k, also assumes), llama's (Mixtral's) permuted to Meta's interleaved
    order; experts stacked (n_experts, rows, columns) with gate and up apart."""
    import gguf
    from test_hf_parity import hf_rows_to_meta
    cfg = hf.config
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_context_length(256)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    tokens = ["a", "b", "ab"] + [f"<t{i}>" for i in range(cfg.vocab_size - 3)]
    w.add_token_list(tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_merges(["a b"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down",
                   "mlp.gate": "ffn_gate_inp", "mlp.experts.down_proj": "ffn_down_exps"}
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if hasattr(cfg, "num_experts_per_tok"):
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for name, t in hf.state_dict().items():
        projection = name.split(".")[-2]
        if arch == "llama" and projection in heads:
            t = hf_rows_to_meta(t, heads[projection])
        t = t.detach().float().numpy()
        if name in names:
            w.add_tensor(names[name], t)
            continue
        i, rest = name.removeprefix("model.layers.").split(".", 1)
        if rest == "mlp.experts.gate_up_proj":  # (n_experts, 2 * inter, dim): gate rows, then up
            gate, up = np.split(t, 2, axis=1)
            w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(up))
        else:
            w.add_tensor(f"blk.{i}.{layer_names[rest.removesuffix('.weight')]}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family, arch", [("qwen3", "qwen3"), ("qwen3-moe", "qwen3moe"),
                                          ("mixtral", "llama")])
def test_qwen3_and_mixtral_gguf_logits_match_transformers(family, arch, tmp_path):
    from test_hf_parity import make_hf_model
    hf = make_hf_model(family)
    path = write_gguf_like_llama_cpp(hf, tmp_path / f"{family}.gguf", arch)
    load_script("convert_gguf").convert(path, tmp_path / "out", torch.float32)
    ours = load_model(read_checkpoint(tmp_path / "out"))
    idx = torch.randint(0, hf.config.vocab_size, (2, 64),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours.setup_caches(2, 64)
        delta = (ours(idx, torch.arange(64)) - hf(idx).logits).abs().max().item()
    assert delta <= 1e-4, f"{family}: max |delta| {delta:.2e}"
