"""A Llama 2 7B-shaped model on the CPU, quantized as it loads: a random checkpoint in bfloat16 (as Meta ships
the 7B model, 13.5 GB) is written once into --workdir, then loaded with each of --schemes (int4, int8, q4_0 and
q8_0), each in a fresh process (benchmarks/load_probe.py): load time, peak resident memory against the quantized
model plus its key/value cache, and decode tokens/s at batch 1 as a percentage of the streaming-read floor. With
llama-cpp-python installed, llama.cpp on the same weights: the checkpoint written as a bfloat16 GGUF file and
quantized to q8_0 and q4_0 by llama.cpp (kept in --workdir), each loaded and decoded in a fresh process
(benchmarks/llama_cpp_probe.py).

    python benchmarks/laptop_7b.py --workdir /var/tmp/llama-7b --threads 2

The checkpoint is written as two shards, one at a time, so that writing it never holds the whole model in memory;
loading reads both into one process (the same tensors Meta's single 7B shard holds).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_cpp_arm import gguf_bytes_per_step, llama_cpp_files, llama_cpp_installed  # noqa: E402
from padded_tokenizer import write_tokenizer  # noqa: E402
from random_model import SHAPES  # noqa: E402
from timing import bandwidth, run_probe  # noqa: E402

from llama.layout import expected_shapes, split_dim, write_params  # noqa: E402

SHARDS = 2
HERE = Path(__file__).resolve().parent


def write_random_7b(folder: Path) -> Path:
    """A random 7B-shaped Meta-layout checkpoint in bfloat16, unless `folder` already holds one."""
    args = SHAPES["7b"]
    if (folder / f"consolidated.{SHARDS - 1:02d}.pth").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_params(folder, args)
    write_tokenizer(folder / "tokenizer.model", args.vocab_size)
    generator = torch.Generator().manual_seed(0)
    for rank in range(SHARDS):
        shard = {}
        for name, shape in expected_shapes(args).items():
            dim = split_dim(name)
            if dim is not None:
                shape = shape[:dim] + (shape[dim] // SHARDS,) + shape[dim + 1 :]
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:  # unit-scale activations: the embedding N(0, 1), each layer N(0, 1 / its input width)
                scale = 1.0 if name == "tok_embeddings.weight" else expected_shapes(args)[name][1] ** -0.5
                shard[name] = (torch.randn(shape, generator=generator) * scale).to(torch.bfloat16)
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth.tmp")
        (folder / f"consolidated.{rank:02d}.pth.tmp").rename(folder / f"consolidated.{rank:02d}.pth")
        del shard
    return folder


def ours(folder: Path, scheme: str, options: argparse.Namespace, floor_bandwidth: float) -> dict:
    """This library loading the bfloat16 checkpoint quantized as `scheme`, in a fresh process."""
    command = [str(HERE / "load_probe.py"), str(folder), str(folder / "tokenizer.model"), "--dtype", "bfloat16",
               "--max-seq-len", "256", "--prompt-len", "8", "--new-tokens", str(options.new_tokens),
               "--threads", str(options.threads), "--quantize", scheme]  # fmt: skip
    figures = run_probe(command, scheme)
    figures["peak_rss_over_model_and_cache"] = figures["peak_rss_build_and_generate"] / (
        figures["model_bytes"] + figures["cache_bytes"]
    )
    # A step reads every weight but the embedding (bfloat16), of which it reads one row.
    args = SHAPES["7b"]
    figures["bytes_per_step"] = figures["model_bytes"] - (args.vocab_size - 1) * args.dim * 2
    figures["percent_of_floor"] = 100 * figures["decode_tokens_per_s"] * figures["bytes_per_step"] / floor_bandwidth
    print(
        f"{scheme}: load {figures['load_s']:.0f} s, peak RSS {figures['peak_rss_build_and_generate'] / 1e9:.2f} GB "
        f"= {figures['peak_rss_over_model_and_cache']:.2f}x model {figures['model_bytes'] / 1e9:.2f} GB + cache "
        f"{figures['cache_bytes'] / 1e9:.2f} GB, decode {figures['decode_tokens_per_s']:.2f} tokens/s "
        f"({figures['percent_of_floor']:.0f}% of the {floor_bandwidth / 1e9:.1f} GB/s floor)",
        flush=True,
    )
    return figures


def theirs(gguf_file: Path, name: str, options: argparse.Namespace, floor_bandwidth: float) -> dict:
    """llama.cpp decoding the same weights from a GGUF file, in a fresh process."""
    command = [str(HERE / "llama_cpp_probe.py"), str(gguf_file), "--threads", str(options.threads),
               "--prompt-len", "8", "--new-tokens", str(options.new_tokens)]  # fmt: skip
    figures = run_probe(command, f"llama.cpp {name}")
    figures["bytes_per_step"] = gguf_bytes_per_step(gguf_file)
    figures["percent_of_floor"] = 100 * figures["decode_tokens_per_s"] * figures["bytes_per_step"] / floor_bandwidth
    print(
        f"llama.cpp {name}: load {figures['load_s']:.0f} s, peak RSS {figures['peak_rss_build_and_generate'] / 1e9:.2f}"
        f" GB, decode {figures['decode_tokens_per_s']:.2f} tokens/s ({figures['percent_of_floor']:.0f}% of floor)",
        flush=True,
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="where the random checkpoint is written (kept for reruns)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--schemes", default="int4,int8,q4_0,q8_0", help="our schemes, comma-separated")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave out llama.cpp even when installed")
    parser.add_argument("--json", help="write the figures to this file")
    options = parser.parse_args()
    folder = write_random_7b(Path(options.workdir))
    torch.set_num_threads(options.threads)
    floor_bandwidth = bandwidth()["sum"]
    results = {"threads": options.threads, "streaming_read_gb_per_s": floor_bandwidth / 1e9, "schemes": {}}
    for scheme in options.schemes.split(","):
        results["schemes"][scheme] = ours(folder, scheme, options, floor_bandwidth)
    if not options.no_llama_cpp and llama_cpp_installed():
        files = llama_cpp_files(folder, folder / "tokenizer.model", folder, options.threads, source="bf16")
        for name in ("q8_0", "q4_0"):
            results["schemes"][f"llama.cpp {name}"] = theirs(files[name], name, options, floor_bandwidth)
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as error:  # a probe failed: its own errors say why
        raise SystemExit(f"error: {error}") from None
