"""Run by laptop_7b.py in a fresh process: load a GGUF file with llama.cpp (llama-cpp-python) and measure the
load time, the peak resident memory above the process's baseline, and the decoding speed at batch 1 (greedy,
EOS ignored, the time of a one-token generation subtracted), as load_probe.py measures this library. Prints
the figures as one line of JSON.

    python benchmarks/llama_cpp_probe.py MODEL.gguf --threads 2 --prompt-len 8 --new-tokens 16
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_cpp_arm import llama_cpp_generate  # noqa: E402
from load_probe import peak_rss, reset_peak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=256)
    options = parser.parse_args()
    reset_peak()
    baseline = peak_rss()
    start = time.perf_counter()
    generate = llama_cpp_generate(Path(options.gguf), options.threads, options.max_seq_len)
    load_s = time.perf_counter() - start
    prompt = [[1] + [3 + i % 200 for i in range(options.prompt_len - 1)]]
    seconds = {}
    # A one-token run first, untimed: the first run pays for reading in the weights (llama.cpp maps the file
    # and reads it at its first use) and for one-time setup, which the subtraction must not count.
    for count in (1, 1, options.new_tokens):
        start = time.perf_counter()
        generate(prompt, count)
        seconds[count] = time.perf_counter() - start
    figures = {
        "load_s": load_s,
        "baseline_rss": baseline,
        "peak_rss_build_and_generate": peak_rss(),
        "peak_rss_build_and_generate_above_baseline": peak_rss() - baseline,
        "decode_tokens_per_s": (options.new_tokens - 1) / (seconds[options.new_tokens] - seconds[1]),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
