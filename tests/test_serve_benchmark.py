"""benchmarks/serve_load.py runs end to end on a tiny random model: every mode's figures, the same tokens served
as generated one after another (greedy), and the table. No figure is checked against a speed."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import serve_load  # noqa: E402

FIGURES = {"requests", "tokens", "seconds", "tokens_per_s", "latency_p50", "latency_p95", "first_token_p50",
           "first_token_p95"}  # fmt: skip


def test_serve_load_benchmark_measures_every_concurrency_against_the_sequential_run(tmp_path, capsys):
    output = tmp_path / "figures.json"
    serve_load.main(["--shape", "tiny", "--concurrency", "1,2", "--requests", "3", "--max-tokens", "3",
                     "--threads", "1", "--max-seq-len", "64", "--json", str(output)])  # fmt: skip
    figures = json.loads(output.read_text())
    assert set(figures["sequential"]) == FIGURES and set(figures["served"]) == {"1", "2"}
    for level, served in figures["served"].items():
        assert set(served) == FIGURES and served["requests"] == 3, level
        assert served["tokens"] == figures["sequential"]["tokens"], "greedy requests get the same tokens served"
        assert served["first_token_p50"] is not None and served["first_token_p50"] <= served["latency_p95"]
    table = capsys.readouterr().out
    assert "one after another (library)" in table and table.count("| llama serve | ") == 2, table
    assert "logical cores; load average" in table
