"""One generation at a time: a Llama's key/value cache holds the state of the generation running on it, so
generations take turns."""

import contextlib
import threading
from collections.abc import Iterator
from typing import Optional


class Turns:
    """A Llama's key/value cache (and the step its CUDA graphs queue) serves one generation at a time. Calls
    from several threads wait for their turn; a stream holds the turn from its first step until it ends or is
    closed, and a call that would have to wait for a stream, which may never be read to its end, raises
    RuntimeError instead, as does a call from the thread that holds the turn."""

    def __init__(self):
        self.condition = threading.Condition()
        self.holder: Optional[tuple[str, int]] = None  # ("stream" or "call", thread id)

    @contextlib.contextmanager
    def turn(self, streaming: bool) -> Iterator[None]:
        """Hold the turn for the block (a stream's: `streaming`), waiting for a call of another thread to end.
        Raises RuntimeError where waiting could last forever."""
        thread = threading.get_ident()
        with self.condition:
            while self.holder is not None:
                kind, holder_thread = self.holder
                if kind == "stream" or holder_thread == thread:
                    raise RuntimeError(
                        "this Llama is in the middle of another generation"
                        + (" (a stream not read to its end)" if kind == "stream" else "")
                        + ": its key/value cache serves one at a time. Read the stream to its end or call its "
                        "close() first, or build a second Llama for generations that run side by side"
                    )
                self.condition.wait()
            self.holder = ("stream" if streaming else "call", thread)
        try:
            yield
        finally:
            with self.condition:
                self.holder = None
                self.condition.notify()
