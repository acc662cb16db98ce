"""A server of llama.serve on 127.0.0.1 at a free port, running in a thread of the test process."""

import contextlib
import gc
import os
import socket
import threading
import time
from collections.abc import Iterator

import torch
import uvicorn

from llama import Llama
from llama.serve.app import Server, Settings
from llama.serve.scheduler import Scheduler

START_TIMEOUT = 120  # seconds: a bound against hangs, generous for a busy machine


@contextlib.contextmanager
def running_server(llama: Llama, start: bool = True, max_queue: int = 64, prefill_chunk: int = 16,
                   **settings) -> Iterator[tuple[str, Scheduler]]:  # fmt: skip
    """(base URL, scheduler) of a server over `llama` while the block runs; with start=False its scheduler
    never runs a step (requests stay queued)."""
    scheduler = Scheduler(llama, max_queue=max_queue, prefill_chunk=prefill_chunk)
    if start:
        scheduler.start()
    app = Server(scheduler, llama, Settings(**settings)).app()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the test server did not start"
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", scheduler
    finally:
        server.should_exit = True
        scheduler.stop(0)
        thread.join(START_TIMEOUT)
        scheduler.join(START_TIMEOUT)
        listener.close()


def wait_for_free_rows(scheduler: Scheduler, rows: int, limit: float = 120) -> dict:
    """The scheduler's state once `rows` rows are free and nothing waits, or after `limit` seconds (a bound
    against hangs, generous because a busy machine can hold the scheduler's thread back for seconds)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        state = scheduler.state()
        if state["free_rows"] == rows and state["waiting"] == 0:
            return state
        time.sleep(0.01)
    return scheduler.state()


def memory_in_use() -> tuple[int, int]:
    """This process's resident memory in bytes (Linux's /proc/self/statm) and the tensors alive in it, after a
    garbage collection."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resident, sum(issubclass(type(obj), torch.Tensor) for obj in gc.get_objects())
