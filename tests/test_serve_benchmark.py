"""benchmarks/serve_load.py runs end to end on a tiny random model: every mode's figures, the same tokens served
as generated one after another (greedy), llama-server's arm (through a stand-in for the binary,
tests/fake_llama_server.py) with only its complete answers counted, and the table. No figure is checked against
a speed."""

import json
import sys
from pathlib import Path

from helpers import REPO_ROOT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import serve_load  # noqa: E402

FIGURES = {"requests", "incomplete", "tokens", "seconds", "tokens_per_s", "latency_p50", "latency_p95",
           "first_token_p50", "first_token_p95"}  # fmt: skip


def test_serve_load_benchmark_measures_every_concurrency_against_the_sequential_run(tmp_path, capsys):
    output, binary = tmp_path / "figures.json", tmp_path / "llama-server"
    binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO_ROOT / "tests" / "fake_llama_server.py"}" "$@"\n')
    binary.chmod(0o755)
    serve_load.main(["--shape", "tiny", "--concurrency", "1,2", "--requests", "3", "--max-tokens", "3",
                     "--threads", "1", "--max-seq-len", "64", "--json", str(output),
                     "--llama-server", str(binary)])  # fmt: skip
    figures = json.loads(output.read_text())
    sequential = figures["sequential"]["f32"]
    assert set(figures["sequential"]) == {"f32"} and set(sequential) == FIGURES
    assert figures["formats"] == {"llama serve f32": "f32", "llama-server f32": "f32"}
    for level, at_level in figures["served"]["llama serve f32"].items():
        assert set(at_level) == FIGURES and at_level["requests"] == 3 and at_level["incomplete"] == 0, level
        assert at_level["tokens"] == sequential["tokens"], "greedy requests get the same tokens served"
        assert at_level["first_token_p50"] is not None and at_level["first_token_p50"] <= at_level["latency_p95"]
    # The stand-in answers the prompt of 24 tokens (the second of three) with a token too few: not counted. It
    # closes the connection of the third without a word the first time: sent again, that one counts.
    for level, at_level in figures["served"]["llama-server f32"].items():
        assert (at_level["requests"], at_level["incomplete"], at_level["tokens"]) == (2, 1, 6), level
    table = capsys.readouterr().out
    assert "one after another (library) f32" in table and table.count("| llama serve f32 | ") == 2, table
    assert table.count("| llama-server f32 | ") == 2 and "| 2 (1 incomplete) |" in table, table
    assert "logical cores; load average" in table


def test_serve_load_counts_only_the_answers_that_completed():
    records = [{"latency": 1.0, "first_token": 0.5, "tokens": 4, "complete": True},
               {"latency": 9.0, "first_token": 0.5, "tokens": 2, "complete": False}]  # fmt: skip
    figures = serve_load.summary(records, 2.0)
    assert (figures["requests"], figures["incomplete"], figures["tokens"], figures["tokens_per_s"]) == (1, 1, 4, 2.0)
