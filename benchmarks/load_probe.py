"""Run by bench.py and laptop_7b.py in a fresh process: time `Llama.build` of a checkpoint (quantized as it
loads with --quantize) and measure the peak resident memory it takes above the process's baseline, after the
build and after a first generation (which reads every weight); then the decoding speed at batch 1. Prints the
figures as one line of JSON.

    python benchmarks/load_probe.py CKPT_DIR TOKENIZER_PATH --dtype float32 --device cpu --max-seq-len 640
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import Llama, SamplingParams  # noqa: E402
from llama.distributed import setup_model_parallel  # noqa: E402
from llama.layout import meta_device  # noqa: E402


def peak_rss() -> int:
    """Bytes: Linux's VmHWM, which clear_refs can reset; elsewhere ru_maxrss (in bytes on macOS)."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(status["VmHWM"].split()[0]) * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> None:
    """Start the peak from the current size: the imports peaked higher than where they settled."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_dir")
    parser.add_argument("tokenizer_path")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-seq-len", type=int, default=640)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--quantize", help="int8, int4, q8_0 or q4_0: quantize the linear layers as they load")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    # The baseline: imports, the process group, and the ~800 modules (70 MB) the first dispatch mode imports.
    setup_model_parallel(device=options.device)
    with meta_device():
        torch.empty(1)
    reset_peak()
    baseline = peak_rss()
    synchronize(options.device)
    start = time.perf_counter()
    llama = Llama.build(options.ckpt_dir, options.tokenizer_path, options.max_seq_len, 1, device=options.device,
                        dtype=options.dtype, quantize=options.quantize)  # fmt: skip
    synchronize(options.device)
    load_s = time.perf_counter() - start
    load_peak = peak_rss()
    prompt = [[1] + [3 + i % 200 for i in range(options.prompt_len - 1)]]
    seconds = {}
    # A one-token run first, untimed: the first run pays for reading in the weights (llama.cpp maps the file
    # and reads it at its first use) and for one-time setup, which the subtraction must not count.
    for count in (1, 1, options.new_tokens):
        start = time.perf_counter()
        list(llama.generate_steps(prompt, SamplingParams(temperature=0, max_gen_len=count, ignore_eos=True)))
        synchronize(options.device)
        seconds[count] = time.perf_counter() - start
    caches = {name for name, _ in llama.model.named_buffers() if "cache" in name}
    figures = {
        "load_s": load_s,
        "load_peak_rss_above_baseline": load_peak - baseline,
        "baseline_rss": baseline,
        "peak_rss_build_and_generate": peak_rss(),
        "peak_rss_build_and_generate_above_baseline": peak_rss() - baseline,
        "cache_bytes": sum(b.numel() * b.element_size() for n, b in llama.model.named_buffers() if n in caches),
        "model_bytes": sum(
            t.numel() * t.element_size()
            for n, t in [*llama.model.named_parameters(), *llama.model.named_buffers()]
            if n not in caches
        ),  # fmt: skip
        "decode_tokens_per_s": (options.new_tokens - 1) / (seconds[options.new_tokens] - seconds[1]),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
