"""server.py's HTTP API in this process, over a scripted scheduler (no model): what a client sees of
request validation, limits and the response's fields, whatever the scheduler computes. The
scheduler here accepts a job and at once hands it the ids of SCRIPT's characters (the
--random_weights byte tokenizer reads id i as chr(33 + i % 94)), up to its max_tokens, then
"length", or "stop" (an end of sequence) when the script runs out first."""
import json
import threading
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from server import RandomWeightsTokenizer, make_app
from test_server import error_of

VOCAB, CONTEXT = 256, 32
SCRIPT = "abcSTOPdef"


def ids_of(text: str) -> list:
    return [ord(c) - 33 for c in text]


class ScriptedScheduler:
    """What make_app uses of a Scheduler: jobs are answered at once from SCRIPT, or refused when
    `full`."""

    def __init__(self, script: str = SCRIPT, full: bool = False):
        self.script, self.full = script, full
        self.model = SimpleNamespace(args=SimpleNamespace(vocab_size=VOCAB))
        self.rows, self.waiting, self.max_queue = [None] * 2, [], 3
        self.ready = threading.Event()
        self.jobs = []

    def start(self, deliver):
        self.ready.set()

    def stop(self):
        pass

    def submit(self, job) -> bool:
        if self.full:
            return False
        self.jobs.append(job)
        tokens = ids_of(self.script)
        for token in tokens[:job.max_tokens]:
            job.emit(token)
        job.emit("length" if len(tokens) >= job.max_tokens else "stop")
        return True

    def cancel(self, job):
        job.cancelled = True


@pytest.fixture
def scripted():
    """(TestClient, scheduler): server.py's app over a ScriptedScheduler."""
    scheduler = ScriptedScheduler()
    app = make_app(scheduler, RandomWeightsTokenizer(), "tiny", CONTEXT, None, None)
    with TestClient(app) as http:
        yield http, scheduler


def chunks_of(response) -> list:
    """A streamed answer's JSON chunks, once it has ended with [DONE]."""
    events = [event.removeprefix("data: ") for event in response.text.split("\n\n") if event]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def test_max_tokens_of_zero_is_refused_as_a_field_error(scripted):
    http, scheduler = scripted
    error = error_of(http.post("/v1/completions", json={"prompt": "a", "max_tokens": 0}), 400)
    assert error["param"] == "max_tokens"
    assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200
    assert [job.max_tokens for job in scheduler.jobs] == [1]


@pytest.mark.parametrize("field, refused, taken", [("temperature", 2.01, 2.0),
                                                   ("top_p", 1.01, 1.0)])
def test_temperature_above_2_and_top_p_above_1_are_refused_at_their_bounds_taken(scripted, field,
                                                                                 refused, taken):
    http, _ = scripted
    error = error_of(http.post("/v1/completions", json={"prompt": "a", field: refused}), 400)
    assert error["param"] == field
    assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1,
                                              field: taken}).status_code == 200


def test_a_prompt_and_max_tokens_that_fill_the_context_exactly_are_served(scripted):
    http, scheduler = scripted
    prompt = "x" * (CONTEXT - 3)
    answer = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["finish_reason"] == "length"
    error = error_of(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4}), 400)
    assert error["code"] == "context_length_exceeded"


def test_a_prompt_that_fills_the_context_without_max_tokens_is_refused_and_one_shorter_gets_one_token(
        scripted):
    http, scheduler = scripted
    error = error_of(http.post("/v1/completions", json={"prompt": "x" * CONTEXT}), 400)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    assert scheduler.jobs == []  # nothing was queued (a job of 0 tokens never ends)
    answer = http.post("/v1/completions", json={"prompt": "x" * (CONTEXT - 1)}).json()
    assert [job.max_tokens for job in scheduler.jobs] == [1]
    assert answer["usage"]["completion_tokens"] == 1


def test_token_ids_must_be_below_the_vocabulary_size(scripted):
    http, scheduler = scripted
    for prompt in ([VOCAB], [1, VOCAB], [-1]):
        error = error_of(http.post("/v1/completions", json={"prompt": prompt}), 400)
        assert (error["code"], error["param"]) == ("invalid_prompt", "prompt"), prompt
    assert scheduler.jobs == []
    assert http.post("/v1/completions", json={"prompt": [0, VOCAB - 1],
                                              "max_tokens": 1}).status_code == 200


def test_max_completion_tokens_bounds_a_chat_answer_and_wins_over_max_tokens(scripted):
    http, scheduler = scripted
    messages = [{"role": "user", "content": "hi"}]
    for fields in ({"max_completion_tokens": 2}, {"max_completion_tokens": 2, "max_tokens": 5}):
        answer = http.post("/v1/chat/completions", json={"messages": messages, **fields}).json()
        choice = answer["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == ("ab", "length")
        assert answer["usage"]["completion_tokens"] == 2
    assert [job.max_tokens for job in scheduler.jobs] == [2, 2]


def test_a_full_queue_is_a_rate_limit_error():
    scheduler = ScriptedScheduler(full=True)
    with TestClient(make_app(scheduler, RandomWeightsTokenizer(), "tiny", CONTEXT, None,
                             None)) as http:
        response = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        error = error_of(response, 429)
        assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
        assert response.headers["Retry-After"] == "1"


def test_include_usage_puts_a_null_usage_on_every_chunk_and_the_counts_on_the_last(scripted):
    """OpenAI's stream_options.include_usage: every chunk has "usage": null, then one chunk of no
    choices has the counts."""
    http, _ = scripted
    response = http.post("/v1/completions", json={
        "prompt": "hi", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}})
    chunks = chunks_of(response)
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1]), chunks
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "abc"
    # without include_usage, no chunk carries the field
    plain = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
    assert all("usage" not in chunk for chunk in chunks_of(plain))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_at_the_very_start_of_the_answer_leaves_it_empty(scripted, stream):
    http, _ = scripted
    response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "stop": "ab",
                                                  "stream": stream})
    if stream:
        chunks = chunks_of(response)
        text = "".join(c["choices"][0]["text"] for c in chunks)
        reason = chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = response.json()["choices"][0]
        text, reason = choice["text"], choice["finish_reason"]
    assert (text, reason) == ("", "stop")


@pytest.mark.parametrize("stop", [["c", "bc"], ["bc", "c"]], ids=["shorter-first", "longer-first"])
def test_of_two_stop_strings_the_one_that_begins_first_cuts_the_answer(scripted, stop):
    """In "abc...", "bc" begins before "c" ends: the answer stops before "bc", whatever the order
    the request lists them in."""
    http, _ = scripted
    answer = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "stop": stop}).json()
    assert (answer["choices"][0]["text"], answer["choices"][0]["finish_reason"]) == ("a", "stop")


def test_usage_counts_the_tokens_generated_not_the_finish(scripted):
    http, _ = scripted
    stopped = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "stop": "STOP"}
                        ).json()
    assert stopped["choices"][0] == {"index": 0, "text": "abc", "finish_reason": "stop",
                                     "logprobs": None}
    # a, b, c and the stop string's four tokens were generated
    assert stopped["usage"] == {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}
    ended = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 20}).json()
    assert ended["choices"][0]["finish_reason"] == "stop"  # the script ran out: an end of sequence
    assert ended["usage"]["completion_tokens"] == len(SCRIPT)
