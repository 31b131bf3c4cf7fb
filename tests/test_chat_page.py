"""The chat page (chat.html, GET /) in a real browser: Debian's chromium, headless, driven by
Playwright, against a real server.py (SmolLM2-135M on the CPU, on 127.0.0.1, started with an API
key). The page asks for the key, streams an answer to a question, stops one mid-stream, keeps the
conversation, and shows the server's error JSON as one line; it sends what was typed, refuses a
setting that is not a number, follows an answer only while scrolled to its end, and works under a
proxy's path prefix."""
import json
import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import serve

pytestmark = pytest.mark.slow  # a browser and a server, end to end (CI installs the browser)

API_KEY = "test-key"
ANSWER_MS = 120_000  # a streamed answer of a few tokens on a busy 2-core CPU


@pytest.fixture(scope="module")
def server(smollm2_checkpoint, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serve(log, "--checkpoint_path", smollm2_checkpoint, "--api_key", API_KEY) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "no chromium on PATH: apt-get install chromium (Debian), as .ci/run does"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """The chat page, opened with the API key typed in; fails the test on any script error."""
    page = browser.new_page(viewport={"width": 900, "height": 640})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server)
    yield with_key(page)
    page.close()
    assert not errors, errors


def with_key(page):
    # Without the key the server refuses to list the models, and the page says so.
    expect(page.locator("#error")).to_contain_text("401")
    page.fill("#api_key", API_KEY)
    page.dispatch_event("#api_key", "change")
    expect(page.locator("#error")).to_be_empty()
    expect(page.locator("#model")).not_to_have_text("…")
    return page


def ask(page, question: str, max_tokens: int):
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#input", question)
    page.keyboard.press("Enter")


def test_chat_page_streams_the_answer_to_a_question(page, tmp_path):
    ask(page, "What is the capital of France?", 16)
    expect(page.locator(".assistant").last).to_contain_text("Paris", timeout=ANSWER_MS)
    expect(page.locator("#send")).to_be_visible(timeout=ANSWER_MS)  # the stream has ended
    expect(page.locator("#input")).to_have_value("")
    page.screenshot(path=tmp_path / "chat.png")  # for a person to look at


def test_chat_page_stops_an_answer_and_keeps_the_conversation_until_a_new_chat(page):
    ask(page, "Write a long story about a dragon.", 200)
    answer = page.locator(".assistant").last
    expect(answer).not_to_be_empty(timeout=ANSWER_MS)
    page.click("#stop")
    expect(page.locator("#send")).to_be_visible()
    stopped = answer.text_content()
    page.wait_for_timeout(1000)
    assert answer.text_content() == stopped  # nothing arrives after the stop
    # The next question is sent with the whole conversation, the stopped answer included.
    with page.expect_request("**/v1/chat/completions") as request:
        ask(page, "What is the capital of France?", 4)
    sent = json.loads(request.value.post_data)
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == stopped
    assert sent["model"] == page.locator("#model").text_content().removeprefix("· ")
    expect(page.locator(".assistant")).to_have_count(2)
    expect(page.locator("#send")).to_be_visible(timeout=ANSWER_MS)
    # A new chat starts from an empty conversation.
    page.click("#clear")
    expect(page.locator(".message")).to_have_count(0)
    with page.expect_request("**/v1/chat/completions") as request:
        ask(page, "Hello!", 1)
    assert [m["role"] for m in json.loads(request.value.post_data)["messages"]] == ["user"]
    expect(page.locator("#send")).to_be_visible(timeout=ANSWER_MS)


def test_chat_page_shows_the_servers_error_and_gives_the_question_back(page):
    ask(page, "What is the capital of France?", 10 ** 7)  # beyond the model's context
    expect(page.locator("#error")).to_contain_text("400", timeout=ANSWER_MS)
    expect(page.locator("#input")).to_have_value("What is the capital of France?")
    expect(page.locator(".message")).to_have_count(0)


def test_chat_page_says_so_when_the_answer_is_empty_and_gives_the_question_back(page):
    def stop_at_once(route):  # the real server's answer, with a stop string it begins with
        body = json.loads(route.request.post_data)
        body["stop"] = ["The"]  # SmolLM2's greedy answer begins "The capital of France"
        route.fulfill(response=route.fetch(post_data=json.dumps(body)))
    page.route("**/v1/chat/completions", stop_at_once)
    ask(page, "What is the capital of France?", 16)
    expect(page.locator("#error")).to_contain_text("empty", timeout=ANSWER_MS)
    expect(page.locator("#input")).to_have_value("What is the capital of France?")
    expect(page.locator(".message")).to_have_count(0)


def test_chat_page_says_when_an_answer_reached_max_tokens_and_sends_no_empty_settings(page):
    ask(page, "What is the capital of France?", 2)
    expect(page.locator("#error")).to_contain_text("max_tokens", timeout=ANSWER_MS)
    expect(page.locator("#send")).to_be_visible(timeout=ANSWER_MS)
    page.fill("#temperature", "")  # an emptied box: the server's default, not 0
    page.fill("#max_tokens", "")
    page.fill("#input", "Hello!")
    with page.expect_request("**/v1/chat/completions") as request:
        page.keyboard.press("Enter")
    sent = json.loads(request.value.post_data)
    assert "temperature" not in sent and "max_tokens" not in sent
    page.click("#stop")
    expect(page.locator("#send")).to_be_visible()


def test_chat_page_says_so_when_a_stream_ends_before_the_server_finished_it(page):
    def cut_off(route):  # the real server's stream without its last events
        response = route.fetch()
        body = response.text().split("data: [DONE]")[0]
        route.fulfill(response=response, body=body.rsplit("data:", 1)[0])
    page.route("**/v1/chat/completions", cut_off)
    ask(page, "What is the capital of France?", 16)
    expect(page.locator("#error")).to_contain_text("cut off", timeout=ANSWER_MS)
    expect(page.locator("#send")).to_be_visible()


def events(*chunks: dict) -> str:
    """A stream of server-sent events as the server writes them: each chunk, then [DONE]."""
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_chat_page_sends_the_message_as_typed_and_wraps_a_long_word_of_the_answer(page):
    """Code's indentation reaches the model, and a URL longer than the page is wide wraps inside
    its message instead of running past it."""
    url = "https://example.com/" + "a" * 400
    sent = []

    def answer_a_long_word(route):
        sent.append(json.loads(route.request.post_data))
        route.fulfill(content_type="text/event-stream", body=events(
            {"choices": [{"delta": {"content": url}, "finish_reason": None}]},
            {"choices": [{"delta": {}, "finish_reason": "stop"}]}))
    page.route("**/v1/chat/completions", answer_a_long_word)
    code = "    def f():\n        return 1"
    ask(page, code, 16)
    expect(page.locator(".assistant")).to_have_text(url)
    assert sent[0]["messages"][-1]["content"] == code
    assert page.eval_on_selector(".assistant", "m => m.scrollWidth <= m.clientWidth")


def test_chat_page_refuses_a_setting_that_is_not_a_number_and_sends_nothing(page):
    """The browser reads "5e" in a number box as an empty box, which would send no max_tokens at
    all (the server's default, the whole context): the page says so and sends nothing."""
    requests = []
    page.on("request", lambda r: requests.append(r) if "/v1/chat" in r.url else None)
    for box, name in (("#max_tokens", "max tokens"), ("#temperature", "temperature")):
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "4")
        page.fill(box, "")
        page.click(box)
        page.keyboard.type("5e")
        page.fill("#input", "Hello!")
        page.click("#send")
        expect(page.locator("#error")).to_have_text(f"{name} is not a number")
        expect(page.locator("#input")).to_have_value("Hello!")
        expect(page.locator(".message")).to_have_count(0)
    assert requests == []


def test_chat_page_sends_no_message_of_only_spaces_and_newlines(page):
    requests = []
    page.on("request", lambda r: requests.append(r) if "/v1/chat" in r.url else None)
    ask(page, "   \n  ", 4)
    page.click("#send")
    page.wait_for_timeout(300)  # time for a request the page should not send
    expect(page.locator(".message")).to_have_count(0)
    assert requests == []


def test_chat_page_new_chat_before_the_first_token_leaves_an_empty_box(page):
    """A question whose answer has not begun, then "New chat": the conversation and the question
    are gone (Stop, by contrast, gives the question back to be sent again)."""
    page.route("**/v1/chat/completions", lambda route: None)  # an answer that never begins
    ask(page, "What is the capital of France?", 16)
    expect(page.locator("#stop")).to_be_visible()
    page.click("#clear")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#input")).to_have_value("")


def test_chat_page_follows_the_answer_only_while_scrolled_to_its_end(page):
    """A reader who scrolls up while the answer streams stays where they are; back at the end, the
    view follows the answer again."""
    page.set_viewport_size({"width": 900, "height": 320})
    ask(page, "Write a long story about a dragon.", 200)
    answer = page.locator(".assistant").last
    overflowing = "m => m.scrollHeight > m.clientHeight + 60"
    page.wait_for_function(f"({overflowing})(document.getElementById('messages'))",
                           timeout=ANSWER_MS)
    page.eval_on_selector("#messages", "m => { m.scrollTop = 0; }")
    length = len(answer.text_content())
    page.wait_for_function(f"document.querySelector('.assistant').textContent.length > {length}",
                           timeout=ANSWER_MS)
    assert page.eval_on_selector("#messages", "m => m.scrollTop") == 0
    page.eval_on_selector("#messages", "m => { m.scrollTop = m.scrollHeight; }")
    length = len(answer.text_content())
    page.wait_for_function(f"document.querySelector('.assistant').textContent.length > {length}",
                           timeout=ANSWER_MS)
    at_end = "m => m.scrollHeight - m.scrollTop - m.clientHeight < 4"
    assert page.eval_on_selector("#messages", at_end)
    page.click("#stop")
    expect(page.locator("#send")).to_be_visible()


def test_chat_page_works_under_a_path_prefix(browser, server):
    """Behind a proxy that serves the server under /gpt/ alone, the page asks for the models and
    its answers under that prefix."""
    page = browser.new_page()
    page.route(f"{server}/gpt/**", lambda route: route.fulfill(
        response=route.fetch(url=route.request.url.replace("/gpt/", "/", 1))))
    page.route(f"{server}/v1/**", lambda route: route.fulfill(status=404, body="not proxied"))
    page.goto(f"{server}/gpt/")
    with_key(page)
    ask(page, "What is the capital of France?", 4)
    expect(page.locator(".assistant")).not_to_be_empty(timeout=ANSWER_MS)
    expect(page.locator("#send")).to_be_visible(timeout=ANSWER_MS)
    expect(page.locator("#error")).to_have_text("the answer reached max_tokens")
    page.close()
