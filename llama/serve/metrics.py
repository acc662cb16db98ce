"""The /metrics page: Prometheus' text format, from the scheduler's state and the server's response counts."""


def metrics_text(state: dict[str, int], responses: dict[int, int], latency: list) -> str:
    """Running and waiting requests, free rows, prompt and generated tokens, steps, requests taken, responses
    by status, and the time requests took (count and sum, in seconds)."""
    gauges = [
        ("llama_requests_running", "requests with rows in the key/value cache", state["running"]),
        ("llama_requests_waiting", "requests waiting for rows", state["waiting"]),
        ("llama_rows_free", "cache rows free", state["free_rows"]),
    ]
    counters = [
        ("llama_prompt_tokens_total", "prompt tokens read by the model", state["prompt_tokens"]),
        ("llama_generated_tokens_total", "tokens generated", state["generated_tokens"]),
        ("llama_steps_total", "decoding steps run", state["steps"]),
        ("llama_requests_total", "requests taken into the queue", state["requests"]),
    ]
    lines = []
    for kind, metrics in (("gauge", gauges), ("counter", counters)):
        for name, help, value in metrics:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP llama_responses_total HTTP responses by status", "# TYPE llama_responses_total counter"]
    lines += [f'llama_responses_total{{status="{status}"}} {count}' for status, count in sorted(responses.items())]
    lines += [
        "# HELP llama_request_duration_seconds time from a request's arrival to its last byte",
        "# TYPE llama_request_duration_seconds summary",
        f"llama_request_duration_seconds_count {latency[0]}",
        f"llama_request_duration_seconds_sum {latency[1]:.6f}",
    ]
    return "\n".join(lines) + "\n"
