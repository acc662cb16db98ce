"""One HTTP request's work in the scheduler: a `Request` per prompt, whose events, emitted in the scheduler's
thread, are brought to the server's event loop."""

import asyncio
from collections.abc import AsyncIterator
from typing import Union

from llama.serve.contract import Job, RequestError
from llama.serve.scheduler import Scheduler
from llama.serve.sequences import Failed, Finished, Piece, Request


class RunFailed(Exception):
    """The scheduler ended the run: `error` is the answer (503 while shutting down, 500 if the model broke)."""

    def __init__(self, error: RequestError):
        super().__init__(error.message)
        self.error = error


class Run:
    """Submits a Request per prompt of `job` to `scheduler` (call it in the event loop). Raises QueueFull or
    ShuttingDown as `Scheduler.submit` does, having cancelled what it submitted. Choice i of prompt p is
    choice p * n + i of the response."""

    def __init__(self, scheduler: Scheduler, job: Job, request_id: str):
        self.scheduler, self.job = scheduler, job
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests = []
        for index, prompt in enumerate(job.prompts):

            def emit(event, index=index) -> None:
                loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

            self.requests.append(Request(prompt, job.params, emit, job.n, f"{request_id}/{index}", job.stream))
        try:
            for request in self.requests:
                scheduler.submit(request)
        except Exception:
            self.cancel()
            raise

    async def events(self) -> AsyncIterator[tuple[int, Union[Piece, Finished]]]:
        """(choice, Piece) for each piece and (choice, Finished) at each choice's end, until every choice has
        ended. Raises RunFailed if the scheduler ends the run."""
        remaining = len(self.requests) * self.job.n
        while remaining:
            index, event = await self.queue.get()
            if isinstance(event, Failed):
                status, code = (503, "shutting_down") if event.shutting_down else (500, "model_failed")
                raise RunFailed(RequestError(status, event.message, code=code))
            remaining -= isinstance(event, Finished)
            yield index * self.job.n + event.choice, event

    async def results(self) -> dict[int, Finished]:
        """Every choice's Finished, by choice."""
        return {choice: event async for choice, event in self.events() if isinstance(event, Finished)}

    def cancel(self) -> None:
        """Cancel every prompt's Request (those that ended are left as they are)."""
        for request in self.requests:
            self.scheduler.cancel(request)
