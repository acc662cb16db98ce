"""A stand-in for llama.cpp's `llama-server` in the benchmark's smoke test: it takes the options
benchmarks/llama_server.py gives, prints `listening on URL` as llama-server does, answers /health, and streams
/completion's events (a piece per token, then the last event with `stop` and `tokens_predicted`). A prompt of
exactly SHORT_PROMPT tokens gets one token fewer than it asks for, as an answer cut short would; one of
DROPPED_PROMPT tokens finds its connection closed without an answer every other time it comes."""

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SHORT_PROMPT = 24
DROPPED_PROMPT = 40
arrivals = {"dropped": 0}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._send(200 if self.path == "/health" else 404, b'{"status": "ok"}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/completion" or not body.get("stream") or not body.get("ignore_eos"):
            return self._send(400, b'{"error": "not what the benchmark sends"}')
        if len(body["prompt"]) == DROPPED_PROMPT:
            arrivals["dropped"] += 1
            if arrivals["dropped"] % 2:
                self.close_connection = True
                return
        count = body["n_predict"] - (len(body["prompt"]) == SHORT_PROMPT)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(count):
            self._event({"content": "a", "tokens": [5], "stop": False})
        self._event({"content": "", "tokens": [], "stop": True, "tokens_predicted": count})

    def _event(self, data: dict) -> None:
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--model", "--host", "--port", "--parallel", "--ctx-size", "--cache-ram", "--threads",
                 "--threads-batch"):  # fmt: skip
        parser.add_argument(name)
    parser.add_argument("--no-webui", action="store_true")
    options = parser.parse_args()
    server = ThreadingHTTPServer((options.host, int(options.port)), Handler)
    print(f"main: server is listening on http://{options.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
