"""One running sequence of the server (one choice of a request) in its cache row: what it feeds the model at the
next step, and what it does with the logits it gets back.

Its bookkeeping is the offline decoder's own: a `llama.decoding.Batch` of one sequence (its tokens, end at a
stop id, a stop sequence or its length, its text stream, its logprobs, its penalties and its generator), so
that a request gets from the server what `text_completion` gives it. Only the forward pass differs: the
scheduler runs it for every row together, each row at its own positions.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from llama.decoding import Batch, Completion
from llama.sampling import SamplingParams, sample_usable
from llama.tokenizer import Tokenizer


@dataclass
class Piece:
    """New text of choice `choice` (never a broken character; see llama.streaming). For a request that streams
    with logprobs, `tokens`: the tokens whose text the pieces so far hold wholly and that no earlier piece had,
    with their logprobs (a Completion without text); the rest of the result's come with its end."""

    choice: int
    text: str
    tokens: Optional[Completion] = None


@dataclass
class Finished:
    """Choice `choice` ended: its Completion (tokens, logprobs, text as `text_completion` returns them), why
    ("stop": an end-of-turn token or a stop sequence; "length": max_tokens, or the end of the context), and how
    many tokens it drew."""

    choice: int
    completion: Completion
    finish_reason: str
    generated: int  # tokens drawn (for usage: more than the completion's where a stop sequence cut them)


@dataclass
class Failed:
    """The request could not be completed (the model broke, or the server is shutting down)."""

    message: str
    shutting_down: bool = False


Event = Union[Piece, Finished, Failed]


@dataclass
class Request:
    """What the scheduler runs: prompt token ids, the sampling settings (max_gen_len is max_tokens), `n`
    choices, and `emit`, called from the scheduler's thread with each Event in order (it must not block).
    Choice i samples with params.seed + i (mod 2**64) when a seed is given, so that choice 0 draws what
    `text_completion(seed=...)` draws. `stream`: each Piece carries its tokens' logprobs (with params.logprobs)."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    n: int = 1
    id: str = ""
    stream: bool = False
    cancelled: bool = field(default=False, init=False)
    finished: int = field(default=0, init=False)  # choices ended

    def cancel(self) -> None:
        """Stop this request: its rows are freed at the next step, and nothing more is emitted."""
        self.cancelled = True


class Sequence:
    """Choice `choice` of `request`, decoded in one cache row. `fed` counts the tokens that went through the
    model (they are in the cache at positions 0 .. fed - 1); the logits of the last one predict position fed."""

    def __init__(
        self,
        request: Request,
        choice: int,
        generator: Optional[torch.Generator],
        tokenizer: Tokenizer,
        max_seq_len: int,
        device: torch.device,
    ):
        self.request, self.choice = request, choice
        generators = None if generator is None else [generator]
        self.batch = Batch([request.prompt], request.params, max_seq_len, device, tokenizer, generators)
        self.prompt_len = len(request.prompt)
        self.fed = 0
        self.handed_out = 0  # tokens of the result whose logprobs went out with a Piece

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prefilling(self) -> bool:
        return self.fed < self.prompt_len

    def wanted(self, prefill_chunk: int) -> list[int]:
        """The tokens to feed next: the prompt's next chunk, or the last token placed."""
        known = self.batch.host[0]
        end = min(self.prompt_len, self.fed + prefill_chunk) if self.prefilling else self.fed + 1
        return known[self.fed : end]

    def needs_all_logits(self) -> bool:
        """Whether this step needs the logits of every token fed, not just the last: the prompt's logprobs are
        returned (echo with logprobs)."""
        return self.prefilling and self.params.echo and self.params.logprobs

    def draw(self, logits: torch.Tensor, count: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """After `count` tokens went through the model, with `logits` (n, vocab) for the last n of them: record
        their logprobs and, past the prompt, draw the next token. Returns (token, usable) tensors of shape (1,)
        for `advance`, or None while the prompt is still being read."""
        self.fed += count
        batch, position = self.batch, self.fed
        drawn = None
        if position >= self.prompt_len:
            sampled, usable = sample_usable(batch.penalized(logits[-1:]), self.params, batch.generators_at(position))
            drawn = (batch.place(position, sampled), usable)
        if self.params.logprobs:  # logits[i] predicts position fed - n + 1 + i
            batch.record_logprobs(logits[None], self.fed - logits.shape[0])
        return drawn

    def advance(self, token: int, usable: bool, stop_ids: frozenset[int]) -> list[Event]:
        """The host's part of the step, with the token drawn: the events it gives (new text, and the end)."""
        batch = self.batch
        pieces = batch.advance(self.fed, [token], [usable], stop_ids)
        events: list[Event] = [Piece(self.choice, pieces[0], self._tokens_out())] if pieces[0] else []
        if batch.done[0]:
            result = batch.finish()
            if result.pieces[0]:
                events.append(Piece(self.choice, result.pieces[0], self._tokens_out()))
            generated = len(batch.host[0]) - self.prompt_len
            events.append(Finished(self.choice, result.finished[0][1], self._finish_reason(stop_ids), generated))
        return events

    def _tokens_out(self) -> Optional[Completion]:
        """For a stream with logprobs, the tokens that the text handed out now holds wholly and that no piece has
        had yet: those of the result, since the text only ever grows towards the result's."""
        if not (self.request.stream and self.params.logprobs):
            return None
        batch, stream = self.batch, self.batch.streams[0]
        start = 0 if self.params.echo else self.prompt_len  # the result's first position
        first, end = start + self.handed_out, self.prompt_len + stream.tokens_within(stream.emitted)
        self.handed_out = max(end - start, self.handed_out)
        top = None
        if batch.top_ids is not None:
            ids, values = batch.top_ids[0, first:end].tolist(), batch.top_logprobs[0, first:end].tolist()
            top = [list(zip(*pair)) if position else [] for position, pair in enumerate(zip(ids, values), first)]
        return Completion(batch.host[0][first:end], batch.logprobs[0, first:end].tolist(), None, top)

    def _finish_reason(self, stop_ids: frozenset[int]) -> str:
        host, stream = self.batch.host[0], self.batch.streams[0]
        ended_by_token = len(host) > self.prompt_len and host[-1] in stop_ids and not self.params.ignore_eos
        return "stop" if ended_by_token or stream.stopped else "length"
