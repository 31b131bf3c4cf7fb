"""server.py end to end: the real `openai` client against a real uvicorn server on 127.0.0.1 serving
SmolLM2-135M (one server process for the module; its last test shuts it down with SIGTERM). Greedy
answers are checked against generate.generate run in this process on the same model. What depends
on when requests come and go (a full queue, a client that leaves, requests that join others) is
checked on server.py's app in this process over a tiny model, its scheduler stepping only when the
test lets it (stepped_server): the same steps on any machine, however fast."""
import asyncio
import gc
import json
import random
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import httpx
import openai
import pytest
import torch

from checkpoint import InputError, copier, load_model, read_checkpoint, save_checkpoint
from conftest import QUIET, ROOT, as_run, assert_one_error_line, main_error, run_script, serve
from generate import Sampling, generate
import server as server_module
from model import ModelArgs, Transformer
from server import (FREE_ROW, Job, RowSettings, Scheduler, decode_rows, held_back, parse_args,
                    sample_rows, settings_dtype)
from stepped_server import StepGate, never_ending, stepped_server, tiny_model, wait_until
from tokenizer import load_tokenizer

KEY = "test-key"
ROWS, QUEUE, CONTEXT = 4, 4, 256
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_checkpoint, tmp_path_factory):
    """(base URL, process, log path): the server, prefilling in chunks of 32 tokens, so that the
    chat prompts here (32 tokens or more) mostly take two."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serve(log, "--checkpoint_path", smollm2_checkpoint, "--api_key", KEY, "--max_batch_size",
               ROWS, "--max_queue", QUEUE, "--max_seq_length", CONTEXT, "--prefill_chunk", 32,
               env=QUIET) as (url, proc):
        yield url, proc, log


@pytest.fixture(scope="module")
def reference(smollm2_checkpoint):
    """greedy(messages, max_tokens) -> (text, token count): generate.generate alone, float32."""
    ckpt = read_checkpoint(smollm2_checkpoint)
    model, tokenizer = load_model(ckpt, dtype=torch.float32), load_tokenizer(ckpt.folder)

    def greedy(messages: list, max_tokens: int) -> tuple[str, int]:
        ids = tokenizer.encode_chat(messages)
        model.setup_caches(1, len(ids) + max_tokens)
        tokens = generate(model, [ids], max_tokens, Sampling(temperature=0),
                          tokenizer.eos_ids).tokens[0]
        return tokenizer.decode(tokens), len(tokens)
    greedy.tokenizer = tokenizer
    return greedy


def client(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0)


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def ask(server, messages=QUESTION, **fields):
    return client(server).chat.completions.create(model="SmolLM2-135M-Instruct",
                                                  messages=messages, **fields)


def streamed(server, messages=QUESTION, **fields) -> tuple[str, str, list]:
    """(text, finish_reason, chunks) of a streamed chat answer."""
    chunks = list(ask(server, messages, stream=True, **fields))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[:-1] == [None] * (len(reasons) - 1)
    return text, reasons[-1], chunks


def test_chat_answers_paris_identically_streamed_and_not_with_usage(server, reference):
    answer = ask(server, max_tokens=20, temperature=0)
    text = answer.choices[0].message.content
    assert "Paris" in text
    assert answer.choices[0].finish_reason == "stop"  # the model ended its answer
    ref_text, ref_tokens = reference(QUESTION, 20)
    assert text == ref_text
    prompt_tokens = len(reference.tokenizer.encode_chat(QUESTION))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens,
            answer.usage.total_tokens) == (prompt_tokens, ref_tokens, prompt_tokens + ref_tokens)
    text, reason, chunks = streamed(server, max_tokens=20, temperature=0,
                                    stream_options={"include_usage": True})
    assert (text, reason) == (answer.choices[0].message.content, "stop")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage


def test_max_tokens_ends_with_length_and_completions_continue_the_prompt(server, reference):
    answer = ask(server, max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3
    assert answer.choices[0].message.content == reference(QUESTION, 3)[0]
    done = client(server).completions.create(model="SmolLM2-135M-Instruct", prompt="The capital "
                                             "of France is", max_tokens=4, temperature=0)
    assert "Paris" in done.choices[0].text and done.usage.completion_tokens == 4
    assert done.usage.prompt_tokens == len(reference.tokenizer.encode("The capital of France is"))


def test_an_answer_that_max_tokens_cuts_inside_a_character_leaves_that_character_out(server,
                                                                                   reference):
    """SmolLM2 writes this emoji in three tokens: an answer cut inside one ends, streamed or not,
    with the characters before it, not with U+FFFD (which a chat page would send back as text)."""
    question = [{"role": "user", "content": "Write 5 emoji about food, only emoji."}]
    cut, whole = next((n, text.rstrip("\ufffd")) for n in range(1, 12)
                      for text in [reference(question, n)[0]]
                      if text.endswith("\ufffd") and text.rstrip("\ufffd"))
    answer = ask(server, question, max_tokens=cut, temperature=0).choices[0]
    assert (answer.message.content, answer.finish_reason) == (whole, "length")
    assert streamed(server, question, max_tokens=cut, temperature=0)[:2] == (whole, "length")


def test_token_ids_top_p_zero_and_top_k_one_answer_as_the_text_and_greedy_do(server, reference):
    complete = lambda **fields: client(server).completions.create(  # noqa: E731
        model="SmolLM2-135M-Instruct", max_tokens=4, **fields).choices[0].text
    text = "The capital of France is"
    greedy = complete(prompt=text, temperature=0)
    ids = reference.tokenizer.encode(text)
    # a prompt alone, or in a list of one, as text or as token ids
    for prompt in (ids, [text], [ids]):
        assert complete(prompt=prompt, temperature=0) == greedy
    # This seed's draws at this temperature are not the greedy answer; top_p 0 and top_k 1 (an
    # extension of OpenAI's API) each keep the most likely token alone, whatever the temperature.
    assert complete(prompt=text, temperature=2, seed=7) != greedy
    assert complete(prompt=text, temperature=2, top_p=0, seed=7) == greedy
    assert complete(prompt=text, temperature=2, seed=7, extra_body={"top_k": 1}) == greedy
    with pytest.raises(openai.BadRequestError, match="token ids go from 0"):
        complete(prompt=[1, 10**9])


def test_stop_strings_cut_the_answer_also_across_tokens(server, reference):
    full = reference(QUESTION, 20)[0]  # "The capital of France is Paris."
    ids = reference.tokenizer.encode(full)
    # a stop string that begins inside one token and ends inside the next
    first, second = (reference.tokenizer.decode(ids[:i]) for i in (2, 3))
    stop = first[-2:] + second[len(first):][:2]
    assert len(stop) == 4 and stop in full
    expected = full[:full.index(stop)]
    answer = ask(server, max_tokens=20, temperature=0, stop=[stop, "never appears"])
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (expected,
                                                                                    "stop")
    assert streamed(server, max_tokens=20, temperature=0, stop=stop)[:2] == (expected, "stop")
    assert held_back("The cap", ["apital", "x"]) == 2  # "ap" may begin "apital": held back


def test_held_back_is_the_longest_end_of_the_text_that_begins_a_stop_string():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choices("ab", k=rng.randint(0, 9)))
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 7))) for _ in range(rng.randint(0, 4))]
        longest = max((k for stop in stops for k in range(1, len(stop))
                       if text.endswith(stop[:k])), default=0)
        assert held_back(text, stops) == longest, (text, stops)


def test_a_seeded_sampled_request_is_reproducible_whatever_runs_beside_it(server):
    fields = dict(max_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    alone = ask(server, **fields).choices[0].message.content

    async def beside_others():
        c = async_client(server)
        return await asyncio.gather(*(c.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=QUESTION, **dict(fields, seed=seed))
            for seed in (7, 8, 9)))
    results = [r.choices[0].message.content for r in asyncio.run(beside_others())]
    assert results[0] == alone
    assert len(set(results)) > 1  # the seed matters


def test_sampling_fields_left_out_take_openais_defaults_and_a_seed_left_out_draws_afresh(server):
    """temperature 1, top_p 1 and every candidate (top_k) when a request leaves them out, as OpenAI's API
    defines; and a request without a seed draws anew each time ("regenerate" gives another answer). Each
    default is checked against a value that would answer otherwise with the same seed."""
    story = [{"role": "user", "content": "Tell me a story about a dragon."}]
    text = lambda **fields: ask(server, story, max_tokens=40, **fields).choices[0].message.content  # noqa: E731
    assert text(seed=7) == text(seed=7, temperature=1.0) != text(seed=7, temperature=0)
    hot = dict(seed=7, temperature=2)  # draws that reach beyond any nucleus or top 40
    left_out = text(**hot)
    assert left_out == text(**hot, top_p=1.0, extra_body={"top_k": server_module.CANDIDATES})
    assert left_out not in (text(**hot, top_p=0.9), text(**hot, extra_body={"top_k": 40}))
    assert text(temperature=2) != text(temperature=2)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def rows_settings(n: int, **columns) -> RowSettings:
    """The settings of n rows: the columns given (tensors (n,)), a free row's value in the others,
    so that these tests keep running when RowSettings gains a field."""
    return server_module.free_rows(n)._replace(**columns)


def test_a_settings_column_takes_its_dtype_from_the_fields_type_not_its_default(monkeypatch):
    """A forker's new float option whose default is written 0 (an int) must still be a float32
    column: an int64 one would store every request's 0.1 as 0 and quietly turn the option off."""
    from typing import NamedTuple

    class Settings(NamedTuple):
        temperature: float = 0.0
        top_k: int = 1024
        min_p: float = 0

    monkeypatch.setattr(server_module, "RowSettings", Settings)
    assert [settings_dtype(f) for f in Settings._fields] == [torch.float32, torch.long, torch.float32]


def settings_distribution(logits: torch.Tensor, temperature: float, top_k: int,
                          top_p: float) -> torch.Tensor:
    """What a row with these settings draws from, computed the plain way: softmax(logits /
    temperature) over the top_k most likely tokens, renormalized; of those, the fewest most likely
    whose mass reaches top_p (the nucleus), renormalized. Float64, over the whole vocabulary."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    top = probs.argsort(descending=True)[:top_k]
    kept, mass = torch.zeros_like(probs), 0.0
    for token in top:
        kept[token] = probs[token] / probs[top].sum()
        mass += kept[token].item()
        if mass >= top_p:
            break
    return kept / kept.sum()


def test_each_sampled_row_draws_from_its_own_temperature_top_k_and_nucleus():
    """One call samples the rows of five requests interleaved, each with its own settings and its
    own logits over 8 tokens, each request drawing at N successive cache positions (its seed fixed,
    as while it decodes). A token's frequency must be its probability under its request's settings
    within 5 binomial standard deviations, sqrt(p (1 - p) / N) (about 0.0035 at p = 0.5: the
    distributions differ from those of a temperature off by its square root by 5 to 11 of them):
    a token outside the top_k or the nucleus (p = 0) is never drawn, and temperature 0 draws the
    argmax, where a temperature of 1 would draw any token. The draws are a hash of seed and
    position: the same every run."""
    N, V = 20_000, 8
    settings = [(0.5, V, 1.0), (1.5, 3, 1.0), (1.0, V, 0.75), (2.0, 5, 0.6), (0.0, V, 1.0)]
    R = len(settings)
    generator = torch.Generator().manual_seed(0)
    base = torch.tensor([1.5, 0.0, 2.5, -1.0, 0.8, -2.0, 0.3, 1.1])
    logits = torch.stack([base[torch.randperm(V, generator=generator)] for _ in settings])  # (R, V)
    temperature, top_k, top_p = (torch.tensor(column).repeat(N) for column in zip(*settings))
    tokens = sample_rows(logits.repeat(N, 1), position=torch.arange(N).repeat_interleave(R),
                         settings=rows_settings(R * N, temperature=temperature, top_k=top_k, top_p=top_p,
                                                seed=torch.arange(1000, 1000 + R).repeat(N)))  # row i: request i % R
    drawn = tokens.view(N, R).T  # (R, N)
    for r, (t, k, p) in enumerate(settings):
        if t == 0:
            assert (drawn[r] == logits[r].argmax()).all()
            continue
        expected = settings_distribution(logits[r], t, k, p)
        frequency = torch.bincount(drawn[r], minlength=V).double() / N
        assert (frequency[expected == 0] == 0).all(), (r, frequency, expected)
        tolerance = 5 * (expected * (1 - expected) / N).sqrt()
        assert ((frequency - expected).abs() <= tolerance).all(), (r, frequency, expected)
        if k < V or p < 1:  # the setting leaves tokens out: those must be the ones never drawn
            assert 0 < (expected > 0).sum() < V


def test_a_nucleus_that_reaches_top_p_exactly_takes_no_more_tokens():
    """[0.5, 0.25, 0.25] at top_p 0.5: the most likely token alone reaches it, so it is the only one
    drawn, as in generate.py and transformers; at 0.75, the first two, each drawn."""
    N = 2000
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]])).repeat(N, 1)
    for top_p, drawn in ((0.5, {0}), (0.75, {0, 1})):
        tokens = sample_rows(logits, position=torch.arange(N), settings=rows_settings(
            N, temperature=torch.ones(N), top_k=torch.full((N,), 3), top_p=torch.full((N,), top_p)))
        assert set(tokens.view(-1).tolist()) == drawn, top_p


def test_a_token_the_filters_drop_is_never_drawn_at_the_hashs_extremes():
    """The race's noise is never 0, or a dropped token's 0 / 0 would win: a row (seed 4565951, cache
    slot 159) whose hash for token 20304 has all of its top 24 bits set, with 20304 the second most
    likely token, draws token 7, the only one top_k 1 or top_p 0.5 leaves."""
    V = 49152
    logits = torch.zeros(1, V)
    logits[0, 7], logits[0, 20304] = 10.0, 5.0
    for top_k, top_p in ((1, 1.0), (V, 0.5)):
        token = sample_rows(logits, torch.tensor([159]), rows_settings(
            1, temperature=torch.ones(1), top_k=torch.tensor([top_k]), top_p=torch.tensor([top_p]),
            seed=torch.tensor([4565951])))
        assert token.item() == 7, (top_k, top_p)


def test_seeds_that_differ_only_in_their_high_bits_or_sign_draw_apart():
    """A seed is an int64, as OpenAI's: seeds equal in their low 32 bits draw their own tokens."""
    N, V = 64, 1000
    seeds = torch.tensor([5, 5 + 2**32, 5 - 2**32, -1, 2**32 - 1, 2**63 - 1])
    logits = torch.zeros(N, V)  # uniform: each draw is the hash's alone
    draws = [sample_rows(logits, torch.arange(N), rows_settings(
        N, temperature=torch.ones(N), top_k=torch.full((N,), V), seed=seed.repeat(N))).view(-1).tolist()
        for seed in seeds]
    assert len({tuple(d) for d in draws}) == len(seeds)


def test_a_tiny_temperature_samples_each_rows_argmax_not_noise():
    """Logits divided by 1e-40 overflow to ±inf; each row's argmax must still win, as at 0."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5000) * 5
    temperature = torch.tensor([1e-40, 1e-38, 0])
    tokens = sample_rows(logits, position=torch.arange(3), settings=rows_settings(
        3, temperature=temperature, top_k=torch.full((3,), 5000), seed=torch.arange(3)))  # (3, 1)
    assert torch.equal(tokens, logits.argmax(-1, keepdim=True))


def test_a_developer_message_is_the_system_message(server, reference):
    """A message of role "developer", OpenAI's newer name for the system message, is rendered as
    one: the answer and the prompt's length are those of the conversation with a system message."""
    system = [{"role": "system", "content": "Answer in one word."}] + QUESTION
    answer = ask(server, [dict(system[0], role="developer")] + QUESTION, max_tokens=4,
                 temperature=0)
    assert answer.choices[0].message.content == reference(system, 4)[0]
    assert answer.usage.prompt_tokens == len(reference.tokenizer.encode_chat(system))


def test_errors_answer_with_openai_error_json_and_status(server):
    url = server[0]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    post = lambda path, **kw: httpx.post(url + path, headers=headers, **kw)  # noqa: E731
    long = "word " * 300
    error = error_of(post("/v1/completions", json={"prompt": long, "max_tokens": 10}), 400)
    assert error["code"] == "context_length_exceeded" and f"{CONTEXT} tokens" in error["message"]
    error = error_of(post("/v1/completions", json={"prompt": long}), 400)  # no max_tokens
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "max_tokens" not in error["message"]  # the client sent none
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(server, max_tokens=CONTEXT)
    assert "JSON" in error_of(post("/v1/chat/completions", content=b"{\"messages\": ["), 400)[
        "message"]
    # curl -d without -H: valid JSON sent as a form, which FastAPI does not read as JSON
    form = httpx.post(url + "/v1/completions", content=b'{"prompt": "a"}', headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"})
    assert "Content-Type: application/json" in error_of(form, 400)["message"]
    # media types are case-insensitive: this one is JSON, and its error is the field's
    error = error_of(httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": "5"},
                                headers={**headers, "Content-Type": "Application/JSON"}), 400)
    assert error["param"] == "max_tokens", error
    # A value of the wrong JSON type is refused, not converted (OpenAI's API refuses them too)
    for field, value in [("max_tokens", "many"), ("max_tokens", "5"), ("max_tokens", True),
                         ("max_tokens", 5.0), ("temperature", "0.5"), ("temperature", True),
                         ("top_k", True), ("stream", "yes"), ("seed", 1e18), ("seed", 2**70),
                         ("stream_options", {"include_usage": "yes"})]:
        error = error_of(post("/v1/chat/completions", json={"messages": QUESTION,
                                                            field: value}), 400)
        assert error["param"].startswith(field), (field, value, error)
    assert post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 1,
                                              "temperature": 1, "seed": -1}).status_code == 200
    for field in ("temperature", "top_p"):  # NaN (Python's json writes it) is not finite, not out of range
        error = error_of(post("/v1/completions", content=b'{"prompt": "a", "%s": NaN}' % field.encode()), 400)
        assert error["param"] == field and "finite" in error["message"], error
    # a body that is no UTF-8 text, with the key: what is wrong; without it, only that
    for key, status in ((KEY, 400), (None, 401)):
        sent = {"Content-Type": "application/json"} | (key and {"Authorization": f"Bearer {key}"}
                                                       or {})
        error = error_of(httpx.post(url + "/v1/completions", content=b'{"prompt": "\xff"}',
                                    headers=sent), status)
        assert error["code"] == ("invalid_json" if key else "invalid_api_key"), error
    error = error_of(post("/v1/completions", json={"prompt": ""}), 400)
    assert (error["code"], error["param"]) == ("empty_prompt", "prompt")
    error_of(post("/v1/chat/completions", json={"messages": "hello"}), 400)
    for part in ({"type": "text", "text": 5}, {"type": "text"}):  # no string to take as text
        error = error_of(post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": [part]}]}), 400)
        assert error["param"] == "messages"
    for prompt in ([], [[]], [True, False], [[1, 2], "a"]):  # no prompt; true is no token id
        error = error_of(post("/v1/completions", json={"prompt": prompt}), 400)
        assert error["param"] == "prompt", error
    assert error["message"].count("prompt") == 1  # one error, not one for each form it could take
    error = error_of(post("/v1/completions", json={"prompt": [[1, 2], [3]]}), 400)
    assert error["code"] == "unsupported_parameter" and "one prompt" in error["message"]
    error = error_of(post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": 5}]}), 400)
    assert (error["param"], error["message"]) == (
        "messages.0.content", "messages.0.content: must be a string or a list of parts")
    for message in ({"role": "user"}, {"role": "system", "content": None}):  # only an answer's
        error = error_of(post("/v1/chat/completions", json={"messages": [message]}), 400)
        assert error["param"] == "messages" and "needs content" in error["message"], error
    for role in ("tool", "robot"):  # a tool's result answers a tool call, which none made here
        error = error_of(post("/v1/chat/completions", json={"messages": [
            {"role": role, "content": "42"}]}), 400)
        assert error["param"] == "messages.0.role"
    # A lone surrogate is valid JSON ("\ud800") but not Unicode text: no tokenizer takes it.
    for path, body in [("/v1/completions", {"prompt": "Hi \ud800"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user",
                                                               "content": "Hi \ud83d"}]}),
                       ("/v1/completions", {"prompt": "Hi", "stop": ["a", "\ud800"]})]:
        escaped = json.dumps({**body, "max_tokens": 2}).encode()  # ASCII: the surrogate escaped
        assert error_of(post(path, content=escaped), 400)["code"] == "invalid_text"
    for stop in ["", ["a", ""], ["a", "b", "c", "d", "e"], "x" * 101]:  # empty, 5, too long
        error = error_of(post("/v1/completions", json={"prompt": "a", "stop": stop}), 400)
        assert error["code"] == "invalid_stop" and error["param"] == "stop"
    for stop in (5, ["a", 3]):
        error = error_of(post("/v1/completions", json={"prompt": "a", "stop": stop}), 400)
        assert error["param"] == "stop" and "a string or a list of strings" in error["message"]
    assert post("/v1/completions", json={"prompt": "a", "max_tokens": 1,
                                         "stop": ["a", "b", "c", "x" * 100]}).status_code == 200
    # OpenAI's API takes null for stream, as for the other optional fields.
    assert post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 1,
                                              "stream": None}).status_code == 200
    # Beyond the sampling candidates (and beyond an int64, which once killed the scheduler).
    for top_k in (1025, 10**20):
        error = error_of(post("/v1/completions", json={"prompt": "a", "top_k": top_k}), 400)
        assert error["param"] == "top_k"
    for field, value in [("n", 2), ("n", True), ("logprobs", True), ("tools", [{
            "type": "function", "function": {"name": "f"}}]), ("modalities", ["text", "audio"]),
            ("min_p", 0.1), ("repetition_penalty", 1.2), ("ignore_eos", True),
            ("stop_token_ids", [2]), ("include_stop_str_in_output", True)]:
        error = error_of(post("/v1/chat/completions", json={"messages": QUESTION, field: value}),
                         400)
        assert error["param"] == field and "not supported" in error["message"]
    # logprobs 0 asks a completion for its chosen tokens' logprobs, which this server does not give
    error = error_of(post("/v1/completions", json={"prompt": "a", "logprobs": 0}), 400)
    assert error["param"] == "logprobs"
    assert post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "n": 1, "logprobs": None,
                                         "presence_penalty": 0.0}).status_code == 200
    error = error_of(post("/v1/chat/completions", json={"messages": QUESTION, "stream_options": {
        "include_usage": True}}), 400)
    assert error["param"] == "stream_options"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(server).chat.completions.create(model="gpt-4", messages=QUESTION)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    error = error_of(httpx.get(url + "/v1/models"), 401)
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")  # OpenAI's
    # without the key, a malformed body says nothing but that
    error_of(httpx.post(url + "/v1/chat/completions", content=b"{\"messages\": [",
                        headers={"Content-Type": "application/json"}), 401)
    assert [m.id for m in client(server).models.list()] == ["SmolLM2-135M-Instruct"]
    assert client(server).models.retrieve("SmolLM2-135M-Instruct").id == "SmolLM2-135M-Instruct"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(server).models.retrieve("gpt-4")
    # an authentication scheme's name has no case
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"bearer {KEY}"}
                     ).status_code == 200
    error_of(httpx.get(url + "/v1/models", headers={"Authorization": f"Basic {KEY}"}), 401)


def test_a_body_over_the_limit_answers_413_whether_its_length_is_declared_or_not(server):
    url, limit = server[0], 1 << 20  # the floor, above 256 bytes for each of CONTEXT's tokens
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def body(n_bytes: int) -> bytes:  # a JSON completion request of exactly n_bytes
        head, tail = b'{"prompt": "', b'", "max_tokens": 1}'
        return head + b"word " * ((n_bytes - len(head) - len(tail)) // 5) + b"." * (
            (n_bytes - len(head) - len(tail)) % 5) + tail
    declared = httpx.post(url + "/v1/completions", content=body(limit + 1), headers=headers)
    error = error_of(declared, 413)
    assert error["code"] == "request_too_large" and f"{limit} bytes" in error["message"]
    chunks = (piece for piece in [body(limit + 1)[:limit // 2], body(limit + 1)[limit // 2:]])
    chunked = httpx.post(url + "/v1/completions", content=chunks, headers=headers)
    assert "content-length" not in chunked.request.headers  # sent in chunks, its size unsaid
    assert error_of(chunked, 413)["code"] == "request_too_large"
    # at the limit, the body is read: its prompt is then too long for the context
    error = error_of(httpx.post(url + "/v1/completions", content=body(limit), headers=headers,
                                timeout=60), 400)
    assert error["code"] == "context_length_exceeded"


# ---- in this process: a server whose scheduler steps only when the test lets it -----------------

def long_streams(http: httpx.Client, n: int) -> list:
    """n streamed requests for 200 tokens each, submitted (headers received): (stream, response)."""
    streams = []
    for _ in range(n):
        stream = http.stream("POST", "/v1/completions", json={"prompt": "Once upon a time",
                                                              "max_tokens": 200, "stream": True})
        response = stream.__enter__()
        assert response.status_code == 200
        streams.append((stream, response))
    return streams


def close(streams: list):
    for stream, _ in streams:
        stream.__exit__(None, None, None)


def answered(gate: StepGate, request: Callable[[], httpx.Response]) -> httpx.Response:
    """request() (one answer, not streamed) on a thread, the scheduler stepping until the job it
    submitted has ended; its response."""
    from concurrent.futures import ThreadPoolExecutor
    known = len(gate.jobs)
    with ThreadPoolExecutor(1) as pool:
        response = pool.submit(request)
        try:
            wait_until(lambda: len(gate.jobs) > known or response.done(), "the request's arrival")
            if len(gate.jobs) > known:
                gate.step_until(lambda: gate.ended(gate.jobs[known]))
        except BaseException:
            gate.free()  # else the request's thread, which the pool waits for, waits on
            raise
        return response.result(timeout=60)


def short_answer(http: httpx.Client, gate: StepGate) -> dict:
    response = answered(gate, lambda: http.post("/v1/completions", json={"prompt": "Hi",
                                                                         "max_tokens": 3}))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def busy(url: str) -> int:
    health = httpx.get(url + "/health").json()
    return health["requests_running"] + health["requests_waiting"]


def test_a_full_queue_answers_429_with_retry_after():
    """Every row and every place in the queue taken by answers that cannot end (the scheduler does
    not step): one request more is refused with 429 and Retry-After; once they have gone, the next
    request is answered."""
    with (stepped_server(*never_ending(ROWS), max_queue=QUEUE) as (url, gate),
          httpx.Client(base_url=url, timeout=60) as http):
        streams = long_streams(http, ROWS + QUEUE)
        try:
            response = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
            assert error_of(response, 429)["code"] == "queue_full"
            assert response.headers["Retry-After"] == "1"
        finally:
            close(streams)
        wait_until(lambda: all(job.cancelled for job in gate.jobs), "the streams' cancelling")
        assert short_answer(http, gate)["finish_reason"] == "length"


def post_and_leave(url: str, body: dict) -> socket.socket:
    """A client's POST of body to /v1/completions, its answer not streamed; close() the socket to
    leave before the answer comes."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)))
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: "
                       b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    return connection


def test_a_prompt_being_tokenized_leaves_the_server_answering_others():
    """A prompt is tokenized off the event loop that serves every request (a long one takes
    seconds): while one request's tokenizing is held up, the server still answers /health; then
    that request is answered."""
    from concurrent.futures import ThreadPoolExecutor
    model, tokenizer, eos_ids = never_ending(ROWS)
    entered, release = threading.Event(), threading.Event()

    class HeldTokenizer(type(tokenizer)):
        def encode(self, text: str) -> list:
            if text == "held":
                entered.set()
                assert release.wait(60)
            return super().encode(text)

    with stepped_server(model, HeldTokenizer(), eos_ids, max_queue=QUEUE) as (url, gate):
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(lambda: httpx.post(url + "/v1/completions", timeout=60, json={
                "prompt": "held", "max_tokens": 3}))
            try:
                assert entered.wait(60)
                assert httpx.get(url + "/health", timeout=5).json()["status"] == "ok"
            finally:
                release.set()
            wait_until(lambda: gate.jobs, "the held request's arrival")
            gate.step_until(lambda: gate.ended(gate.jobs[0]))
            assert held.result(timeout=60).json()["choices"][0]["finish_reason"] == "length"


def test_a_client_that_disconnects_frees_its_row_for_the_next_request():
    """Every row holds an answer of 200 tokens, which the few steps the test lets the scheduler
    take cannot end (nor can the model end one: it has no end of sequence): a request can only be
    answered once a client that left has freed its row, a non-streaming one, then a streaming
    one."""
    with (stepped_server(*never_ending(ROWS), max_queue=QUEUE) as (url, gate),
          httpx.Client(base_url=url, timeout=60) as http):
        rows = gate.scheduler.rows
        streams = long_streams(http, ROWS - 1)
        try:
            leaving = post_and_leave(url, {"prompt": "Once upon a time", "max_tokens": 200})
            wait_until(lambda: len(gate.jobs) == ROWS, "the last request's arrival")
            gate.step_until(lambda: all(rows))  # every row taken
            leaving.close()
            wait_until(lambda: gate.jobs[ROWS - 1].cancelled, "the server to see the client go")
            assert short_answer(http, gate)["finish_reason"] == "length"
            assert busy(url) == ROWS - 1  # the streams, still decoding
            assert all(not job.cancelled and job.generated < 200 for job in gate.jobs[:ROWS - 1])
            streams += long_streams(http, 1)
            gate.step_until(lambda: all(rows))  # every row taken again
            close(streams[:1])
            wait_until(lambda: gate.jobs[0].cancelled, "the server to see the stream closed")
            assert short_answer(http, gate)["finish_reason"] == "length"
            assert busy(url) == ROWS - 1
        finally:
            close(streams[1:])


def test_requests_that_join_while_others_decode_each_get_their_alone_answer(smollm2_checkpoint):
    """Eight chat requests of different prompts and lengths into four rows, one arriving at each
    step (four wait for a row), streamed through the HTTP API by a tiny model with SmolLM2's
    tokenizer: each answer is generate's greedy one for its conversation alone, and the last one's
    first token is sampled while the first one still decodes: it joined while the others were
    decoding. The scheduler steps only as the test lets it: the same steps on any machine."""
    import copy
    tokenizer = load_tokenizer(smollm2_checkpoint)
    model = tiny_model(read_checkpoint(smollm2_checkpoint).args.vocab_size, 256)
    alone = copy.deepcopy(model)
    alone.setup_caches(1, 256)
    model.setup_caches(ROWS, 256)
    questions = ["Write a long story about a dragon.", "What is 2 + 2?",
                 "Write a haiku about the sea.",
                 "Who wrote Hamlet?", "Describe a cat in one sentence.", "What is the capital of "
                 "Italy? Answer with one word, then explain how you know it in detail.", "Hi!",
                 "List the planets of the solar system in order from the sun."]
    lengths = [40, 4, 8, 3, 6, 5, 3, 6]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    with stepped_server(model, tokenizer, tokenizer.eos_ids, max_queue=QUEUE) as (url, gate):
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        rows, overlapped = gate.scheduler.rows, []

        async def read(stream) -> str:
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream
                            if chunk.choices])

        async def step():
            await asyncio.to_thread(gate.step)
            first, last = gate.jobs[0], gate.jobs[-1]
            overlapped.append(len(gate.jobs) == len(questions) and last.computed > 0 and
                              any(j is first for j in rows) and first.computed < first.max_tokens)

        async def run() -> list:
            readers = []
            for conversation, n in zip(conversations, lengths):
                readers.append(asyncio.create_task(read(await c.chat.completions.create(
                    model="tiny", messages=conversation, max_tokens=n, temperature=0,
                    stream=True))))
                await step()
            assert len(gate.scheduler.waiting) == len(questions) - ROWS
            while not gate.idle():
                await step()
            return await asyncio.gather(*readers)
        served = asyncio.run(run())
    expected = []
    for conversation, n in zip(conversations, lengths):
        ids = tokenizer.encode_chat(conversation)
        expected.append(tokenizer.decode(generate(alone, [ids], n, Sampling(temperature=0),
                                                  tokenizer.eos_ids).tokens[0]))
    assert served == expected
    assert any(overlapped)


def test_the_chat_page_is_served_at_the_root(server):
    page = ROOT / "chat.html"
    response = httpx.get(server[0] + "/")
    assert response.status_code == 200 and response.text == page.read_text()
    assert response.headers["content-type"].startswith("text/html")


def test_the_log_names_the_address_served(server):
    url, _, log = server
    assert f"serving SmolLM2-135M-Instruct at {url}/v1" in log.read_text()


def test_sigterm_finishes_open_answers_and_exits_cleanly(server):
    """The module's last test: it shuts the server down."""
    url, proc, log = server
    stream = ask(server, max_tokens=24, temperature=0, stream=True)
    next(iter(stream))
    proc.send_signal(signal.SIGTERM)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in log.read_text()


def test_speculative_flags_are_refused_with_one_error_line(smollm2_checkpoint):
    r = run_script("server.py", "--checkpoint_path", smollm2_checkpoint, "--speculate_ngram", 3)
    assert r.returncode == 1
    assert_one_error_line(r.stderr, "speculative decoding")


def test_a_port_in_use_is_refused_before_the_model_loads(smollm2_checkpoint):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run_script("server.py", "--checkpoint_path", smollm2_checkpoint, "--device", "cpu",
                       "--port", busy.getsockname()[1], timeout=60)
    assert r.returncode == 1
    assert_one_error_line(r.stderr, "cannot listen", "in use")


def test_compile_prefill_is_refused_since_prompts_ride_the_decode_steps(smollm2_checkpoint, capsys):
    with pytest.raises(InputError, match="--compile_prefill"):
        parse_args(["--checkpoint_path", str(smollm2_checkpoint), "--compile_prefill"])
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    offered = capsys.readouterr().out
    assert "--compile " in offered and "--compile_prefill" not in offered  # not offered, then refused


def test_flags_the_server_would_misuse_later_are_refused_at_once(smollm2_checkpoint):
    """A port outside TCP's, an API key no header carries (or an empty one, which a bare
    "Bearer" would match), --max_seq_length 0 (not taken as the default), a prompt chunk longer
    than a row: each refused before the model loads. Parsing the server's flags leaves
    generate.py's as they were (they share a parent parser)."""
    import generate
    checkpoint = ["--checkpoint_path", str(smollm2_checkpoint), "--device", "cpu"]
    for flags in (["--port", "70000"], ["--port", "-1"], ["--api_key", "k\xff"], ["--api_key", ""],
                  ["--api_key", " k"], ["--max_seq_length", "0"]):
        with pytest.raises(InputError, match=flags[0]):
            parse_args(checkpoint + flags)
    with pytest.raises(InputError, match="--prefill_chunk 65"):
        server_module.main(checkpoint + ["--max_seq_length", "64", "--prefill_chunk", "65"])
    assert parse_args(checkpoint + ["--api_key", "sk-1"]).api_key == "sk-1"
    assert generate.parse_args(checkpoint + ["--compile_prefill"]).compile_prefill


def test_no_rows_queue_or_chunk_and_a_context_beyond_the_model_are_one_error_line(capsys,
                                                                                  monkeypatch):
    """--max_batch_size, --max_queue or --prefill_chunk of 0, or --max_seq_length beyond the model's
    context (stories15M's: 256 tokens): each ends in one `error:` line naming it, before the server
    listens or the model loads."""
    def too_far(*args, **kwargs):
        raise AssertionError("the server went on to listen or load the model")
    monkeypatch.setattr(server_module, "listen", too_far)
    monkeypatch.setattr(server_module, "load_weights", too_far)
    model = ["--random_weights", "stories15M", "--device", "cpu"]
    for flag in ("--max_batch_size", "--max_queue", "--prefill_chunk"):
        main_error(as_run(server_module.main), model + [flag, 0], capsys, flag, "must be >= 1")
    main_error(as_run(server_module.main), model + ["--max_seq_length", 257], capsys,
               "--max_seq_length 257", "context of 256 tokens")


KEEP_ALIVE_WRAPPER = """import datetime, sys
import torch.distributed.distributed_c10d as c10d
c10d.default_pg_timeout = datetime.timedelta(seconds=4)  # a broadcast gives up after 4 s
sys.path.insert(0, {root!r})
import server
server.KEEP_ALIVE_S = 1
server.main(sys.argv[2:])  # sys.argv[1] is server.py
"""


@pytest.mark.slow
def test_under_torchrun_an_idle_server_outlives_the_collectives_timeout(tmp_path):
    """While no request comes, the other ranks wait for rank 0 in a broadcast, which gives up after
    the process group's timeout (here shortened to 4 s): rank 0 must keep them alive."""
    wrapper = tmp_path / "short_timeout.py"
    wrapper.write_text(KEEP_ALIVE_WRAPPER.format(root=str(ROOT)))
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", wrapper)
    with serve(tmp_path / "server.log", "--random_weights", "stories15M", "--max_seq_length", 32,
               launch=torchrun, env=QUIET) as (url, proc):
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        for _ in range(2):
            assert c.completions.create(model="stories15M", prompt="a", max_tokens=2).usage
            time.sleep(7)  # idle past the timeout
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def tiny_with_a_tokenizer(smollm2_checkpoint, tmp_path_factory) -> Path:
    """A tiny model's checkpoint with SmolLM2's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny"
    tiny = tiny_model(49152, 128)
    names = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
    save_checkpoint(folder, tiny.args, tiny.state_dict(),
                    {n: copier(smollm2_checkpoint / n) for n in names
                     if (smollm2_checkpoint / n).exists()})
    return folder


def streamed_through_a_stop(url: str, proc, stop_signal) -> list:
    """The chunks of a streamed completion of 40 tokens from the tiny model, stop_signal sent to
    proc once the first chunk has arrived."""
    stream = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).completions.create(
        model="tiny", prompt="Hello", max_tokens=40, temperature=0, stream=True)
    first = next(iter(stream))
    proc.send_signal(stop_signal)
    return [first, *stream]


def test_ctrl_c_finishes_open_answers_and_exits_cleanly(tiny_with_a_tokenizer, tmp_path):
    with serve(tmp_path / "server.log", "--checkpoint_path", tiny_with_a_tokenizer,
               "--max_seq_length", 64, env=QUIET) as (url, proc):
        assert streamed_through_a_stop(url, proc, signal.SIGINT)[-1].choices[0].finish_reason in (
            "stop", "length")
        assert proc.wait(timeout=60) == 0
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_a_second_ctrl_c_while_answers_finish_cuts_them_off_and_exits_at_once(tmp_path):
    """SIGTERM starts the graceful stop; Ctrl-C during it, as uvicorn's log invites, quits at once:
    status 130, the open answer cut off, no traceback (uvicorn's own forced quit logs one for each
    open answer, and the process then aborts). SmolLM2's shape with random weights never ends an
    answer early: 480 tokens take seconds on a CPU."""
    log = tmp_path / "server.log"
    with serve(log, "--random_weights", "SmolLM2-135M", "--max_seq_length", 512,
               env=QUIET) as (url, proc):
        stream = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).completions.create(
            model="SmolLM2-135M", prompt="a", max_tokens=480, stream=True)
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "Waiting for connections to close" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        with pytest.raises(openai.APIError):
            list(chunks)
    text = log.read_text()
    assert "stopped at once: the open answers are cut off" in text and "Traceback" not in text, text


@pytest.mark.slow
def test_under_torchrun_two_processes_serve_the_greedy_answers_of_one(tiny_with_a_tokenizer,
                                                                       tmp_path):
    """A tiny model with SmolLM2's tokenizer split over 2 gloo processes: rank 0 schedules and
    serves, both ranks run every forward; answers arriving together equal generate.py's alone."""
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    with serve(tmp_path / "server.log", "--checkpoint_path", tiny_with_a_tokenizer,
               "--max_seq_length", 64, "--prefill_chunk", 8, launch=torchrun,
               env=QUIET) as (url, proc):
        prompts = ["Hello there", "What is the capital of France?", "Tell me a joke"]
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        async def together():
            return await asyncio.gather(*(c.completions.create(
                model="tiny", prompt=p, max_tokens=8, temperature=0) for p in prompts))
        served = [r.choices[0].text for r in asyncio.run(together())]
        ckpt = read_checkpoint(tiny_with_a_tokenizer)
        model, tokenizer = load_model(ckpt, dtype=torch.float32), load_tokenizer(ckpt.folder)
        alone = []
        for p in prompts:
            ids = tokenizer.encode(p)
            model.setup_caches(1, len(ids) + 8)
            tokens = generate(model, [ids], 8, Sampling(temperature=0), tokenizer.eos_ids).tokens[0]
            alone.append(tokenizer.decode(tokens))
        assert served == alone
        # Stopping torchrun (SIGTERM, as `kill` or a container's stop sends it) signals both ranks
        # at once: rank 1 keeps stepping until rank 0 has finished the open answer.
        assert streamed_through_a_stop(url, proc, signal.SIGTERM)[-1].choices[0].finish_reason in (
            "stop", "length")
        proc.wait(timeout=60)  # torchrun itself ends on a traceback of the signal it got
        log = (tmp_path / "server.log").read_text()
        assert "Finished server process" in log and "RuntimeError" not in log, log[-3000:]


@pytest.mark.parametrize("chunk", [None, (torch.tensor([[7, 8, 9]]), torch.tensor([[4, 5, 6]]), torch.tensor([1]))],
                         ids=["decode", "and a chunk"])
def test_torchrun_ranks_step_with_every_rows_settings_as_rank_0_sent_them(monkeypatch, chunk):
    """send_step's broadcasts, replayed into follow (what the other ranks run): their step gets the
    rows' tokens, slots and each field of each row's settings as rank 0's step had them, in its
    dtype, whatever RowSettings holds, and the prompt's chunk (ids, slots, cache row) it carried; then
    the end."""
    from types import SimpleNamespace
    sent = []
    monkeypatch.setattr(server_module.dist, "broadcast", lambda t, src: sent.append(t.clone()))
    settings = rows_settings(2, temperature=torch.tensor([0.5, 1.5]), top_k=torch.tensor([3, 7]),
                             top_p=torch.tensor([0.9, 1.0]), seed=torch.tensor([11, -2**62]))
    idx, input_pos = torch.tensor([[4], [5]]), torch.tensor([[9], [12]])
    server_module.send_step(idx, input_pos, settings, chunk)
    server_module.send_step(idx[:0], input_pos[:0], server_module.FREE_ROW, None)  # the end
    replay = iter(sent)
    monkeypatch.setattr(server_module.dist, "broadcast", lambda t, src: t.copy_(next(replay)))
    steps = []
    model = SimpleNamespace(tok_embeddings=SimpleNamespace(weight=torch.zeros(1)))
    server_module.follow(model, lambda model, *step: steps.append(step))
    ((got_idx, got_pos, got, got_chunk),) = steps
    assert torch.equal(got_idx, idx) and torch.equal(got_pos, input_pos)
    if chunk is None:
        assert got_chunk is None
    else:
        assert all(torch.equal(got_part, part) for got_part, part in zip(got_chunk, chunk, strict=True))
    assert type(got) is RowSettings
    for name, value in settings._asdict().items():
        assert getattr(got, name).dtype == value.dtype and torch.equal(getattr(got, name), value), name


def run_jobs(scheduler, jobs: list, arrivals: list):
    """Submit each job at its step (arrivals), admit jobs into free rows as serve() does, and step
    until every job has ended."""
    step = 0
    while any(not job.ended for job in jobs):
        for job, at in zip(jobs, arrivals):
            if at == step:
                assert scheduler.submit(job)
        for r in range(len(scheduler.rows)):
            if scheduler.rows[r] is None and scheduler.waiting:
                scheduler.admit(r, scheduler.waiting.popleft())
        scheduler.step()
        step += 1
        assert step < 500


def greedy_job(prompt: list, max_tokens: int) -> Job:
    job = Job(prompt, max_tokens, FREE_ROW, emit=None)
    job.tokens, job.ended, job.finish_reason = [], False, None

    def emit(item):
        if isinstance(item, str):
            job.ended, job.finish_reason = True, item
        else:
            job.tokens.append(item)
    job.emit = emit
    return job


def model_and_alone(rows: int) -> tuple[Transformer, Transformer]:
    """A tiny random model (97 tokens, 64 slots) with a cache of `rows` rows, and a copy of it with
    one row, to run each prompt alone."""
    import copy
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=97,
                                  intermediate_size=128, block_size=64)).eval()
    alone = copy.deepcopy(model)
    alone.setup_caches(1, 64)
    model.setup_caches(rows, 64)
    return model, alone


@pytest.mark.parametrize("static_chunks", [False, True], ids=["exact", "padded"])
def test_prompts_prefilled_inside_decode_steps_give_each_request_its_alone_tokens(static_chunks):
    check_prompts_prefilled_inside_decode_steps(static_chunks)


def check_prompts_prefilled_inside_decode_steps(static_chunks: bool, chunk_kernel=None):
    """Prompts of 1 to 30 tokens arrive while three rows decode; each is prefilled in chunks of 8
    that ride along the decode steps (exact, or padded to 8 as a compiled server pads them), in
    whichever row it got, through the model's attention or chunk_kernel (tests/test_kernels.py
    runs the Triton kernel in the interpreter): every request's greedy tokens are generate's for
    its prompt alone."""
    model, alone = model_and_alone(rows=3)
    for layer in model.layers:
        layer.attention.chunk_kernel = chunk_kernel
    prompts = [torch.randint(1, 97, (n,)).tolist() for n in (3, 12, 1, 2, 10, 20, 30, 9)]
    jobs = [greedy_job(p, 6 + i) for i, p in enumerate(prompts)]
    scheduler = Scheduler(model, [], 16, 8, decode_rows, static_chunks)
    with torch.inference_mode():
        run_jobs(scheduler, jobs, arrivals=[0, 0, 1, 3, 4, 4, 9, 12])
    for job in jobs:
        assert job.tokens == generate(alone, [job.prompt], job.max_tokens,
                                      Sampling(temperature=0)).tokens[0]


@pytest.mark.slow
def test_the_warm_up_compiles_everything_the_first_requests_run(monkeypatch):
    """The compiled step, with and without a prompt's chunk, meets no new shape, row or input kind
    once warm_up has run, and gives each request its alone tokens: prompts of many lengths into
    rows 0, 1 and 2, decoded together. Dynamo decides what compiles and
    when (its guards); the backend only what each graph becomes, so the graphs here are run by
    dynamo's eager backend: the same graphs, without inductor's half a minute of building them."""
    from torch._dynamo.utils import counters
    from generate import compile_functions
    model, alone = model_and_alone(rows=3)
    torch._dynamo.reset()
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode, **kwargs: compile(fn, backend="eager",
                                                                             **kwargs))
    _, step_fn = compile_functions(True, False, decode_step=decode_rows, decode_dynamic=False)
    scheduler = Scheduler(model, [], 8, 8, step_fn, static_chunks=True)
    # 1: no prefill; 2 and 10 leave a one-token chunk; 12 and 20: chunks of 8 and the rest
    jobs = [greedy_job(torch.randint(1, 97, (n,)).tolist(), 6) for n in (3, 12, 1, 2, 10, 20)]
    with torch.inference_mode():
        scheduler.warm_up()
        graphs = counters["stats"]["unique_graphs"]
        run_jobs(scheduler, jobs, arrivals=[0] * len(jobs))
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == graphs
    for job in jobs:
        assert job.tokens == generate(alone, [job.prompt], 6, Sampling(temperature=0)).tokens[0]


def test_the_warm_up_and_prompts_run_in_chunks_of_one_token():
    """--prefill_chunk 1 with a compiled step: every chunk is padded to one token, the warm-up's
    too."""
    model, alone = model_and_alone(rows=2)
    chunks = []  # the shape of each chunk's ids, the warm-up's first

    def step(*args):
        if args[-1] is not None:
            chunks.append(tuple(args[-1][0].shape))
        return decode_rows(*args)
    scheduler = Scheduler(model, [], 8, 1, step, static_chunks=True)
    jobs = [greedy_job(torch.randint(1, 97, (n,)).tolist(), 4) for n in (5, 3)]
    with torch.inference_mode():
        scheduler.warm_up()
        run_jobs(scheduler, jobs, arrivals=[0, 1])
    assert chunks == [(1, 1)] * (3 + 4 + 2)  # the warm-up's 3 runs; 4 and 2 of the prompts' tokens
    for job in jobs:
        assert job.tokens == generate(alone, [job.prompt], 4, Sampling(temperature=0)).tokens[0]


def recording(steps: list) -> Callable:
    """decode_rows, appending each step's (rows run, their cache slots, the cache row of the prompt's chunk it carries
    or None) to steps."""
    def step(model, token, input_pos, settings, chunk=None):
        steps.append((token.shape[0], input_pos.view(-1).tolist(), None if chunk is None else chunk[2].item()))
        return decode_rows(model, token, input_pos, settings, chunk)
    return step


def test_a_request_ended_by_max_tokens_takes_one_step_a_token_and_no_more():
    """A prompt of three tokens: one step prefills the first two, then one decode step for each of the 4 tokens, from
    the prompt's last slot on; none after the fourth."""
    model, alone = model_and_alone(rows=1)
    steps, job = [], greedy_job([5, 6, 7], 4)
    with torch.inference_mode():
        run_jobs(Scheduler(model, [], 8, 8, recording(steps), static_chunks=False), [job], arrivals=[0])
    assert steps == [(1, [2], 0), (1, [2], None), (1, [3], None), (1, [4], None), (1, [5], None)]
    assert (job.tokens, job.finish_reason) == (generate(alone, [job.prompt], 4, Sampling(temperature=0)).tokens[0],
                                               "length")


def test_an_end_of_sequence_stops_a_request_and_its_row_passes_on_without_the_token_of_its_last_step():
    """One row: the first request's third greedy token is an end of sequence, sampled while its next step is already
    queued. It ends with "stop" after two tokens; the request waiting for its row then gets its alone tokens, not the
    first one's step that came after the end."""
    model, alone = model_and_alone(rows=1)
    first, second = greedy_job([83, 50, 50, 5], 6), greedy_job([52, 77, 35, 20, 55, 89], 6)
    greedy = lambda job, eos_ids=(): generate(alone, [job.prompt], job.max_tokens, Sampling(  # noqa: E731
        temperature=0), eos_ids).tokens[0]
    *before, eos = greedy(first)[:3]
    assert eos not in before + greedy(second)
    with torch.inference_mode():
        run_jobs(Scheduler(model, [eos], 8, 8, decode_rows, static_chunks=False), [first, second], arrivals=[0, 0])
    assert (first.tokens, first.finish_reason) == (before, "stop")
    assert (second.tokens, second.finish_reason) == (greedy(second), "length")


def test_prompts_are_prefilled_in_the_order_their_requests_took_a_row():
    """Two rows: a request of 40 prompt tokens takes row 1 and is prefilled in 5 chunks of 8; one that takes row 0
    while those are under way (its first request has ended) waits for the last of them before its own 3 chunks."""
    model, alone = model_and_alone(rows=2)
    steps = []
    jobs = [greedy_job([5], 2)] + [greedy_job(torch.randint(1, 97, (n,)).tolist(), 3) for n in (40, 20)]
    with torch.inference_mode():
        run_jobs(Scheduler(model, [], 8, 8, recording(steps), static_chunks=False), jobs, arrivals=[0, 0, 0])
    assert [row for _, _, row in steps if row is not None] == [1] * 5 + [0] * 3
    for job in jobs:
        assert job.tokens == generate(alone, [job.prompt], job.max_tokens, Sampling(temperature=0)).tokens[0]


def test_a_padded_chunk_at_the_end_of_the_context_stays_inside_the_cache():
    """64 slots, a compiled step's chunks of 6: a prompt of 63 tokens ends in a chunk of 2 (slots 60 and 61), whose
    padding would run past the cache's last slot; it is answered as alone."""
    model, alone = model_and_alone(rows=1)
    job = greedy_job(torch.randint(1, 97, (63,)).tolist(), 1)
    with torch.inference_mode():
        run_jobs(Scheduler(model, [], 8, 6, decode_rows, static_chunks=True), [job], arrivals=[0])
    assert job.tokens == generate(alone, [job.prompt], 1, Sampling(temperature=0)).tokens[0]


def test_every_step_the_requests_take_has_a_shape_the_warm_up_ran():
    """A compiled server compiles the steps of the warm-up: each later step must be one of them, in its rows and
    whether it carries a prompt's chunk (row 0 alone without one, every row with one or when another row decodes),
    and the warm-up must run each that requests take."""
    model, alone = model_and_alone(rows=3)
    steps = []
    scheduler = Scheduler(model, [], 8, 8, recording(steps), static_chunks=True)
    # row 0 alone; then a prompt prefilled while it decodes; then both decoding
    jobs = [greedy_job([5], 12), greedy_job(torch.randint(1, 97, (20,)).tolist(), 4)]
    with torch.inference_mode():
        scheduler.warm_up()
        warmed = {(n, row is not None) for n, _, row in steps}
        steps.clear()
        run_jobs(scheduler, jobs, arrivals=[0, 2])
    assert {(n, row is not None) for n, _, row in steps} == warmed
    for job in jobs:
        assert job.tokens == generate(alone, [job.prompt], job.max_tokens, Sampling(temperature=0)).tokens[0]


def test_each_request_samples_with_its_own_settings_whatever_shares_its_step():
    """A greedy request and two seeded sampled ones, each of its own temperature, top_k and top_p, decoding in the
    rows of one step: each draws the tokens it draws alone, the sampled ones other than the greedy tokens."""
    model, alone = model_and_alone(rows=3)
    settings = [FREE_ROW, FREE_ROW._replace(temperature=1.0, seed=3),
                FREE_ROW._replace(temperature=0.8, top_k=5, top_p=0.9, seed=4)]

    def jobs() -> list:
        made = [greedy_job(prompt, 8) for prompt in ([5, 6], [7, 8, 9], [10])]
        for job, row_settings in zip(made, settings):
            job.settings = row_settings
        return made
    together, apart = jobs(), jobs()
    with torch.inference_mode():
        run_jobs(Scheduler(model, [], 8, 8, decode_rows, static_chunks=False), together, arrivals=[0, 0, 0])
        for job in apart:
            run_jobs(Scheduler(alone, [], 8, 8, decode_rows, static_chunks=False), [job], arrivals=[0])
    assert [job.tokens for job in together] == [job.tokens for job in apart]
    for job in together[1:]:
        assert job.tokens != generate(alone, [job.prompt], 8, Sampling(temperature=0)).tokens[0]


@contextmanager
def gated_scheduler(rows: int):
    """A Scheduler over model_and_alone's model serving on its own thread as the server's does, its steps through a
    StepGate held once the warm-up is over, each step's events handed to the jobs there. Yields (scheduler, gate,
    the model of one row)."""
    model, alone = model_and_alone(rows)
    gate = StepGate()
    scheduler = gate.scheduler = Scheduler(model, [], 8, 8, gate, static_chunks=False)
    scheduler.start(server_module.hand_out)
    try:
        assert scheduler.ready.wait(timeout=60)
        gate.hold()
        yield scheduler, gate, alone
    finally:
        gate.free()
        scheduler.stop()
        gc.unfreeze()  # the scheduler froze what its warm-up left alive: this process collects on


def test_a_request_cancelled_while_its_prompt_is_prefilled_hands_its_row_to_the_next_at_the_next_step():
    """One row: a request of 40 prompt tokens, cancelled after two of its five chunks, leaves the row before the step
    that follows, which already prefills the request that waited; that one gets its alone tokens."""
    with gated_scheduler(rows=1) as (scheduler, gate, alone):
        cancelled, waiting = greedy_job(list(range(1, 41)), 4), greedy_job([7, 8, 9], 4)
        assert scheduler.submit(cancelled)
        gate.step()  # the first chunk; the scheduler waits inside the step of the second
        scheduler.cancel(cancelled)
        assert scheduler.submit(waiting)
        gate.step()
        assert scheduler.rows == [waiting]
        gate.free()
        wait_until(lambda: waiting.ended, "the waiting request's answer")
    assert cancelled.tokens == [] and not cancelled.ended
    assert waiting.tokens == generate(alone, [waiting.prompt], 4, Sampling(temperature=0)).tokens[0]


def test_a_request_cancelled_while_a_step_runs_is_handed_no_token_after():
    """The scheduler waits inside a step of a decoding request when the request is cancelled: that step ends with the
    request's row free, and no token of it (nor any finish reason: the HTTP side gives the cancelled its own)."""
    with gated_scheduler(rows=1) as (scheduler, gate, _):
        job = greedy_job([5, 6, 7], 50)
        assert scheduler.submit(job)
        gate.step_until(lambda: len(job.tokens) >= 2)
        tokens = list(job.tokens)
        scheduler.cancel(job)
        gate.step()
        assert scheduler.rows == [None]
        assert (job.tokens, job.ended) == (tokens, False)


def test_stopping_an_idle_scheduler_ends_its_thread_at_once():
    """Stop, as at a server's shutdown, wakes a scheduler waiting for requests: it does not wait out its keep-alive."""
    with gated_scheduler(rows=1) as (scheduler, _, _):
        stopping = threading.Thread(target=scheduler.stop)
        stopping.start()
        stopping.join(timeout=10)
        assert not stopping.is_alive() and not scheduler.thread.is_alive()


def test_what_the_warm_up_leaves_alive_is_out_of_the_collectors_view_before_the_first_request():
    """The model and the compiled steps live as long as the server: a full collection must not
    walk them (it holds the GIL, a stall in every stream), nor must the one at exit."""
    from generate import compile_functions
    model = Transformer(ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=97,
                                  intermediate_size=128, block_size=64)).eval()
    model.setup_caches(3, 64)
    _, step_fn = compile_functions(False, False, decode_step=decode_rows, decode_dynamic=False)
    scheduler = Scheduler(model, [], 8, 8, step_fn, static_chunks=False)
    assert gc.get_freeze_count() == 0
    try:
        scheduler.start(lambda events: None)
        assert scheduler.ready.wait(timeout=120)
        assert gc.get_freeze_count() > 0
        assert not any(o is model for o in gc.get_objects())  # frozen: outside every generation
    finally:
        scheduler.stop()
        gc.unfreeze()  # this test process goes on collecting as before


def test_a_sentencepiece_completion_keeps_the_space_after_its_prompt_and_a_chat_answer_starts_bare(
        monkeypatch, tmp_path):
    """sentencepiece drops the leading space of a decode's first piece: a completion's text continues its
    prompt's (" there"), a chat answer is a message of its own ("there"). Every token sampled is "▁there"."""
    import importlib.util
    import shutil
    data = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
    shutil.copy(data / "tokenizer.model.v1", tmp_path / "tokenizer.model")
    tokenizer = load_tokenizer(tmp_path)
    there = tokenizer.encode("a there")[-1]
    monkeypatch.setattr(server_module, "sample_rows",
                        lambda logits, *settings: torch.full((logits.shape[0], 1), there, device=logits.device))
    model = tiny_model(tokenizer.vocab_size, 64)
    model.setup_caches(2, 64)
    with stepped_server(model, tokenizer, tokenizer.eos_ids, 4) as (url, gate):
        gate.free()
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, temperature=0)
        assert done.choices[0].text == " there there there"
        streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, temperature=0,
                                             stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == " there there there"
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2, temperature=0)
        assert chat.choices[0].message.content == "there there"
