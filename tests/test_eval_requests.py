"""eval.py's lm-eval model, request by request, on the tiny random model of tests/test_generate.py (a word
tokenizer: "w5" is id 5): the empty context's token, the KV cache's size, tokenizers that add a BOS,
whitespace-only contexts, the rolling windows, and generate_until's limits, stop strings and end of sequence.
tests/test_eval.py checks the numbers against transformers and lm-eval on SmolLM2."""
from types import SimpleNamespace

import pytest
import torch

import eval as eval_py
from checkpoint import load_model, read_checkpoint
from eval import EvalModel, cut_at_stop_strings, empty_context_token
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    """The tiny random model with 512 tokens of context (more than the KV cache's 64-slot minimum)."""
    from test_generate import save_tiny_checkpoint
    return save_tiny_checkpoint(tmp_path_factory.mktemp("eval_requests") / "tiny", block_size=512)


@pytest.fixture(autouse=True)
def one_thread_here(one_thread):
    """conftest.py's one_thread: many small forwards on a busy 2-core machine."""


def eval_model(folder, max_seq_length: int, tokenizer=None, batch_size: int = 1) -> EvalModel:
    ckpt = read_checkpoint(folder)
    return EvalModel(load_model(ckpt, dtype=torch.float32), tokenizer or load_tokenizer(folder),
                     max_seq_length=max_seq_length, batch_size=batch_size)


class SpecialTokens:
    """The tiny word tokenizer with special tokens: BOS w1, end of sequence eos_ids. encode() puts
    BOS first when add_bos (as Llama's tokenizers do; SmolLM2's do not)."""

    def __init__(self, folder, add_bos: bool, eos_ids=(2,)):
        self.inner, self.add_bos = load_tokenizer(folder), add_bos
        self.bos_id, self.eos_ids = 1, list(eos_ids)

    def encode(self, text: str) -> list:
        return ([self.bos_id] if self.add_bos else []) + self.inner.encode(text)

    def decode(self, ids: list) -> str:
        return self.inner.decode(ids)


def until(stop, max_gen_toks=None) -> dict:
    return {"until": stop} if max_gen_toks is None else {"until": stop, "max_gen_toks": max_gen_toks}


@pytest.fixture
def prompts_seen(monkeypatch) -> list:
    """Every batch of prompts generate_until hands to generate.generate (which still runs)."""
    seen, real = [], eval_py.generate

    def spy(model, prompts, *args, **kwargs):
        seen.append([list(p) for p in prompts])
        return real(model, prompts, *args, **kwargs)
    monkeypatch.setattr(eval_py, "generate", spy)
    return seen


# ---- the empty context, the KV cache, BOS ---------------------------------------------------------------

def test_the_empty_context_token_is_bos_else_the_first_end_of_sequence_token():
    assert empty_context_token(SimpleNamespace(bos_id=5, eos_ids=[7, 9])) == 5
    assert empty_context_token(SimpleNamespace(bos_id=None, eos_ids=[7, 9])) == 7
    assert empty_context_token(SimpleNamespace(bos_id=None, eos_ids=[])) is None


def test_the_kv_cache_is_sized_to_the_next_power_of_two_at_least_64_at_most_max_seq_length(tiny_long):
    em = eval_model(tiny_long, max_seq_length=300)
    for length, slots in [(1, 64), (64, 64), (65, 128), (128, 128), (129, 256), (256, 256),
                          (257, 304)]:  # 300, rounded up to whole 8s by setup_caches
        em.fit_cache(length)
        assert em.model.max_seq_length == slots, length


def test_the_bos_a_tokenizer_adds_is_read_once_before_a_rolling_text(tiny_long):
    em = eval_model(tiny_long, max_seq_length=16, tokenizer=SpecialTokens(tiny_long, add_bos=True))
    assert em.encode_plain("w3 w4") == [3, 4]
    [(expected, _)] = em.score([([1, 3, 4], 2)], progress=False)  # BOS, then both words scored
    assert em.loglikelihood_rolling(["w3 w4"], progress=False) == [pytest.approx(expected, abs=1e-5)]


def test_a_whitespace_only_context_scores_like_an_empty_one(tiny_long):
    # SmolLM2-like: a BOS token that encode() does not add.
    em = eval_model(tiny_long, max_seq_length=16, tokenizer=SpecialTokens(tiny_long, add_bos=False),
                    batch_size=2)
    blank, empty = em.loglikelihood([("  ", "w3 w4"), ("", "w3 w4")], progress=False)
    [(expected, _)] = em.score([([1, 3, 4], 2)], progress=False)
    assert blank[0] == pytest.approx(expected, abs=1e-5) and empty[0] == pytest.approx(expected, abs=1e-5)


def test_rolling_loglikelihood_scores_each_token_once_in_windows_of_max_seq_length(tiny_long):
    """As in lm-eval's own models: each window after the first scores max_seq_length new tokens, the
    last one reading as much context as fits."""
    em = eval_model(tiny_long, max_seq_length=8, tokenizer=SpecialTokens(tiny_long, add_bos=False), batch_size=4)
    tokens = [1] + list(range(10, 29))  # the prefix token, then 19 words
    windows = [(tokens[0:9], 8), (tokens[8:17], 8), (tokens[11:20], 3)]
    expected = sum(logprob for logprob, _ in em.score(windows, progress=False))
    text = " ".join(f"w{i}" for i in range(10, 29))
    assert em.loglikelihood_rolling([text], progress=False) == [pytest.approx(expected, abs=1e-4)]


# ---- generate_until ----------------------------------------------------------------------------------------

def test_a_stop_string_given_as_one_string_is_not_split_into_characters(tiny_long):
    em = eval_model(tiny_long, max_seq_length=64)
    full = em.generate_until([("w1 w2 w3", until([], 12))], progress=False)[0]
    words = full.split()
    stop = f"{words[2]} {words[3]}"  # lm-eval also passes `until` as one str
    expected = full[:full.index(stop)]
    assert expected.strip()
    assert em.generate_until([("w1 w2 w3", until(stop, 12))], progress=False) == [expected]


def test_text_is_cut_before_the_earliest_of_the_stop_strings():
    # One token can complete two stop strings at once: the earliest one cuts.
    assert cut_at_stop_strings("one two. three\nfour", ["\n", "."]) == "one two"
    assert cut_at_stop_strings("xab", ["b", "ab"]) == "x"
    assert cut_at_stop_strings("no stop here", ["\n"]) == "no stop here"


def test_max_gen_toks_defaults_to_256_new_tokens(tiny_long):
    em = eval_model(tiny_long, max_seq_length=300)
    [text] = em.generate_until([("w1 w2", until([]))], progress=False)  # no end of sequence, no stop
    assert len(text.split()) == 256


def test_new_tokens_are_at_most_max_seq_length_minus_one_after_one_token_of_context(tiny_long, prompts_seen):
    em = eval_model(tiny_long, max_seq_length=16)
    [text] = em.generate_until([("w1 w2 w3", until([], 100))], progress=False)
    assert prompts_seen == [[[3]]] and len(text.split()) == 15


def test_a_long_context_keeps_its_end_as_much_as_fits_before_the_new_tokens(tiny_long, prompts_seen):
    em = eval_model(tiny_long, max_seq_length=16)
    context = " ".join(f"w{i}" for i in range(10, 40))  # 30 tokens
    [text] = em.generate_until([(context, until([], 4))], progress=False)
    assert prompts_seen == [[list(range(28, 40))]] and len(text.split()) == 4  # 16 - 4 tokens


def test_an_empty_generation_context_starts_from_the_empty_context_token(tiny_long, prompts_seen):
    em = eval_model(tiny_long, max_seq_length=16, tokenizer=SpecialTokens(tiny_long, add_bos=False, eos_ids=()))
    [text] = em.generate_until([("", until([], 3))], progress=False)
    assert prompts_seen == [[[1]]] and len(text.split()) == 3


def test_generation_ends_at_an_end_of_sequence_token_which_is_left_out_of_the_text(tiny_long):
    plain = eval_model(tiny_long, max_seq_length=64)
    words = plain.generate_until([("w1 w2 w3", until([], 12))], progress=False)[0].split()
    k = 2
    while words[k] in words[:k]:  # the first occurrence of a word ends it
        k += 1
    em = eval_model(tiny_long, max_seq_length=64,
                    tokenizer=SpecialTokens(tiny_long, add_bos=False, eos_ids=[int(words[k][1:])]))
    assert em.generate_until([("w1 w2 w3", until([], 12))], progress=False) == [" ".join(words[:k])]


def test_the_kv_cache_holds_a_prompt_and_its_new_tokens_beyond_64(tiny_long):
    """60 prompt tokens and 10 new ones: the cache (at least 64 slots) must grow to hold all 70."""
    context = " ".join(f"w{i}" for i in range(1, 61))
    big = eval_model(tiny_long, max_seq_length=300)
    big.fit_cache(300)
    from generate import Sampling, generate
    reference = big.tokenizer.decode(generate(big.model, [big.encode(context)], 10,
                                              Sampling(temperature=0)).tokens[0])
    em = eval_model(tiny_long, max_seq_length=300)
    assert em.generate_until([(context, until([], 10))], progress=False) == [reference]
