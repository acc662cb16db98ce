"""`llama serve` under load: the same greedy requests sent at concurrency 1, 4, 8 and 16 (total generated tokens
per second, and per request its latency and the time to its first token, p50 and p95), against the same
requests run one after another through the library in this process (`Llama.generate`, the call
`text_completion` makes after tokenizing).

    python benchmarks/serve_load.py --shape demo --threads 2
    python benchmarks/serve_load.py --shape 110m --threads 2 --json serve_110m.json

The server is the `llama serve` command in a process of its own, with as many rows as the highest concurrency;
the clients are asyncio tasks in this process, each sending its next request when the last is answered. Every
request is streamed (so that its first token's time is seen) with its prompt as token ids, of 8 to 64 tokens,
and asks for --max-tokens new ones. The models: the bundled demo model, or a random one of a benchmark shape
(benchmarks/random_model.py), whose tokens decode to text too. Each mode is warmed up first. The figures
depend on the machine and on what else runs on it: the table's heading names the CPU and its load average
before the run.
"""

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_model import prepare_checkpoint, random_prompts  # noqa: E402

from llama import Llama, demo_checkpoint  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
PROMPT_LENGTHS = (8, 24, 40, 64)  # cycled over the requests
START_TIMEOUT = 300  # seconds for the server to load: a bound against hangs


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="demo", help="demo (the bundled model), or a shape of random_model.py")
    parser.add_argument("--concurrency", default="1,4,8,16", help="the client counts, comma-separated")
    parser.add_argument("--requests", type=int, default=32, help="requests at each concurrency")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens each request asks for")
    parser.add_argument("--max-seq-len", type=int, default=256, help="the server's and the library's context")
    parser.add_argument("--threads", type=int, help="PyTorch's threads, here and in the server (default: its own)")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args(argv)


def checkpoint(options: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    """(ckpt_dir, tokenizer_path) of the model to serve."""
    if options.shape == "demo":
        ckpt_dir, tokenizer_path = demo_checkpoint()
        return Path(ckpt_dir), Path(tokenizer_path)
    settings = argparse.Namespace(ckpt_dir=None, shape=options.shape, dtype="float32")
    return prepare_checkpoint(settings, workdir)


def start_server(ckpt_dir: Path, tokenizer_path: Path, options: argparse.Namespace, rows: int) -> tuple:
    """(the `llama serve` process, its base URL), once it serves."""
    command = [sys.executable, "-m", "llama", "serve", "--ckpt-dir", str(ckpt_dir), "--tokenizer-path",
               str(tokenizer_path), "--port", "0", "--max-batch-size", str(rows), "--max-seq-len",
               str(options.max_seq_len), "--max-queue", str(options.requests), "--device", "cpu"]  # fmt: skip
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(options.threads)} if options.threads else {}))
    process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True)  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT
    for line in process.stderr:
        found = re.search(r"serving .* on (http://\S+)", line)
        if found:  # its log lines are read on, so that the pipe never fills
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, found.group(1)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError(f"llama serve did not start (exit status {process.wait()})")


async def _request(http, prompt: list[int], max_tokens: int) -> dict:
    """One streamed request: its seconds to the first token and to the end, and the tokens it got."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"latency": end - start, "first_token": (first or end) - start, "tokens": tokens}


async def _load(base: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> tuple[list, float]:
    """Every prompt sent by `concurrency` clients: (each request's figures, the seconds it all took)."""
    import httpx

    waiting, records = list(reversed(prompts)), []

    async def client(http) -> None:
        while waiting:
            records.append(await _request(http, waiting.pop(), max_tokens))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return records, time.perf_counter() - start


def sequential(llama: Llama, prompts: list[list[int]], max_tokens: int) -> tuple[list, float]:
    """The prompts one after another through the library: (each request's figures, the seconds in all)."""
    records, start = [], time.perf_counter()
    for prompt in prompts:
        began = time.perf_counter()
        tokens, _ = llama.generate([prompt], max_tokens, temperature=0)
        records.append({"latency": time.perf_counter() - began, "first_token": None, "tokens": len(tokens[0])})
    return records, time.perf_counter() - start


def summary(records: list[dict], seconds: float) -> dict:
    """Total tokens and tokens/s, and per-request latency and time to the first token (p50, p95), in seconds."""

    def percentile(values: list[float], share: float) -> Optional[float]:
        return statistics.quantiles(values, n=100, method="inclusive")[share - 1] if len(values) > 1 else None

    tokens = sum(record["tokens"] for record in records)
    latency = [record["latency"] for record in records]
    first = [record["first_token"] for record in records if record["first_token"] is not None]
    return {"requests": len(records), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "latency_p50": percentile(latency, 50), "latency_p95": percentile(latency, 95),
            "first_token_p50": percentile(first, 50), "first_token_p95": percentile(first, 95)}  # fmt: skip


def machine() -> str:
    """The CPU's name and core count, and the load average now."""
    names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE) or ["a CPU"]
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{names[0]}, {os.cpu_count()} logical cores; load average before the run {load}"


def table(results: dict) -> str:
    """The figures as a Markdown table, the sequential run first; speedup is tokens/s over the sequential's."""

    def seconds(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}"

    base = results["sequential"]["tokens_per_s"]
    lines = [f"`{results['shape']}`, {results['max_tokens']} new tokens per request, {results['machine']}", "",
             "| run | clients | requests | tokens | tokens/s | vs sequential | latency p50 / p95 (s) | "
             "first token p50 / p95 (s) |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]  # fmt: skip
    rows = [("one after another (library)", "1", results["sequential"])]
    rows += [("llama serve", str(level), figures) for level, figures in results["served"].items()]
    for name, clients, figures in rows:
        lines.append(
            f"| {name} | {clients} | {figures['requests']} | {figures['tokens']} | {figures['tokens_per_s']:.1f} | "
            f"{figures['tokens_per_s'] / base:.2f}x | {seconds(figures['latency_p50'])} / "
            f"{seconds(figures['latency_p95'])} | {seconds(figures['first_token_p50'])} / "
            f"{seconds(figures['first_token_p95'])} |"
        )
    return "\n".join(lines)


def run(options: argparse.Namespace, workdir: Path) -> dict:
    """Every figure: the sequential run, then the server at each concurrency."""
    levels = [int(level) for level in options.concurrency.split(",")]
    results = {"shape": options.shape, "max_tokens": options.max_tokens, "machine": machine(), "served": {}}
    ckpt_dir, tokenizer_path = checkpoint(options, workdir)
    llama = Llama.build(ckpt_dir, tokenizer_path, options.max_seq_len, 1, device="cpu")
    vocab = llama.model.params.vocab_size
    prompts = [random_prompts(1, PROMPT_LENGTHS[index % len(PROMPT_LENGTHS)], vocab, seed=index)[0]
               for index in range(options.requests)]  # fmt: skip
    sequential(llama, prompts[:2], options.max_tokens)  # warm-up
    results["sequential"] = summary(*sequential(llama, prompts, options.max_tokens))
    del llama  # the server has the machine to itself
    server, base = start_server(ckpt_dir, tokenizer_path, options, max(levels))
    try:
        asyncio.run(_load(base, prompts[:2], options.max_tokens, 2))  # warm-up
        for level in levels:
            results["served"][level] = summary(*asyncio.run(_load(base, prompts, options.max_tokens, level)))
    finally:
        server.terminate()
        server.wait(60)
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark; print the table (and write --json); return the figures."""
    options = parse(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory() as workdir:
        results = run(options, Path(workdir))
    print(table(results))
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
