"""The benchmark (benchmarks/bench.py) runs end to end on a tiny random model, writes every figure to JSON, and
finds that this library and Hugging Face transformers produce the same greedy tokens (equal work). Timings are
not checked: they depend on the machine.

The benchmark commands run in this process (a new one would spend seconds importing torch again, more than the
tiny run itself); the probes whose point is a fresh process (load time and peak memory) still get one each."""

import importlib.util
import json
import sys

import pytest
import torch

from helpers import REPO_ROOT
from llama.block_quant import kernel_for

pytest.importorskip("transformers")

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import bench  # noqa: E402
import decode_side_by_side  # noqa: E402
import step_profile  # noqa: E402

EXPECTED_FIGURES = {
    "prefill_tokens_per_s",
    "time_to_first_token_s",
    "decode_tokens_per_s_b1",
    "decode_tokens_per_s_b8",
    "decode_b1_percent_of_floor",
    "decode_b1_achieved_gb_per_s",
}


def test_benchmark_smoke_run_writes_all_figures_and_both_libraries_agree_on_greedy_tokens(tmp_path, capsys):
    output = tmp_path / "figures.json"
    arguments = ["--shape", "tiny", "--repeats", "1", "--new_tokens", "4", "--prompt_len", "16", "--threads", "1"]
    bench.main([*arguments, "--json", str(output)])
    stdout = capsys.readouterr().out
    assert "same greedy tokens as HF" in stdout, stdout
    figures = json.loads(output.read_text())
    assert EXPECTED_FIGURES <= set(figures["ours"]) and EXPECTED_FIGURES <= set(figures["hf"])
    assert {"load_s", "load_peak_rss_above_baseline_bytes", "peak_rss_build_and_generate_bytes"} <= set(figures["ours"])
    for key in ("memory_bandwidth_gb_per_s", "decode_floor_tokens_per_s", "peak_rss_bytes", "speedup_ours_over_hf"):
        assert key in figures, key
    assert figures["greedy_tokens_agree"] and all(figures["greedy_tokens_agree"].values()), figures[
        "greedy_tokens_agree"
    ]


def test_side_by_side_decoding_benchmark_runs_every_arm_with_the_kernels(tmp_path):
    """benchmarks/decode_side_by_side.py: float32, bfloat16, int8, int4, q8_0 and q4_0 of this library and HF's
    float32 and bfloat16 on one random model (and llama.cpp's f32, q8_0 and q4_0 where llama-cpp-python is
    installed); int8 and int4 use PyTorch's kernels, q8_0 and q4_0 this machine's block kernel, and this
    library's float32 decodes Hugging Face's float32 tokens (and llama.cpp's)."""
    output = tmp_path / "side.json"
    arguments = ["--shape", "tiny", "--repeats", "1", "--new_tokens", "4", "--threads", "1", "--json", str(output),
                 "--peak_arms", "int4,llama.cpp q4_0", "--profile_steps", "2"]  # fmt: skip
    decode_side_by_side.main(arguments)
    arms = json.loads(output.read_text())["arms"]
    expected = {"float32", "bfloat16", "int8", "int4", "q8_0", "q4_0", "hf float32", "hf bfloat16"}
    if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf"):
        expected |= {"llama.cpp f32", "llama.cpp q8_0", "llama.cpp q4_0"}
        assert arms["llama.cpp f32"]["greedy_tokens"] == arms["float32"]["greedy_tokens"]
    assert set(arms) == expected
    assert arms["int8"]["kernels"] == ["int8"] and arms["int4"]["kernels"] == ["int4-cpu"]
    assert arms["q8_0"]["kernels"] == arms["q4_0"]["kernels"] == [kernel_for(torch.device("cpu"))]
    assert arms["float32"]["greedy_tokens"] == arms["hf float32"]["greedy_tokens"]
    assert arms["hf float32"]["tokens_as_float32"] == 4
    # The memory of the arms asked for, each measured in a process of its own.
    peaks = {name for name, figures in arms.items() if figures.get("peak_rss_above_start", 0) > 0}
    assert peaks == {"int4", "llama.cpp q4_0"} & expected
    for figures in arms.values():
        assert {"decode_tokens_per_s", "ratio", "bytes_per_step", "percent_of_floor"} <= set(figures)
    assert arms["int4"]["bytes_per_step"] < arms["int8"]["bytes_per_step"] < arms["bfloat16"]["bytes_per_step"]


def test_step_profile_splits_each_step_into_its_parts(capsys):
    """benchmarks/step_profile.py on a tiny random model: one row per arm, the parts no larger than the step."""
    step_profile.main(["--shape", "tiny", "--threads", "1", "--rounds", "1", "--steps", "2", "--no_compile",
                       "--arms", "float32,int8"])  # fmt: skip
    stdout = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| float32") or
            line.startswith("| int8")]  # fmt: skip
    assert [row[0].strip() for row in rows] == ["float32", "int8"]
    for row in rows:
        step, *parts = map(float, row[2:])
        assert step > 0 and all(part >= 0 for part in parts)
