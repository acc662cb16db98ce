"""The benchmark (benchmarks/bench.py) runs end to end on a tiny random model, writes every figure to JSON, and
finds that this library and Hugging Face transformers produce the same greedy tokens (equal work). Timings are
not checked: they depend on the machine.

The benchmark commands run in this process (a new one would spend seconds importing torch again, more than the
tiny run itself); the probes whose point is a fresh process (load time and peak memory) still get one each, and
so does each arm of the side-by-side benchmark, whose point is that a crashing arm takes only itself down (those
tests choose few arms: each worker imports torch)."""

import importlib.util
import json
import signal
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
from workers import Worker  # noqa: E402

LLAMA_CPP = bool(importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf"))
SIDE_BY_SIDE_TINY = ["--shape", "tiny", "--repeats", "1", "--new_tokens", "4", "--threads", "1", "--profile_steps", "2"]
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


def test_side_by_side_benchmark_runs_each_arm_in_a_process_of_its_own_with_its_kernel(tmp_path):
    """benchmarks/decode_side_by_side.py, each arm in a worker process of its own: our float32 and q8_0 and HF's
    float32 on one random model (and llama.cpp's q8_0 where llama-cpp-python is installed); q8_0 uses this
    machine's block kernel, and this library's float32 decodes Hugging Face's float32 tokens. Every arm reports
    decode and prefill speed, and its own peak memory. Few arms: each worker imports torch."""
    output = tmp_path / "side.json"
    arms = "float32,q8_0,hf float32" + (",llama.cpp q8_0" if LLAMA_CPP else "")
    decode_side_by_side.main(SIDE_BY_SIDE_TINY + ["--arms", arms, "--json", str(output)])
    result = json.loads(output.read_text())
    figures = result["arms"]
    assert list(figures) == arms.split(",")
    assert figures["q8_0"]["kernels"] == [kernel_for(torch.device("cpu"))]
    assert figures["float32"]["greedy_tokens"] == figures["hf float32"]["greedy_tokens"]
    assert figures["hf float32"]["tokens_as_float32"] == 4
    for name, arm in figures.items():
        assert {"decode_tokens_per_s", "prefill_tokens_per_s", "ratio", "percent_of_floor"} <= set(arm), name
        assert arm["peak_rss_above_start"] > 0, name
    assert figures["q8_0"]["bytes_per_step"] < figures["float32"]["bytes_per_step"] / 3
    assert {"torch", "transformers"} <= set(result["versions"]) and result["cpu"]["name"]
    if LLAMA_CPP:
        assert {"llama_cpp_python", "llama_cpp_system_info"} <= set(result["versions"])


def test_side_by_side_benchmark_writes_its_table_and_json_when_an_arm_dies_of_a_segfault(tmp_path, monkeypatch, capsys):
    """A peer whose process dies of SIGSEGV at its first timed run (tests/segfault_worker.py, added beside the
    benchmark's own arms) leaves the rotation: its row says SIGSEGV, its JSON entry has `crashed` and no decode
    figure, and the other arm's figures are all there."""
    commands = decode_side_by_side.worker_commands

    def with_a_crashing_peer(*arguments):
        return {**commands(*arguments), "segfaulting peer": [str(REPO_ROOT / "tests" / "segfault_worker.py")]}

    monkeypatch.setattr(decode_side_by_side, "worker_commands", with_a_crashing_peer)
    output = tmp_path / "side.json"
    decode_side_by_side.main(SIDE_BY_SIDE_TINY + ["--arms", "float32", "--json", str(output)])
    stdout = capsys.readouterr().out
    assert "| segfaulting peer | crashed: SIGSEGV |" in stdout, stdout
    assert "segfaulting peer crashed (SIGSEGV); its last words: about to crash" in stdout, stdout
    figures = json.loads(output.read_text())["arms"]
    assert figures["segfaulting peer"]["crashed"] == "SIGSEGV"
    assert "decode_tokens_per_s" not in figures["segfaulting peer"]
    assert figures["float32"]["decode_tokens_per_s"] > 0 and figures["float32"]["prefill_tokens_per_s"] > 0
    assert "| float32 |" in stdout


def test_side_by_side_benchmark_refuses_an_arm_it_does_not_have_in_one_line(capsys):
    with pytest.raises(SystemExit):
        decode_side_by_side.main(["--shape", "tiny", "--no_llama_cpp", "--arms", "float32,int3"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--arms names 'int3', not an arm of this run; choose among: float32, bfloat16" in error, error


def test_a_worker_that_sends_nothing_within_its_timeout_is_killed_and_reported(tmp_path):
    worker = Worker(["-c", "import time; time.sleep(60)"], tmp_path / "log", timeout=0.5)
    assert worker.ready is None and worker.crashed == "timed out after 0.5 s (killed)"
    assert worker.process.returncode == -signal.SIGKILL
    assert worker.ask({"prompt": [1], "new_tokens": 1}) is None
    worker.close()


def test_a_worker_that_raises_is_reported_with_its_exit_status_and_last_words(tmp_path):
    script = "import json; print(json.dumps({'ready': True}), flush=True); input(); raise ValueError('no such arm')"
    worker = Worker(["-c", script], tmp_path / "log", timeout=30)
    assert worker.ready == {"ready": True}
    assert worker.ask({"prompt": [1], "new_tokens": 1}) is None
    assert worker.crashed == "exit status 1"
    assert worker.stderr_tail()[-1] == "ValueError: no such arm"
    worker.close()


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
