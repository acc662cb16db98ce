"""The benchmarks' output: bench.py's figures as a plain-text table with notes under it, and the last step of
every benchmark command (run in a temporary folder, print the table, write --json)."""

import argparse
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

TABLE_ROWS = [
    ("prefill tokens/s", "prefill_tokens_per_s", 1),
    ("time to first token (ms)", "time_to_first_token_s", 1000),
    ("decode tokens/s, batch 1", "decode_tokens_per_s_b1", 1),
    ("decode tokens/s, batch 8", "decode_tokens_per_s_b8", 1),
    ("decode batch 1, % of floor", "decode_b1_percent_of_floor", 1),
    ("  (floor of weights read)", "decode_b1_percent_of_floor_weights_read", 1),
    ("decode batch 1, GB/s achieved", "decode_b1_achieved_gb_per_s", 1),
]


def cpu_name() -> str:
    """The CPU's model name as Linux gives it in /proc/cpuinfo, or "a CPU" where that cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "a CPU"
    names = re.findall(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return names[0] if names else "a CPU"


def speed_table(result: dict) -> list[str]:
    """The header lines and one row per figure: ours, HF's, the ratio, and ours without CUDA graphs."""
    ours, hf, speedup = result["ours"], result.get("hf", {}), result.get("speedup_ours_over_hf", {})
    eager = result.get("ours_eager")
    what = result["ckpt_dir"] or f"random {result['shape']}"
    load = result["load_average_at_start"]
    lines = [
        f"model: {what}, {result['parameters'] / 1e6:.1f}M parameters, {result['dtype']}, {result['device']}, "
        f"{result['threads']} threads, load average {'-' if load is None else f'{load:.2f}'} at the start",
        f"medians of {result['repeats']} rounds; prompt {result['prompt_len']} tokens for prefill, "
        f"{result['new_tokens']} tokens decoded after {result['decode_prompt_len']}",
        "",
        f"{'figure':<36}{'ours':>10}{'HF':>10}{'speedup':>10}" + (f"{'ours eager':>12}" if eager else ""),
    ]
    for label, key, scale in TABLE_ROWS:
        theirs = f"{hf[key] * scale:.1f}" if key in hf else "-"
        ratio = f"{speedup[key]:.2f}x" if key in speedup else ""
        line = f"{label:<36}{ours[key] * scale:>10.1f}{theirs:>10}{ratio:>10}"
        lines.append(line + (f"{eager[key] * scale:>12.1f}" if eager else ""))
    return lines


def notes(result: dict) -> list[str]:
    """The lines under the table: bandwidth and floors, load and memory, and whether the tokens agreed."""
    ours, mb = result["ours"], 1e6
    lines = [
        f"memory bandwidth (float32 matrix-vector product over {result['bandwidth_probe_bytes'] / 2**30:g} GiB): "
        f"{result['memory_bandwidth_gb_per_s']:.1f} GB/s",
        f"decode floor, batch 1: {result['decode_floor_tokens_per_s']:.1f} tokens/s reading all "
        f"{result['weight_bytes'] / mb:.0f} MB of weights per token; "
        f"{result['decode_floor_weights_read_tokens_per_s']:.1f} tokens/s for the "
        f"{result['weight_bytes_read_per_token'] / mb:.0f} MB actually read (one embedding row)",
        f"load (Llama.build, file in the page cache): {ours['load_s']:.2f} s, peak RSS "
        f"{ours['load_peak_rss_above_baseline_bytes'] / mb:.0f} MB above baseline = "
        f"{ours['load_peak_rss_over_checkpoint_bytes']:.2f}x the checkpoint "
        f"({result['checkpoint_bytes'] / mb:.0f} MB); after a first generation (every weight read): "
        f"{ours['peak_rss_after_generate_over_checkpoint_bytes']:.2f}x",
        f"peak RSS: ours alone (build, generate at batch 1) {ours['peak_rss_build_and_generate_bytes'] / mb:.0f} MB; "
        f"this process (both models, batch 8, the probe matrix on the CPU) {result['peak_rss_bytes'] / mb:.0f} MB",
    ]
    if "peak_gpu_memory_bytes" in result:
        lines.append(f"GPU: {result['gpu']}; peak GPU memory: {result['peak_gpu_memory_bytes'] / mb:.0f} MB")
    if "ours_eager" in result:
        lines.append(
            "ours eager: the same model decoding without CUDA graphs; the graphs' decode speed-up: "
            + ", ".join(f"{ratio:.2f}x ({key})" for key, ratio in result["speedup_cuda_graphs_over_eager"].items())
            + f"; same greedy tokens as eager: {'yes' if result['cuda_graphs_tokens_agree_with_eager'] else 'NO'}"
        )
    if "greedy_tokens_agree" in result:
        prefix = result["greedy_tokens_common_prefix"]
        differing = [
            f"{job} (after {prefix[job]} equal tokens)"
            for job, same in result["greedy_tokens_agree"].items()
            if not same
        ]
        verdict = f"NO, they differ in {', '.join(differing)}" if differing else "yes, in every run"
        lines.append(f"same greedy tokens as HF ({result['hf_attention']} attention): {verdict}")
    return lines


def format_table(result: dict) -> str:
    """bench.py's figures as plain text."""
    return "\n".join(speed_table(result) + [""] + notes(result))


def run_and_report(
    run: Callable[[argparse.Namespace, Path], dict], table: Callable[[dict], str], options: argparse.Namespace
) -> dict:
    """`run(options, workdir)` with a temporary workdir, removed after; print `table(result)`, write the result
    to the --json file if one was given, and return it."""
    with tempfile.TemporaryDirectory(prefix="llama-bench-") as workdir:
        result = run(options, Path(workdir))
    print(table(result))
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=1) + "\n")
    return result
