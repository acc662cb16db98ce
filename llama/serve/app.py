"""The HTTP layer of `llama serve` (Starlette): routes that check a request against the contract
(llama.serve.contract), hand it to the scheduler as plain `Request`s, and turn the scheduler's events into
OpenAI's responses, whole or streamed as server-sent events. Every error is OpenAI's error object."""

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from llama.generation import Llama
from llama.serve.contract import RequestError, chat_job, check_model, completion_job, parse_body
from llama.serve.metrics import metrics_text
from llama.serve.responses import Shapes
from llama.serve.runs import Run, RunFailed
from llama.serve.scheduler import QueueFull, Scheduler, ShuttingDown
from llama.serve.sequences import Piece

log = logging.getLogger("llama.serve")
OPEN_PATHS = ("/health", "/")  # no API key needed: the page asks for it itself


@dataclass
class Settings:
    """What the server is told at start: the model's name, the API key (None: none needed), the largest body
    in bytes, whether the log shows prompts, the origins whose web pages may call it (CORS; none: only pages of
    its own origin, as browsers allow by default), and whether / answers the chat page."""

    model_name: str = "llama"
    api_key: Optional[str] = None
    max_body_bytes: int = 1 << 20
    log_prompts: bool = False
    ui: bool = True  # the chat page at /
    allow_origins: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))


class Server:
    """The routes over one scheduler (already started) and the Llama it runs."""

    def __init__(self, scheduler: Scheduler, llama: Llama, settings: Settings):
        self.scheduler, self.llama, self.settings = scheduler, llama, settings
        params = llama.model.params
        self.limits = {"context": params.max_seq_len - 1, "rows": params.max_batch_size,
                       "prompt": params.max_seq_len - 1}  # fmt: skip
        self.responses: dict[int, int] = {}  # HTTP status: responses sent
        self.latency = [0, 0.0]  # responses, seconds in all
        self.page = resources.files("llama.serve").joinpath("page.html").read_bytes() if settings.ui else None

    def app(self) -> Starlette:
        """The ASGI application: the routes behind the API key check and the request log."""
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        if self.page is not None:
            routes.append(Route("/", self.chat_page, methods=["GET"]))
        app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
        app.add_middleware(_Gate, server=self)
        if self.settings.allow_origins:
            # Added last, so outermost: a browser's preflight (OPTIONS, without the API key) is answered here,
            # and the gate's 401 still carries the headers that let the page read it.
            app.add_middleware(
                CORSMiddleware,
                allow_origins=list(self.settings.allow_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        return app

    async def chat_page(self, http: HttpRequest) -> Response:
        return HTMLResponse(self.page, headers={"Cache-Control": "no-cache"})

    async def health(self, http: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, http: HttpRequest) -> Response:
        model = {"id": self.settings.model_name, "object": "model", "created": self.settings.created,
                 "owned_by": "llama"}  # fmt: skip
        return JSONResponse({"object": "list", "data": [model]})

    async def metrics(self, http: HttpRequest) -> Response:
        text = metrics_text(self.scheduler.state(), self.responses, self.latency)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def chat(self, http: HttpRequest) -> Response:
        return await self._answer(http, "chat")

    async def completions(self, http: HttpRequest) -> Response:
        return await self._answer(http, "completion")

    async def _answer(self, http: HttpRequest, kind: str) -> Response:
        try:
            body = parse_body(await self._body(http))
            check_model(body, self.settings.model_name)
            if kind == "chat":
                job = chat_job(body, self.llama.chat_format, self.limits)
            else:
                job = completion_job(body, self.llama.tokenizer, self.limits)
            http.state.prompt_tokens = sum(len(prompt) for prompt in job.prompts)
            if self.settings.log_prompts:
                http.state.prompt = body.get("messages", body.get("prompt"))
            run = self._submit(job, http.state.request_id)
        except RequestError as error:
            return _error(error)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        shapes = Shapes(kind, f"{prefix}-{http.state.request_id}", int(time.time()), self.settings.model_name,
                        self.llama.tokenizer, job)  # fmt: skip
        if job.stream:
            return EventSourceResponse(self._stream(http, run, shapes), ping=600)
        return await self._whole(http, run, shapes)

    def _submit(self, job, request_id: str) -> Run:
        try:
            return Run(self.scheduler, job, request_id)
        except QueueFull as error:
            raise RequestError(429, f"the server is busy: {error}; retry later", code="queue_full") from None
        except ShuttingDown as error:
            raise RequestError(503, str(error), code="shutting_down") from None

    async def _body(self, http: HttpRequest) -> bytes:
        """The body, refused with 413 past max_body_bytes (by its announced length, or as it arrives)."""
        limit = self.settings.max_body_bytes
        too_large = RequestError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        announced = http.headers.get("content-length", "")
        if announced.isdigit() and int(announced) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _whole(self, http: HttpRequest, run: Run, shapes: Shapes) -> Response:
        """Wait for every choice; a client that goes away first cancels the run."""
        collecting = asyncio.ensure_future(run.results())
        disconnect = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({collecting, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            if not collecting.done():
                collecting.cancel()
                run.cancel()
        if not collecting.done() or collecting.cancelled():
            return Response(status_code=499)  # nobody reads it
        try:
            results = collecting.result()
        except RunFailed as failure:
            return _error(failure.error)
        http.state.completion_tokens = sum(result.generated for result in results.values())
        return JSONResponse(shapes.whole(results))

    async def _stream(self, http: HttpRequest, run: Run, shapes: Shapes) -> AsyncIterator[dict]:
        """Server-sent events: a chunk per piece of text (with its tokens' logprobs), a last chunk per choice
        with its finish_reason, the usage with stream_options.include_usage, then [DONE]. Closing the connection
        cancels the run."""
        results = {}
        started = set()
        try:
            async for index, event in run.events():
                if index not in started and shapes.kind == "chat":
                    started.add(index)
                    yield {"data": json.dumps(shapes.chunk(index, "", first=True))}
                if isinstance(event, Piece):
                    yield {"data": json.dumps(shapes.chunk(index, event.text, tokens=event.tokens))}
                else:
                    results[index] = event
                    yield {"data": json.dumps(shapes.chunk(index, None, event))}
            http.state.completion_tokens = sum(result.generated for result in results.values())
            if run.job.include_usage:
                yield {"data": json.dumps(shapes.usage_chunk(results))}
        except RunFailed as failure:
            yield {"data": json.dumps(failure.error.body())}
        finally:
            run.cancel()  # nothing left to cancel when it ended; when the client went away, its rows are freed
        yield {"data": "[DONE]"}


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _error(error: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _http_error(http: HttpRequest, error: HTTPException) -> Response:
    """Starlette's own errors (an unknown route, a method a route does not take) in OpenAI's shape."""
    words = {404: f"no route {http.url.path}", 405: f"{http.method} is not allowed on {http.url.path}"}
    return _error(RequestError(error.status_code, words.get(error.status_code, str(error.detail))))


class _Gate:
    """ASGI middleware: the API key on every route but /health and the page, a request id, and one log line per
    request (id, method, path, status, tokens in and out, seconds; the prompt only with log_prompts)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), [0]
        state = scope.setdefault("state", {})
        state["request_id"] = uuid.uuid4().hex[:16]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["path"] not in OPEN_PATHS and not self._authorized(scope):
                error = RequestError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                                     code="invalid_api_key")  # fmt: skip
                return await _error(error)(scope, receive, sending)
            await self.app(scope, receive, sending)
        finally:
            self._log(scope, state, status[0] or 499, time.monotonic() - started)

    def _authorized(self, scope) -> bool:
        key = self.server.settings.api_key
        if key is None:
            return True
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + key.encode())

    def _log(self, scope, state: dict, status: int, seconds: float) -> None:
        server = self.server
        server.responses[status] = server.responses.get(status, 0) + 1
        server.latency[0] += 1
        server.latency[1] += seconds
        line = (f"{state['request_id']} {scope['method']} {scope['path']} {status} "
                f"tokens_in={state.get('prompt_tokens', 0)} tokens_out={state.get('completion_tokens', 0)} "
                f"{seconds:.3f}s")  # fmt: skip
        if "prompt" in state:
            line += f" prompt={json.dumps(state['prompt'])}"
        log.info(line)
