"""The decoding loop: a batch of prompts advanced one position per step, each step a forward pass, a draw and
the bookkeeping of every sequence (its end at EOS or a stop sequence, its text, its logprobs).

The forward pass is a `Step`: `EagerStep` runs the model as it is asked; `llama.compiled.CompiledStep` runs
a compiled one-token step; `llama.cuda_graphs.DecodeGraphs` replays a recorded CUDA graph and queues the next
step while the host reads this one's tokens. The loop is the same for all.
"""

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Protocol

import torch
import torch.nn.functional as F

from llama.sampling import SamplingParams, sample_usable
from llama.streaming import TextStream
from llama.tokenizer import Tokenizer


class Step(Protocol):
    def begin(self) -> None:
        """A new batch starts (its first forward may come at any position, after what the cache holds): forget
        whatever was computed ahead for the last one."""

    def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool) -> torch.Tensor:
        """Logits for `tokens` (bsz, seqlen) at positions start_pos.., as `Transformer.forward` gives them."""

    def fetch(self, values: torch.Tensor, tokens: torch.Tensor, next_pos: Optional[int]) -> list:
        """`values.tolist()`. Unless every sequence ends here, the next step reads the tokens at `next_pos`,
        tokens[:, next_pos : next_pos + 1], at that position: a step may start computing it before it waits for
        the values."""


class EagerStep:
    """Runs the model for each step when asked: nothing is queued ahead, nothing computed in vain."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def begin(self) -> None:
        pass

    def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool) -> torch.Tensor:
        # forward itself, not the module's call: hooks are for training, and their machinery costs a few
        # microseconds a step, which shows in a small model's decoding
        return self.model.forward(tokens, start_pos, last_only=last_only)

    def fetch(self, values: torch.Tensor, tokens: torch.Tensor, next_pos: Optional[int]) -> list:
        return values.tolist()


def cache_window(start_pos: int, min_window: int, max_seq_len: int) -> int:
    """The cache window a one-token step at start_pos reads when the window must come from a few fixed sizes
    (a recorded graph, a compiled step): the smallest power of two times min_window that holds positions
    0..start_pos, capped at max_seq_len. A step so reads at most twice the cache it needs."""
    window = min_window
    while window < start_pos + 1:
        window *= 2
    return min(window, max_seq_len)


class Completion(NamedTuple):
    """One sequence's result: its tokens (with the prompt's if echoed; without EOS; with a stop sequence, those
    wholly inside the text, which ends before the stop), their logprobs (with logprobs=True), and their text
    when it was followed (else None: decode(tokens)). With top_logprobs=k, for each returned token the k most
    likely tokens at its position, as (token id, logprob) pairs, most likely first ([] for a prompt's first
    token, which nothing predicts)."""

    tokens: list[int]
    logprobs: Optional[list[float]]
    text: Optional[str]
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None


@dataclass
class StepResult:
    """What one decoding step produced: `pieces`, the text each sequence gained ("" where none, or where text
    is not followed), and `finished`, the (index, Completion) of each sequence that ended with this step."""

    pieces: list[str]
    finished: list[tuple[int, Completion]] = field(default_factory=list)


def completions(steps: Iterator[StepResult]) -> list[Completion]:
    """Run the steps to the end; every sequence's Completion, in input order."""
    finished = dict(pair for step in steps for pair in step.finished)
    return [finished[index] for index in range(len(finished))]


class Batch:
    """The sequences decoded together: left-aligned in one (bsz, total_len) tensor of tokens, the whole batch
    advancing one position per step from the end of the shortest prompt on (position t of a shorter prompt is
    generated while a longer one is still being read). Keeps each sequence's tokens on the host as well, its
    end, and its text stream when text is followed."""

    def __init__(
        self,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        max_seq_len: int,
        device: torch.device,
        text_of: Optional[Tokenizer] = None,
        generators: Optional[Sequence[torch.Generator]] = None,
        cached: int = 0,
    ):
        """`text_of`: follow each sequence's text, as this tokenizer decodes it (with params.stop applied).
        `generators`: each sequence's own random generator, for sampling (None: greedy). `cached`: positions
        0 .. cached - 1 of every row are in the key/value cache already, these very tokens fed to that cache row
        by an earlier batch; decoding feeds the rest (at least each prompt's last token, so cached < the shortest
        prompt's length; the logprobs of echoed prompt tokens need them all fed)."""
        self.params = params
        self.generators = generators
        self.streams = None
        if text_of is not None:
            self.streams = [TextStream(text_of, prompt if params.echo else (), params.stop) for prompt in prompts]
        self.prompt_lens = [len(prompt) for prompt in prompts]
        self.min_prompt_len = min(self.prompt_lens)
        max_gen_len = params.max_gen_len or max_seq_len - 1
        self.total_len = min(max_seq_len, max_gen_len + max(self.prompt_lens))
        pad_id = -1  # never fed to the model: every position before the one being decoded is filled
        self.tokens = torch.full((len(prompts), self.total_len), pad_id, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            self.tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
        self.is_prompt = self.tokens != pad_id
        self.host = [list(prompt) for prompt in prompts]
        self.logprobs = torch.zeros(self.tokens.shape, device=device) if params.logprobs else None
        self.top_ids = self.top_logprobs = None  # (bsz, total_len, k) each, with params.top_logprobs = k
        self.counts = None  # (bsz, vocab): how often each sequence has generated each token, with penalties
        # end[row]: one past the row's last returned token; it shrinks when the row stops early.
        self.end = [min(length + max_gen_len, self.total_len) for length in self.prompt_lens]
        self.done = [length >= end for length, end in zip(self.prompt_lens, self.end)]
        self.cached = cached  # the cache holds the keys and values of positions 0 .. cached - 1 of every row

    def generators_at(self, position: int) -> Optional[list[Optional[torch.Generator]]]:
        """Each sequence's generator where `position` is generated, None where the sequence still reads its
        prompt: it draws nothing there, so that its draws do not depend on the prompts beside it."""
        if self.generators is None:
            return None
        return [own if position >= length else None for own, length in zip(self.generators, self.prompt_lens)]

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (bsz, vocab) for the next draw, less OpenAI's penalties for what each sequence has generated:
        count * frequency_penalty, plus presence_penalty where the count is not 0."""
        if not (self.params.frequency_penalty or self.params.presence_penalty):
            return logits
        if self.counts is None:
            self.counts = torch.zeros_like(logits)
        presence = (self.counts > 0).to(logits.dtype)
        return logits - self.counts * self.params.frequency_penalty - presence * self.params.presence_penalty

    def place(self, position: int, sampled: torch.Tensor) -> torch.Tensor:
        """Write the tokens of `position` (bsz,): the sampled ones, except where a prompt still has its own."""
        generated = ~self.is_prompt[:, position]
        column = torch.where(generated, sampled, self.tokens[:, position])
        self.tokens[:, position] = column
        if self.counts is not None:  # penalties count the generated tokens only
            self.counts.scatter_add_(1, column[:, None], generated[:, None].to(self.counts.dtype))
        return column

    def record_logprobs(self, logits: torch.Tensor, start: int) -> None:
        """Log-probabilities of the tokens that logits (bsz, n, vocab) predict: logits[:, i] predicts the token
        at position start + 1 + i."""
        columns = slice(start + 1, start + 1 + logits.shape[1])
        log_probs = F.log_softmax(logits, dim=-1)  # (bsz, n, vocab)
        self.logprobs[:, columns] = log_probs.gather(-1, self.tokens[:, columns].unsqueeze(-1)).squeeze(-1)
        if self.params.top_logprobs:
            self.record_top(log_probs, slice(None), columns)

    def record_top(self, log_probs: torch.Tensor, rows, columns) -> None:
        """Keep the params.top_logprobs most likely tokens of log_probs (..., vocab) and their log-probabilities
        at batch.tokens[rows, columns]."""
        top = log_probs.topk(min(self.params.top_logprobs, log_probs.shape[-1]), dim=-1)  # (..., k) each
        if self.top_ids is None:  # k is known now: at most the vocabulary
            shape = (*self.tokens.shape, top.indices.shape[-1])  # (bsz, total_len, k)
            self.top_ids, self.top_logprobs = self.tokens.new_zeros(shape), self.logprobs.new_zeros(shape)
        self.top_ids[rows, columns], self.top_logprobs[rows, columns] = top.indices, top.values

    def advance(self, position: int, new_tokens: list[int], usable: list[bool], stop_ids: frozenset[int]) -> list[str]:
        """The host's part of a step, given the tokens now at `position`: end sequences at a stop id (EOS, or
        the end of a turn), at a stop sequence or at their length, and return each sequence's new text. Raises
        FloatingPointError for a sequence whose logits were unusable."""
        return [self.advance_row(row, position, token, usable[row], stop_ids) for row, token in enumerate(new_tokens)]

    def advance_row(self, row: int, position: int, token: int, usable: bool, stop_ids: frozenset[int]) -> str:
        """`advance` for one sequence, whose token now at `position` is `token`: its new text ("" when it has
        ended or still reads its prompt there)."""
        if self.done[row] or position < self.prompt_lens[row]:
            return ""
        if not usable:
            raise FloatingPointError(
                f"the model's logits for sequence {row} at generation step {position - self.prompt_lens[row]} "
                f"(position {position}) hold NaN or +inf, or rule out every token: the weights hold "
                f"inf/nan or the dtype overflowed (float16 overflows most easily; try bfloat16 or float32)"
            )
        self.host[row].append(token)
        piece = ""
        if token in stop_ids and not self.params.ignore_eos:
            self.end[row], self.done[row] = position, True
            return piece
        if self.streams is not None:
            piece = self.streams[row].push(token)
            if self.streams[row].stopped:
                self.end[row], self.done[row] = self.prompt_lens[row] + self.streams[row].tokens_inside(), True
        if position + 1 >= self.end[row]:
            self.done[row] = True
        return piece

    def finish(self) -> StepResult:
        """The text not handed out yet, and every sequence's Completion."""
        pieces = [""] * len(self.host) if self.streams is None else [stream.finish() for stream in self.streams]
        logprobs = self.logprobs.tolist() if self.logprobs is not None else None
        top = None if self.top_ids is None else (self.top_ids.tolist(), self.top_logprobs.tolist())
        finished = []
        for row, length in enumerate(self.prompt_lens):
            start = 0 if self.params.echo else length
            if logprobs is not None:
                _check_logprobs(logprobs[row], start, self.end[row], row)
            completion = Completion(
                tokens=self.host[row][start : self.end[row]],
                logprobs=logprobs[row][start : self.end[row]] if logprobs is not None else None,
                text=None if self.streams is None else self.streams[row].text,
                top_logprobs=None if top is None else _top_pairs(top[0][row], top[1][row], start, self.end[row]),
            )
            finished.append((row, completion))
        return StepResult(pieces, finished)


def _top_pairs(ids: list, logprobs: list, start: int, end: int) -> list[list[tuple[int, float]]]:
    """The (token id, logprob) pairs of positions start .. end - 1; none for position 0, which nothing predicts."""
    return [list(zip(ids[position], logprobs[position])) if position else [] for position in range(start, end)]


def _check_logprobs(logprobs: list[float], start: int, end: int, row: int) -> None:
    """FloatingPointError if a returned logprob is NaN: the logits that gave it held NaN or +inf, or ruled out
    every token (log_softmax gives NaN for each), which generation reports as well."""
    position = next((position for position in range(start, end) if math.isnan(logprobs[position])), None)
    if position is not None:
        raise FloatingPointError(
            f"the model's logits for sequence {row} at position {position - 1} hold NaN or +inf, or rule out every "
            f"token (the logprob of the token "
            f"at position {position} is NaN): the weights hold inf/nan or the dtype overflowed "
            f"(float16 overflows most easily; try bfloat16 or float32)"
        )


def decode(step: Step, batch: Batch, stop_ids: frozenset[int], speculation=None) -> Iterator[StepResult]:
    """Decode `batch` to the end, feeding the model from the first position its cache lacks (`batch.cached`).
    Yields a StepResult per position when the batch follows its text, and one at the end that holds every
    sequence's Completion (and the text held back until then). With `speculation` (llama.speculative), each
    step verifies proposed tokens instead, yielding per verification pass."""
    params = batch.params
    step.begin()
    if speculation is not None and not all(batch.done):
        yield from speculation.decode(batch, stop_ids)
        return
    if batch.min_prompt_len == batch.total_len and params.logprobs:
        # Nothing to generate (every prompt fills the context): score the prompts.
        batch.record_logprobs(step.forward(batch.tokens, 0, last_only=False)[:, :-1], 0)
    # A prompt that fills the context is done from the start, but its echoed logprobs are scored only as the
    # loop feeds its tokens: the loop runs on until the longest prompt is read, though the others are done.
    scored_until = max(batch.prompt_lens) - 1 if params.logprobs and params.echo else 0
    for position in range(batch.min_prompt_len, batch.total_len):
        fed = batch.cached  # feed the positions the cache lacks, up to this one
        # (bs, position - fed, vocab) for logprobs, else (bs, 1, vocab): the next token needs the last
        logits = step.forward(batch.tokens[:, fed:position], fed, last_only=not params.logprobs)
        batch.cached = position
        sampled, usable = sample_usable(batch.penalized(logits[:, -1]), params, batch.generators_at(position))
        column = batch.place(position, sampled)
        if params.logprobs:
            batch.record_logprobs(logits, fed)
        # The one host synchronisation per step: EOS, stop sequences and streaming need the tokens on the host.
        next_pos = position if position + 1 < batch.total_len else None
        new_tokens, usable = step.fetch(torch.stack((column, usable.long())), batch.tokens, next_pos)
        pieces = batch.advance(position, new_tokens, usable, stop_ids)
        if batch.streams is not None:  # else there is nothing to hand out before the end
            yield StepResult(pieces)
        if all(batch.done) and position >= scored_until:
            break
    yield batch.finish()
