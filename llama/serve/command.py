"""`llama serve`: load a checkpoint (the bundled demo model when none is given) and serve it over HTTP with
OpenAI's API until SIGTERM or Ctrl-C. The options are in `SERVE_OPTIONS` (the `llama` command line adds them);
the HTTP stack is imported only when the server starts, so that the rest of the command line works without the
`serve` extra."""

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import urllib.parse
import warnings
from pathlib import Path
from typing import Optional

API_KEY_VARIABLE = "LLAMA_API_KEY"
SHUTDOWN_GRACE = 10.0  # seconds the running requests get to finish after SIGTERM or Ctrl-C
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

SERVE_OPTIONS = (
    ("--ckpt-dir", dict(metavar="DIR", help="the Meta-layout checkpoint folder (default: the bundled demo model)")),
    ("--tokenizer-path", dict(metavar="FILE", help="its tokenizer.model (default: DIR/tokenizer.model)")),
    ("--host", dict(default="127.0.0.1", metavar="HOST",
                    help="the address to listen on; any other than this machine's own is warned about")),
    ("--port", dict(type=int, default=8000, metavar="N", help="the port to listen on (0: any free port)")),
    ("--max-batch-size", dict(type=int, default=8, metavar="N", help="the most sequences decoded at once")),
    ("--max-seq-len", dict(type=int, metavar="N", help="the context: prompt and answer, in tokens (default: the "
                           "length the model was trained on where its folder records it, else 512)")),
    ("--max-queue", dict(type=int, default=64, metavar="N",
                         help="the most requests waiting for a row; more are answered 429")),
    ("--prefill-chunk", dict(type=int, default=256, metavar="N",
                             help="the most prompt tokens a request feeds in one step")),
    ("--quantize", dict(metavar="NAME", help="int8, int4, q8_0 or q4_0: quantize the linear layers as they load")),
    ("--group-size", dict(type=int, metavar="N", help="int4's group of input channels: 32, 64 or 128 (default 32)")),
    ("--compile", dict(action=argparse.BooleanOptionalAction, default=False,
                       help="run the steps of one token per request through a compiled graph: faster steps, after "
                            "a compile of tens of seconds at the first step that reads each cache window")),
    ("--api-key", dict(metavar="KEY", help=f"require `Authorization: Bearer KEY` on every route but "
                                           f"/health and the page / "
                                           f"(default: the {API_KEY_VARIABLE} environment variable; none if unset)")),
    ("--model-name", dict(metavar="NAME", help="the model's name in the API (default: the checkpoint folder's)")),
    ("--log-prompts", dict(action="store_true", help="put each request's prompt in its log line")),
    ("--no-ui", dict(action="store_true", help="serve no chat page at / (it answers 404); the API is unchanged")),
    ("--allow-origin", dict(action="append", metavar="ORIGIN", help="let web pages of ORIGIN (e.g. "
                            "http://localhost:3000, or * for any) call the server from a browser: CORS headers; "
                            "repeat for several (default: none)")),
    ("--device", dict(metavar="NAME", help="cpu or cuda (default: CUDA when available)")),
    ("--dtype", dict(metavar="NAME", help="float32, bfloat16 or float16 (default: float32 on the CPU)")),
)  # fmt: skip


def serve(
    ckpt_dir: Optional[str], tokenizer_path: Optional[str], host: str, port: int, max_batch_size: int,
    max_seq_len: Optional[int], max_queue: int, prefill_chunk: int, quantize: Optional[str], group_size: Optional[int],
    api_key: Optional[str], model_name: Optional[str], log_prompts: bool, device: Optional[str],
    dtype: Optional[str], allow_origin: Optional[list[str]] = None, compile: bool = False, no_ui: bool = False,
) -> str:  # fmt: skip
    """Serve until SIGTERM or Ctrl-C; returns the line to print at the end. Raises ValueError for bad settings
    and OSError for a port that cannot be bound or a checkpoint that cannot be read, before serving."""
    from llama.generation import Llama
    from llama.layout import check_folder, tokenizer_file, trained_context_len
    from llama.loading import demo_checkpoint
    from llama.serve.app import Settings
    from llama.serve.ranks import follow, model_step
    from llama.serve.scheduler import Scheduler
    from llama.values import whole_number

    max_queue, prefill_chunk = whole_number(max_queue, "--max-queue"), whole_number(prefill_chunk, "--prefill-chunk")
    origins = check_origins(allow_origin or [])
    if ckpt_dir is None:
        ckpt_dir, default_tokenizer = demo_checkpoint()
        tokenizer_path = tokenizer_path or str(default_tokenizer)
    check_folder(ckpt_dir)
    tokenizer_path = tokenizer_file(ckpt_dir, tokenizer_path)
    max_seq_len = max_seq_len or trained_context_len(ckpt_dir) or 512
    leading = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 serves HTTP and the others follow it
    if leading and host not in LOCAL_HOSTS:
        warnings.warn(f"listening on {host}: anyone who reaches it can use the model (see --api-key)", stacklevel=2)
    listener = _listen(host, port) if leading else None  # before loading: a port in use is reported at once
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype,
                        quantize=quantize, group_size=group_size, compile=compile)  # fmt: skip
    if not leading:
        follow(model_step(llama), llama.device)  # until rank 0 stops; RankLost (an OSError) if it is gone
        return ""
    scheduler = Scheduler(llama, max_queue=max_queue, prefill_chunk=prefill_chunk).start()
    name = model_name or Path(ckpt_dir).resolve().name
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_VARIABLE) or None
    settings = Settings(name, api_key, log_prompts=log_prompts, allow_origins=origins, ui=not no_ui)
    _run_server(scheduler, llama, listener, settings)
    if scheduler.lost is not None:
        raise scheduler.lost
    return "stopped"


def check_origins(origins: list[str]) -> tuple[str, ...]:
    """--allow-origin's values, each `*` or SCHEME://HOST[:PORT] as a browser sends it in its Origin header.
    Raises ValueError for anything else (a path or a trailing slash would never match)."""
    for origin in origins:
        parts = urllib.parse.urlsplit(origin)
        if origin != "*" and not (parts.scheme and parts.netloc and origin == f"{parts.scheme}://{parts.netloc}"):
            raise ValueError(
                f"--allow-origin {origin!r} is not an origin: give SCHEME://HOST[:PORT] as the browser sends it "
                f"(e.g. http://localhost:3000, no path and no trailing slash), or * for any"
            )
    return tuple(origins)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}: pass another --port") from None
    listener.listen(128)
    return listener


def _run_server(scheduler, llama, listener: socket.socket, settings):
    import uvicorn

    from llama.serve.app import Server

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    app = Server(scheduler, llama, settings).app()
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(SHUTDOWN_GRACE) + 2)
    server = _stoppable_server()(config, scheduler)
    host, port = listener.getsockname()[:2]
    url = f"http://{host}:{port}"
    print(f"serving {settings.model_name} on {url} (SIGTERM or Ctrl-C stops it)", file=sys.stderr, flush=True)
    server.run(sockets=[listener])
    scheduler.stop(0)
    scheduler.join(SHUTDOWN_GRACE)


def _stoppable_server() -> type:
    import contextlib

    import uvicorn

    class Stoppable(uvicorn.Server):
        """uvicorn's server, whose SIGTERM and Ctrl-C stop the scheduler too (new requests get 503, running ones
        get SHUTDOWN_GRACE seconds) and end the command with status 0, rather than being raised again."""

        def __init__(self, config, scheduler):
            super().__init__(config)
            self.scheduler = scheduler

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            # A plain function, not the bound method: sse-starlette looks for a server behind the SIGTERM handler
            # and cuts every open stream half a second after its should_exit turns true, which would end a running
            # stream with neither its last chunk nor [DONE]; the scheduler's grace decides instead.
            def stop(number, frame) -> None:
                self.stop(number, frame)

            previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for number, handler in previous.items():
                    signal.signal(number, handler)

        async def on_tick(self, counter: int) -> bool:
            if not self.scheduler.thread.is_alive():  # it ended by itself: another rank is gone
                self.should_exit = True
            return await super().on_tick(counter)

        def stop(self, number, frame) -> None:
            print(f"{signal.Signals(number).name}: stopping", file=sys.stderr, flush=True)
            self.scheduler.stop(SHUTDOWN_GRACE)
            self.should_exit = True

    return Stoppable
