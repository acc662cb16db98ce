"""`llama serve` under load: the same greedy requests sent at concurrency 1, 4, 8 and 16 (total generated tokens
per second, and per request its latency and the time to its first token, p50 and p95), against the same
requests run one after another through the library in this process (`Llama.generate`, the call
`text_completion` makes after tokenizing).

    python benchmarks/serve_load.py --shape demo --threads 2
    python benchmarks/serve_load.py --shape 110m --threads 2 --json serve_110m.json
    python benchmarks/serve_load.py --shape demo --threads 2 --formats f32,q8_0 --llama-server PATH/llama-server

The server is the `llama serve` command in a process of its own, with as many rows as the highest concurrency;
the clients are asyncio tasks in this process, each sending its next request when the last is answered. Every
request is streamed (so that its first token's time is seen) with its prompt as token ids, of 8 to 64 tokens,
and asks for --max-tokens new ones. The models: the bundled demo model, or a random one of a benchmark shape
(benchmarks/random_model.py), whose tokens decode to text too. Each mode is warmed up first. The figures
depend on the machine and on what else runs on it: the table's heading names the CPU and its load average
before the run.

--formats serves the weights in float32 (f32) and/or in 8-bit blocks (q8_0: `llama serve --quantize q8_0`).
With --llama-server, llama.cpp's own server (benchmarks/llama_server.py) serves each format too, as GGUF written
from the same checkpoint (benchmarks/to_gguf.py; q8_0 quantized by llama.cpp itself, which needs
llama-cpp-python), with a slot per client. Only answers that completed with all their tokens count; the
requests column says how many did not.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_server import llama_server_request, serving_url, start_llama_server, stop  # noqa: E402
from random_model import prepare_checkpoint, random_prompts  # noqa: E402
from tables import cpu_name  # noqa: E402

from llama import Llama, demo_checkpoint  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
PROMPT_LENGTHS = (8, 24, 40, 64)  # cycled over the requests
REQUEST_TIMEOUT = 600  # seconds for one request, a bound against hangs
FORMATS = {"f32": None, "q8_0": "q8_0"}  # the weights' format: llama serve's --quantize


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="demo", help="demo (the bundled model), or a shape of random_model.py")
    parser.add_argument("--concurrency", default="1,4,8,16", help="the client counts, comma-separated")
    parser.add_argument("--requests", type=int, default=32, help="requests at each concurrency")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens each request asks for")
    parser.add_argument("--max-seq-len", type=int, default=256, help="the server's and the library's context")
    parser.add_argument("--threads", type=int, help="PyTorch's threads, here and in the server (default: its own)")
    parser.add_argument("--formats", default="f32", help="f32 and/or q8_0, comma-separated: the weights served")
    parser.add_argument("--llama-server", type=Path, metavar="PATH", help="llama.cpp's llama-server binary: "
                        "serve each format with it too (on the same weights as GGUF)")  # fmt: skip
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args(argv)


def checkpoint(options: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    """(ckpt_dir, tokenizer_path) of the model to serve."""
    if options.shape == "demo":
        ckpt_dir, tokenizer_path = demo_checkpoint()
        return Path(ckpt_dir), Path(tokenizer_path)
    settings = argparse.Namespace(ckpt_dir=None, shape=options.shape, dtype="float32")
    return prepare_checkpoint(settings, workdir)


def start_server(ckpt_dir: Path, tokenizer_path: Path, options: argparse.Namespace, rows: int,
                 quantize: Optional[str] = None) -> tuple:  # fmt: skip
    """(the `llama serve` process, its base URL), once it serves."""
    command = [sys.executable, "-m", "llama", "serve", "--ckpt-dir", str(ckpt_dir), "--tokenizer-path",
               str(tokenizer_path), "--port", "0", "--max-batch-size", str(rows), "--max-seq-len",
               str(options.max_seq_len), "--max-queue", str(options.requests), "--device", "cpu",
               *(["--quantize", quantize] if quantize else [])]  # fmt: skip
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(options.threads)} if options.threads else {}))
    process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    return process, serving_url(process, r"serving .* on (http://\S+)", "llama serve")


async def _request(http, prompt: list[int], max_tokens: int) -> dict:
    """One streamed request to `llama serve`: its seconds to the first token and to the end, the tokens it got,
    and whether it completed (its usage and [DONE] came)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, tokens, done = time.perf_counter(), None, 0, False
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:  # refused: counted as incomplete
            await response.aread()
        async for line in response.aiter_lines() if response.status_code == 200 else ():
            done = done or line == "data: [DONE]"
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"latency": end - start, "first_token": (first or end) - start, "tokens": tokens,
            "complete": done and tokens > 0}  # fmt: skip


async def _load(base: str, prompts: list[list[int]], max_tokens: int, concurrency: int,
                send=_request) -> tuple[list, float]:  # fmt: skip
    """Every prompt sent by `concurrency` clients, each request through `send`: (each request's figures, the
    seconds it all took)."""
    import httpx

    waiting, records = list(reversed(prompts)), []

    async def answer(http, prompt: list[int]) -> dict:
        began = time.perf_counter()
        for attempt in range(2):
            try:
                return await send(http, prompt, max_tokens)
            except httpx.TransportError as error:  # the connection broke or timed out: no answer
                if attempt == 0 and isinstance(error, httpx.RemoteProtocolError):
                    # The server closed the connection without a word, as llama-server now and then does to a
                    # kept-alive one as it is reused: sent again once, on a new connection (its time counts).
                    print(f"{base}: a request was sent again: {error!r}", file=sys.stderr)
                    continue
                print(f"{base}: a request got no answer: {error!r}", file=sys.stderr)
                break
        return {"latency": time.perf_counter() - began, "first_token": None, "tokens": 0, "complete": False}

    async def client(http) -> None:
        while waiting:
            records.append(await answer(http, waiting.pop()))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return records, time.perf_counter() - start


def sequential(llama: Llama, prompts: list[list[int]], max_tokens: int) -> tuple[list, float]:
    """The prompts one after another through the library: (each request's figures, the seconds in all)."""
    records, start = [], time.perf_counter()
    for prompt in prompts:
        began = time.perf_counter()
        tokens, _ = llama.generate([prompt], max_tokens, temperature=0)
        records.append({"latency": time.perf_counter() - began, "first_token": None, "tokens": len(tokens[0]),
                        "complete": True})  # fmt: skip
    return records, time.perf_counter() - start


def summary(records: list[dict], seconds: float) -> dict:
    """Total tokens and tokens/s, and per-request latency and time to the first token (p50, p95), in seconds, of
    the requests that completed; `incomplete` counts the others."""

    def percentile(values: list[float], share: float) -> Optional[float]:
        return statistics.quantiles(values, n=100, method="inclusive")[share - 1] if len(values) > 1 else None

    complete = [record for record in records if record["complete"]]
    tokens = sum(record["tokens"] for record in complete)
    latency = [record["latency"] for record in complete]
    first = [record["first_token"] for record in complete if record["first_token"] is not None]
    return {"requests": len(complete), "incomplete": len(records) - len(complete), "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds,
            "latency_p50": percentile(latency, 50), "latency_p95": percentile(latency, 95),
            "first_token_p50": percentile(first, 50), "first_token_p95": percentile(first, 95)}  # fmt: skip


def machine() -> str:
    """The CPU's name and core count, and the load average now."""
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{cpu_name()}, {os.cpu_count()} logical cores; load average before the run {load}"


def table(results: dict) -> str:
    """The figures as a Markdown table, the sequential runs first; "vs sequential" is tokens/s over that of the
    library's sequential run on the same format."""

    def seconds(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [f"`{results['shape']}`, {results['max_tokens']} new tokens per request, {results['machine']}", "",
             "| run | clients | requests | tokens | tokens/s | vs sequential | latency p50 / p95 (s) | "
             "first token p50 / p95 (s) |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]  # fmt: skip
    rows = [(f"one after another (library) {form}", form, "1", figures)
            for form, figures in results["sequential"].items()]  # fmt: skip
    for name, levels in results["served"].items():
        rows += [(name, results["formats"][name], str(level), figures) for level, figures in levels.items()]
    for name, form, clients, figures in rows:
        missing = figures["incomplete"]
        requests = f"{figures['requests']}" + (f" ({missing} incomplete)" if missing else "")
        lines.append(
            f"| {name} | {clients} | {requests} | {figures['tokens']} | {figures['tokens_per_s']:.1f} | "
            f"{figures['tokens_per_s'] / results['sequential'][form]['tokens_per_s']:.2f}x | "
            f"{seconds(figures['latency_p50'])} / {seconds(figures['latency_p95'])} | "
            f"{seconds(figures['first_token_p50'])} / {seconds(figures['first_token_p95'])} |"
        )
    return "\n".join(lines)


def servers(options: argparse.Namespace, ckpt_dir: Path, tokenizer_path: Path, workdir: Path, rows: int) -> list:
    """(name, format, start, send) of every server to measure: `llama serve` on each format, and llama-server on
    each with --llama-server. start() returns (process, base URL); send is the coroutine of one request."""
    arms = []
    for form in options.formats:
        start = lambda form=form: start_server(ckpt_dir, tokenizer_path, options, rows, FORMATS[form])  # noqa: E731
        arms.append((f"llama serve {form}", form, start, _request))
    if options.llama_server:
        for form, model in gguf_models(ckpt_dir, tokenizer_path, workdir, options).items():
            start = lambda model=model: start_llama_server(  # noqa: E731
                options.llama_server, model, rows, options.max_seq_len, options.threads
            )
            arms.append((f"llama-server {form}", form, start, llama_server_request))
    return arms


def gguf_models(ckpt_dir: Path, tokenizer_path: Path, workdir: Path, options: argparse.Namespace) -> dict:
    """{format: GGUF file} of the checkpoint for llama-server: f32 written by benchmarks/to_gguf.py, q8_0 by
    llama.cpp's own quantizer from it (through llama-cpp-python, in a process of its own)."""
    from to_gguf import write_gguf

    if options.formats == ["f32"]:
        return {"f32": write_gguf(ckpt_dir, tokenizer_path, workdir / "model-f32.gguf")}
    from llama_cpp_arm import llama_cpp_files

    files = llama_cpp_files(ckpt_dir, tokenizer_path, workdir, options.threads or os.cpu_count())
    return {form: files[form] for form in options.formats}


def under_load(start, send, prompts: list[list[int]], levels: list[int], max_tokens: int) -> dict:
    """{concurrency: figures} of a server, started by start() and stopped at the end, after a warm-up."""
    process, base = start()
    try:
        asyncio.run(_load(base, prompts[:2], max_tokens, 2, send))
        return {level: summary(*asyncio.run(_load(base, prompts, max_tokens, level, send))) for level in levels}
    finally:
        if process.poll() is not None:  # its requests since then count as incomplete
            print(f"{base}: the server ended during the run, exit status {process.returncode}", file=sys.stderr)
        stop(process)


def run(options: argparse.Namespace, workdir: Path) -> dict:
    """Every figure: the sequential run on each format, then each server at each concurrency."""
    levels = [int(level) for level in options.concurrency.split(",")]
    results = {"shape": options.shape, "max_tokens": options.max_tokens, "machine": machine(), "sequential": {},
               "served": {}, "formats": {}}  # fmt: skip
    ckpt_dir, tokenizer_path = checkpoint(options, workdir)
    prompts = None
    for form in options.formats:
        llama = Llama.build(ckpt_dir, tokenizer_path, options.max_seq_len, 1, device="cpu", quantize=FORMATS[form])
        vocab = llama.model.params.vocab_size
        prompts = prompts or [random_prompts(1, PROMPT_LENGTHS[index % len(PROMPT_LENGTHS)], vocab, seed=index)[0]
                              for index in range(options.requests)]  # fmt: skip
        sequential(llama, prompts[:2], options.max_tokens)  # warm-up
        results["sequential"][form] = summary(*sequential(llama, prompts, options.max_tokens))
        del llama  # each server has the machine to itself
    for name, form, start, send in servers(options, ckpt_dir, tokenizer_path, workdir, max(levels)):
        results["formats"][name] = form
        results["served"][name] = under_load(start, send, prompts, levels, options.max_tokens)
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark; print the table (and write --json); return the figures."""
    options = parse(argv)
    options.formats = options.formats.split(",")
    unknown = sorted(set(options.formats) - set(FORMATS))
    if unknown:
        raise SystemExit(f"error: --formats {','.join(unknown)}: choose from {', '.join(FORMATS)}")
    if options.llama_server and not options.llama_server.is_file():
        raise SystemExit(f"error: --llama-server {str(options.llama_server)!r} is not a file: build llama-server "
                         "first (docs/serving.md says how)")  # fmt: skip
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
