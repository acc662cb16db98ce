"""Train a small Llama-2-style model on a text file and write it in Meta's checkpoint layout.

    python -m llama train --text-path input.txt --out-dir my-model

The end of the text (`val_fraction`, cut at a line break) is held out for validation. A SentencePiece
tokenizer (BPE, byte fallback, Llama's special ids) is trained on the rest, then this library's Transformer
learns next-token prediction on random windows of it: AdamW, linear warm-up then cosine decay, gradient
clipping, a fixed seed. The folder written (`params.json`, `consolidated.00.pth`, `tokenizer.model`, and
`metrics.json` with the validation loss next to a unigram baseline) loads with `Llama.build` unchanged.

Each phase is a function of its own (`prepare_data` in llama.data, `build_model`, `make_optimizer`,
`train_steps`, `final_metrics`, `write_checkpoint`), for experiments that change one of them.
"""

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from llama.args import ModelArgs
from llama.atomic import staged_folder
from llama.data import TrainingData, prepare_data, read_text
from llama.distributed import resolve_dtype, setup_model_parallel
from llama.layout import TOKENIZER_FILE, write_params
from llama.model import Transformer
from llama.shards import save_shard


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the model a training run makes (recorded in metrics.json); the defaults are the
    bundled demo model's. Raises ValueError for a value out of range."""

    vocab_size: int = _setting(2000, "pieces in the tokenizer trained on the text")
    dim: int = _setting(192, "model width")
    n_layers: int = _setting(6, "transformer blocks")
    n_heads: int = _setting(8, "query heads")
    n_kv_heads: int = _setting(4, "key/value heads (grouped-query attention when fewer than the query heads)")
    multiple_of: int = _setting(64, "the feed-forward width is rounded up to a multiple of this")
    max_seq_len: int = _setting(256, "tokens per training window: the context the model learns")
    batch_size: int = _setting(8, "windows per step")
    steps: int = _setting(1200, "optimizer steps")
    learning_rate: float = _setting(2e-3, "peak learning rate")
    min_lr_ratio: float = _setting(0.1, "the cosine decay ends at learning_rate times this")
    warmup_steps: int = _setting(100, "steps of linear warm-up")
    weight_decay: float = _setting(0.1, "AdamW weight decay of the matrices (never of the norm weights)")
    grad_clip: float = _setting(1.0, "largest global gradient norm")
    val_fraction: float = _setting(0.1, "share of the text, at its end, held out for validation")
    eval_every: int = _setting(200, "steps between validation losses")
    eval_windows: int = _setting(32, "validation windows scored during training (the final loss scores all)")
    log_every: int = _setting(10, "steps between lines of training loss and speed")
    seed: int = _setting(1337, "seed of the initial weights and of the windows drawn")
    dtype: str = _setting("bfloat16", "dtype of the weights written: bfloat16, float16 or float32")

    def __post_init__(self):
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            minimum = 0 if item.name in ("warmup_steps", "seed") else 1
            if item.type is int and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                what = "a positive whole number" if minimum else "a whole number >= 0"
                raise ValueError(f"{item.name} must be {what}, got {value!r}")
        for name in ("learning_rate", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name, low, high in (("val_fraction", 0.0, 0.5), ("min_lr_ratio", 0.0, 1.0), ("weight_decay", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be a number from {low} to {high}, got {value!r}")
        if self.val_fraction == 0:
            raise ValueError("val_fraction must be above 0: the validation loss needs held-out text")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be from 0 to steps - 1 = {self.steps - 1}, got {self.warmup_steps}")
        resolve_dtype(self.dtype, torch.device("cpu"))
        self.model_args().validate()

    def model_args(self) -> ModelArgs:
        """The architecture, with a cache for one batch of training windows."""
        return ModelArgs(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            vocab_size=self.vocab_size,
            multiple_of=self.multiple_of,
            max_batch_size=self.batch_size,
            max_seq_len=self.max_seq_len,
        )


def build_model(config: TrainConfig, device: torch.device) -> Transformer:
    """A fresh model, its initial weights drawn from `config.seed` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return Transformer(config.model_args()).to(device)


def make_optimizer(model: Transformer, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW. Weight decay pulls matrices towards small norms; the norms' weights are scales, where it would
    only hurt, so they have none."""
    matrices = [param for param in model.parameters() if param.dim() >= 2]
    gains = [param for param in model.parameters() if param.dim() < 2]
    return torch.optim.AdamW(
        [{"params": matrices, "weight_decay": config.weight_decay}, {"params": gains, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )


def learning_rate_at(step: int, steps: int, warmup_steps: int, learning_rate: float, min_lr_ratio: float) -> float:
    """Linear warm-up from learning_rate / warmup_steps to learning_rate over the first warmup_steps steps
    (0-based `step`), then cosine decay to learning_rate * min_lr_ratio at the last step."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - 1 - warmup_steps)
    return learning_rate * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(
    tokens: torch.Tensor, batch_size: int, seq_len: int, bos_id: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `seq_len` tokens: inputs (batch, seq_len) are BOS and the window but its last
    token, targets are the window. Every row starts with BOS because every prompt does."""
    starts = torch.randint(0, len(tokens) - seq_len + 1, (batch_size,), generator=generator)
    targets = torch.stack([tokens[start : start + seq_len] for start in starts.tolist()])
    inputs = torch.cat([torch.full((batch_size, 1), bos_id), targets[:, :-1]], dim=1)
    return inputs, targets


@torch.no_grad()
def evaluate(
    model: Transformer,
    tokens: torch.Tensor,
    bos_id: int,
    seq_len: int,
    batch_size: int,
    max_windows: Optional[int] = None,
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of `tokens` and how many were scored. The tokens are cut into
    consecutive windows of seq_len, each read after BOS, so every token is predicted exactly once (the
    first `max_windows` windows only, when given)."""
    windows = list(torch.split(tokens, seq_len))[:max_windows]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        # A shorter last window is padded at its end: the causal mask keeps padding out of earlier positions,
        # and its targets (-1) are not scored.
        targets = torch.full((len(chunk), seq_len), -1, dtype=torch.long)
        for row, window in enumerate(chunk):
            targets[row, : len(window)] = window
        inputs = torch.cat([torch.full((len(chunk), 1), bos_id), targets[:, :-1].clamp(min=0)], dim=1)
        logits = model(inputs.to(device), use_cache=False)
        total += F.cross_entropy(
            logits.flatten(0, 1), targets.to(device).flatten(), ignore_index=-1, reduction="sum"
        ).item()
        count += int((targets >= 0).sum())
    return total, count


def unigram_nll(train_tokens: torch.Tensor, val_tokens: torch.Tensor, vocab_size: int) -> float:
    """Total negative log-likelihood (nats) of `val_tokens` under the unigram distribution of `train_tokens`
    with add-one smoothing: the baseline a model has to beat by using context at all."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1
    log_probs = counts.log() - counts.sum().log()
    return -log_probs[val_tokens].sum().item()


def train_step(
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    lr: float,
    grad_clip: float,
) -> float:
    """One optimizer step at learning rate `lr` on a batch of inputs and targets (batch, seq_len) on the model's
    device; returns the batch's mean cross-entropy (nats per token) before the step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(inputs, use_cache=False)  # (batch, seq_len, vocab)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Clipping the global norm keeps one unlucky batch from undoing what warm-up protected.
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def train_steps(
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    data: TrainingData,
    config: TrainConfig,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> list[tuple[int, float]]:
    """Run the training loop; returns the validation losses as (step, nats per token), the first before any
    step. Logs the training loss and tokens/s every log_every steps and the validation loss every eval_every."""
    device = next(model.parameters()).device
    batches = torch.Generator().manual_seed(config.seed)

    def validation_loss() -> float:
        model.eval()
        total, count = evaluate(
            model, data.val_tokens, data.bos_id, config.max_seq_len, config.batch_size, config.eval_windows
        )
        model.train()
        return total / count

    history = [(0, validation_loss())]
    log(f"step 0: validation loss {history[-1][1]:.4f} nats/token")
    started = last_log = time.perf_counter()
    recent_losses = []
    for step in range(config.steps):
        lr = learning_rate_at(step, config.steps, config.warmup_steps, config.learning_rate, config.min_lr_ratio)
        inputs, targets = sample_batch(data.train_tokens, config.batch_size, config.max_seq_len, data.bos_id, batches)
        recent_losses.append(train_step(model, optimizer, inputs.to(device), targets.to(device), lr, config.grad_clip))
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            now = time.perf_counter()
            tokens_per_second = len(recent_losses) * config.batch_size * config.max_seq_len / (now - last_log)
            log(
                f"step {done}/{config.steps} | loss {sum(recent_losses) / len(recent_losses):.4f} | lr {lr:.2e} | "
                f"{tokens_per_second:,.0f} tokens/s | {now - started:,.0f} s"
            )
            recent_losses, last_log = [], now
        if done % config.eval_every == 0 or done == config.steps:
            history.append((done, validation_loss()))
            log(f"step {done}: validation loss {history[-1][1]:.4f} nats/token")
            last_log = time.perf_counter()  # evaluation time is not training throughput
    return history


def final_metrics(model: Transformer, data: TrainingData, config: TrainConfig, history: list) -> dict:
    """The validation loss of the weights as they will be stored (rounded to config.dtype: the model is
    changed in place), every validation token scored once, next to the unigram baseline; with the run's
    settings and the text's checksum, as metrics.json records them."""
    model.eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(resolve_dtype(config.dtype, param.device)))
    val_nll, val_count = evaluate(model, data.val_tokens, data.bos_id, config.max_seq_len, config.batch_size)
    baseline_nll = unigram_nll(data.train_tokens, data.val_tokens, config.vocab_size)
    return {
        "parameters": sum(param.numel() for param in model.parameters()),
        "train_tokens": len(data.train_tokens),
        "val_tokens": val_count,
        "val_chars": data.val_chars,
        "val_nats_per_token": val_nll / val_count,
        "val_nats_per_char": val_nll / data.val_chars,
        "val_bits_per_char": val_nll / data.val_chars / math.log(2),
        "unigram_nats_per_token": baseline_nll / val_count,
        "unigram_nats_per_char": baseline_nll / data.val_chars,
        "unigram_bits_per_char": baseline_nll / data.val_chars / math.log(2),
        "val_history": history,
        "text_sha256": hashlib.sha256(data.text.encode("utf-8")).hexdigest(),
        "settings": dataclasses.asdict(config),
    }


def write_checkpoint(
    out_dir: Union[str, Path],
    model: Transformer,
    config: TrainConfig,
    tokenizer_model: bytes,
    metrics: dict,
    overwrite: bool = False,
) -> None:
    """Write the Meta-layout folder: params.json, consolidated.00.pth in config.dtype, tokenizer.model and
    metrics.json. Written under a temporary name and renamed into place: a reader sees the old folder or the
    whole new one, never a half-written one, and a failure leaves nothing behind."""
    dtype = resolve_dtype(config.dtype, torch.device("cpu"))
    with staged_folder(out_dir, overwrite=overwrite) as folder:
        write_params(folder, config.model_args())
        state = {name: tensor.detach().to("cpu", dtype).clone() for name, tensor in model.state_dict().items()}
        save_shard(state, folder / "consolidated.00.pth")
        (folder / TOKENIZER_FILE).write_bytes(tokenizer_model)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def train(
    text_path: Union[str, Path],
    out_dir: Union[str, Path],
    config: TrainConfig = TrainConfig(),
    device: Optional[str] = None,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict:
    """Train a tokenizer and a model on the UTF-8 text at `text_path` and write the checkpoint folder
    `out_dir` (see the module docstring); returns the metrics also written to out_dir/metrics.json. Progress
    goes to `log`. Raises FileNotFoundError for a missing text file, FileExistsError when out_dir exists and
    `overwrite` is not set, and ValueError for a text too short for the settings."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{str(out_dir)!r} already exists: choose another folder or pass --overwrite")
    data = prepare_data(read_text(text_path), config.val_fraction, config.vocab_size, config.max_seq_len)
    log(
        f"text: {len(data.train_tokens):,} tokens to train on, {len(data.val_tokens):,} tokens "
        f"({data.val_chars:,} characters) to validate on"
    )
    model = build_model(config, setup_model_parallel(device=device))
    log(f"model: {sum(param.numel() for param in model.parameters()):,} parameters, {config.model_args()}")
    started = time.perf_counter()
    history = train_steps(model, make_optimizer(model, config), data, config, log)
    train_seconds = round(time.perf_counter() - started, 1)
    metrics = final_metrics(model, data, config, history) | {"train_seconds": train_seconds}
    log(
        f"validation: {metrics['val_nats_per_token']:.4f} nats/token, {metrics['val_nats_per_char']:.4f} nats/char "
        f"({metrics['val_bits_per_char']:.4f} bits/char); unigram baseline: "
        f"{metrics['unigram_nats_per_token']:.4f} nats/token, {metrics['unigram_nats_per_char']:.4f} nats/char "
        f"({metrics['unigram_bits_per_char']:.4f} bits/char)"
    )
    write_checkpoint(out_dir, model, config, data.tokenizer_model, metrics, overwrite)
    return metrics
