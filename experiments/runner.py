"""Training the arms of an experiment the same way and recording what they did.

Every arm of an experiment gets the same tokenizer and text split, the same training windows in the same order
for a given seed (the batches' generator is seeded by it, apart from the weights'), the same token budget and
learning-rate schedule (`llama.train`'s AdamW, warm-up and cosine decay, clipping), and the same validation
tokens, which training never reads. Runs go seed by seed, every arm within a seed, and the results file is
rewritten after each run, so an interrupted experiment keeps what it finished and a second call with the same
settings carries on from there.
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from experiments.report import summarised
from experiments.variants import trainable_parameters
from llama.args import ModelArgs
from llama.data import TrainingData
from llama.model import Transformer
from llama.train import TrainConfig, evaluate, learning_rate_at, make_optimizer, sample_batch, train_step

REPO_ROOT = Path(__file__).resolve().parent.parent

Log = Callable[[str], None]


def print_line(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class Arm:
    """One way of building the model: `build(args)` runs under the run's seed, so arms that share an
    architecture start from the same weights."""

    name: str
    description: str
    build: Callable[[ModelArgs], Transformer]


def no_measure(model: Transformer, data: TrainingData, config: TrainConfig) -> dict:
    return {}


@dataclass(frozen=True)
class Experiment:
    """A question and its arms, the first being Llama's own design (the baseline). `context_multiple` sizes
    the model's context as a multiple of the training window (for scoring longer windows after training);
    `measure` adds figures of its own to each trained model's results."""

    name: str
    question: str
    arms: tuple[Arm, ...]
    context_multiple: int = 1
    measure: Callable[[Transformer, TrainingData, TrainConfig], dict] = field(default=no_measure)


def build_arm(experiment: Experiment, arm: Arm, config: TrainConfig) -> Transformer:
    """The arm's fresh model for `config` (its seed draws the weights), in training mode."""
    args = dataclasses.replace(config.model_args(), max_seq_len=config.max_seq_len * experiment.context_multiple)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return arm.build(args).train()


def validation_loss(
    model: Transformer, data: TrainingData, seq_len: int, batch_size: int, windows: Optional[int] = None
) -> float:
    """Mean nats per token over the validation windows (all of them, or the first `windows`)."""
    was_training = model.training
    model.eval()
    total, count = evaluate(model, data.val_tokens, data.bos_id, seq_len, batch_size, windows)
    model.train(was_training)
    return total / count


def train_arm(model: Transformer, data: TrainingData, config: TrainConfig) -> dict:
    """Train `model` for config.steps on the training windows that config.seed draws. Returns its validation
    curve ([tokens trained on, loss] every eval_every steps, on the first eval_windows windows) and the time
    the steps took: as wall-clock time, and as this process's CPU time, which neither other programs on the
    machine nor a pause (SIGSTOP) add to."""
    optimizer = make_optimizer(model, config)
    batches = torch.Generator().manual_seed(config.seed)
    tokens_per_step = config.batch_size * config.max_seq_len
    curve = [[0, validation_loss(model, data, config.max_seq_len, config.batch_size, config.eval_windows)]]
    cpu_seconds = wall_seconds = 0.0
    for step in range(config.steps):
        lr = learning_rate_at(step, config.steps, config.warmup_steps, config.learning_rate, config.min_lr_ratio)
        inputs, targets = sample_batch(data.train_tokens, config.batch_size, config.max_seq_len, data.bos_id, batches)
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        train_step(model, optimizer, inputs, targets, lr, config.grad_clip)
        cpu_seconds += time.process_time() - cpu_started
        wall_seconds += time.perf_counter() - wall_started
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            loss = validation_loss(model, data, config.max_seq_len, config.batch_size, config.eval_windows)
            curve.append([(step + 1) * tokens_per_step, loss])
    trained = config.steps * tokens_per_step
    return {
        "curve": curve,
        "train_cpu_seconds": round(cpu_seconds, 2),
        "train_wall_seconds": round(wall_seconds, 2),
        "tokens_per_cpu_second": round(trained / cpu_seconds, 1),
        "tokens_per_wall_second": round(trained / wall_seconds, 1),
    }


def run_arm(experiment: Experiment, arm: Arm, data: TrainingData, budget: TrainConfig, seed: int) -> dict:
    """One run: the arm built and trained with `seed`, then its final figures: the validation loss over every
    validation token at the trained window length, and the experiment's own measures."""
    config = dataclasses.replace(budget, seed=seed)
    started = time.perf_counter()
    model = build_arm(experiment, arm, config)
    record = {"arm": arm.name, "seed": seed, "parameters": trainable_parameters(model)}
    record |= train_arm(model, data, config)
    model.eval()
    with torch.no_grad():
        final = {"val_loss": validation_loss(model, data, config.max_seq_len, config.batch_size)}
        final |= experiment.measure(model, data, config)
    record["final"] = final
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    return record


def run_experiment(
    experiment: Experiment,
    data: TrainingData,
    budget: TrainConfig,
    seeds: int,
    out_dir: Path,
    log: Log = print_line,
) -> dict:
    """Run every arm with seeds 0 .. seeds - 1 and write out_dir/NAME.json after each run (see `report` for
    the summary it holds). Runs already in that file with the same settings and text are kept, not repeated.
    Returns the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{experiment.name}.json"
    results = _fresh_results(experiment, data, budget)
    commit = _commit()
    kept = _previous_runs(path, results)
    if kept:
        log(f"{experiment.name}: keeping {len(kept)} finished runs from {path}")
    results["runs"] = kept
    for seed in range(seeds):
        for arm in experiment.arms:
            if any(run["arm"] == arm.name and run["seed"] == seed for run in kept):
                continue
            run = run_arm(experiment, arm, data, budget, seed) | {"commit": commit}
            results["runs"].append(run)
            log(
                f"{experiment.name} | {arm.name} | seed {seed}: validation loss {run['final']['val_loss']:.4f} "
                f"nats/token, {run['parameters']:,} parameters, {run['tokens_per_cpu_second']:,.0f} tokens per "
                f"CPU second, {run['wall_seconds']:,.0f} s"
            )
            _write_json(path, summarised(experiment, results))
    results = summarised(experiment, results)
    _write_json(path, results)
    return results


def _fresh_results(experiment: Experiment, data: TrainingData, budget: TrainConfig) -> dict:
    return {
        "experiment": experiment.name,
        "question": experiment.question,
        "arms": {arm.name: arm.description for arm in experiment.arms},
        "settings": dataclasses.asdict(budget),
        "context_multiple": experiment.context_multiple,
        "text_sha256": hashlib.sha256(data.text.encode("utf-8")).hexdigest(),
        "train_tokens": len(data.train_tokens),
        "val_tokens": len(data.val_tokens),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _previous_runs(path: Path, fresh: dict) -> list:
    """The runs of an earlier results file made with the same settings, text and arms, each with the commit it
    was made at; none otherwise."""
    try:
        previous = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    same = all(previous.get(key) == fresh[key] for key in ("settings", "context_multiple", "text_sha256", "arms"))
    # Files written before runs recorded their own commit named one for all of them.
    return [{"commit": previous.get("commit")} | run for run in previous.get("runs", [])] if same else []


def _write_json(path: Path, results: dict) -> None:
    # Written beside and renamed: a reader (or a run stopped mid-write) never sees half a file.
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(partial, path)


def _commit() -> Optional[str]:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
