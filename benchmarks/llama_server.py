"""llama.cpp's own HTTP server, `llama-server`, as a peer of `llama serve` in benchmarks/serve_load.py: started on
127.0.0.1 at a free port with a slot per client, given the same greedy requests (prompt token ids, a number of
new tokens, end-of-sequence ignored, streamed), and each answer's figures.

The binary is not part of llama-cpp-python's wheel: build it with cmake from the llama.cpp source that
llama-cpp-python's source package carries (docs/serving.md gives the commands). Every wait here is bounded.
"""

import json
import queue
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

START_TIMEOUT = 300  # seconds for a server to load and answer: a bound against hangs
STOP_TIMEOUT = 60  # seconds for a server to end after SIGTERM, before it is killed


def serving_url(process: subprocess.Popen, pattern: str, name: str, timeout: float = START_TIMEOUT) -> str:
    """The URL (group 1 of `pattern`) that `process` prints on its merged output when it listens, waiting at
    most `timeout` seconds; its later lines are read on in a thread, so that the pipe never fills. Kills the
    process and raises RuntimeError, with its last lines, when it ends or stays silent too long."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found.group(1)
    stop(process)
    raise RuntimeError(f"{name} did not start (exit status {process.returncode}): {''.join(seen[-5:])}")


def stop(process: subprocess.Popen) -> None:
    """End `process`: SIGTERM, then SIGKILL after STOP_TIMEOUT seconds."""
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT)


def start_llama_server(binary: Path, model: Path, slots: int, max_seq_len: int, threads: Optional[int]) -> tuple:
    """(the llama-server process, its base URL) serving the GGUF file `model` with `slots` parallel slots of
    max_seq_len tokens each (llama-server splits its context between its slots), once it answers /health. No
    prompt cache (a benchmark that sends the same prompts again must not read them from a cache), no web page."""
    command = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", "0", "--parallel", str(slots),
               "--ctx-size", str(max_seq_len * slots), "--cache-ram", "0", "--no-webui"]  # fmt: skip
    if threads:
        command += ["--threads", str(threads), "--threads-batch", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               text=True, errors="replace")  # fmt: skip
    base = serving_url(process, r"listening on (http://\S+)", "llama-server")
    _wait_until_loaded(process, base)
    return process, base


def _wait_until_loaded(process: subprocess.Popen, base: str) -> None:
    """Wait (at most START_TIMEOUT seconds) for /health to answer 200: llama-server listens before its model has
    loaded, and answers 503 meanwhile."""
    import httpx

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop(process)
    raise RuntimeError(f"llama-server did not load its model (exit status {process.returncode})")


async def llama_server_request(http, prompt: list[int], max_tokens: int) -> dict:
    """One streamed request to llama-server's /completion: greedy, end-of-sequence ignored, no prompt cache. Its
    seconds to the first token and to the end, the tokens it got, and whether it completed: its last event says
    it stopped, with all max_tokens tokens."""
    body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "top_k": 1, "ignore_eos": True,
            "cache_prompt": False, "stream": True}  # fmt: skip
    start, first, last = time.perf_counter(), None, {}
    async with http.stream("POST", "/completion", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"latency": time.perf_counter() - start, "first_token": None, "tokens": 0, "complete": False}
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            last = json.loads(line[6:])
            if first is None and (last.get("content") or last.get("tokens")):
                first = time.perf_counter()
    end = time.perf_counter()
    tokens = last.get("tokens_predicted", 0)
    complete = bool(last.get("stop")) and tokens == max_tokens
    return {"latency": end - start, "first_token": (first or end) - start, "tokens": tokens, "complete": complete}
