"""Benchmark this library against Hugging Face transformers' LlamaForCausalLM on the same weights, in one
process run, and against this machine's memory bandwidth.

    python benchmarks/bench.py --shape 110m --dtype float32
    python benchmarks/bench.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model --dtype bfloat16

What it measures (medians over --repeats after --warmup rounds; within a round ours and HF's run back to back,
in alternating order, so that a load change on the machine affects both alike and the ratios stay meaningful):

- time to first token: `generate` with one new token on a --prompt_len prompt at batch 1 (prefill plus one
  greedy choice, through each library's generation API); prefill tokens/s is prompt_len / that time.
- decode tokens/s at batch 1 and 8: greedy, --new_tokens new tokens after a --decode_prompt_len prompt, EOS
  ignored by both; the time of one-token generation is subtracted, so the figure is the decoding steps alone.
- the memory-bandwidth floor: a matrix-vector product over a 1 GiB float32 matrix (4 GiB on a GPU; 64 MiB for
  the smoke-test shape tiny) gives the bytes per second this machine can stream; decoding one token at batch 1
  reads every weight once, so the fastest possible decode is bandwidth / weight bytes. Ours is reported as a
  percentage of it, and as GB/s achieved.
- load: the weights written as a Meta-layout checkpoint, then `Llama.build` timed in a fresh process
  (benchmarks/load_probe.py), with the peak resident memory above the process's baseline (file already in the
  page cache: a warm load).
- that both libraries produce the same greedy tokens, so that they did the same work.

A random model of a named --shape, or a checkpoint folder (--ckpt_dir, --tokenizer_path). --json writes the
figures. --device cuda runs the same on a GPU (timings synchronised, peak GPU memory reported).

Its parts, shared with the other benchmarks: random_model.py (the random checkpoint and prompts),
padded_tokenizer.py (its tokenizer), arms.py (what is timed), timing.py (how), tables.py (the output).
"""

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arms import hf_model, implementations  # noqa: E402
from random_model import DTYPES, SHAPES, prepare_checkpoint, random_prompts  # noqa: E402
from tables import format_table, run_and_report  # noqa: E402
from timing import BandwidthProbe, probe_gib, run_probe, time_rounds  # noqa: E402

from llama import Llama  # noqa: E402

BATCH_SIZES = (1, 8)


def jobs(options: argparse.Namespace, vocab_size: int) -> list[tuple[str, list[list[int]], int]]:
    """(name, prompts, new tokens) of every timing: the first token after a long prompt, and for each batch
    size one token and all --new_tokens after a short prompt."""
    result = [("first_token", random_prompts(1, options.prompt_len, vocab_size, seed=1), 1)]
    for batch in BATCH_SIZES:
        prompts = random_prompts(batch, options.decode_prompt_len, vocab_size, seed=2)
        result += [(f"one_token_b{batch}", prompts, 1), (f"decode_b{batch}", prompts, options.new_tokens)]
    return result


def measure_load(ckpt_dir: Path, tokenizer_path: Path, options: argparse.Namespace, max_seq_len: int) -> dict:
    """Time Llama.build in a fresh process (benchmarks/load_probe.py, batch 1) and read its peak resident
    memory above the process's baseline, after the build and after a first generation. Raises RuntimeError
    with the probe's errors."""
    arguments = [str(ckpt_dir), str(tokenizer_path), "--dtype", options.dtype, "--device", options.device]
    arguments += ["--max-seq-len", str(max_seq_len), "--threads", str(options.threads)]
    arguments += ["--prompt-len", str(options.prompt_len), "--new-tokens", str(options.new_tokens)]
    return run_probe([str(Path(__file__).resolve().parent / "load_probe.py"), *arguments], "the load probe")


def speed_figures(times: dict, options: argparse.Namespace, floor: float, floor_read: float, bytes_read: int) -> dict:
    """Medians turned into rates: prefill tokens/s, decode tokens/s per batch size (the one-token time
    subtracted, leaving the decoding steps), and batch-1 decoding against the bandwidth floors."""
    median = {job: statistics.median(values) for job, values in times.items()}
    figures = {
        "time_to_first_token_s": median["first_token"],
        "prefill_tokens_per_s": options.prompt_len / median["first_token"],
    }
    for batch in BATCH_SIZES:
        steps_s = median[f"decode_b{batch}"] - median[f"one_token_b{batch}"]
        figures[f"decode_tokens_per_s_b{batch}"] = batch * (options.new_tokens - 1) / steps_s
    decode = figures["decode_tokens_per_s_b1"]
    figures["decode_b1_percent_of_floor"] = 100 * decode / floor
    figures["decode_b1_percent_of_floor_weights_read"] = 100 * decode / floor_read
    figures["decode_b1_achieved_gb_per_s"] = decode * bytes_read / 1e9
    return figures


def check_same_work(tokens: dict, work: list) -> None:
    """RuntimeError unless every implementation produced every token asked of it."""
    for name, outputs in tokens.items():
        for job, prompts, new_tokens in work:
            out = outputs[job]
            if len(out) != len(prompts) or any(len(row) != new_tokens for row in out):
                raise RuntimeError(f"{name}, {job}: a sequence stopped early, so the work was not the same")


def load_figures(load: dict, checkpoint_bytes: int) -> dict:
    return dict(
        load_s=load["load_s"],
        load_peak_rss_above_baseline_bytes=load["load_peak_rss_above_baseline"],
        load_peak_rss_over_checkpoint_bytes=load["load_peak_rss_above_baseline"] / checkpoint_bytes,
        peak_rss_build_and_generate_bytes=load["peak_rss_build_and_generate"],
        # Weights mapped from the file are read on first use: this is the load's cost once they all were.
        peak_rss_after_generate_over_checkpoint_bytes=load["peak_rss_build_and_generate_above_baseline"]
        / checkpoint_bytes,
    )


def comparisons(figures: dict, tokens: dict) -> dict:
    """Ratios between the implementations timed, and whether they produced the same greedy tokens."""
    result = {}
    if "ours_eager" in figures:
        keys = ("decode_tokens_per_s_b1", "decode_tokens_per_s_b8")
        result["speedup_cuda_graphs_over_eager"] = {
            key: figures["ours"][key] / figures["ours_eager"][key] for key in keys
        }
        result["cuda_graphs_tokens_agree_with_eager"] = all(
            tokens["ours"][job] == tokens["ours_eager"][job] for job in tokens["ours"]
        )
    if "hf" in figures:
        # Speed ratios: above 1, ours is faster (for a time, theirs / ours).
        keys = ("prefill_tokens_per_s", "time_to_first_token_s", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8")
        result["speedup_ours_over_hf"] = {
            key: figures["ours"][key] / figures["hf"][key]
            if "per_s" in key
            else figures["hf"][key] / figures["ours"][key]
            for key in keys
        }
        result["greedy_tokens_agree"] = {job: tokens["ours"][job] == tokens["hf"][job] for job in tokens["ours"]}
        # Where they differ (half precision rounds differently in the two), how far they went together.
        result["greedy_tokens_common_prefix"] = {
            job: min(_common_prefix(a, b) for a, b in zip(tokens["ours"][job], tokens["hf"][job]))
            for job in tokens["ours"]
        }
    return result


def _common_prefix(first: list[int], second: list[int]) -> int:
    length = 0
    while length < min(len(first), len(second)) and first[length] == second[length]:
        length += 1
    return length


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(options: argparse.Namespace, workdir: Path) -> dict:
    """Run every measurement (temporary files in `workdir`) and return the figures as a JSON-ready dict."""
    # The machine's load before this run adds its own: other work on the cores makes every figure noisier.
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    torch.set_num_threads(options.threads)
    max_seq_len = max(options.prompt_len, options.decode_prompt_len) + options.new_tokens
    ckpt_dir, tokenizer_path = prepare_checkpoint(options, workdir)
    checkpoint_bytes = sum(path.stat().st_size for path in ckpt_dir.glob("consolidated.*.pth"))
    load = measure_load(ckpt_dir, tokenizer_path, options, max_seq_len)

    ours = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max(BATCH_SIZES), device=device, dtype=dtype)
    args = ours.model.params
    weights = sum(p.numel() * p.element_size() for p in ours.model.parameters())
    # A decoding step reads one row of the embedding table, not all of it: the stricter floor counts that.
    embedding = ours.model.tok_embeddings.weight
    weights_read = weights - embedding.numel() * embedding.element_size() + args.dim * embedding.element_size()
    theirs = None if options.no_hf else hf_model(args, ours.model.state_dict(), dtype, device)
    generators = implementations(ours, theirs, device)
    work = jobs(options, args.vocab_size)
    probe = BandwidthProbe(device, probe_gib(None if options.ckpt_dir else options.shape, device))
    times, tokens = time_rounds(generators, work, options.warmup, options.repeats, device, probe)
    check_same_work(tokens, work)
    bytes_per_s, probe_bytes = probe.median(), probe.matrix.numel() * probe.matrix.element_size()
    del probe  # up to 4 GiB
    floor, floor_read = bytes_per_s / weights, bytes_per_s / weights_read
    figures = {name: speed_figures(times[name], options, floor, floor_read, weights_read) for name in generators}
    figures["ours"].update(load_figures(load, checkpoint_bytes))
    result = {
        "shape": None if options.ckpt_dir else options.shape,
        "ckpt_dir": options.ckpt_dir,
        "dtype": options.dtype,
        "device": str(device),
        "threads": options.threads,
        "load_average_at_start": load_average,
        "repeats": options.repeats,
        "prompt_len": options.prompt_len,
        "decode_prompt_len": options.decode_prompt_len,
        "new_tokens": options.new_tokens,
        "parameters": sum(p.numel() for p in ours.model.parameters()),
        "weight_bytes": weights,
        "checkpoint_bytes": checkpoint_bytes,
        "memory_bandwidth_gb_per_s": bytes_per_s / 1e9,
        "bandwidth_probe_bytes": probe_bytes,
        "weight_bytes_read_per_token": weights_read,
        "decode_floor_tokens_per_s": floor,
        "decode_floor_weights_read_tokens_per_s": floor_read,
        **figures,
        "peak_rss_bytes": _peak_rss(),
        **comparisons(figures, tokens),
    }
    if device.type == "cuda":
        result.update(
            peak_gpu_memory_bytes=torch.cuda.max_memory_allocated(device), gpu=torch.cuda.get_device_name(device)
        )
    if theirs is not None:
        result["hf_attention"] = theirs.config._attn_implementation
    return result


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line; exits with a usage message for bad arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="110m", help="a random model of this shape")
    parser.add_argument("--ckpt_dir", help="a Meta-layout checkpoint folder instead of a random model")
    parser.add_argument("--tokenizer_path", help="its tokenizer.model (with --ckpt_dir)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both libraries")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--prompt_len", type=int, default=512, help="prompt tokens for prefill / first token")
    parser.add_argument("--decode_prompt_len", type=int, default=16, help="prompt tokens before decoding")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens decoded per sequence")
    parser.add_argument("--no_hf", action="store_true", help="measure only this library")
    parser.add_argument("--json", help="write the figures to this file")
    options = parser.parse_args(argv)
    if (options.ckpt_dir is None) != (options.tokenizer_path is None):
        parser.error("--ckpt_dir and --tokenizer_path go together")
    return options


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark with command-line arguments `argv`; print the table, write --json, return the figures."""
    return run_and_report(run, format_table, parse_args(argv))


if __name__ == "__main__":
    main()
