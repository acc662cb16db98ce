"""The `llama serve` command: it serves the demo model out of the box on 127.0.0.1, takes its API key from the
environment, logs one line per request without the prompt, and ends with status 0 on SIGTERM; under torchrun,
two processes serve what one does, and SIGTERM to torchrun ends them all."""

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from helpers import REPO_ROOT, child_env
from llama import Llama, demo_checkpoint

TIMEOUT = 60  # seconds: a bound against hangs


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


@contextlib.contextmanager
def serving(arguments: list[str], env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, str, list[str]]]:
    """`python ARGUMENTS...` run from the repository root, once it has printed `serving NAME on URL`: the
    process, the URL, and the lines of its standard error, which grow until the block ends (the rest once the
    process has ended). The process is killed at the end of the block if it still runs."""
    process = subprocess.Popen([sys.executable, *arguments], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    errors: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stderr, errors), daemon=True).start()
    seen: list[str] = []
    try:
        while not seen or "serving" not in seen[-1]:
            line = errors.get(timeout=TIMEOUT)
            assert line is not None, "".join(seen)
            seen.append(line)
        yield process, re.search(r"http://127\.0\.0\.1:\d+", seen[-1]).group(0), seen
    finally:
        process.kill()
        process.wait(TIMEOUT)
        seen.extend(iter(lambda: errors.get(timeout=TIMEOUT) or "", ""))


def test_llama_serve_serves_the_demo_model_logs_without_prompts_and_exits_0_on_sigterm():
    env = dict(os.environ, LLAMA_API_KEY="from-the-environment")
    arguments = ["-m", "llama", "serve", "--port", "0", "--max-seq-len", "512", "--max-batch-size", "2"]
    with serving(arguments, env) as (process, base, seen):
        assert httpx.get(base + "/v1/models", timeout=TIMEOUT).status_code == 401
        key = {"Authorization": "Bearer from-the-environment"}
        body = {"prompt": "SECRET PROMPT", "max_tokens": 3}
        answer = httpx.post(base + "/v1/completions", json=body, headers=key, timeout=TIMEOUT).json()
        assert answer["model"] == "demo" and answer["usage"]["completion_tokens"] == 3
        events = _stream_across_sigterm(process, base, key, max_tokens=400)
        assert process.wait(TIMEOUT) == 0
    # The stream that ran at SIGTERM was let finish (400 tokens take about a second alone on two cores, well
    # within the 10 s grace): its last chunk, its usage and [DONE], and no error.
    assert events[-1] == "[DONE]" and not any("error" in event for event in events[:-1]), events[-3:]
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 400
    assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
    log = "".join(seen)
    assert re.search(r"POST /v1/completions 200 tokens_in=\d+ tokens_out=3 ", log), log
    assert "GET /v1/models 401" in log and "SECRET" not in log
    assert process.stdout.read().strip() == "stopped"


def _stream_across_sigterm(process: subprocess.Popen, base: str, headers: dict, max_tokens: int) -> list[str]:
    """The data of each event of a streamed request, SIGTERM sent to `process` once its first event is in."""
    body = {"prompt": "ROMEO:", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = []
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=headers, timeout=TIMEOUT) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 1:
                    process.send_signal(signal.SIGTERM)
    return events


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


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc)."""
    stats = [path / "stat" for path in Path("/proc").iterdir() if path.name.isdigit()]
    return [int(stat.parent.name) for stat in stats if _parent(stat) == pid]


def _parent(stat: Path) -> int:
    try:
        return int(stat.read_text().rpartition(")")[2].split()[1])  # after "pid (name) state"
    except (OSError, IndexError, ValueError):  # gone meanwhile
        return -1


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's processes in Linux's /proc")
def test_two_ranks_under_torchrun_serve_the_tokens_of_one_and_all_end_on_sigterm():
    """Rank 0 serves HTTP and sends each step to rank 1: concurrent greedy requests get the tokens one process
    gives them; SIGTERM to torchrun reaches both, and both end (rank 0 after its running requests, rank 1 when
    rank 0 tells it) well before torchrun would kill them."""
    arguments = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llama", "serve",
                 "--port", "0", "--max-seq-len", "64", "--max-batch-size", "4"]  # fmt: skip
    prompts, lengths = ["ROMEO:", "KING", "First Citizen:\nBefore we proceed", "O", "JULIET:"], [20, 7, 12, 16, 9]
    dialog = [{"role": "user", "content": "Who art thou?"}]
    with serving(arguments, child_env()) as (process, base, seen):
        ranks = _children(process.pid)
        with ThreadPoolExecutor(len(prompts) + 1) as pool:
            calls = [pool.submit(httpx.post, base + "/v1/completions", timeout=TIMEOUT, json={
                "prompt": prompt, "max_tokens": length, "temperature": 0, "logprobs": 0})
                for prompt, length in zip(prompts, lengths)]  # fmt: skip
            chat = pool.submit(httpx.post, base + "/v1/chat/completions", timeout=TIMEOUT,
                               json={"messages": dialog, "max_tokens": 12, "temperature": 0})  # fmt: skip
            answers, chat = [call.result().json()["choices"][0] for call in calls], chat.result().json()
        process.send_signal(signal.SIGTERM)
        process.wait(TIMEOUT)
        left = [pid for pid in ranks if Path(f"/proc/{pid}").exists()]
    log, out = "".join(seen), process.stdout.read()
    assert len(ranks) == 2 and not left, f"ranks {ranks}, still running after torchrun ended: {left}\n{log}"
    assert out.strip() == "stopped" and "forcefully" not in log, log  # torchrun had no process to kill
    one = Llama.build(*demo_checkpoint(), max_seq_len=64, max_batch_size=4)
    for prompt, length, answer in zip(prompts, lengths, answers):
        alone = one.text_completion([prompt], temperature=0, max_gen_len=length, logprobs=True)[0]
        assert answer["text"] == alone["generation"] and answer["logprobs"]["tokens"] == alone["tokens"], prompt
        assert answer["logprobs"]["token_logprobs"] == pytest.approx(alone["logprobs"], abs=1e-4)
    expected = one.chat_completion([dialog], temperature=0, max_gen_len=12)[0]["generation"]["content"]
    assert chat["choices"][0]["message"]["content"] == expected
