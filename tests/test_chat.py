"""--chat --interactive: a conversation that remembers its turns, reusing the KV cache for them."""
import builtins
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
from checkpoint import copier, load_model, read_checkpoint, save_checkpoint
from conftest import ROOT
from generate import Sampling
from model import ModelArgs, Transformer
from tokenizer import load_tokenizer

TURNS = ["My name is Bob.", "What is my name?", "Say it again."]


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    ckpt = read_checkpoint(smollm2_checkpoint)
    return load_model(ckpt, dtype=torch.float32), load_tokenizer(ckpt.folder)


def converse(tokenizer, lines: list, monkeypatch, max_seq=4096, chat=True, compiled=False,
             vocab_size=None, max_new=32, stopped=()):
    """Run generate.interactive on `lines` of input with a stand-in model that answers "Fine." (but
    the answers of the runs numbered in `stopped`, which Ctrl-C stops) in at most max_new tokens,
    and records what it was asked: [(prompt ids, cached)] per turn."""
    asked = []
    answer = tokenizer.encode("Fine.")[-2:]

    def fake_generate(prompts, max_new, on_tokens=None, cached=0):
        asked.append((prompts[0], cached))
        if len(asked) - 1 in stopped:
            raise KeyboardInterrupt
        tokens = answer[:max_new]
        ended = len(tokens) < max_new  # room for its end-of-sequence token
        return generate.Generation([tokens], len(tokens) + ended, [len(prompts[0]) - cached], 0.1,
                                   0.1, len(tokens))
    interact(tokenizer, lines, monkeypatch, fake_generate, max_seq, max_new, chat, compiled,
             vocab_size)
    return asked


def interact(tokenizer, lines: list, monkeypatch, generate_fn, max_seq: int, max_new: int,
             chat=True, compiled=False, vocab_size=None):
    """generate.interactive reading `lines` as the terminal's input (an exception among them: what
    that read raises, KeyboardInterrupt for a Ctrl-C), answering with generate_fn, for a model of
    vocab_size tokens (the tokenizer's own by default)."""
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            line = next(feed)
        except StopIteration:
            raise EOFError from None
        if isinstance(line, BaseException):
            raise line
        return line
    monkeypatch.setattr(builtins, "input", fake_input)
    args = type("Args", (), dict(chat=chat, metrics=False, compile=compiled,
                                 compile_prefill=False))()
    generate.interactive(args, tokenizer, generate_fn, max_seq, max_new, 1, torch.device("cpu"),
                         vocab_size or tokenizer.vocab_size)


def test_each_turn_runs_the_whole_conversation_and_reuses_the_cache(smollm2, monkeypatch):
    _, tokenizer = smollm2
    asked = converse(tokenizer, TURNS, monkeypatch)
    assert len(asked) == 3
    third = tokenizer.decode(asked[2][0])
    for turn in TURNS:
        assert turn in third  # the model sees every earlier question ...
    assert third.count("Fine.") == 2  # ... and its own answers
    assert asked[0][1] == 0
    for (previous, _), (prompt, cached) in zip(asked, asked[1:]):
        assert 0 < cached < len(prompt)  # only the new part is prefilled
        assert prompt[:len(previous)] == previous  # the cached tokens are what the cache holds


def test_a_line_beyond_the_models_vocabulary_is_refused_and_the_next_one_runs(smollm2, monkeypatch,
                                                                             capsys):
    _, tokenizer = smollm2
    rare, common = "Zyzzyva quixotically", "the"
    vocab_size = max(tokenizer.encode(rare))  # a model one token short of the rare line's ids
    assert max(tokenizer.encode(common)) < vocab_size
    asked = converse(tokenizer, [rare, common], monkeypatch, chat=False, vocab_size=vocab_size)
    assert [prompt for prompt, _ in asked] == [tokenizer.encode(common)]
    assert f"error: the tokenizer gives id {vocab_size}," in capsys.readouterr().err


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_empty_lines_ask_nothing(smollm2, monkeypatch, capsys, chat):
    _, tokenizer = smollm2
    asked = converse(tokenizer, ["", "   ", TURNS[0]], monkeypatch, chat=chat)
    assert len(asked) == 1 and TURNS[0] in tokenizer.decode(asked[0][0])
    assert "skipped" not in capsys.readouterr().err


def test_clear_starts_the_conversation_over(smollm2, monkeypatch):
    _, tokenizer = smollm2
    asked = converse(tokenizer, [TURNS[0], "/clear", TURNS[1]], monkeypatch)
    assert len(asked) == 2
    assert TURNS[0] not in tokenizer.decode(asked[1][0])
    assert asked[1][0] == tokenizer.encode_chat([{"role": "user", "content": TURNS[1]}])


def test_oldest_turns_are_dropped_when_the_conversation_outgrows_the_cache(smollm2, monkeypatch,
                                                                            capsys):
    _, tokenizer = smollm2
    two_turns = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": "Fine."},
                 {"role": "user", "content": TURNS[1]}]
    max_seq = len(tokenizer.encode_chat(two_turns))  # the second question no longer fits
    asked = converse(tokenizer, TURNS, monkeypatch, max_seq=max_seq)
    assert len(asked) == 3
    for prompt, _ in asked[1:]:
        assert TURNS[0] not in tokenizer.decode(prompt)
    assert TURNS[2] in tokenizer.decode(asked[2][0])
    assert all(len(prompt) < max_seq for prompt, _ in asked)
    assert "dropped the oldest turn" in capsys.readouterr().err


def test_oldest_turns_are_dropped_to_leave_room_for_a_whole_answer(smollm2, monkeypatch, capsys):
    """The second question fits the cache with the first turn, but a 32-token answer would not."""
    _, tokenizer = smollm2
    two_turns = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": "Fine."},
                 {"role": "user", "content": TURNS[1]}]
    max_seq = len(tokenizer.encode_chat(two_turns)) + 8
    asked = converse(tokenizer, TURNS[:2], monkeypatch, max_seq=max_seq)
    assert asked[1][0] == tokenizer.encode_chat(two_turns[2:])
    assert "dropped the oldest turn" in capsys.readouterr().err


def test_a_question_too_long_for_the_cache_is_skipped_and_the_conversation_kept(smollm2, monkeypatch,
                                                                                capsys):
    """Dropping the oldest turns cannot make room for it: it is skipped, and the next question still
    sees every earlier turn."""
    _, tokenizer = smollm2
    two_turns = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": "Fine."},
                 {"role": "user", "content": TURNS[1]}]
    max_seq = len(tokenizer.encode_chat(two_turns)) + 40  # room for a 32-token answer
    asked = converse(tokenizer, [TURNS[0], "word " * 200, TURNS[1]], monkeypatch, max_seq=max_seq)
    assert [prompt for prompt, _ in asked] == [tokenizer.encode_chat(two_turns[:1]),
                                               tokenizer.encode_chat(two_turns)]
    err = capsys.readouterr().err
    assert "(skipped: the prompt has" in err and "dropped" not in err


def test_an_answer_cut_short_by_the_end_of_the_cache_says_so(smollm2, monkeypatch, capsys):
    """The stand-in's two-token answer fills the two slots left after the question."""
    _, tokenizer = smollm2
    question = tokenizer.encode_chat([{"role": "user", "content": TURNS[0]}])
    converse(tokenizer, TURNS[:1], monkeypatch, max_seq=len(question) + 2)
    assert "the answer stopped at the end of the" in capsys.readouterr().err
    converse(tokenizer, TURNS[:1], monkeypatch, max_seq=len(question) + 3)
    assert "stopped" not in capsys.readouterr().err


def test_an_answer_cut_at_max_new_tokens_is_not_said_to_stop_at_the_end_of_the_cache(smollm2, monkeypatch,
                                                                                   capsys):
    """The stand-in's two-token answer fills max_new_tokens of 2 with the cache far from full."""
    _, tokenizer = smollm2
    converse(tokenizer, TURNS[:1], monkeypatch, max_new=2)
    assert "stopped" not in capsys.readouterr().err


def test_earlier_turns_are_kept_while_they_leave_half_the_cache_for_a_longer_answer(smollm2, monkeypatch,
                                                                                   capsys):
    """Answers of up to 1000 tokens in a cache of twice the second question's conversation: an answer
    longer than the cache's half does not push the first turn out."""
    _, tokenizer = smollm2
    two_turns = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": "Fine."},
                 {"role": "user", "content": TURNS[1]}]
    max_seq = 2 * len(tokenizer.encode_chat(two_turns))
    asked = converse(tokenizer, TURNS[:2], monkeypatch, max_seq=max_seq, max_new=1000)
    assert asked[1][0] == tokenizer.encode_chat(two_turns)
    assert "dropped" not in capsys.readouterr().err


def test_a_long_question_drops_as_many_oldest_turns_as_it_needs_and_says_how_many(smollm2, monkeypatch,
                                                                                   capsys):
    _, tokenizer = smollm2
    long_question = "word " * 60
    max_seq = len(tokenizer.encode_chat([{"role": "user", "content": long_question}])) + 32
    asked = converse(tokenizer, [*TURNS[:2], long_question], monkeypatch, max_seq=max_seq)
    assert asked[2][0] == tokenizer.encode_chat([{"role": "user", "content": long_question}])
    assert "(dropped the 2 oldest turns:" in capsys.readouterr().err


def test_the_next_turn_reuses_the_cache_up_to_the_end_of_an_answer_that_ended_itself(smollm2, monkeypatch):
    """The stand-in's answer ends with an end-of-sequence token: each of its two tokens was fed to the
    model, and is in the cache with the question before it."""
    _, tokenizer = smollm2
    asked = converse(tokenizer, TURNS[:2], monkeypatch)
    (first, _), (_, cached) = asked
    assert cached == len(first) + 2


def test_after_a_stopped_answer_the_next_turn_prefills_the_whole_conversation(smollm2, monkeypatch, capsys):
    """What the cache holds after Ctrl-C stopped an answer is not known: none of it is reused, and the
    stopped question is not part of the conversation."""
    _, tokenizer = smollm2
    asked = converse(tokenizer, TURNS, monkeypatch, stopped=[1])
    assert len(asked) == 3 and asked[2][1] == 0
    third = tokenizer.decode(asked[2][0])
    assert TURNS[0] in third and TURNS[1] not in third
    assert "(answer stopped)" in capsys.readouterr().err


def test_ctrl_c_at_the_prompt_ends_the_session_as_end_of_input_does(smollm2, monkeypatch, capsys):
    _, tokenizer = smollm2
    try:
        asked = converse(tokenizer, [TURNS[0], KeyboardInterrupt(), TURNS[1]], monkeypatch)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C at the prompt raised out of the session")
    assert len(asked) == 1
    assert capsys.readouterr().out.endswith("\n")


def test_ctrl_c_while_a_question_is_encoded_stops_that_turn_only(smollm2, monkeypatch, capsys):
    """A long question takes seconds to encode: Ctrl-C then stops that turn, as it stops an
    answer, and the next question is asked without it."""
    _, tokenizer = smollm2
    encode_chat = tokenizer.encode_chat

    def interrupted_first(messages):
        if messages[-1]["content"] == TURNS[0]:
            raise KeyboardInterrupt
        return encode_chat(messages)
    monkeypatch.setattr(tokenizer, "encode_chat", interrupted_first)
    try:
        asked = converse(tokenizer, TURNS[:2], monkeypatch)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C while encoding ended the conversation")
    assert asked == [(encode_chat([{"role": "user", "content": TURNS[1]}]), 0)]
    assert "(answer stopped)" in capsys.readouterr().err


def test_a_compiled_session_compiles_before_the_first_answer(smollm2, monkeypatch, capsys):
    """--compile: one untimed warm-up first, so that no answer's metrics count the compiling."""
    _, tokenizer = smollm2
    asked = converse(tokenizer, TURNS[:1], monkeypatch, compiled=True)
    question = tokenizer.encode_chat([{"role": "user", "content": TURNS[0]}])
    assert len(asked) == 2 and asked[0][0] != question and asked[1] == (question, 0)
    assert "Compilation time" in capsys.readouterr().err


def test_without_chat_each_line_stands_alone(smollm2, monkeypatch):
    _, tokenizer = smollm2
    asked = converse(tokenizer, TURNS, monkeypatch, chat=False)
    assert [prompt for prompt, _ in asked] == [tokenizer.encode(t) for t in TURNS]
    assert all(cached == 0 for _, cached in asked)


def test_cache_reuse_gives_the_tokens_of_a_fresh_prefill(smollm2):
    model, tokenizer = smollm2
    greedy = Sampling(temperature=0)
    model.setup_caches(1, 512)
    messages = [{"role": "user", "content": TURNS[0]}]
    first_ids = tokenizer.encode_chat(messages)
    first = generate.generate(model, [first_ids], 12, greedy, tokenizer.eos_ids)
    answer = first.tokens[0]
    in_cache = first_ids + (answer if first.generated > len(answer) else answer[:-1])
    messages += [{"role": "assistant", "content": tokenizer.decode(answer)},
                 {"role": "user", "content": TURNS[1]}]
    ids = tokenizer.encode_chat(messages)
    cached = next(i for i in range(len(ids)) if i >= len(in_cache) or in_cache[i] != ids[i])
    assert cached > len(first_ids) // 2
    reused = generate.generate(model, [ids], 12, greedy, tokenizer.eos_ids, cached=cached)
    assert reused.prompt_tokens == [len(ids) - cached]
    fresh = generate.generate(model, [ids], 12, greedy, tokenizer.eos_ids)
    assert reused.tokens == fresh.tokens


def test_an_answer_cut_at_max_new_tokens_is_reused_without_its_unfed_last_token(smollm2, monkeypatch):
    """An answer cut at max_new_tokens ends on a token that was sampled but never fed to the model:
    its cache slot holds nothing, so the next turn prefills from that token on, and answers as a
    fresh prefill of the whole conversation does."""
    model, tokenizer = smollm2
    greedy, max_new = Sampling(temperature=0), 6
    model.setup_caches(1, 512)
    runs = []

    def recording(prompts, max_new_tokens, on_tokens=None, cached=0):
        gen = generate.generate(model, prompts, max_new_tokens, greedy, tokenizer.eos_ids,
                                on_tokens=on_tokens, cached=cached)
        runs.append((prompts[0], cached, gen))
        return gen
    interact(tokenizer, TURNS[:2], monkeypatch, recording, 512, max_new)
    (first_ids, _, first), (ids, cached, second) = runs
    answer = first.tokens[0]
    assert len(answer) == first.generated == max_new  # cut: no end-of-sequence token
    assert ids[:len(first_ids) + max_new] == first_ids + answer  # the conversation re-rendered
    assert cached == len(first_ids) + max_new - 1
    fresh = generate.generate(model, [ids], max_new, greedy, tokenizer.eos_ids)
    assert second.tokens == fresh.tokens


EQUALS, DASHES = "=" * 64, "-" * 64  # one token each in SmolLM2's vocabulary


def said(text: str) -> int:
    """How many of the two-token model's tokens the text holds."""
    return text.count(EQUALS) + text.count(DASHES)


@pytest.fixture(scope="module")
def two_token_checkpoint(smollm2_checkpoint, tmp_path_factory) -> Path:
    """A tiny model with SmolLM2's tokenizer and chat template that only ever says one of two
    64-character tokens, so that its answers never end before --max_new_tokens: its final norm
    keeps one feature of the hidden state, whose sign picks the one token that the output layer
    scores above 0 (every other scores 0). A context of 1024 tokens."""
    tokenizer = load_tokenizer(smollm2_checkpoint)
    (equals,), (dashes,) = tokenizer.encode(EQUALS), tokenizer.encode(DASHES)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=49152,
                                  intermediate_size=128, block_size=1024))
    with torch.no_grad():
        model.norm.weight.zero_()[0] = 1
        model.output.weight.zero_()[[equals, dashes], 0] = torch.tensor([1.0, -1.0])
    folder = tmp_path_factory.mktemp("two_tokens") / "tiny"
    names = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
    save_checkpoint(folder, model.args, model.state_dict(),
                    {n: copier(smollm2_checkpoint / n) for n in names
                     if (smollm2_checkpoint / n).exists()})
    return folder


def chat_command(checkpoint: Path, max_new_tokens: int, *flags) -> list:
    return [sys.executable, "generate.py", "--checkpoint_path", str(checkpoint), "--chat",
            "--interactive", "--temperature", "0", "--max_new_tokens", str(max_new_tokens),
            "--device", "cpu", *flags]


def test_interactive_chat_cli_answers_three_turns(two_token_checkpoint):
    r = subprocess.run(chat_command(two_token_checkpoint, 8, "--metrics"), cwd=ROOT,
                       capture_output=True, text=True, input="\n".join(TURNS) + "\n/clear\n",
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("> ") == 5  # three answers, /clear, end of input
    assert said(r.stdout) == 3 * 8  # the answers, streamed
    assert r.stderr.count("new tokens, time to first token") == 3
    assert "(conversation cleared)" in r.stderr


def test_ctrl_c_stops_an_answer_and_the_conversation_goes_on(two_token_checkpoint):
    """SIGINT while an answer streams (the terminal's Ctrl-C) ends that answer, not the session:
    the next question is answered, and end of input still ends it with status 0. The first answer
    cannot end before the signal: its 100 tokens of 64 characters do not fit in the output pipe,
    shrunk to 4096 bytes, of which the test reads 3 bytes until then."""
    import fcntl
    import signal
    p = subprocess.Popen(chat_command(two_token_checkpoint, 100, "--metrics"), cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         bufsize=0)  # unbuffered: a read takes no more than it asks from the pipe
    try:
        assert fcntl.fcntl(p.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096) == 4096
        p.stdin.write(b"Tell me a very long story about a dragon.\n")
        assert read_exactly(p.stdout, 2) == b"> "  # the prompt; then the answer streams
        assert read_exactly(p.stdout, 1)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(b"What is the capital of France?\n", timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    stdout, stderr = out.decode(), err.decode()
    assert p.returncode == 0, stderr[-2000:]
    assert "(answer stopped)" in stderr and "Traceback" not in stderr
    assert stderr.count("new tokens, time to first token") == 1  # the second answer, whole
    assert said(stdout.split("> ")[-2]) == 100  # between the second prompt and the last
    assert stdout.split("> ")[0].endswith("\n")  # the stopped answer's line ended before the prompt


def read_exactly(stream, n: int) -> bytes:
    data = b""
    while len(data) < n and (piece := stream.read(n - len(data))):
        data += piece
    return data
