"""Continuous batching: one scheduler owns the model and its key/value cache, and runs the decoding steps in one
thread of its own.

Each running sequence holds a cache row (batch row i of the model's forward is cache row i) and stands at its
own position. Between two steps, cancelled requests leave, and waiting ones take the free rows; within a step,
every row feeds its next tokens: one (the token it drew last) for a row that decodes, the next chunk of at most
`prefill_chunk` tokens of its prompt for a row that reads it, so that the rows that decode wait at most one
chunk between two of their tokens. Rows of one step are fed as one (rows, width) tensor: a row with fewer
tokens than the widest fills the columns before its own with padding tokens at positions after its own, which
its real tokens never read (the mask hides later positions) and which it overwrites before it reaches them.

Requests come from other threads (the HTTP server's event loop) through `submit`, under a lock; the events of
a request go back through its `emit` callback, called from the scheduler's thread. On several model-parallel
processes, the scheduler runs on rank 0 and sends each step to the others (llama.serve.ranks).
"""

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from llama.compiled import CompiledStep
from llama.decoding import cache_window
from llama.generation import Llama
from llama.sampling import SamplingParams
from llama.serve.ranks import HEARTBEAT, Leader, RankLost, model_step, several_ranks
from llama.serve.sequences import Event, Failed, Finished, Request, Sequence

PADDING_TOKEN = 0  # fed where a row has no token of its own; its keys and values are never read


class QueueFull(Exception):
    """The queue of waiting requests is full: try again later."""


class ShuttingDown(Exception):
    """The scheduler takes no new requests: it is stopping."""


@dataclass(frozen=True)
class StepRecord:
    """One step: for every row that ran in it, (request id, choice, tokens fed, "prefill" or "decode")."""

    number: int
    rows: tuple[tuple[str, int, int, str], ...]


@dataclass
class Counters:
    """Totals since the start, for /metrics."""

    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens read by the model
    generated_tokens: int = 0  # tokens drawn
    requests: int = 0  # requests taken into the queue


class Scheduler:
    """Runs requests on `llama`'s model, up to its max_batch_size sequences at once, each at its own position.

    `max_queue`: how many requests may wait for rows (beyond it, `submit` raises QueueFull). `prefill_chunk`:
    the most prompt tokens a row feeds in one step. `seed`: seeds the generator that seeds each sampled
    sequence of a request that gives no seed. `step_log`: how many of the last steps `steps` remembers.
    When `llama` was built with compile=True, the steps in which every row feeds one token run its compiled
    graph (see `_forward`); the others run eagerly.
    """

    def __init__(
        self, llama: Llama, max_queue: int = 64, prefill_chunk: int = 256, seed: int = 1, step_log: int = 1000
    ):
        self.model, self.tokenizer, self.device = llama.model, llama.tokenizer, llama.device
        self.compiled = llama.decode_step if isinstance(llama.decode_step, CompiledStep) else None
        self.forward_step = model_step(llama)
        self.leader = Leader(self.forward_step, self.device) if several_ranks() else None
        self.lost: Optional[RankLost] = None  # why the scheduler ended early: another rank is gone
        self.max_batch_size = self.model.params.max_batch_size
        self.max_seq_len = self.model.params.max_seq_len
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.rows: list[Optional[Sequence]] = [None] * self.max_batch_size
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.accepting = True
        self.deadline: Optional[float] = None
        self.steps: deque[StepRecord] = deque(maxlen=step_log)
        self.counters = Counters()
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.thread: Optional[threading.Thread] = None

    # ---- the other threads' side ---------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        """Start the scheduler's thread; returns self."""
        self.thread = threading.Thread(target=self.run, name="llama-scheduler", daemon=True)
        self.thread.start()
        return self

    def submit(self, request: Request) -> None:
        """Queue `request`. Raises QueueFull when max_queue requests already wait, ShuttingDown after `stop`,
        and ValueError for more choices than there are rows."""
        if request.n > self.max_batch_size:
            raise ValueError(f"n={request.n} is more than the {self.max_batch_size} sequences that run at once")
        with self.lock:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already, the most the queue holds")
            self.waiting.append(request)
            self.counters.requests += 1
            self.lock.notify()

    def cancel(self, request: Request) -> None:
        """Cancel `request`: it leaves the queue, or frees its rows at the next step."""
        request.cancel()
        with self.lock:
            self.lock.notify()

    def stop(self, grace: float) -> None:
        """Take no new requests, refuse the waiting ones, let the running ones finish for at most `grace`
        seconds and then end them (Failed, shutting_down=True); the thread ends when no row is left."""
        with self.lock:
            self.accepting = False
            self.deadline = time.monotonic() + grace
            self.lock.notify()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the thread to end (after `stop`); whether it has."""
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True

    def state(self) -> dict[str, int]:
        """The numbers /metrics shows now: running and waiting requests, free rows, and the counters."""
        with self.lock:
            running = {id(sequence.request) for sequence in self.rows if sequence is not None}
            free = sum(sequence is None for sequence in self.rows)
            return dict(running=len(running), waiting=len(self.waiting), free_rows=free, **vars(self.counters))

    # ---- the scheduler's thread ----------------------------------------------------------------------------

    def run(self) -> None:
        """The scheduler's loop (the thread's target): steps while any row runs, waits when none does, ends
        after `stop` once no row is left (on several ranks, telling the others so). When another rank is gone,
        it ends every request (503) and itself at once, and `lost` says why."""
        try:
            with torch.inference_mode():
                while self._between_steps():
                    self._step()
            if self.leader is not None:
                self.leader.stop()
        except RankLost as lost:
            with self.lock:
                self.lost, self.accepting, self.deadline = lost, False, 0.0
                self._end_for_shutdown()

    def _between_steps(self) -> bool:
        """Let cancelled requests go and waiting ones in; wait while nothing runs. False: the loop ends."""
        while True:
            with self.lock:
                self._drop_cancelled()
                if not self.accepting:
                    self._end_for_shutdown()
                self._admit()
                if any(sequence is not None for sequence in self.rows):
                    return True
                if not self.accepting:
                    return False
                woken = self.lock.wait(HEARTBEAT if self.leader is not None else None)
            if not woken and self.leader is not None:
                self.leader.idle()  # outside the lock: requests keep coming in meanwhile

    def _drop_cancelled(self) -> None:
        self.waiting = deque(request for request in self.waiting if not request.cancelled)
        for row, sequence in enumerate(self.rows):
            if sequence is not None and sequence.request.cancelled:
                self.rows[row] = None

    def _end_for_shutdown(self) -> None:
        """Refuse the waiting requests; past the deadline, end the running ones too."""
        while self.waiting:
            self._fail(self.waiting.popleft(), "the server is shutting down", shutting_down=True)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            for sequence in self.rows:
                if sequence is not None:
                    self._fail(sequence.request, "the server is shutting down", shutting_down=True)

    def _admit(self) -> None:
        """Waiting requests take free rows, first come first served, each with a row per choice."""
        free = [row for row, sequence in enumerate(self.rows) if sequence is None]
        while self.waiting and self.waiting[0].n <= len(free):
            request = self.waiting.popleft()
            generators = self._generators(request.params, request.n)
            for choice, generator in enumerate(generators):
                self.rows[free.pop(0)] = Sequence(
                    request, choice, generator, self.tokenizer, self.max_seq_len, self.device
                )

    def _generators(self, params: SamplingParams, n: int) -> list[Optional[torch.Generator]]:
        """A generator per choice (None for greedy decoding): seeded params.seed + choice, or from the
        scheduler's generator when the request gives no seed."""
        if params.temperature == 0:
            return [None] * n
        if params.seed is None:
            seeds = torch.randint(2**62, (n,), generator=self.generator, device=self.device).tolist()
        else:
            seeds = [params.seed if choice == 0 else (params.seed + choice) % 2**64 for choice in range(n)]
        return [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]

    def _step(self) -> None:
        """One forward pass for every row, then each row's draw and bookkeeping."""
        active = [(row, sequence) for row, sequence in enumerate(self.rows) if sequence is not None]
        # A row whose tokens are fewer than the width pads after its last position: keep that in the context.
        room = min(self.max_seq_len - sequence.fed for _, sequence in active)
        fed = {row: sequence.wanted(self.prefill_chunk)[:room] for row, sequence in active}
        every_logit = {row: sequence.needs_all_logits() for row, sequence in active}
        self._record(active, fed)
        try:
            logits = self._forward(active, fed, last_only=not any(every_logit.values()))
            drawn = []
            for row, sequence in active:
                count = len(fed[row])
                own = logits[row, -count:] if every_logit[row] else logits[row, -1:]  # (tokens, vocab)
                outcome = sequence.draw(own, count)
                if outcome is not None:
                    drawn.append((sequence, outcome))
            # The one host synchronisation of the step: the tokens and whether each row's logits were usable.
            # Two concatenations for all rows, not one per row: a tensor operation's Python share is most of its
            # cost at this size.
            values = []
            if drawn:
                tokens = torch.cat([token for _, (token, _) in drawn])
                usable = torch.cat([usable for _, (_, usable) in drawn])
                values = torch.stack((tokens, usable.long()), dim=1).tolist()
        except RankLost:
            raise
        except Exception as error:  # the model broke: the requests of this step end, the server goes on
            for _, sequence in active:
                self._fail(sequence.request, f"the model failed: {error}")
            return
        for (sequence, _), (token, usable) in zip(drawn, values):
            self._advance(sequence, token, bool(usable))

    def _forward(self, active: list[tuple[int, Sequence]], fed: dict[int, list[int]], last_only: bool) -> torch.Tensor:
        """Logits (rows, width or 1, vocab) for the rows 0 .. the last active one, each feeding `fed[row]` (free
        rows feed padding), right-aligned: a row's last token is in the last column.

        With a compiled step, a step of one token per row runs its graph, which is specialised to the shapes of
        its inputs: so that a few graphs serve every such step, it runs every row (the free ones too) and reads
        a cache window of one of a few sizes (llama.decoding.cache_window), longer than the eager step's (the
        positions past a row's own are masked: they add exact zeros)."""
        width = max(len(tokens) for tokens in fed.values())
        compiled = self.compiled is not None and width == 1
        rows = self.max_batch_size if compiled else active[-1][0] + 1
        tokens = [[PADDING_TOKEN] * width for _ in range(rows)]
        positions = [list(range(width)) for _ in range(rows)]
        for row, sequence in active:
            count, start = len(fed[row]), sequence.fed
            tokens[row] = [PADDING_TOKEN] * (width - count) + fed[row]
            positions[row] = list(range(start + count, start + width)) + list(range(start, start + count))
        cache_len = max(max(row_positions) for row_positions in positions) + 1
        if compiled:
            cache_len = cache_window(cache_len - 1, self.compiled.min_window, self.max_seq_len)
        forward = self.forward_step if self.leader is None else self.leader.forward
        return forward(torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device),
                       cache_len, last_only)  # fmt: skip

    def _record(self, active: list[tuple[int, Sequence]], fed: dict[int, list[int]]) -> None:
        counters = self.counters
        counters.steps += 1
        rows = []
        for row, sequence in active:
            kind = "prefill" if sequence.prefilling else "decode"
            counters.prompt_tokens += len(fed[row]) if sequence.prefilling else 0
            rows.append((sequence.request.id, sequence.choice, len(fed[row]), kind))
        self.steps.append(StepRecord(counters.steps, tuple(rows)))

    def _advance(self, sequence: Sequence, token: int, usable: bool) -> None:
        request = sequence.request
        if request.cancelled:
            return
        self.counters.generated_tokens += 1
        try:
            events = sequence.advance(token, usable, self.tokenizer.stop_ids)
        except FloatingPointError as error:
            self._fail(request, str(error))
            return
        for event in events:
            if isinstance(event, Finished):
                self._free(sequence)
                request.finished += 1
            self._emit(request, event)

    def _free(self, sequence: Sequence) -> None:
        self.rows = [None if other is sequence else other for other in self.rows]

    def _fail(self, request: Request, message: str, shutting_down: bool = False) -> None:
        """End `request` with Failed, freeing its rows."""
        self._emit(request, Failed(message, shutting_down))
        request.cancel()
        self.rows = [None if other is not None and other.request is request else other for other in self.rows]

    def _emit(self, request: Request, event: Event) -> None:
        if request.cancelled:
            return
        try:
            request.emit(event)
        except Exception:  # the listener is gone (its event loop closed): nobody wants the rest
            request.cancel()
