"""scripts/load_test.py against a real server.py (SmolLM2-135M on the CPU, on 127.0.0.1) for a few
seconds: its JSON result counts every request once (those the server refuses as failed, by
status), its percentiles are ordered, its token counts are the server's. Bad input is one line.
The refused requests are counted against server.py's app in this process, its scheduler held until
every request has arrived (tests/stepped_server.py). Nothing here asserts a speed."""
import contextlib
import http.server
import io
import itertools
import json
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Optional

import httpx
import openai
import pytest

from conftest import (assert_fails_with_one_line, assert_one_error_line, free_port, http_server, load_script,
                      run_script, serve)


ROWS, QUEUE = 2, 3  # a server takes 5 requests at a time; 3 clients never hear 429


@pytest.fixture(scope="module")
def server(smollm2_checkpoint, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serve(log, "--checkpoint_path", smollm2_checkpoint, "--max_batch_size", ROWS,
               "--max_queue", QUEUE) as (url, _):
        yield url


def test_load_test_reports_every_request_and_ordered_percentiles(server, tmp_path):
    out = tmp_path / "load.json"
    r = run_script("scripts/load_test.py", "--url", f"{server}/v1", "--concurrency", "3",
                   "--duration", "3", "--prompt_tokens", "40", "--max_tokens", "6", "--out", out,
                   timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model"] and result["concurrency"] == 3 and result["max_tokens"] == 6
    # Every client sent at least one request, each finished and was counted once.
    assert result["sent"] >= 3 and result["finished"] == result["sent"] and result["failed"] == 0
    assert result["errors"] == {}
    assert sum(result["finish_reasons"].values()) == result["finished"]
    # Counting on, the model writes answers that run to max_tokens: the server's usage counts them.
    assert result["finish_reasons"] == {"length": result["finished"]}
    assert result["output_tokens"] == 6 * result["finished"]
    assert abs(result["prompt_tokens"] - 40) <= 4  # whole numbers, of 7 tokens in SmolLM2
    assert result["requests_per_s"] == pytest.approx(result["finished"] / result["wall_s"])
    assert result["output_tok_s"] == pytest.approx(result["output_tokens"] / result["wall_s"])
    assert result["wall_s"] >= 3
    for stats in (result["ttft_ms"], result["itl_ms"]):
        assert 0 < stats["p50"] <= stats["p99"]
    # A gap between each two streamed chunks of an answer, at most one per token after the first.
    gaps = result["output_tokens"] - result["finished"]
    assert result["finished"] <= result["itl_samples"] <= gaps
    assert result["client_cpu"] > 0  # the client's own CPU seconds over the wall time
    assert "requests/s" in r.stdout and "ITL" in r.stdout and "client CPU" in r.stdout


@pytest.fixture(scope="module")
def load_test():
    return load_script("load_test")


def test_load_test_sends_100_requests_unless_told_a_number_or_a_duration(load_test):
    assert load_test.parse_args([]).requests == 100
    assert load_test.parse_args(["--requests", "7"]).requests == 7
    assert load_test.parse_args(["--duration", "5"]).requests is None


def test_load_test_starts_a_client_process_for_each_8_clients_at_most_one_per_core(load_test, monkeypatch):
    monkeypatch.setattr(load_test.os, "cpu_count", lambda: 4)
    processes = {n: load_test.parse_args(["--concurrency", str(n)]).processes for n in (1, 8, 9, 17, 64)}
    assert processes == {1: 1, 8: 1, 9: 2, 17: 3, 64: 4}
    assert load_test.parse_args(["--concurrency", "64", "--processes", "2"]).processes == 2


def test_percentile_interpolates_between_the_two_nearest_ranks(load_test):
    assert load_test.percentile([40, 10, 30, 20], 50) == 25
    assert load_test.percentile([0, 100], 25) == 25
    assert load_test.percentile([0, 100], 99) == 99
    assert load_test.percentile([7], 99) == 7


def test_load_test_reports_p50_and_p99_of_time_to_first_token_and_of_the_gaps_between_chunks(load_test):
    """101 answers sent at 0 s whose first chunks come after 0, 1, ..., 100 ms, then two more chunks 2 ms
    and 3 ms apart; a request that was refused has no result and counts as failed."""
    results = [load_test.Result(sent=0.0, chunk_times=[i / 1e3, (i + 2) / 1e3, (i + 5) / 1e3], prompt_tokens=40,
                                completion_tokens=3, finish_reason="length") for i in range(101)]
    args = load_test.parse_args(["--concurrency", "4"])
    result = load_test.summary(args, "m", results, Counter({"429": 1}), 102, 2.0)
    assert result["ttft_ms"] == {"p50": pytest.approx(50), "p99": pytest.approx(99)}
    assert result["itl_ms"] == {"p50": pytest.approx(2.5), "p99": pytest.approx(3)}
    assert result["itl_samples"] == 202
    assert (result["sent"], result["finished"], result["failed"]) == (102, 101, 1)
    assert result["output_tokens"] == 303 and result["output_tok_s"] == pytest.approx(303 / 2)


def test_load_test_averages_the_prompt_tokens_of_the_finished_requests_only(load_test):
    results = [load_test.Result(sent=0.0, chunk_times=[0.1], prompt_tokens=n, completion_tokens=1,
                                finish_reason="length") for n in (30, 50)]
    args = load_test.parse_args([])
    result = load_test.summary(args, "m", results, Counter({"429": 2}), 4, 1.0)
    assert result["prompt_tokens"] == 40 and result["requests_per_s"] == 2


def refusal(load_test, *flags) -> str:
    """What load_test.main prints to stderr as it exits with status 1: its one error line, printed
    by checkpoint.script_exits, or by the interpreter for a sys.exit("error: ...")."""
    err = io.StringIO()
    with pytest.raises(SystemExit) as exit, contextlib.redirect_stderr(err):
        load_test.main([str(flag) for flag in flags])
    if isinstance(exit.value.code, str):  # sys.exit("error: ..."): the interpreter prints it
        return exit.value.code
    assert exit.value.code == 1, exit.value.code
    return err.getvalue()


def test_load_test_over_processes_sends_exactly_the_requests_asked(server, load_test, tmp_path):
    out = tmp_path / "load.json"
    load_test.main(["--url", f"{server}/v1", "--concurrency", "3", "--processes", "2",
                    "--requests", "5", "--prompt_tokens", "12", "--max_tokens", "2",
                    "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["client_processes"] == 2
    assert result["sent"] == result["finished"] == 5 and result["output_tokens"] == 10


def test_load_test_counts_the_requests_the_server_refuses(load_test, tmp_path):
    """8 requests at once into a server of 2 rows and 3 places in its queue, in this process, whose
    scheduler takes no step from the first of them until all 8 have arrived: 5 are taken, 3 hear
    429 (queue full), and the report says so. Its answers never end before max_tokens."""
    from concurrent.futures import ThreadPoolExecutor
    from stepped_server import never_ending, stepped_server, wait_until
    out = tmp_path / "load.json"
    with stepped_server(*never_ending(ROWS), max_queue=QUEUE) as (url, gate):
        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(load_test.main, [
                "--url", f"{url}/v1", "--concurrency", "8", "--requests", "8", "--prompt_tokens",
                "12", "--max_tokens", "8", "--out", str(out)])
            try:
                calibration = len(load_test.CALIBRATION)  # one request after another, first
                for i in range(calibration):
                    wait_until(lambda: len(gate.jobs) > i or done.done(), "a calibration request")
                    assert not done.done(), done.result()
                    gate.step_until(lambda: gate.ended(gate.jobs[i]))
                wait_until(lambda: len(gate.jobs) + gate.refused == calibration + 8
                           or done.done(), "the 8 requests")
            finally:
                gate.free()  # the answers run to their end
            done.result(timeout=120)
    result = json.loads(out.read_text())
    assert result["sent"] == 8 and result["finished"] == ROWS + QUEUE
    assert result["failed"] == 8 - ROWS - QUEUE and result["errors"] == {"429": result["failed"]}
    assert result["finish_reasons"] == {"length": result["finished"]}
    assert result["output_tokens"] == 8 * result["finished"]  # refused requests count no tokens


@pytest.mark.parametrize("flags, words", [
    (["--requests", "0"], "--requests"),
    (["--requests", "2", "--duration", "5"], "not both"),
    (["--url", "127.0.0.1:8000/v1"], "URL"),
    (["--url", "http://[::1/v1"], "IPv6"),
    (["--url", "http://127.0.0.1:99999/v1"], "Port out of range"),
    (["--url", "http:///v1"], "no host"),
    (["--concurrency", "2", "--processes", "3"], "--processes 3"),
    (["--duration", "0"], "--duration must be a positive number"),
    (["--duration", "inf"], "--duration must be a positive number"),
])
def test_load_test_bad_flags_are_one_error_line(load_test, flags, words):
    assert_one_error_line(refusal(load_test, *flags), words)


def test_load_test_without_the_openai_client_says_to_install_it(tmp_path):
    """The openai client is an optional install: without it the script ends in one error line."""
    (tmp_path / "openai.py").write_text("raise ImportError('no openai here')\n")
    r = run_script("scripts/load_test.py", env={"PYTHONPATH": str(tmp_path)})
    assert_fails_with_one_line(r, "pip install openai")


def test_load_test_names_a_server_that_refuses_it(server, load_test):
    url = f"{server}/no/such/api"
    assert_one_error_line(refusal(load_test, "--url", url, "--requests", 1), "404", url)


def test_a_load_test_in_which_no_request_finishes_fails_in_one_line(server, load_test, capsys):
    """Prompts longer than the model's context: the server refuses every one (400), so nothing was
    measured, and the run says so and exits 1 after its report."""
    line = refusal(load_test, "--url", f"{server}/v1", "--requests", 2, "--prompt_tokens", 10_000)
    assert_one_error_line(line, "no request finished", "400")


def test_load_test_names_a_server_it_cannot_reach(load_test):
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert_one_error_line(refusal(load_test, "--url", url, "--requests", 1), "cannot reach")


def test_load_test_names_a_server_that_is_not_an_openai_api(load_test, tmp_path):
    """A web server that answers GET /v1/models with a page, not OpenAI's JSON."""
    import functools
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "models").write_text("<html>a web page</html>")
    class Files(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # a line a request on stderr, where the error line is checked
            pass
    with http_server(functools.partial(Files, directory=tmp_path)) as port:
        line = refusal(load_test, "--url", f"http://127.0.0.1:{port}/v1", "--requests", 1)
    assert_one_error_line(line, "OpenAI-compatible")


class FakeAPI(http.server.BaseHTTPRequestHandler):
    """An OpenAI-shaped server that lists one model, "m", and answers each POST by its class's
    `post(handler, body)`."""
    post: Callable

    def answer(self, body: dict, status: int = 200, headers: dict = {}):
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer({"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x"}]})

    def do_POST(self):
        type(self).post(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def log_message(self, *args):
        pass


@contextmanager
def fake_api(post: Callable):
    """FakeAPI on a free port of 127.0.0.1, answering with post; yields its /v1 URL."""
    with http_server(type("Handler", (FakeAPI,), {"post": staticmethod(post)})) as port:
        yield f"http://127.0.0.1:{port}/v1"


def completion(usage, text="1", finish_reason="length") -> dict:
    return {"id": "c", "object": "text_completion", "created": 0, "model": "m", "usage": usage,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


@pytest.mark.parametrize("usage, words", [
    (None, ["gives no prompt_tokens count"]),
    ({"prompt_tokens": "n/a", "completion_tokens": 1, "total_tokens": 13}, ["gives no prompt_tokens count"]),
    ({"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}, ["do not grow with the prompt"]),
], ids=["no-usage", "a-string", "the-same-for-every-prompt"])
def test_load_test_names_a_server_whose_token_counts_it_cannot_use(load_test, usage, words):
    """A server of OpenAI's API shape whose completions' usage is missing, not a number, or the same for every
    prompt: the prompts cannot be sized by it."""
    with fake_api(lambda handler, body: handler.answer(completion(usage))) as url:
        line = refusal(load_test, "--url", url, "--requests", 1)
    assert_one_error_line(line, *words)


def sized(body: dict) -> dict:
    """A calibration request's usage: a token a number of the prompt."""
    n = body["prompt"].count(",") + 1
    return {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}


@pytest.mark.parametrize("stream, error", [
    ([completion(None, finish_reason=None)] * 2, "no finish_reason"),  # then the connection closes
    ([completion(None), "[DONE]"], "no usage"),
    (["{not json"], "chunk not JSON"),
], ids=["cut-off", "without-usage", "not-json"])
def test_load_test_counts_a_broken_stream_as_failed(load_test, tmp_path, stream, error):
    """Streams that end without a finish_reason or a usage count, or carry a chunk that is not JSON:
    each request failed, none finished (so the run ends in its one error line), and errors names why."""
    def post(handler, body):
        if not body.get("stream"):
            return handler.answer(completion(sized(body)))
        send_stream(handler, stream)
    out = tmp_path / "load.json"
    with fake_api(post) as url:
        line = refusal(load_test, "--url", url, "--requests", 2, "--prompt_tokens", 12, "--out", out)
    assert_one_error_line(line, "no request finished")
    result = json.loads(out.read_text())
    assert (result["sent"], result["finished"], result["errors"]) == (2, 0, {error: 2})


def send_stream(handler, events: list):
    """Server-sent events, each a JSON object or a string as it is."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.end_headers()
    for event in events:
        handler.wfile.write(f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode())


def refusing(retry_after: Optional[str], status: int = 429, first: Optional[int] = None) -> Callable:
    """A server's POST that sizes the calibration prompts and refuses streamed requests with status and
    Retry-After (none if None): every one, or the first `first`, then streams whole answers."""
    streamed = itertools.count()

    def post(handler, body):
        if not body.get("stream"):
            return handler.answer(completion(sized(body)))
        if first is None or next(streamed) < first:
            headers = {} if retry_after is None else {"Retry-After": retry_after}
            return handler.answer({"error": {"message": "refused", "type": "x"}}, status, headers)
        send_stream(handler, [completion(sized(body)), "[DONE]"])
    return post


def test_a_client_that_hears_429_waits_as_retry_after_asks(load_test, tmp_path):
    """A server that refuses every streamed request with Retry-After: 0.5: over 1.2 s a client sends
    three requests (two on a slow machine), not as many as it can loop through."""
    out = tmp_path / "load.json"
    with fake_api(refusing("0.5")) as url:
        refusal(load_test, "--url", url, "--concurrency", 1, "--duration", 1.2, "--prompt_tokens", 12, "--out", out)
    result = json.loads(out.read_text())
    assert result["errors"] == {"429": result["sent"]} and 2 <= result["sent"] <= 3


def test_after_a_429_waited_out_a_client_sends_at_full_speed_again(load_test, tmp_path):
    """A server that refuses the first streamed request with Retry-After: 0.5, then answers at once: the
    client waits once, then sends one request after another (many in the run, where a wait before each would
    allow three)."""
    out = tmp_path / "load.json"
    with fake_api(refusing("0.5", first=1)) as url:
        load_test.main(["--url", url, "--concurrency", "1", "--duration", "1.5", "--prompt_tokens", "12",
                        "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["errors"] == {"429": 1} and result["finished"] >= 8, result


def test_only_a_429_makes_a_client_wait(load_test, tmp_path):
    """Other refusals (a 500, with no Retry-After) are sent again at once: the load stays on the server."""
    out = tmp_path / "load.json"
    with fake_api(refusing(None, status=500)) as url:
        refusal(load_test, "--url", url, "--concurrency", 1, "--duration", 1, "--prompt_tokens", 12, "--out", out)
    result = json.loads(out.read_text())
    assert result["errors"] == {"500": result["sent"]} and result["sent"] >= 8, result


@pytest.mark.parametrize("header, seconds", [
    ("0.5", 0.5), ("3600", 60), ("inf", 60), ("-5", 0), ("soon", 1), (None, 1)])
def test_retry_after_is_the_servers_wait_within_a_minute_or_a_second_where_it_gives_no_number(
        load_test, header, seconds):
    response = httpx.Response(429, headers={} if header is None else {"Retry-After": header},
                              request=httpx.Request("POST", "http://127.0.0.1/v1/completions"))
    assert load_test.retry_after(openai.RateLimitError("busy", response=response, body=None)) == seconds


@pytest.mark.parametrize("retry_after", ["30", "inf"])
def test_a_429_to_the_last_request_is_not_waited_out(load_test, tmp_path, retry_after):
    """The wait belongs to a next request: after the last one there is none, and the run's wall time
    does not hold it."""
    out = tmp_path / "load.json"
    with fake_api(refusing(retry_after)) as url:
        refusal(load_test, "--url", url, "--requests", 1, "--prompt_tokens", 12, "--out", out)
    result = json.loads(out.read_text())
    assert result["errors"] == {"429": 1} and result["wall_s"] < 10


def test_clients_split_over_processes_all_send_at_once(load_test, tmp_path):
    """3 clients over 2 processes: a server that answers only once 3 requests are open at the same time
    (within 5 s; else it refuses them) answers every one."""
    together = threading.Barrier(3, timeout=5)

    def post(handler, body):
        if not body.get("stream"):
            return handler.answer(completion(sized(body)))
        try:
            together.wait()
        except threading.BrokenBarrierError:
            return handler.answer({"error": {"message": "alone", "type": "x"}}, 500)
        send_stream(handler, [completion(sized(body)), "[DONE]"])
    out = tmp_path / "load.json"
    with fake_api(post) as url:
        load_test.main(["--url", url, "--concurrency", "3", "--processes", "2", "--requests", "3",
                        "--prompt_tokens", "12", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["client_processes"] == 2 and result["finished"] == 3 and result["errors"] == {}
