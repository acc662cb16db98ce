"""One forward pass of the scheduler's steps, and serving a model split over several processes
(`torchrun --nproc_per_node N -m llama serve ...`).

Each rank holds 1/N of the heads and of the feed-forward width, and the layers gather or sum the ranks' parts
with collectives, so every rank must run every forward pass, on the same inputs. Rank 0 runs the HTTP server
and the scheduler: before each step it broadcasts the step's inputs (a header, then the tokens and positions),
and every other rank runs the same step on them (`follow`). Sampling and everything after the logits happen on
rank 0 alone. Rank 0 also sends a message after HEARTBEAT seconds without work, so that a rank waiting for the
next step never reaches the process group's timeout, and one when it stops.

A process that dies closes its connections: the other ranks' next collective fails, and each ends with a
message that says so (`RankLost`), never waiting for ever. torchrun, for its part, ends the whole launch when
one process fails, and passes SIGTERM or Ctrl-C on to every process: rank 0 then stops as a single process
does, and the others, which ignore those signals, follow its steps until it says stop.
"""

import signal
from typing import Callable, Optional

import torch
import torch.distributed as dist

from llama.compiled import CompiledStep
from llama.generation import Llama

STOP, STEP, IDLE = 0, 1, 2  # what a header announces
HEARTBEAT = 60.0  # seconds without work after which rank 0 tells the others it is still there

StepFunction = Callable[[torch.Tensor, torch.Tensor, int, bool], torch.Tensor]


class RankLost(ConnectionError):
    """Another process of the model is gone (its connections closed): serving cannot go on."""


def model_step(llama: Llama) -> StepFunction:
    """The forward pass of one step, (tokens, positions, cache_len, last_only) -> logits, as
    `Transformer.forward_at` takes them: the compiled graph for one token per row when `llama` was built with
    compile=True (the caller then gives it a fixed number of rows and a cache window of a few lengths), else the
    model's own."""
    model, step = llama.model, llama.decode_step
    compiled = step.compiled if isinstance(step, CompiledStep) else None

    def forward(tokens: torch.Tensor, positions: torch.Tensor, cache_len: int, last_only: bool) -> torch.Tensor:
        if compiled is not None and tokens.shape[1] == 1:
            return compiled(tokens, positions, cache_len, last_only=True)
        return model.forward_at(tokens, positions, cache_len, last_only=last_only)

    return forward


def several_ranks() -> bool:
    """Whether this process is one of several that hold the model (started by torchrun)."""
    return dist.is_initialized() and dist.get_world_size() > 1


class Leader:
    """Rank 0's side: `forward` sends a step's inputs to the other ranks, then runs it there too. Raises
    RankLost when a message cannot be sent."""

    def __init__(self, step: StepFunction, device: torch.device):
        self.step, self.device = step, device

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache_len: int, last_only: bool) -> torch.Tensor:
        rows, width = tokens.shape
        self._send(STEP, rows, width, cache_len, int(last_only), inputs=torch.stack((tokens, positions)))
        return self.step(tokens, positions, cache_len, last_only)

    def idle(self) -> None:
        """Tell the other ranks that rank 0 is still there, with nothing to do."""
        self._send(IDLE)

    def stop(self) -> None:
        """Tell the other ranks that no step follows: `follow` returns."""
        self._send(STOP)

    def _send(self, kind: int, *numbers: int, inputs: Optional[torch.Tensor] = None) -> None:
        header = torch.tensor([kind, *numbers, *[0] * (4 - len(numbers))], device=self.device)
        try:
            dist.broadcast(header, 0)
            if inputs is not None:
                dist.broadcast(inputs, 0)
        except RuntimeError as error:
            raise _lost("another rank", error) from None


def follow(step: StepFunction, device: torch.device) -> None:
    """The other ranks' loop: run each step rank 0 sends, until it sends STOP. SIGINT and SIGTERM are ignored
    meanwhile (rank 0, which gets them too, decides when the steps end), and still after a RankLost, raised
    when rank 0 is gone: the process is ending then, and the signal torchrun sends the rest of its launch must
    not take the place of the message. A step that fails here fails on rank 0 as well, which answers for it and
    goes on: so does this loop."""
    numbers = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in numbers}
    header = torch.zeros(5, dtype=torch.long, device=device)
    with torch.inference_mode():
        while True:
            try:
                dist.broadcast(header, 0)
                kind, rows, width, cache_len, last_only = header.tolist()
                if kind == STEP:
                    inputs = torch.empty((2, rows, width), dtype=torch.long, device=device)
                    dist.broadcast(inputs, 0)
            except RuntimeError as error:
                raise _lost("rank 0", error) from None
            if kind == STOP:
                break
            if kind == STEP:
                try:
                    step(inputs[0], inputs[1], cache_len, bool(last_only))
                except Exception:  # rank 0 reports it
                    pass
    for number, handler in previous.items():
        signal.signal(number, handler)


def _lost(whom: str, error: RuntimeError) -> RankLost:
    rank = dist.get_rank() if dist.is_initialized() else 0
    reason = str(error).split(". ")[0].rsplit("] ", 1)[-1]  # gloo's "[file:line] Connection closed by peer ..."
    return RankLost(f"rank {rank} lost {whom} of the model ({reason}): the server stops")
