"""The chat page that `llama serve` answers at /, in a real headless Chromium (Debian's `chromium`, driven by
Playwright for Python): what it shows is what the library answers, Stop frees the server's row, text stays
text, conversations and settings outlive a reload, errors are told in words, the API key is asked for, and the
page asks nothing of any other address. One server and one browser serve the module; a second server, started
by the `llama serve` command itself, has an API key."""

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import running_server, wait_for_free_rows

from helpers import REPO_ROOT
from llama import Llama, demo_checkpoint
from llama.serve.app import Settings
from llama.serve.scheduler import Scheduler

try:
    from playwright import sync_api
except ImportError:  # the browser tests say how to install it; the server's own tests run without it
    sync_api = None

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
TIMEOUT = 60  # seconds: a bound against hangs, never a measure of speed
ROWS = 2
KEY = "the-right-key"
SCREENSHOT = REPO_ROOT / "build" / "test-artifacts" / "serving-page.png"
STATS = re.compile(r"^(\d+) tokens · \d+\.\d\d s · \d+\.\d tokens/s")


@pytest.fixture(scope="module")
def demo():
    ckpt_dir, tokenizer_path = demo_checkpoint()
    return Llama.build(ckpt_dir, tokenizer_path, max_seq_len=256, max_batch_size=ROWS)


@pytest.fixture(scope="module")
def server(demo):
    with running_server(demo, model_name="demo") as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install it with `apt-get install chromium` (as .ci/run does)")
    if sync_api is None:
        pytest.skip("Playwright is missing: pip install -e '.[test]' (it drives the system's Chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield browser
        browser.close()


class Visit:
    """One visit of the page in a fresh browser profile: the page, and every address it asked for."""

    def __init__(self, browser, base: str, model: str = "demo"):
        self.base = base
        self.context = browser.new_context(viewport={"width": 1000, "height": 640})
        self.context.set_default_timeout(TIMEOUT * 1000)
        self.requests: list[str] = []
        self.context.on("request", lambda request: self.requests.append(request.url))
        self.page = self.context.new_page()
        self.load(model)

    def load(self, model: str = "demo") -> None:
        """(Re)load the page; wait until it shows `model`'s name, unless `model` is empty."""
        self.page.goto(self.base + "/")
        if model:
            self.page.wait_for_selector(f"#model:text-is({json.dumps(model)})")

    def settings(self, **values) -> None:
        """Fill the settings panel (opening it): system, temperature, top_p, max_tokens, seed."""
        if self.page.is_hidden("#settings"):
            self.page.click("#toggle-settings")
        for name, value in values.items():
            self.page.fill(f"#{name}", str(value))

    def send(self, text: str, wait: bool = True) -> None:
        """Type `text` (a new line as Shift+Enter) and send it with Enter; with `wait`, until the answer ends."""
        self.page.click("#input")
        for number, line in enumerate(text.split("\n")):
            if number:
                self.page.keyboard.press("Shift+Enter")
            self.page.keyboard.insert_text(line)
        self.page.keyboard.press("Enter")
        if wait:
            self.page.wait_for_selector("#stop", state="hidden")

    def texts(self, role: str) -> list[str]:
        return self.page.eval_on_selector_all(f".message.{role} .text", "nodes => nodes.map(node => node.textContent)")

    def last_stats(self) -> str:
        return self.page.eval_on_selector_all(".message.assistant .stats", "nodes => nodes.at(-1).textContent")

    def notice(self) -> str:
        return self.page.text_content("#notice") if self.page.is_visible("#notice") else ""

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser, server):
    opened = Visit(browser, server[0])
    yield opened
    opened.close()


def _offline(demo: Llama, server, dialog: list[dict], max_gen_len: int) -> str:
    """chat_completion's greedy answer, computed while the server is idle (the two share the model)."""
    wait_for_free_rows(server[1], ROWS)
    return demo.chat_completion([dialog], temperature=0, max_gen_len=max_gen_len)[0]["generation"]["content"]


def test_the_answers_shown_are_chat_completions_greedy_answers_to_the_whole_dialog(demo, server, visit):
    visit.settings(system="Speak as a king.", temperature=0, max_tokens=20)
    first = "Who art thou?\nSpeak!"  # typed with Shift+Enter
    visit.send(first)
    dialog = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": first}]
    answer = _offline(demo, server, dialog, 20)
    assert visit.texts("user") == [first] and visit.texts("assistant") == [answer]
    assert STATS.match(visit.last_stats()).group(1) == "20", visit.last_stats()
    visit.send("And whence comest thou?")
    dialog += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And whence comest thou?"}]
    assert visit.texts("assistant") == [answer, _offline(demo, server, dialog, 20)], "the second turn lost the first"
    style = visit.page.eval_on_selector(".message.assistant .text", "node => getComputedStyle(node).whiteSpace")
    assert style == "pre-wrap" and visit.page.text_content("#model") == "demo"
    visit.page.click("#toggle-settings")  # closed, for the screenshot
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    partial = SCREENSHOT.with_suffix(f".{os.getpid()}.png")
    visit.page.screenshot(path=str(partial))
    partial.replace(SCREENSHOT)


def test_stop_keeps_the_partial_answer_and_frees_the_servers_row(demo, server, visit, monkeypatch):
    scheduler = server[1]
    forward = scheduler._forward

    def slow_forward(*args, **kwargs):  # a slow model, so that the answer is surely stopped midway
        time.sleep(0.05)
        return forward(*args, **kwargs)

    monkeypatch.setattr(scheduler, "_forward", slow_forward)
    visit.settings(temperature=0, max_tokens=200)
    before = wait_for_free_rows(scheduler, ROWS)["generated_tokens"]
    visit.send("Tell me a long tale.", wait=False)
    visit.page.wait_for_selector(".message.assistant .text:not(:empty)")
    assert scheduler.state()["running"] == 1
    visit.page.click("#stop")
    visit.page.wait_for_selector("#stop", state="hidden")
    state = wait_for_free_rows(scheduler, ROWS)
    assert state["free_rows"] == ROWS and state["running"] == 0, f"the stopped request kept its row: {state}"
    generated = state["generated_tokens"] - before
    assert 0 < generated < 200, f"the request ran {generated} of its 200 tokens after Stop"
    monkeypatch.undo()
    shown = visit.texts("assistant")[0]
    full = _offline(demo, server, [{"role": "user", "content": "Tell me a long tale."}], generated)
    assert shown and full.startswith(shown), f"{shown!r} is not the start of {full!r}"
    assert visit.last_stats().endswith("stopped") and visit.notice() == ""


def _answer_with(visit: Visit, text: str) -> None:
    """Make the page's next answers `text`, streamed as the server streams (in place of the model's)."""
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}]  # fmt: skip
    stream = "".join(f"data: {json.dumps(chunk)}\r\n\r\n" for chunk in chunks) + "data: [DONE]\r\n\r\n"
    visit.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=stream))  # fmt: skip


def test_html_in_a_message_or_an_answer_is_shown_as_text_and_never_runs(visit):
    payload = '<img src=x onerror="window.injected = 1"><script>window.injected = 2</script><b>bold</b>'
    _answer_with(visit, payload)
    visit.send(payload)
    for _ in range(2):  # as it arrives, and as the stored conversation shows it after a reload
        assert visit.texts("user") == [payload] and visit.texts("assistant") == [payload]
        assert visit.page.evaluate("window.injected === undefined"), "HTML from a message ran in the page"
        assert visit.page.query_selector_all("#messages img, #messages b, #messages script") == []
        visit.load()


def test_conversations_and_settings_outlive_a_reload_and_delete_removes_one(visit):
    visit.settings(temperature=0, max_tokens=4, seed=7)
    visit.send("First conversation")
    visit.page.click("#new")
    visit.send("Second conversation")
    visit.load()
    titles = visit.page.eval_on_selector_all("#conversations .open", "nodes => nodes.map(node => node.textContent)")
    assert titles == ["Second conversation", "First conversation"]
    assert visit.texts("user") == ["Second conversation"] and len(visit.texts("assistant")) == 1
    visit.settings()
    assert [visit.page.input_value(f"#{name}") for name in ("temperature", "max_tokens", "seed")] == ["0", "4", "7"]
    visit.page.click("#conversations li:first-child .delete")
    visit.load()
    titles = visit.page.eval_on_selector_all("#conversations .open", "nodes => nodes.map(node => node.textContent)")
    assert titles == ["First conversation"] and visit.texts("user") == []


def test_copy_puts_the_raw_answer_on_the_clipboard(visit):
    raw = "\n  An answer, <b>as sent</b>,\n\n\twith its spaces.  \n"
    _answer_with(visit, raw)
    visit.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=visit.base)
    visit.send("Copy me")
    visit.page.click(".message.assistant .copy")
    visit.page.wait_for_selector(".message.assistant .copy:text('Copied')")
    assert visit.page.evaluate("navigator.clipboard.readText()") == raw == visit.texts("assistant")[0]


def test_errors_are_told_in_words_and_the_conversation_is_kept(visit):
    visit.settings(temperature=0, max_tokens=4)
    visit.send("Hello")
    kept = visit.texts("assistant")
    visit.settings(max_tokens=100000)
    visit.send("Too long an answer")
    assert "refused the request (400)" in visit.notice() and "max_tokens" in visit.notice(), visit.notice()
    assert visit.texts("assistant") == kept and visit.page.input_value("#input") == "Too long an answer"
    visit.settings(max_tokens=4)
    busy = {"error": {"message": "64 requests are waiting already", "type": "x", "param": None, "code": "queue_full"}}
    visit.page.route("**/v1/chat/completions", lambda route: route.fulfill(status=429, json=busy))
    visit.page.fill("#input", "")
    visit.send("Busy?")
    assert "busy" in visit.notice() and "(429)" in visit.notice(), visit.notice()
    visit.page.unroute("**/v1/chat/completions")
    visit.context.set_offline(True)
    visit.page.fill("#input", "")
    visit.send("Anyone there?")
    assert "Cannot reach the server" in visit.notice(), visit.notice()
    visit.context.set_offline(False)
    assert visit.texts("user") == ["Hello"] and visit.texts("assistant") == kept


def test_the_page_asks_nothing_of_any_other_address(visit):
    visit.settings(temperature=0.8, top_p=0.9, max_tokens=6, seed=1)
    visit.send("Where do you send my words?")
    visit.page.click("#new")
    visit.load()
    assert visit.requests and all(url.startswith(visit.base + "/") or url.startswith("data:")
                                  for url in visit.requests), visit.requests  # fmt: skip


def test_the_page_and_health_need_no_key_and_no_ui_turns_the_page_off(demo):
    with running_server(demo, start=False, api_key=KEY) as (base, _):
        assert httpx.get(base + "/", timeout=TIMEOUT).headers["content-type"].startswith("text/html")
        assert httpx.get(base + "/v1/models", timeout=TIMEOUT).status_code == 401
    with running_server(demo, start=False, ui=False) as (base, _):
        assert httpx.get(base + "/", timeout=TIMEOUT).status_code == 404
        assert httpx.get(base + "/health", timeout=TIMEOUT).status_code == 200


def test_llama_serve_no_ui_tells_the_server_to_serve_no_page(run_main, monkeypatch):
    given = []

    def run_server(*arguments) -> None:  # in place of serving: keep what the server would be given
        given.extend(arguments)
        for argument in arguments:
            if isinstance(argument, Scheduler):
                argument.stop(0)

    monkeypatch.setattr("llama.serve.command._run_server", run_server)
    assert run_main("serve", "--no-ui", "--port", "0", "--max-seq-len", "32")[0] == 0
    assert [argument.ui for argument in given if isinstance(argument, Settings)] == [False]


@pytest.fixture(scope="module")
def keyed_server():
    """`llama serve --api-key KEY` on a free port: its base URL."""
    command = [sys.executable, "-m", "llama", "serve", "--port", "0", "--api-key", KEY, "--max-seq-len", "64",
               "--max-batch-size", "1"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr] + [lines.put("")], daemon=True).start()
    try:
        seen = [lines.get(timeout=TIMEOUT)]
        while seen[-1] and "serving" not in seen[-1]:
            seen.append(lines.get(timeout=TIMEOUT))
        assert seen[-1], "llama serve ended:\n" + "".join(seen)
        yield re.search(r"http://127\.0\.0\.1:\d+", seen[-1]).group(0)
    finally:
        process.kill()  # its orderly stop on SIGTERM is tested in test_serve_command.py
        process.wait(TIMEOUT)


def test_with_an_api_key_the_page_asks_for_it_once_and_tells_a_wrong_one(browser, keyed_server):
    visit = Visit(browser, keyed_server, model="")
    try:
        visit.page.wait_for_selector("#key-form", state="visible")
        assert "needs an API key" in visit.page.text_content("#key-notice")
        visit.page.fill("#key", "a-wrong-key")
        visit.page.press("#key", "Enter")
        visit.page.wait_for_selector("#key-notice:text('refused this API key')")
        visit.page.fill("#key", KEY)
        visit.page.press("#key", "Enter")
        visit.page.wait_for_selector("#model:text-is('demo')")
        assert visit.page.is_hidden("#key-form")
        visit.settings(temperature=0, max_tokens=4)
        visit.send("Open, sesame")
        assert STATS.match(visit.last_stats()).group(1) == "4" and visit.notice() == ""
        visit.load()  # the key is kept: no second question
        assert visit.page.is_hidden("#key-form") and visit.texts("user") == ["Open, sesame"]
    finally:
        visit.close()
