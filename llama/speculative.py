"""Speculative decoding: a proposer guesses the next k tokens of each sequence, and the model checks them all in
one forward pass over k + 1 positions, keeping those it would have produced itself and one of its own after
them. A pass so yields from 1 to k + 1 tokens for the cost of about one when the model's step is bound by
reading its weights, and the output is the model's: with greedy decoding the same tokens, with sampling the
same distribution (rejection sampling).

Two proposers: `PromptLookup` copies the tokens that followed the most recent earlier occurrence of the last n
tokens (in the prompt or the text so far), which pays off where the output repeats its input (summaries, code
edits, questions about a document); `DraftModel` runs a smaller (or quantized) model with the same tokenizer.

Each row of a batch stands at its own position (`Transformer.forward_at`) and accepts its own count. A row's
key/value cache is "rolled back" by its count of valid entries alone: the next pass writes from there on, and
a query reads only the positions up to its own, all of which are valid or written by that same pass, so an
entry left by a rejected token is never read.
"""

from collections.abc import Iterator, Sequence
from typing import Optional, Protocol

import torch
import torch.nn.functional as F

from llama.decoding import Batch, StepResult
from llama.model import Transformer
from llama.sampling import SamplingParams

READ_AHEAD_FROM = 16  # tokens a row must lack for `read_ahead` to feed them in a pass of their own
MAX_PAUSE = 64  # the longest run of plain passes a row makes after its proposals were refused
PAD_ID = 0  # fills the columns of a row that has fewer tokens than the widest row; its outputs are never read


class Proposer(Protocol):
    def begin(self, batch_size: int, cached: int) -> None:
        """A new batch starts, its rows' caches holding positions 0 .. cached - 1."""

    def propose(
        self, histories: Sequence[list[int]], counts: Sequence[int], params: SamplingParams, generators
    ) -> tuple[list[list[int]], Optional[torch.Tensor]]:
        """Up to counts[row] tokens to follow each row's history, and the distributions they were drawn from,
        (bsz, max(counts), vocab), or None where each proposed token is certain (a point mass)."""

    def rollback(self, row: int, valid: int) -> None:
        """Row `row` keeps only its first `valid` tokens of what was proposed and fed so far."""


class PromptLookup:
    """Proposes the tokens that followed the most recent earlier occurrence of the last `ngram` tokens."""

    def __init__(self, ngram: int):
        self.ngram = ngram

    def begin(self, batch_size: int, cached: int) -> None:
        pass

    def propose(self, histories, counts, params, generators):
        return [lookup(history, self.ngram, count) for history, count in zip(histories, counts)], None

    def rollback(self, row: int, valid: int) -> None:
        pass


def lookup(history: Sequence[int], ngram: int, count: int) -> list[int]:
    """The (at most) `count` tokens that follow the most recent earlier occurrence of history's last `ngram`
    tokens in `history`; [] when they occur nowhere earlier (or count is 0)."""
    if count <= 0 or len(history) <= ngram:
        return []
    suffix = list(history[-ngram:])
    for start in range(len(history) - ngram - 1, -1, -1):
        if history[start] == suffix[0] and list(history[start : start + ngram]) == suffix:
            return list(history[start + ngram : start + ngram + count])
    return []


class DraftModel:
    """Proposes by decoding a draft model (same tokenizer) k tokens ahead, with its own key/value cache."""

    def __init__(self, model: Transformer):
        self.model = model
        self.cached: list[int] = []  # per row: positions of the draft's cache that hold the row's tokens

    def begin(self, batch_size: int, cached: int) -> None:
        self.cached = [0] * batch_size  # the draft's cache rows hold nothing of this batch

    def propose(self, histories, counts, params, generators):
        width = max(counts)
        proposed: list[list[int]] = [[] for _ in histories]
        if width == 0:
            return proposed, None
        # Feed each proposing row what the draft lacks, then each new draft token, one pass per token.
        feeding = [
            list(history[cached:]) if count else [] for history, count, cached in zip(histories, counts, self.cached)
        ]
        feeding = read_ahead(self.model, feeding, self.cached, histories)
        distributions = []
        for index in range(width):
            logits, columns = feed(self.model, feeding, self.cached, histories, proposed)
            last = [column + max(len(tokens) - 1, 0) for column, tokens in zip(columns, feeding)]
            logits = logits[torch.arange(len(last)), torch.tensor(last, device=logits.device)]  # (bsz, vocab)
            drawing = [own if index < count else None for own, count in zip(generators or [None] * len(counts), counts)]
            tokens, probs = draw(logits, params, drawing)
            distributions.append(probs)
            for row, tokens_fed in enumerate(feeding):
                self.cached[row] += len(tokens_fed)
            feeding = []
            for row, token in enumerate(tokens):
                if index < counts[row]:
                    proposed[row].append(token)
                feeding.append([token] if index + 1 < counts[row] else [])
        return proposed, None if params.temperature == 0 else torch.stack(distributions, dim=1)

    def rollback(self, row: int, valid: int) -> None:
        self.cached[row] = min(self.cached[row], valid)


def feed(
    model: Transformer,
    tokens: Sequence[list[int]],
    cached: Sequence[int],
    histories: Sequence[list[int]],
    extra: Optional[Sequence[list[int]]] = None,
    last_only: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """One forward pass in which row r reads tokens[r] at positions cached[r] on (a row may read none), each row
    at its own positions. Returns the logits (bsz, width, vocab) and, per row, the column of its first token.

    Rows fill the width with padding after their tokens, at the positions after theirs (never read: see the
    module's docstring). A row whose padding would run past max_seq_len starts earlier instead, reading again
    the last tokens of its history (and of `extra`, tokens it already read after its history), which writes
    their keys and values again."""
    width = max(1, max(len(row) for row in tokens))
    max_seq_len = model.params.max_seq_len
    rows, positions, columns = [], [], []
    for row, start in enumerate(cached):
        first = min(start, max_seq_len - width)
        known = list(histories[row]) + (list(extra[row]) if extra is not None else [])
        again = known[first:start]
        rows.append((again + list(tokens[row]) + [PAD_ID] * width)[:width])
        positions.append(range(first, first + width))
        columns.append(len(again))
    device = model.output.weight.device
    tokens_tensor = torch.tensor(rows, dtype=torch.long, device=device)  # (bsz, width)
    starts = {first[0] for first in positions}
    if len(starts) == 1:
        # Every row at the same positions (a batch of one, always): the plain forward, which builds no
        # per-row positions, and for one token per row no mask, as a plain decoding step.
        return model(tokens_tensor, starts.pop(), last_only=last_only), columns
    positions_tensor = torch.tensor(positions, dtype=torch.long, device=device)  # (bsz, width)
    cache_len = max(starts) + width
    return model.forward_at(tokens_tensor, positions_tensor, cache_len, last_only=last_only), columns


def read_ahead(model: Transformer, tokens: list[list[int]], cached: list[int], histories) -> list[list[int]]:
    """Feed each row all but the last of its `tokens` (a prompt, mostly), whose logits nobody needs, with the
    output layer run on one position only, advancing `cached`; returns what is left for the pass that needs
    logits: each row's last token. A few tokens (the ones a draft lacks after a pass) are returned as they are:
    the output layer at a few more positions of the pass that follows costs less than a pass of its own."""
    if max(len(row) for row in tokens) <= READ_AHEAD_FROM:
        return tokens
    feed(model, [row[:-1] for row in tokens], cached, histories, last_only=True)
    for row, row_tokens in enumerate(tokens):
        cached[row] += max(len(row_tokens) - 1, 0)
    return [row[-1:] for row in tokens]


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the plain sampler (`llama.sampling.sample`) draws from for logits (..., vocab): top-k,
    then softmax at the temperature, then the top-p nucleus, renormalised. float32, the shape of logits."""
    if params.top_k > 0:
        kth_largest = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    logits = logits.float()
    float32 = torch.finfo(torch.float32)
    temperature = min(max(params.temperature, float32.tiny), float32.max)
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort = probs_sort.masked_fill(probs_before > params.top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, probs_idx, probs_sort)
    return kept / kept.sum(dim=-1, keepdim=True)


def draw(logits: torch.Tensor, params: SamplingParams, generators) -> tuple[list[int], torch.Tensor]:
    """A token for each row of logits (bsz, vocab), greedy or drawn with the row's own generator, and the
    distribution it came from (the logits themselves when greedy, for want of one). A row whose generator is
    None gets its most likely token."""
    if params.temperature == 0:
        return logits.argmax(dim=-1).tolist(), logits
    probs = filtered_probs(logits, params)
    tokens = [
        int(row_probs.argmax()) if own is None else int(torch.multinomial(row_probs, 1, generator=own))
        for row_probs, own in zip(probs, generators)
    ]
    return tokens, probs


def verify_greedy(targets: list[int], proposed: list[int]) -> list[int]:
    """The tokens a greedy row keeps, given the model's choice at each of the len(proposed) + 1 positions: the
    proposed ones up to the first the model would not have chosen, then the model's own choice there."""
    kept = 0
    while kept < len(proposed) and proposed[kept] == targets[kept]:
        kept += 1
    return targets[: kept + 1]


def verify_sampled(
    probs: torch.Tensor, proposed: list[int], draft_probs: Optional[torch.Tensor], generator: torch.Generator
) -> list[int]:
    """Rejection sampling: the tokens a sampled row keeps, distributed as drawing each from the model's own
    distribution. probs (len(proposed) + 1, vocab): the model's (filtered) distributions at each position;
    draft_probs (>= len(proposed), vocab): those the proposals were drawn from, None for certain proposals. A
    proposal x is kept with probability min(1, p(x) / q(x)); the first one refused is replaced by a draw from
    max(0, p - q), renormalised; when all are kept, one more is drawn from p after them."""
    kept = []
    for index, token in enumerate(proposed):
        p = probs[index]
        if draft_probs is None:
            q = torch.zeros_like(p)
            q[token] = 1.0
        else:
            q = draft_probs[index].to(p.dtype)
        uniform = float(torch.rand(1, generator=generator, device=p.device, dtype=torch.float64))
        if uniform * float(q[token]) < float(p[token]):
            kept.append(token)
            continue
        residual = (p - q).clamp(min=0)
        if float(residual.sum()) <= 0:
            residual = p  # p <= q everywhere means p == q: nothing to correct
        return kept + [int(torch.multinomial(residual, 1, generator=generator))]
    return kept + [int(torch.multinomial(probs[len(proposed)], 1, generator=generator))]


class Speculation:
    """Speculative decoding for a model: `speculate` tokens proposed per pass by `proposer`, each row's
    proposals checked in one pass. Counts what it does, for measurements: `passes` (a row's verification pass
    each), `proposed`, `accepted` (proposals kept) and `generated` (tokens the passes produced)."""

    def __init__(self, model: Transformer, speculate: int, proposer: Proposer):
        self.model = model
        self.speculate = speculate
        self.proposer = proposer
        self.passes = self.proposed = self.accepted = self.generated = 0
        self.limits: list[int] = []  # per row of the batch running: the most tokens it is proposed next
        self.paused: list[int] = []  # per row: passes it still makes without proposals
        self.pause: list[int] = []  # per row: how many passes its next pause lasts

    def decode(self, batch: Batch, stop_ids: frozenset[int]) -> Iterator[StepResult]:
        """`llama.decoding.decode` for `batch`, a verification pass per step: yields a StepResult per pass
        when the batch follows its text (the text of every token kept), and one at the end with every
        sequence's Completion."""
        cached = [batch.cached] * len(batch.host)  # per row: the positions its cache holds
        self.limits = [self.speculate] * len(batch.host)
        self.paused, self.pause = [0] * len(batch.host), [1] * len(batch.host)
        self.proposer.begin(len(batch.host), batch.cached)
        while not all(batch.done):
            pieces = self._pass(batch, cached, stop_ids)
            if batch.streams is not None:
                yield StepResult(pieces)
        yield batch.finish()

    def _pass(self, batch: Batch, cached: list[int], stop_ids: frozenset[int]) -> list[str]:
        """One verification pass over every row: propose, feed, keep, advance. Returns each row's new text."""
        params, histories, rows = batch.params, batch.host, range(len(batch.host))
        # A proposal stops where the row must end, so that no position past max_seq_len is ever fed.
        counts = [
            0
            if batch.done[row] or self.paused[row]
            else min(self.limits[row], batch.end[row] - 1 - len(histories[row]))
            for row in rows
        ]
        proposed, draft_probs = self.proposer.propose(histories, counts, params, batch.generators)
        # What the cache lacks: a row's unread tokens (a finished row's prompt, read for its logprobs only).
        unfed = [histories[row][cached[row] : None if not batch.done[row] else batch.prompt_lens[row]] for row in rows]
        if not params.logprobs:
            unfed = read_ahead(self.model, unfed, cached, histories)
        raw, columns = feed(self.model, [unfed[row] + proposed[row] for row in rows], cached, histories)
        usable = torch.isfinite(raw.amax(dim=-1))  # (bsz, width): NaN or +inf anywhere, or no possible token
        logits = torch.where(usable[..., None], raw, 0.0)
        usable_rows, pieces = usable.tolist(), [""] * len(rows)
        for row in rows:
            first = columns[row] + len(unfed[row]) - 1  # the column that predicts the row's next token
            new: list[int] = []
            if not batch.done[row]:
                guesses = proposed[row]
                scores = _penalized(batch, row, logits[row, first : first + len(guesses) + 1], guesses)
                if params.temperature == 0:
                    new = verify_greedy(scores.argmax(dim=-1).tolist(), guesses)
                else:
                    row_draft = None if draft_probs is None else draft_probs[row]
                    new = verify_sampled(filtered_probs(scores, params), guesses, row_draft, batch.generators[row])
                if not new:  # every pass gives a running row a token, or decoding would never end
                    raise RuntimeError(f"a verification pass gave sequence {row} no token: its cache bookkeeping broke")
                self._count(row, len(guesses), len(new))
            if params.logprobs:
                _record_logprobs(batch, row, raw[row, columns[row] :], cached[row], new)
            cached[row] += len(unfed[row]) + max(len(new) - 1, 0)
            self.proposer.rollback(row, cached[row])
            pieces[row] = _advance(batch, row, new, usable_rows[row][max(first, 0) :], stop_ids)
        batch.cached = min(cached)
        return pieces

    def _count(self, row: int, proposed: int, produced: int) -> None:
        """Count a row's pass, and set how much it may be proposed next: one more after a pass that kept every
        proposal (up to `speculate`), one less after one that kept some, half after one that kept none. A row
        whose single proposal is refused pauses: it makes plain passes, without proposals, for 1 pass, then 2,
        4, ... up to MAX_PAUSE at each refusal that follows, until a pass keeps all it was proposed. A proposer
        that is always wrong so soon costs a draft step and a position now and then, and speculation about what
        plain decoding costs. (The limits depend on past passes only, so sampling keeps its distribution.)"""
        if proposed:
            limit = self.limits[row]
            if produced - 1 == proposed:
                self.limits[row], self.pause[row] = min(self.speculate, limit + 1), 1
            elif limit > 1:
                self.limits[row] = limit - 1 if produced > 1 else limit // 2
            else:
                self.paused[row], self.pause[row] = self.pause[row], min(2 * self.pause[row], MAX_PAUSE)
        elif self.paused[row]:
            self.paused[row] -= 1
        self.passes += 1
        self.proposed += proposed
        self.accepted += produced - 1
        self.generated += produced


def _penalized(batch: Batch, row: int, scores: torch.Tensor, guesses: list[int]) -> torch.Tensor:
    """The row's scores (len(guesses) + 1, vocab) less OpenAI's penalties, as `Batch.penalized` takes them
    before each draw, for what the row will have generated before each position: its tokens so far, then the
    guesses before that position (the model's own token, where one replaces a guess, comes last). Adds the
    counts of this pass's tokens only once they are known (see `_advance`)."""
    params = batch.params
    if not (params.frequency_penalty or params.presence_penalty):
        return scores
    if batch.counts is None:
        batch.counts = torch.zeros(len(batch.host), scores.shape[-1], device=scores.device)
    counts = batch.counts[row].expand(len(guesses) + 1, -1).clone()  # (len(guesses) + 1, vocab)
    for index, token in enumerate(guesses):
        counts[index + 1 :, token] += 1
    presence = (counts > 0).to(scores.dtype)
    return scores - counts * params.frequency_penalty - presence * params.presence_penalty


def _record_logprobs(batch: Batch, row: int, logits: torch.Tensor, cached: int, new: list[int]) -> None:
    """Log-probabilities of the row's tokens that this pass predicted: logits (width, vocab) from the row's first
    column, at positions cached, cached + 1, ...; each predicts the token after it, up to the last new one."""
    sequence = batch.host[row] + new
    count = len(sequence) - 1 - cached
    if count <= 0:
        return
    ids = torch.tensor(sequence[cached + 1 :], dtype=torch.long, device=logits.device)  # (count,)
    log_probs = F.log_softmax(logits[:count], dim=-1)  # (count, vocab)
    columns = slice(cached + 1, cached + 1 + count)
    batch.logprobs[row, columns] = log_probs.gather(-1, ids[:, None]).squeeze(-1)
    if batch.params.top_logprobs:
        batch.record_top(log_probs, row, columns)


def _advance(batch: Batch, row: int, new: list[int], usable: list[bool], stop_ids: frozenset[int]) -> str:
    """Write the row's kept tokens and take them one by one through the batch's bookkeeping (EOS, stop sequences,
    max_gen_len, text) until the row ends; returns its new text."""
    begin = len(batch.host[row])
    if new:
        new_tensor = torch.tensor(new, device=batch.tokens.device)
        batch.tokens[row, begin : begin + len(new)] = new_tensor
        if batch.counts is not None:  # penalties count the generated tokens
            batch.counts[row].index_add_(0, new_tensor, torch.ones(len(new), device=batch.counts.device))
    piece = ""
    for offset, token in enumerate(new):
        if batch.done[row]:
            break
        piece += batch.advance_row(row, begin + offset, token, usable[offset], stop_ids)
    return piece
