"""The `llama serve` command: it serves the demo model out of the box on 127.0.0.1, takes its API key from the
environment, logs one line per request without the prompt, and ends with status 0 on SIGTERM."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading

import httpx

from helpers import REPO_ROOT

TIMEOUT = 60  # seconds: a bound against hangs


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def test_llama_serve_serves_the_demo_model_logs_without_prompts_and_exits_0_on_sigterm():
    env = dict(os.environ, LLAMA_API_KEY="from-the-environment")
    command = [sys.executable, "-m", "llama", "serve", "--port", "0", "--max-seq-len", "64", "--max-batch-size", "2"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    errors: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stderr, errors), daemon=True).start()
    try:
        seen = []
        while not seen or "serving" not in seen[-1]:
            line = errors.get(timeout=TIMEOUT)
            assert line is not None, "".join(seen)
            seen.append(line)
        base = re.search(r"http://127\.0\.0\.1:\d+", seen[-1]).group(0)
        assert httpx.get(base + "/v1/models", timeout=TIMEOUT).status_code == 401
        key = {"Authorization": "Bearer from-the-environment"}
        body = {"prompt": "SECRET PROMPT", "max_tokens": 3}
        answer = httpx.post(base + "/v1/completions", json=body, headers=key, timeout=TIMEOUT).json()
        assert answer["model"] == "demo" and answer["usage"]["completion_tokens"] == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
    finally:
        process.kill()
        process.wait(TIMEOUT)
    log = "".join(seen) + "".join(iter(lambda: errors.get(timeout=TIMEOUT) or "", ""))
    assert re.search(r"POST /v1/completions 200 tokens_in=\d+ tokens_out=3 ", log), log
    assert "GET /v1/models 401" in log and "SECRET" not in log
    assert process.stdout.read().strip() == "stopped"


def test_serve_refuses_bad_settings_in_one_line_before_loading(run_main):
    status, _, err = run_main("serve", "--prefill-chunk", "0")
    assert status == 1 and err.startswith("error: ") and "--prefill-chunk" in err and len(err.splitlines()) == 1
    status, _, err = run_main("serve", "--ckpt-dir", "/nonexistent/folder")
    assert status == 1 and "/nonexistent/folder" in err


def test_serve_refuses_an_allow_origin_that_no_browser_sends(run_main):
    for origin in ("http://localhost:3000/", "localhost:3000", "http://example.com/app"):
        # (a folder that does not exist, so that a check that let the origin through ends the command all the same)
        status, _, err = run_main("serve", "--allow-origin", "*", "--allow-origin", origin, "--ckpt-dir", "/nowhere")
        assert status == 1 and "--allow-origin" in err and "not an origin" in err and len(err.splitlines()) == 1, err
