"""Train a small Llama-2-style model on a text file and write it in Meta's checkpoint layout.

    python -m llama.train --text_path input.txt --out_dir my-model

The end of the text (`--val_fraction`, cut at a line break) is held out for validation. A SentencePiece
tokenizer (BPE, byte fallback, Llama's special ids) is trained on the rest, then this library's Transformer
learns next-token prediction on random windows of it: AdamW, linear warm-up then cosine decay, gradient
clipping, a fixed seed. The folder written (`params.json`, `consolidated.00.pth`, `tokenizer.model`, and
`metrics.json` with the validation loss next to a unigram baseline) loads with `Llama.build` unchanged.
"""

import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Union

import fire
import sentencepiece as spm
import torch
import torch.nn.functional as F

from llama.checkpoint import resolve_dtype, staged_folder
from llama.distributed import setup_model_parallel
from llama.model import ModelArgs, Transformer

# params.json holds the architecture only, under Meta's names; batch and sequence sizes are chosen at load time.
META_PARAM_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "norm_eps", "rope_theta")


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """The text cut in two at the line break nearest before the last `val_fraction` of its characters:
    (training text, validation text). Cutting at a line break keeps both halves tokenized as in the whole."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int) -> bytes:
    """A serialized SentencePiece BPE model trained on the lines of `text`, with Llama's conventions: byte
    fallback (any text encodes, a newline is the byte piece <0x0A>), unk 0, bos 1, eos 2, no pad piece.
    Unlike Llama's, it adds no dummy space in front of the text: a prompt starts where a line of the corpus
    starts, without a space. Raises ValueError when the text is too small for `vocab_size` pieces."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([line for line in text.split("\n") if line]),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            split_digits=True,
            # Keep the text as it is (spaces, case, newlines), so that decoding gives back exactly the text.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(
            f"cannot train a tokenizer of vocab_size={vocab_size} on this text ({error}): the vocabulary holds "
            "3 special and 256 byte pieces, a piece for every distinct character, and merges that the text must be "
            "long enough to provide; choose another --vocab_size or give a longer text"
        ) from error
    return model.getvalue()


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


_INTEGER_OPTIONS = (
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "batch_size",
    "steps", "eval_every", "eval_windows", "log_every",
)  # fmt: skip
_SETTINGS_RECORDED = _INTEGER_OPTIONS + (
    "learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "val_fraction", "seed", "dtype",
)  # fmt: skip


def _check_settings(settings: dict) -> None:
    for name in _INTEGER_OPTIONS:
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a positive whole number, got {value!r}")
    for name in ("learning_rate", "grad_clip"):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"--{name} must be a positive number, got {value!r}")
    for name, low, high in (("val_fraction", 0.0, 0.5), ("min_lr_ratio", 0.0, 1.0), ("weight_decay", 0.0, 1.0)):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"--{name} must be a number from {low} to {high}, got {value!r}")
    if settings["val_fraction"] == 0:
        raise ValueError("--val_fraction must be above 0: the validation loss needs held-out text")
    warmup_steps, steps = settings["warmup_steps"], settings["steps"]
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < steps:
        raise ValueError(
            f"--warmup_steps must be a whole number from 0 to --steps - 1 = {steps - 1}, got {warmup_steps!r}"
        )


def train(
    text_path: Union[str, Path],
    out_dir: Union[str, Path],
    vocab_size: int = 2000,
    dim: int = 192,
    n_layers: int = 6,
    n_heads: int = 8,
    n_kv_heads: int = 4,
    multiple_of: int = 64,
    max_seq_len: int = 256,
    batch_size: int = 8,
    steps: int = 1200,
    learning_rate: float = 2e-3,
    min_lr_ratio: float = 0.1,
    warmup_steps: int = 100,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    val_fraction: float = 0.1,
    eval_every: int = 200,
    eval_windows: int = 32,
    log_every: int = 10,
    seed: int = 1337,
    dtype: str = "bfloat16",
    device: Optional[str] = None,
    overwrite: bool = False,
) -> dict:
    """Train a tokenizer and a model on the UTF-8 text at `text_path` and write the checkpoint folder
    `out_dir` (see the module docstring); returns the metrics also written to out_dir/metrics.json.

    Progress goes to stdout: the training loss and tokens/s every `log_every` steps, the validation loss on
    the first `eval_windows` validation windows every `eval_every` steps (and before the first step), the
    full validation loss and the unigram baseline at the end. Weights are stored in `dtype` (bfloat16,
    float16 or float32). Raises FileNotFoundError for a missing text file, FileExistsError when out_dir
    exists and `overwrite` is not set, and ValueError for bad settings or a text too short for them.
    """
    settings = {name: value for name, value in locals().items() if name in _SETTINGS_RECORDED}
    _check_settings(settings)
    save_dtype = resolve_dtype(dtype, torch.device("cpu"))
    args = ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size,
        multiple_of=multiple_of,
        max_batch_size=batch_size,
        max_seq_len=max_seq_len,
    )
    args.validate()
    text_path, out_dir = Path(text_path), Path(out_dir)
    if not text_path.is_file():
        raise FileNotFoundError(f"text file {str(text_path)!r} does not exist: pass --text_path a UTF-8 text file")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{str(out_dir)!r} already exists: choose another --out_dir or pass --overwrite")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(text_path)!r} is not UTF-8 text ({error})") from error

    train_text, val_text = split_text(text, val_fraction)
    if not train_text.strip() or not val_text.strip():
        raise ValueError(
            f"{str(text_path)!r} ({len(text)} characters) is too short to hold out {val_fraction:.0%} of its lines "
            "for validation: give a longer text"
        )
    tokenizer_model = train_tokenizer(train_text, vocab_size)
    tokenizer = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    train_tokens = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_tokens = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    if len(train_tokens) < max_seq_len + 1:
        raise ValueError(
            f"the training text is {len(train_tokens)} tokens, fewer than max_seq_len + 1 = {max_seq_len + 1}: "
            "give a longer text or a smaller --max_seq_len"
        )
    print(
        f"text: {len(train_text):,} characters ({len(train_tokens):,} tokens) to train on, "
        f"{len(val_text):,} ({len(val_tokens):,} tokens) to validate on",
        flush=True,
    )

    device = setup_model_parallel(device=device)
    with torch.random.fork_rng(devices=[]):  # seed the initial weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = Transformer(args).to(device)
    n_params = sum(param.numel() for param in model.parameters())
    print(f"model: {n_params:,} parameters, {dataclasses.asdict(args)}", flush=True)
    # Weight decay pulls matrices towards small norms; the norms' gains are scales, where it would only hurt.
    matrices = [param for param in model.parameters() if param.dim() >= 2]
    gains = [param for param in model.parameters() if param.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": weight_decay}, {"params": gains, "weight_decay": 0.0}],
        lr=learning_rate,
        betas=(0.9, 0.95),
    )
    batches = torch.Generator().manual_seed(seed)

    def validation_loss() -> float:
        model.eval()
        total, count = evaluate(model, val_tokens, tokenizer.bos_id(), max_seq_len, batch_size, eval_windows)
        model.train()
        return total / count

    history = [(0, validation_loss())]
    print(f"step 0: validation loss {history[-1][1]:.4f} nats/token", flush=True)
    started = last_log = time.perf_counter()
    recent_losses = []
    for step in range(steps):
        lr = learning_rate_at(step, steps, warmup_steps, learning_rate, min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = sample_batch(train_tokens, batch_size, max_seq_len, tokenizer.bos_id(), batches)
        logits = model(inputs.to(device), use_cache=False)  # (batch, seq_len, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Clipping the global norm keeps one unlucky batch from undoing what warm-up protected.
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        recent_losses.append(loss.item())
        done = step + 1
        if done % log_every == 0 or done == steps:
            now = time.perf_counter()
            tokens_per_second = len(recent_losses) * batch_size * max_seq_len / (now - last_log)
            print(
                f"step {done}/{steps} | loss {sum(recent_losses) / len(recent_losses):.4f} | lr {lr:.2e} | "
                f"{tokens_per_second:,.0f} tokens/s | {now - started:,.0f} s",
                flush=True,
            )
            recent_losses, last_log = [], now
        if done % eval_every == 0 or done == steps:
            history.append((done, validation_loss()))
            print(f"step {done}: validation loss {history[-1][1]:.4f} nats/token", flush=True)
            last_log = time.perf_counter()  # evaluation time is not training throughput
    train_seconds = time.perf_counter() - started

    model.eval()
    with torch.no_grad():  # the metrics describe the weights as stored, rounded to the checkpoint's dtype
        for param in model.parameters():
            param.copy_(param.to(save_dtype))
    val_nll, val_count = evaluate(model, val_tokens, tokenizer.bos_id(), max_seq_len, batch_size)
    baseline_nll = unigram_nll(train_tokens, val_tokens, vocab_size)
    metrics = {
        "parameters": n_params,
        "train_tokens": len(train_tokens),
        "val_tokens": val_count,
        "val_chars": len(val_text),
        "val_nats_per_token": val_nll / val_count,
        "val_nats_per_char": val_nll / len(val_text),
        "val_bits_per_char": val_nll / len(val_text) / math.log(2),
        "unigram_nats_per_token": baseline_nll / val_count,
        "unigram_nats_per_char": baseline_nll / len(val_text),
        "unigram_bits_per_char": baseline_nll / len(val_text) / math.log(2),
        "val_history": history,
        "train_seconds": round(train_seconds, 1),
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "settings": settings,
    }
    print(
        f"validation: {metrics['val_nats_per_token']:.4f} nats/token, {metrics['val_nats_per_char']:.4f} nats/char "
        f"({metrics['val_bits_per_char']:.4f} bits/char); unigram baseline: "
        f"{metrics['unigram_nats_per_token']:.4f} nats/token, {metrics['unigram_nats_per_char']:.4f} nats/char "
        f"({metrics['unigram_bits_per_char']:.4f} bits/char)",
        flush=True,
    )

    # Written under a temporary name and renamed into place: a reader sees the old folder or the whole new
    # one, never a half-written one, and a failure leaves nothing behind.
    with staged_folder(out_dir, overwrite=overwrite) as folder:
        params = {name: value for name, value in dataclasses.asdict(args).items() if name in META_PARAM_KEYS}
        (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        state = {name: tensor.detach().to("cpu", save_dtype).clone() for name, tensor in model.state_dict().items()}
        torch.save(state, folder / "consolidated.00.pth")
        (folder / "tokenizer.model").write_bytes(tokenizer_model)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {out_dir}", flush=True)
    return metrics


def main() -> None:
    """The command line: `python -m llama.train --text_path FILE --out_dir FOLDER [--option value ...]`."""
    try:
        fire.Fire(train, serialize=lambda metrics: None)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
