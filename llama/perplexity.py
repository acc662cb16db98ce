"""How well a model predicts a text: the mean negative log-likelihood of its tokens (nats per token), its
exponential (the perplexity), and bits per character, which compares models with different tokenizers.

A text longer than the model's context is read in windows of `window` tokens that start `stride` tokens apart;
each token is scored once, in the first window that holds it with some context before it, so with a stride
below the window every token but the first of the text is predicted from at least window - stride tokens."""

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from llama.model import Transformer
from llama.values import whole_number


class Perplexity(NamedTuple):
    nats: float  # the total negative log-likelihood of the scored tokens
    tokens: int  # how many tokens were scored (all but the first)
    chars: int  # the characters of the text

    @property
    def nats_per_token(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_char(self) -> float:
        return self.nats / math.log(2) / self.chars

    def __str__(self) -> str:
        return (
            f"perplexity {self.perplexity:.4f}: {self.nats_per_token:.4f} nats per token, "
            f"{self.bits_per_char:.4f} bits per character ({self.tokens:,} tokens, {self.chars:,} characters)"
        )


def scored_windows(length: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """The windows over a text of `length` tokens, as (start, end, scored_until): tokens[start:end] are read, and
    tokens[scored_until:end], which no earlier window scored, are scored (see the module's docstring)."""
    scored_until, start = 1, 0  # tokens before scored_until are scored
    while scored_until < length:
        end = min(start + window, length)
        yield start, end, scored_until
        scored_until, start = end, start + stride


@torch.no_grad()
def sequence_nll(model: Transformer, tokens: list[int], window: int, stride: int) -> tuple[float, int]:
    """The total negative log-likelihood (nats, summed in float64) of tokens[1:], each given the tokens before it
    in its window (see the module's docstring), and how many were scored. Runs the model without its cache.
    Raises ValueError unless 2 <= window <= the model's max_seq_len and 1 <= stride < window."""
    window = whole_number(window, "window", minimum=2)
    stride = whole_number(stride, "stride")
    if window > model.params.max_seq_len:
        raise ValueError(f"window={window} is longer than the model's max_seq_len={model.params.max_seq_len}")
    if stride >= window:
        raise ValueError(f"stride={stride} must be below window={window}, or tokens would be read without context")
    device = model.tok_embeddings.weight.device
    total = 0.0
    for start, end, scored_until in scored_windows(len(tokens), window, stride):
        inputs = torch.tensor(tokens[start:end], device=device)[None]  # (1, end - start)
        logits = model(inputs, use_cache=False)[0].float()  # row i predicts tokens[start + i + 1]
        targets = torch.tensor(tokens[scored_until:end], device=device)
        rows = logits[scored_until - start - 1 : end - start - 1]
        total += F.cross_entropy(rows, targets, reduction="sum").double().item()
    return total, max(0, len(tokens) - 1)


def text_perplexity(model: Transformer, tokenizer, text: str, window: int, stride: int) -> Perplexity:
    """The perplexity of `text`, read after BOS as one sequence (see `sequence_nll`). Raises ValueError for an
    empty text and as `sequence_nll` does."""
    if not text:
        raise ValueError("the text is empty: give a text of at least one token")
    tokens = tokenizer.encode(text, bos=True, eos=False)
    nats, count = sequence_nll(model, tokens, window, stride)
    return Perplexity(nats, count, len(text))
