"""The server's scheduler, without HTTP: continuous batching is exact (a request under load gets what
`text_completion` / `chat_completion` give it alone), rows join and leave between steps, the queue is bounded,
and cancelling or stopping frees the rows. Orders of events are read from the scheduler's own step log."""

import queue
import time
from typing import Optional

import pytest
import torch

from helpers import random_model, small_args
from llama import Llama, SamplingParams, Tokenizer, demo_checkpoint
from llama.compiled import CompiledStep
from llama.serve.ranks import RankLost
from llama.serve.scheduler import QueueFull, Scheduler, ShuttingDown
from llama.serve.sequences import Failed, Finished, Piece, Request

TIMEOUT = 60  # seconds any one event may take: a bound against hangs, never a measure of speed


@pytest.fixture(scope="module")
def demo():
    ckpt_dir, tokenizer_path = demo_checkpoint()
    return Llama.build(ckpt_dir, tokenizer_path, max_seq_len=128, max_batch_size=4)


@pytest.fixture(scope="module")
def random_llama(tokenizer_path):
    return Llama(random_model(small_args(max_batch_size=4, max_seq_len=64)), Tokenizer(str(tokenizer_path)))


def submit(scheduler: Scheduler, prompt: list[int], params: SamplingParams, n: int = 1, name: str = "") -> queue.Queue:
    events: queue.Queue = queue.Queue()
    scheduler.submit(Request(prompt, params, events.put, n, name))
    return events


def collect(events: queue.Queue, n: int = 1) -> dict[int, tuple[str, Finished]]:
    """Each choice's streamed text and its Finished event."""
    texts, results = [""] * n, {}
    while len(results) < n:
        event = events.get(timeout=TIMEOUT)
        assert not isinstance(event, Failed), event.message
        if isinstance(event, Piece):
            texts[event.choice] += event.text
        else:
            results[event.choice] = (texts[event.choice], event)
    return results


def mixed_load(llama: Llama, texts: list[str], lengths: list[int], stops: list[list[str]]) -> list:
    """Every prompt, greedy with logprobs, submitted at once to a scheduler of max_batch_size 4 and chunks of 5
    tokens: rows run, join and leave."""
    scheduler = Scheduler(llama, max_queue=len(texts), prefill_chunk=5).start()
    try:
        queues = [
            submit(scheduler, llama.tokenizer.encode(text, bos=True, eos=False),
                   SamplingParams(temperature=0, max_gen_len=length, stop=stop, logprobs=True), name=str(index))
            for index, (text, length, stop) in enumerate(zip(texts, lengths, stops))
        ]  # fmt: skip
        results = [collect(events)[0] for events in queues]
        assert scheduler.state()["free_rows"] == 4
        return results
    finally:
        scheduler.stop(0)
        scheduler.join(TIMEOUT)


def check_each_as_alone(
    llama: Llama, texts: list[str], lengths: list[int], stops: list[list[str]], alone_on: Optional[Llama] = None
) -> None:
    """Each request under load (on `llama`) gets what it gets alone (on `alone_on`, by default `llama` too)."""
    for index, (streamed, result) in enumerate(mixed_load(llama, texts, lengths, stops)):
        alone = (alone_on or llama).text_completion(
            [texts[index]], temperature=0, max_gen_len=lengths[index], stop=stops[index] or None, logprobs=True
        )[0]
        assert result.completion.text == streamed == alone["generation"], f"request {index} got other text"
        tokens = [llama.tokenizer.decode([token]) for token in result.completion.tokens]
        assert tokens == alone["tokens"], f"request {index} got other tokens"
        assert torch.allclose(torch.tensor(result.completion.logprobs), torch.tensor(alone["logprobs"]), atol=1e-4)


SHAKESPEARE = [
    "ROMEO:",
    "First Citizen:\nWe are accounted poor citizens, the patricians good.",
    "KING",
    "O",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "JULIET:\n",
]


def test_greedy_requests_under_load_get_the_tokens_each_gets_alone_on_the_demo_model(demo):
    texts = [SHAKESPEARE[index % len(SHAKESPEARE)] for index in range(16)]
    lengths = [3 + (7 * index) % 29 for index in range(16)]
    stops = [["\n\n"] if index % 3 == 0 else [] for index in range(16)]
    check_each_as_alone(demo, texts, lengths, stops)


def test_greedy_requests_under_load_get_the_tokens_each_gets_alone_on_a_random_model(random_llama):
    texts = ["The quick brown fox", "Once upon a time", "She read", "[INST] What", "0 1 2 3 4 5 6 7 8 9", "a"] * 3
    lengths = [2 + (5 * index) % 23 for index in range(len(texts))]
    stops = [["e"] if index % 4 == 1 else [] for index in range(len(texts))]
    check_each_as_alone(random_llama, texts, lengths, stops)


def test_with_a_compiled_step_requests_under_load_get_the_tokens_eager_decoding_gives_each_alone(random_llama):
    compiled = Llama(random_llama.model, random_llama.tokenizer)
    # One window (the whole context) and Inductor's Python wrapper: one graph, the quickest to compile.
    step = compiled.decode_step = CompiledStep(random_llama.model, min_window=64, cpp_wrapper=False)
    graph, calls = step.compiled, []
    step.compiled = lambda *args, **kwargs: calls.append(args[0].shape) or graph(*args, **kwargs)
    texts = ["The quick brown fox", "Once upon a time", "She read", "0 1 2 3 4 5 6 7 8 9", "a", "[INST] What"]
    check_each_as_alone(compiled, texts, [20, 7, 25, 3, 14, 9], [[], ["e"], [], [], [], []], alone_on=random_llama)
    assert calls and set(calls) == {(4, 1)}, "the steps of one token per row ran the graph, on every row"


def test_a_greedy_chat_request_under_load_gets_what_chat_completion_gives_it_alone(demo):
    dialog = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who art thou?"}]
    prompt = demo.chat_format.encode_dialog_prompt(dialog)
    scheduler = Scheduler(demo, prefill_chunk=4).start()
    try:
        others = [submit(scheduler, [1] + [50 + index] * (index + 2), SamplingParams(temperature=0, max_gen_len=9))
                  for index in range(3)]  # fmt: skip
        events = submit(scheduler, prompt, SamplingParams(temperature=0, max_gen_len=24))
        text, result = collect(events)[0]
        for other in others:
            collect(other)
    finally:
        scheduler.stop(0)
        scheduler.join(TIMEOUT)
    alone = demo.chat_completion([dialog], temperature=0, max_gen_len=24)[0]["generation"]["content"]
    assert text == result.completion.text == alone


def test_a_seeded_sampled_request_gets_the_same_text_alone_and_under_load(demo):
    prompt = demo.tokenizer.encode("ROMEO:", bos=True, eos=False)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_gen_len=20, seed=1234, frequency_penalty=0.5)
    scheduler = Scheduler(demo, prefill_chunk=3).start()
    try:
        alone = collect(submit(scheduler, prompt, params))[0][1].completion
        busy = [submit(scheduler, prompt, SamplingParams(temperature=1.0, max_gen_len=5 + index)) for index in range(3)]
        loaded = collect(submit(scheduler, prompt, params))[0][1].completion
        for events in busy:
            collect(events)
    finally:
        scheduler.stop(0)
        scheduler.join(TIMEOUT)
    assert loaded.tokens == alone.tokens and loaded.text == alone.text
    offline = demo.text_completion(["ROMEO:"], temperature=1.0, top_p=0.95, max_gen_len=20, seed=1234,
                                   frequency_penalty=0.5)[0]["generation"]  # fmt: skip
    assert alone.text == offline, "choice 0 of a seeded request draws what text_completion draws with that seed"


def test_n_choices_of_a_seeded_request_differ_and_the_first_is_text_completions(demo):
    prompt = demo.tokenizer.encode("KING", bos=True, eos=False)
    scheduler = Scheduler(demo).start()
    try:
        results = collect(submit(scheduler, prompt, SamplingParams(temperature=1.0, max_gen_len=16, seed=7), n=3), 3)
    finally:
        scheduler.stop(0)
        scheduler.join(TIMEOUT)
    texts = [results[choice][1].completion.text for choice in range(3)]
    assert len(set(texts)) == 3, texts
    assert texts[0] == demo.text_completion(["KING"], temperature=1.0, max_gen_len=16, seed=7)[0]["generation"]


def test_a_short_request_sent_while_a_long_one_runs_finishes_first_decoded_in_the_same_steps(demo):
    scheduler = Scheduler(demo).start()
    try:
        long = submit(scheduler, [1, 100], SamplingParams(temperature=0, max_gen_len=100, ignore_eos=True), name="long")
        first = long.get(timeout=TIMEOUT)  # the long one decodes: its first piece (or its end) has come
        assert isinstance(first, (Piece, Finished))
        short = submit(scheduler, [1, 200], SamplingParams(temperature=0, max_gen_len=4, ignore_eos=True), name="short")
        collect(short)
        assert scheduler.state()["running"] == 1, "the long request still runs when the short one has finished"
        collect(long)
    finally:
        scheduler.stop(0)
        scheduler.join(TIMEOUT)
    together = [step for step in scheduler.steps if {row[0] for row in step.rows} == {"long", "short"}]
    decoding = [step for step in together if all(row[3] == "decode" for row in step.rows)]
    assert len(decoding) >= 3, "the short request's tokens were decoded in the long one's steps"


def test_a_long_prompt_is_read_in_chunks_while_the_running_rows_keep_decoding(demo):
    scheduler = Scheduler(demo, prefill_chunk=8).start()
    try:
        running = submit(scheduler, [1, 100], SamplingParams(temperature=0, max_gen_len=60, ignore_eos=True), name="a")
        running.get(timeout=TIMEOUT)
        reading = submit(scheduler, [1] + [300] * 40, SamplingParams(temperature=0, max_gen_len=2), name="b")
        collect(reading)
        collect(running)
    finally:
        scheduler.stop(0)
        scheduler.join(TIMEOUT)
    prefill = [step for step in scheduler.steps if any(row[0] == "b" and row[3] == "prefill" for row in step.rows)]
    assert [row[2] for step in prefill for row in step.rows if row[0] == "b"] == [8, 8, 8, 8, 8, 1]
    assert all(("a", 0, 1, "decode") in step.rows for step in prefill), "the running row decoded at every chunk"


def test_the_queue_holds_at_most_max_queue_waiting_requests(demo):
    scheduler = Scheduler(demo, max_queue=2)  # not started: nothing leaves the queue
    for _ in range(2):
        submit(scheduler, [1], SamplingParams(temperature=0, max_gen_len=1))
    with pytest.raises(QueueFull, match="waiting"):
        submit(scheduler, [1], SamplingParams(temperature=0, max_gen_len=1))
    with pytest.raises(ValueError, match="n=5"):
        submit(scheduler, [1], SamplingParams(temperature=0, max_gen_len=1), n=5)


def test_a_cancelled_request_frees_its_row_and_emits_nothing_more(demo):
    scheduler = Scheduler(demo).start()
    try:
        params = SamplingParams(temperature=0, max_gen_len=100, ignore_eos=True)
        events: queue.Queue = queue.Queue()
        request = Request([1, 5], params, events.put, 1, "gone")
        scheduler.submit(request)
        events.get(timeout=TIMEOUT)
        scheduler.cancel(request)
        collect(submit(scheduler, [1, 6], SamplingParams(temperature=0, max_gen_len=2)))  # a step after the cancel
        assert scheduler.state()["free_rows"] == 4
        while not events.empty():
            assert not isinstance(events.get(), Finished), "a cancelled request does not finish"
    finally:
        scheduler.stop(0)
        scheduler.join(TIMEOUT)


def test_stop_refuses_new_and_waiting_requests_and_ends_running_ones_after_the_grace(demo):
    scheduler = Scheduler(demo)
    waiting = submit(scheduler, [1], SamplingParams(temperature=0, max_gen_len=1))
    scheduler.stop(0)
    with pytest.raises(ShuttingDown):
        submit(scheduler, [1], SamplingParams(temperature=0, max_gen_len=1))
    scheduler.start()
    assert scheduler.join(TIMEOUT)
    event = waiting.get(timeout=TIMEOUT)
    assert isinstance(event, Failed) and event.shutting_down
    scheduler = Scheduler(demo).start()
    running = submit(scheduler, [1, 5], SamplingParams(temperature=0, max_gen_len=100, ignore_eos=True))
    running.get(timeout=TIMEOUT)
    scheduler.stop(0)
    assert scheduler.join(TIMEOUT)
    events = [running.get(timeout=TIMEOUT)]
    while not isinstance(events[-1], (Failed, Finished)):
        events.append(running.get(timeout=TIMEOUT))
    assert isinstance(events[-1], Failed) and events[-1].shutting_down
    assert scheduler.state()["free_rows"] == 4


class FakeLeader:
    """Rank 0's link to the other ranks, as the scheduler sees it: each step through `forward`, a heartbeat when
    idle, a stop at the end; once `gone`, a step finds another rank gone."""

    def __init__(self, step):
        self.step, self.steps, self.idles, self.stops, self.gone = step, 0, 0, 0, False

    def forward(self, *inputs):
        if self.gone:
            raise RankLost("rank 0 lost another rank of the model (it was killed): the server stops")
        self.steps += 1
        return self.step(*inputs)

    def idle(self):
        self.idles += 1

    def stop(self):
        self.stops += 1


def test_on_several_ranks_steps_go_to_the_others_and_a_lost_rank_ends_every_request_and_the_scheduler(
    demo, monkeypatch
):
    monkeypatch.setattr("llama.serve.scheduler.HEARTBEAT", 0.01)  # seconds idle before telling the others
    scheduler = Scheduler(demo)
    leader = scheduler.leader = FakeLeader(scheduler.forward_step)
    scheduler.start()
    try:
        collect(submit(scheduler, [1, 5], SamplingParams(temperature=0, max_gen_len=3, ignore_eos=True)))
        for _ in range(500):  # idle now: until the heartbeats come
            if leader.idles >= 2:
                break
            time.sleep(0.01)
        running = submit(scheduler, [1, 6], SamplingParams(temperature=0, max_gen_len=100, ignore_eos=True))
        running.get(timeout=TIMEOUT)
        leader.gone = True
        events = [running.get(timeout=TIMEOUT)]
        while not isinstance(events[-1], (Failed, Finished)):
            events.append(running.get(timeout=TIMEOUT))
        assert scheduler.join(TIMEOUT), "the scheduler ends by itself when a rank is gone"
    finally:
        scheduler.stop(0)
        scheduler.join(TIMEOUT)
    assert leader.steps >= 3 and leader.idles >= 2 and leader.stops == 0
    assert isinstance(events[-1], Failed) and events[-1].shutting_down
    assert "lost another rank" in str(scheduler.lost) and scheduler.state()["free_rows"] == 4
    with pytest.raises(ShuttingDown):
        submit(scheduler, [1], SamplingParams(temperature=0, max_gen_len=1))
    stopped = Scheduler(demo)
    stopped.leader = FakeLeader(stopped.forward_step)
    stopped.start().stop(0)
    assert stopped.join(TIMEOUT) and stopped.leader.stops == 1 and stopped.lost is None
