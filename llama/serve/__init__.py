"""`llama serve`: an OpenAI-compatible HTTP server over one model, with continuous batching.

The scheduler (`llama.serve.scheduler`) owns the model and its key/value cache and runs the decoding steps in
one thread; it knows nothing of HTTP and is used as a library of its own. The HTTP layer (`llama.serve.app`,
with the request contract in `llama.serve.contract`) turns requests into plain `Request` objects and the
scheduler's events into OpenAI's responses. `llama.serve.command` is the `llama serve` command. Nothing else in
`llama` imports this package; the HTTP layer needs the `serve` extra (Starlette, uvicorn, sse-starlette).
"""
