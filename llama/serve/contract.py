"""The request contract of the server, in one place: the OpenAI fields it takes, their types, bounds and
defaults, the fields it refuses, and the errors it answers with. The routes (llama.serve.app) call `parse_body`
and `completion_job` / `chat_job`; docs/serving.md lists the same table.

A field OpenAI's API defines but this server does not implement is refused with a 400 naming it; a field
OpenAI does not define is ignored; a field of the wrong type or out of range is refused with a 400 naming the
field and what it takes. Nothing here touches the model: every check runs before any work.
"""

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from llama.chat_format import ChatFormat, check_dialog
from llama.sampling import MAX_TOP_LOGPROBS, SamplingParams
from llama.tokenizer import Tokenizer

MAX_STOP_SEQUENCES = 4  # as OpenAI's API
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' `logprobs` is a count, at most 5 in OpenAI's API


class RequestError(Exception):
    """A request the server refuses, as OpenAI's error object: HTTP `status`, `message`, the `param` at fault."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kinds = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}
        kind = kinds.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# name: (JSON type, lowest, highest, default). Bounds are inclusive; "context" (the most new tokens) and "rows"
# (the sequences that run at once) stand for the served model's limits.
NUMBERS = {
    "temperature": (float, 0.0, 2.0, 1.0),
    "top_p": (float, 0.0, 1.0, 1.0),  # 0 is taken as the smallest nucleus: the most likely token
    "top_k": (int, 0, None, 0),  # an extension, as llama.cpp's server has
    "frequency_penalty": (float, -2.0, 2.0, 0.0),
    "presence_penalty": (float, -2.0, 2.0, 0.0),
    "seed": (int, -(2**63), 2**64 - 1, None),
    "n": (int, 1, "rows", 1),
    "max_tokens": (int, 1, "context", None),
    "max_completion_tokens": (int, 1, "context", None),
    "top_logprobs": (int, 0, MAX_TOP_LOGPROBS, 0),
}
FLAGS = {"stream": False, "echo": False}
# Fields of OpenAI's API this server does not implement, with the value that means "not used" (accepted).
UNSUPPORTED = {
    "tools": None, "tool_choice": "none", "functions": None, "function_call": "none", "parallel_tool_calls": None,
    "response_format": {"type": "text"}, "logit_bias": None, "best_of": 1, "suffix": None, "audio": None,
    "modalities": ["text"], "prediction": None, "web_search_options": None,
}  # fmt: skip
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Job:
    """A checked request: its prompts (token ids), sampling settings, choices per prompt, and how to answer."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    top_logprobs: int  # 0: none; with params.logprobs, the alternatives to show per token


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; RequestError 400 for anything else."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise RequestError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def check_model(body: dict, served: str) -> None:
    """RequestError 404 when the body names a model other than the one served."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, f"model must be a string, got {_kind(model)}", "model")
    if model not in (None, served):
        raise RequestError(404, f"the model {model!r} does not exist: this server serves {served!r}", "model",
                           "model_not_found")  # fmt: skip


def number(body: dict, name: str, limits: dict[str, int]) -> Any:
    """Field `name` of NUMBERS, checked: its default when absent or null. `limits`: the values of "context",
    "rows" and "prompt" (the most prompt tokens)."""
    kind, low, high, default = NUMBERS[name]
    value = body.get(name)
    if value is None:
        return default
    low, high = limits.get(low, low), limits.get(high, high)
    integer = isinstance(value, int) and not isinstance(value, bool)
    if kind is int and not integer:
        raise RequestError(400, f"{name} must be an integer, got {_kind(value)}", name)
    if kind is float and not (integer or isinstance(value, float)):
        raise RequestError(400, f"{name} must be a number, got {_kind(value)}", name)
    if isinstance(value, float) and not math.isfinite(value) or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise RequestError(400, f"{name} must be {bounds}, got {value!r}", name)
    return value


def boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false, got {_kind(value)}", name)
    return value


def common_settings(body: dict, limits: dict[str, int]) -> dict:
    """The settings both endpoints take, checked, as keyword arguments of SamplingParams (and `n`,
    `stream`, `include_usage`); `limits` as for `number`."""
    for name, unused in UNSUPPORTED.items():
        if name in body and body[name] not in (None, unused, [], {}):
            raise RequestError(400, f"{name} is not supported by this server: leave it out", name, "unsupported")
    max_tokens = number(body, "max_completion_tokens", limits)
    if max_tokens is None:
        max_tokens = number(body, "max_tokens", limits)
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(400, f"stream_options must be an object, got {_kind(options)}", "stream_options")
    include_usage = boolean(options or {}, "include_usage")
    settings = {name: number(body, name, limits) for name in ("temperature", "top_k", "seed", "n")}
    settings.update({name: number(body, name, limits) for name in ("frequency_penalty", "presence_penalty")})
    settings["top_p"] = max(number(body, "top_p", limits), 1e-9)
    return dict(settings, max_gen_len=max_tokens, stop=_stop(body.get("stop")), stream=stream,
                include_usage=include_usage)  # fmt: skip


def completion_job(body: dict, tokenizer: Tokenizer, limits: dict[str, int]) -> Job:
    """A /v1/completions request: prompt (text, list of texts, token ids, or list of token id lists), echo,
    logprobs (a count, 0 to 5) and the common settings."""
    settings = common_settings(body, limits)
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)):
        raise RequestError(400, f"logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}, got "
                           f"{_kind(logprobs)}", "logprobs")  # fmt: skip
    if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise RequestError(400, f"logprobs must be from 0 to {MAX_COMPLETION_LOGPROBS}, got {logprobs}", "logprobs")
    settings["echo"] = boolean(body, "echo")
    if settings["max_gen_len"] is None:
        settings["max_gen_len"] = 16  # OpenAI's default for completions
    prompts = [_fit(prompt, index, limits) for index, prompt in enumerate(_prompts(body.get("prompt"), tokenizer))]
    return _job(prompts, settings, logprobs is not None, logprobs or 0)


def chat_job(body: dict, chat_format: ChatFormat, limits: dict[str, int]) -> Job:
    """A /v1/chat/completions request: messages in the checkpoint's chat format, logprobs (true or false) with
    top_logprobs (0 to 20), and the common settings."""
    settings = common_settings(body, limits)
    logprobs = boolean(body, "logprobs")
    top_logprobs = number(body, "top_logprobs", limits)
    if top_logprobs and not logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    dialog = _dialog(body.get("messages"))
    refusal = chat_format.refusal(dialog)
    if refusal:
        raise RequestError(400, f"messages: {refusal}", "messages")
    prompt = _fit(chat_format.encode_dialog_prompt(dialog), 0, limits, "messages")
    return _job([prompt], settings, logprobs, top_logprobs)


def _job(prompts: list[list[int]], settings: dict, logprobs: bool, top_logprobs: int) -> Job:
    n, stream, include_usage = settings.pop("n"), settings.pop("stream"), settings.pop("include_usage")
    if len(prompts) * n > 2 * MAX_PROMPTS:
        raise RequestError(400, f"{len(prompts)} prompts times n={n} is more than the {2 * MAX_PROMPTS} choices "
                           "one request may ask for", "n")  # fmt: skip
    try:
        params = SamplingParams(**settings, logprobs=logprobs, top_logprobs=top_logprobs)
    except (ValueError, TypeError) as error:
        raise RequestError(400, str(error)) from None
    return Job(prompts, params, n, stream, include_usage, top_logprobs)


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(item, str) and item for item in stops):
        raise RequestError(400, f"stop must be a non-empty string or a list of them, got {_kind(stop)}", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(400, f"stop holds {len(stops)} sequences, more than {MAX_STOP_SEQUENCES}", "stop")
    return tuple(stops)


def _prompts(prompt: Any, tokenizer: Tokenizer) -> list[list[int]]:
    """The token ids of each prompt, BOS first for text."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(item, int) and not isinstance(item, bool)
                                                     for item in prompt):  # fmt: skip
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                           f"lists of token ids, got {_kind(prompt)}", "prompt")  # fmt: skip
    if len(prompt) > MAX_PROMPTS:
        raise RequestError(400, f"prompt holds {len(prompt)} prompts, more than {MAX_PROMPTS}", "prompt")
    encoded = []
    for index, item in enumerate(prompt):
        if isinstance(item, str):
            try:
                encoded.append(tokenizer.encode(item, bos=True, eos=False))
            except ValueError as error:
                raise RequestError(400, f"prompt {index}: {error}", "prompt") from None
        elif isinstance(item, list) and all(_token(token, tokenizer) for token in item) and item:
            encoded.append(list(item))
        else:
            raise RequestError(400, f"prompt {index} must be a string or a non-empty list of token ids from 0 to "
                               f"{tokenizer.n_words - 1}, got {_kind(item)}", "prompt")  # fmt: skip
    return encoded


def _token(token: Any, tokenizer: Tokenizer) -> bool:
    return isinstance(token, int) and not isinstance(token, bool) and 0 <= token < tokenizer.n_words


def _fit(prompt: list[int], index: int, limits: dict[str, int], what: str = "prompt") -> list[int]:
    limit = limits["prompt"]
    if len(prompt) > limit:
        raise RequestError(400, f"{what} {index} is {len(prompt)} tokens long, more than the {limit} this server "
                           "takes (the context, less room for one new token): shorten it", what)  # fmt: skip
    return prompt


def _dialog(messages: Any) -> list[dict]:
    """The messages as a dialog of the library: roles system/developer, user, assistant; content a string or a
    list of text parts."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, f"messages must be a non-empty list of messages, got {_kind(messages)}", "messages")
    dialog = []
    for number_, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(400, f"messages[{number_}] must be an object with a role of {', '.join(ROLES)}",
                               "messages")  # fmt: skip
        dialog.append({"role": ROLES[message["role"]], "content": _content(message.get("content"), number_)})
    try:
        check_dialog(dialog)
    except (ValueError, TypeError) as error:
        raise RequestError(400, f"messages: {error}".replace("dialog 0", "the dialog"), "messages") from None
    return dialog


def _content(content: Any, number_: int) -> str:
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else None
    if parts is None or not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(
            part.get("text"), str) for part in parts):  # fmt: skip
        raise RequestError(400, f"messages[{number_}].content must be a string or a list of text parts",
                           "messages")  # fmt: skip
    return "".join(part["text"] for part in parts)


def _kind(value: Any) -> str:
    """The JSON type of a value, for messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)
