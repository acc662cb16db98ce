"""The command line: which experiments, which budget, how many seeds, where the results go."""

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from experiments import budgets
from experiments.questions import EXPERIMENTS
from experiments.report import SPREAD_RULE, markdown_table, plot
from experiments.runner import REPO_ROOT, print_line, run_experiment
from llama.data import prepare_data, read_text

DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_OUT = REPO_ROOT / "experiments" / "results"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Train small models with and without a design choice of Llama's, several seeds each, and write "
        "each run's validation curve and final figures (NAME.json), a plot (NAME.png) and a summary table. Several "
        "experiments run one after another.",
    )
    commands.add_argument(
        "names", nargs="+", metavar="NAME", choices=[*EXPERIMENTS, "all"], help=f"{', '.join(EXPERIMENTS)}, or all"
    )
    commands.add_argument("--quick", action="store_true", help="tiny models for a few steps: checks the machinery only")
    commands.add_argument("--seeds", type=positive_int, default=3, help="seeds per arm (default 3)")
    commands.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    commands.add_argument("--text", type=Path, default=DEFAULT_TEXT, help=f"training text (default {DEFAULT_TEXT})")
    commands.add_argument(
        "--threads", type=positive_int, default=1, help="CPU threads (default 1: on shared cores more are slower)"
    )
    return commands


def main(argv: Optional[list] = None) -> int:
    """Run the experiments the command line names; returns the exit status (2 for a bad text file)."""
    options = parser().parse_args(argv)
    torch.set_num_threads(options.threads)
    budget = budgets.QUICK if options.quick else budgets.FULL
    try:
        text = read_text(options.text)
        started = time.perf_counter()
        data = prepare_data(text, budget.val_fraction, budget.vocab_size, budget.max_seq_len)
        if options.quick:
            data = data._replace(val_tokens=data.val_tokens[: budgets.QUICK_VALIDATION_TOKENS])
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_line(
        f"text {options.text}: {len(data.train_tokens):,} tokens to train on, {len(data.val_tokens):,} to validate "
        f"on, tokenizer of {budget.vocab_size} pieces ({time.perf_counter() - started:.0f} s)"
    )
    names = list(EXPERIMENTS) if "all" in options.names else list(dict.fromkeys(options.names))
    for name in names:
        started = time.perf_counter()
        results = run_experiment(EXPERIMENTS[name], data, budget, options.seeds, options.out)
        picture = plot(results, options.out / f"{name}.png")
        print_line(f"\n{name}: {results['question']}\n\n{markdown_table(results)}")
        print_line(f"A difference counts when {SPREAD_RULE}.")
        print_line(
            f"Wrote {options.out / (name + '.json')}"
            + (f" and {picture}" if picture else " (no plot: matplotlib is not installed, see the experiments extra)")
            + f" in {time.perf_counter() - started:,.0f} s.\n"
        )
    return 0
