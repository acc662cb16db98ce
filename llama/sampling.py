"""How the next token is chosen: the settings of a generation (`SamplingParams`, checked once where they enter)
and the draw itself (greedy, temperature, top-k, top-p)."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch

from llama.values import flag, real_number, whole_number

MAX_TOP_LOGPROBS = 20  # as OpenAI's API: enough to show the alternatives, never a copy of the distribution


@dataclass(frozen=True)
class SamplingParams:
    """The settings of one generation call, checked when made.

    temperature: 0 is greedy; higher flattens the distribution. top_p: draw from the smallest set of most
    likely tokens whose probabilities add up to at least top_p. top_k: draw from the top_k most likely tokens
    only (0: no limit). max_gen_len: the most tokens to generate per sequence (None: until the context is
    full). stop: strings that end a sequence's text (the text ends before them). logprobs: return the
    log-probability of every returned token. echo: return the prompt before the generation. ignore_eos: keep
    generating after EOS (benchmarks, which need every sequence to run its full length). seed: seeds each
    sequence's own random generator, so that its samples depend on its prompt, the settings and the seed only,
    never on the other prompts of its batch (None: each sequence's seed is drawn from the generator's own).
    top_logprobs: with logprobs, also the top_logprobs most likely tokens and their log-probabilities at each
    returned position (0 to 20, as OpenAI's API allows). frequency_penalty, presence_penalty: OpenAI's, from
    -2 to 2: before each draw, a token's logit is lowered by frequency_penalty times the number of times the
    sequence has generated it, and by presence_penalty if it has generated it at all (negative values raise it).

    Raises ValueError for a value out of range, TypeError for `stop` that is not a list of non-empty strings
    or a flag that is not a bool.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    max_gen_len: Optional[int] = None
    stop: Sequence[str] = ()
    logprobs: bool = False
    echo: bool = False
    ignore_eos: bool = False
    seed: Optional[int] = None
    top_logprobs: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self):
        settings = {
            "temperature": real_number(
                self.temperature, "temperature", "a finite number >= 0 (0 means greedy)", lambda x: 0 <= x < math.inf
            ),
            "top_p": real_number(self.top_p, "top_p", "in (0, 1]", lambda x: 0 < x <= 1),
            "top_k": whole_number(self.top_k, "top_k", minimum=0),
            "max_gen_len": None if self.max_gen_len is None else whole_number(self.max_gen_len, "max_gen_len"),
            "stop": _checked_stop(self.stop),
            **{name: flag(getattr(self, name), name) for name in ("logprobs", "echo", "ignore_eos")},
            "seed": None if self.seed is None else _checked_seed(self.seed),
            "top_logprobs": whole_number(self.top_logprobs, "top_logprobs", minimum=0),
            **{
                name: real_number(getattr(self, name), name, "a number from -2.0 to 2.0", lambda x: -2 <= x <= 2)
                for name in ("frequency_penalty", "presence_penalty")
            },
        }
        if not settings["top_logprobs"] <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {self.top_logprobs!r}")
        if settings["top_logprobs"] and not settings["logprobs"]:
            raise ValueError(f"top_logprobs={self.top_logprobs!r} needs logprobs=True")
        for name, value in settings.items():
            object.__setattr__(self, name, value)  # frozen: set once, here


def _checked_seed(seed: int) -> int:
    number = whole_number(seed, "seed", minimum=None)
    if not -(2**63) <= number < 2**64:  # what a torch.Generator takes
        raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1, got {seed!r}")
    return number


def _checked_stop(stop: Optional[Sequence[str]]) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str) or not isinstance(stop, Sequence):
        raise TypeError(f"stop must be a list of strings (for example stop=['\\n\\n']), got {stop!r}")
    for sequence in stop:
        if not isinstance(sequence, str) or not sequence:
            raise TypeError(f"stop must be a list of non-empty strings, got {stop!r}")
    return tuple(stop)


# One generator whose draws go to the rows in order, or a generator per row, whose draws are that row's alone
# (None for a row that draws nothing: it gets the most likely token).
Generators = Union[torch.Generator, Sequence[Optional[torch.Generator]], None]


def uniform_per_row(rows: int, generator: Generators, device: torch.device) -> torch.Tensor:
    """One draw from [0, 1) for each of `rows` rows, float64, shape (rows, 1): from `generator` in row order,
    or from each row's own generator, so that a row's draw does not depend on how many rows come before it
    (0 for a row whose generator is None)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(rows, 1, generator=generator, device=device, dtype=torch.float64)
    return torch.stack(
        [
            torch.zeros(1, device=device, dtype=torch.float64)
            if own is None
            else torch.rand(1, generator=own, device=device, dtype=torch.float64)
            for own in generator
        ]
    )


def sample_top_p(probs: torch.Tensor, p: float, generator: Generators = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of most likely tokens whose probabilities add up to at
    least p, renormalised. probs: (batch, vocab); `generator` one for the batch or one per row (see
    `uniform_per_row`). Returns token ids (batch, 1)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_before = torch.cumsum(probs_sort, dim=-1) - probs_sort  # mass of the tokens more likely than this one
    probs_sort[probs_before > p] = 0.0  # the most likely token always stays: its mass before is 0
    # Inverse transform sampling: the first token whose cumulative mass passes a uniform draw times the mass
    # kept (which renormalises). Summed in float64, so that no rounding gives a token outside the nucleus, or
    # the last ones of a large vocabulary, a share that is not theirs.
    cumulative = torch.cumsum(probs_sort, dim=-1, dtype=torch.float64)  # (batch, vocab)
    uniform = uniform_per_row(probs.shape[0], generator, probs.device)  # (batch, 1)
    next_token = torch.searchsorted(cumulative, uniform * cumulative[:, -1:])  # (batch, 1)
    return torch.gather(probs_idx, -1, next_token)


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0, generator: Generators = None
) -> torch.Tensor:
    """The next token of each row of `logits` (batch, vocab): argmax at temperature 0; otherwise a draw from
    softmax(logits / temperature), restricted to the top_k most likely tokens (0: no limit) and then to the
    top-p nucleus, with `generator`: one for the batch, or one per row. Returns (batch,) token ids."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    if top_k > 0:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    # Softmax in float32: in half precision the small probabilities that top-p keeps would round to zero.
    # Shift by the maximum first, and keep the temperature a normal float32: a tiny temperature then sends the
    # others to -inf (greedy in the limit) instead of overflowing to inf, and neither extreme gives 0/0 or inf/inf.
    logits = logits.float()
    float32 = torch.finfo(torch.float32)
    temperature = min(max(temperature, float32.tiny), float32.max)
    probs = torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / temperature, dim=-1)
    return sample_top_p(probs, top_p, generator).reshape(-1)


def sample_usable(
    logits: torch.Tensor, params: SamplingParams, generator: Generators = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` for each row of logits (batch, vocab), and whether the row could be used: (tokens (batch,),
    usable (batch,) bool). -inf marks a token as impossible; NaN, +inf or no possible token at all means the
    model broke, and such a row is drawn from zeros instead, so that the draw cannot crash, for the caller to
    report. One reduction finds them all: the row maximum is NaN if any logit is, +inf if any is, and -inf only
    if every one is."""
    usable = torch.isfinite(logits.amax(dim=-1))
    tokens = sample(
        torch.where(usable[:, None], logits, 0.0), params.temperature, params.top_p, params.top_k, generator
    )
    return tokens, usable
