"""Whatever a caller passes, the only exceptions are the documented ones (TypeError, ValueError), with a
message; Unicode edge cases round-trip; and many generations in one process do not leak memory."""

import gc
import json
import math
import threading
import warnings
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import meta_params, random_model, small_args, write_checkpoint
from llama.chat_format import UNSAFE_REQUEST_ERROR
from llama.cli import main
from llama.generation import Llama


@pytest.fixture(scope="module")
def llama(tokenizer):
    return Llama(random_model(small_args(max_seq_len=64, max_batch_size=3), seed=51), tokenizer)


UNICODE_CASES = {
    "emoji": "Hi 😀👍🏽",
    "family emoji with zero-width joiners": "\U0001f469\u200d\U0001f469\u200d\U0001f467",
    "right-to-left Hebrew and Arabic": "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",
    "bidirectional override": "abc\u202edef\u202c",
    "zero-width space and joiner": "a\u200bb\u200dc\ufeff",
    "combining marks": "e\u0301 a\u0308\u0323",
    "CJK": "世界 こんにちは 안녕",
    "control characters": "tab\there\x00nul\x1bescape\r\n",
    "private use and astral": "\ue000 \U0010fffd \U0001d11e",
}


@pytest.mark.parametrize("text", UNICODE_CASES.values(), ids=UNICODE_CASES.keys())
def test_unicode_edge_cases_round_trip_through_the_tokenizer_and_generate(llama, text):
    tokens = llama.tokenizer.encode(text, bos=False, eos=False)
    assert llama.tokenizer.decode(tokens) == text
    result = llama.text_completion([text], temperature=0, max_gen_len=3, echo=True)[0]["generation"]
    assert result.startswith(text)


@pytest.mark.parametrize("text", ["\ud800", "ok \udfff", "\udc80\ud800 pair in the wrong order"])
def test_lone_surrogates_fail_cleanly_naming_the_prompt(llama, text):
    with pytest.raises(ValueError, match=r"prompt 1: text is not valid Unicode: .* lone surrogate"):
        llama.text_completion(["fine", text], max_gen_len=2)
    with pytest.raises(ValueError, match=r"dialog 0, message 0: text is not valid Unicode"):
        llama.chat_completion([[{"role": "user", "content": text}]], max_gen_len=2)


# derandomize: the same examples on every run, so that how many reach generation is fixed too
FAST = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


class Counting(torch.nn.Module):
    """Wraps a model and counts its forward passes: a refused call must be refused before the first one."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.params, self.calls = model, model.params, 0

    def forward(self, tokens, start_pos=0, last_only=False):
        self.calls += 1
        return self.inner(tokens, start_pos, last_only=last_only)


@pytest.fixture(scope="module")
def counted(llama):
    return Llama(Counting(llama.model), llama.tokenizer)


def refused(call, counted: Llama, expected: Optional[tuple[type, str]], runs: bool = True) -> bool:
    """Run `call`; if `expected` is (error type, regular expression), it must raise exactly that, before any
    forward pass; else it must run the model if `runs`, and not otherwise. Returns whether it reached generation."""
    before = counted.model.calls
    if expected is None:
        call()
        assert (counted.model.calls > before) == runs, "a valid call runs the model, unless it has nothing to run"
        return runs
    error_type, message = expected
    with pytest.raises(error_type, match=message):
        call()
    assert counted.model.calls == before, "the error was raised where arguments enter, before any forward pass"
    return False


def expected_completion_error(prompts, temperature, top_p, top_k, stop, tokenizer, max_prompt_len):
    """The documented error for these text_completion arguments, as (type, message pattern), or None: the
    settings checked in the order of the signature, then the prompts (generation.md's table of rules)."""
    number = (int, float)
    if not isinstance(temperature, number) or not 0 <= temperature < math.inf:
        return ValueError, "temperature must be a finite number >= 0"
    if not isinstance(top_p, number) or not 0 < top_p <= 1:
        return ValueError, r"top_p must be in \(0, 1\]"
    if top_k < 0:
        return ValueError, "top_k must be an integer >= 0"
    if isinstance(stop, str):
        return TypeError, "stop must be a list of strings"
    if stop is not None and not all(stop):
        return TypeError, "stop must be a list of non-empty strings"
    if not prompts:
        return ValueError, "no prompts given"
    for index, prompt in enumerate(prompts):
        if len(tokenizer.encode(prompt, bos=True, eos=False)) > max_prompt_len:
            return ValueError, f"prompt {index} is \\d+ tokens long"
    return None


SOME_NUMBERS = st.one_of(st.floats(allow_nan=True), st.integers(-2, 2))
VALID_SETTINGS = dict(
    prompts=st.lists(st.text(max_size=16), min_size=1, max_size=4),
    temperature=st.one_of(st.sampled_from([0, 0.7, 1.0]), st.floats(0.05, 2.0)),
    top_p=st.floats(0.05, 1.0),
    top_k=st.integers(0, 50),
    stop=st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=3), max_size=2)),
)
ANY_SETTINGS = dict(
    prompts=st.lists(st.text(max_size=40), max_size=4),  # none, or too long
    temperature=SOME_NUMBERS,
    top_p=SOME_NUMBERS,
    top_k=st.one_of(st.integers(max_value=-1), st.integers(0, 500)),
    stop=st.one_of(st.lists(st.text(max_size=2), max_size=3), st.text(max_size=3)),  # empty strings, or a string
)


def test_random_completion_calls_raise_only_the_documented_error_before_generating(counted):
    """Valid arguments, or valid ones with one drawn from anything: each call either generates (its texts
    stopping before any stop sequence) or raises the one error the documentation gives for its first bad
    argument, before any forward pass. At least a quarter of the calls reach generation."""
    max_prompt_len = counted.model.params.max_seq_len - 1
    reached = []

    @FAST
    @given(
        settings=st.fixed_dictionaries(VALID_SETTINGS),
        replaced=st.sampled_from([None, None, None, *ANY_SETTINGS]),
        echo=st.booleans(),
        data=st.data(),
    )
    def check(settings, replaced, echo, data):
        if replaced is not None:
            settings[replaced] = data.draw(ANY_SETTINGS[replaced], label=replaced)
        expected = expected_completion_error(**settings, tokenizer=counted.tokenizer, max_prompt_len=max_prompt_len)
        results = []
        prompts, stop = settings.pop("prompts"), settings["stop"]
        reached.append(
            refused(
                lambda: results.extend(counted.text_completion(prompts, **settings, echo=echo, max_gen_len=3)),
                counted,
                expected,
            )
        )
        if results:
            assert len(results) == len(prompts)
            for prompt, result in zip(prompts, results):
                generated = result["generation"][len(prompt) :] if echo else result["generation"]
                assert not any(sequence in generated for sequence in stop or ()), (stop, generated)

    check()
    assert sum(reached) >= len(reached) / 4, f"only {sum(reached)} of {len(reached)} calls reached generation"


CONTENT = st.one_of(*[st.text(max_size=8)] * 3, st.sampled_from(["[INST]", "<</SYS>>", "hi", "ok"]))


@st.composite
def valid_dialogs(draw):
    """An optional system message, then user/assistant exchanges, then a user message."""
    dialog = [{"role": "system", "content": draw(CONTENT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 1))):
        dialog += [{"role": "user", "content": draw(CONTENT)}, {"role": "assistant", "content": draw(CONTENT)}]
    return dialog + [{"role": "user", "content": draw(CONTENT)}]


# One mistake each, against a rule of check_dialog: drawn as often as one another, so that every rule is tried.
MISTAKES = ("role", "content", "not a dict", "no content", "ends with the assistant", "only a system message", "empty",
            "a string", "no dialogs")  # fmt: skip


def broken(dialogs: list, mistake: str, draw) -> list:
    """`dialogs` (valid) with `mistake` made in one of them, or no dialogs at all."""
    if mistake == "no dialogs":
        return []
    index = draw(st.integers(0, len(dialogs) - 1))
    dialog = dialogs[index]
    message = draw(st.integers(0, len(dialog) - 1))
    if mistake == "role":
        dialog[message] = {"role": draw(st.sampled_from(["system", "user", "assistant", "bot", ""])), "content": "x"}
    elif mistake == "content":
        dialog[message] = {"role": dialog[message]["role"], "content": draw(st.one_of(st.integers(), st.none()))}
    elif mistake == "not a dict":
        dialog[message] = ["nested"]
    elif mistake == "no content":
        dialog[message] = {"role": "user"}
    elif mistake == "ends with the assistant":
        dialog.append({"role": "assistant", "content": "x"})
    else:
        dialogs[index] = {"only a system message": [{"role": "system", "content": "x"}], "empty": [],
                          "a string": "not a dialog"}[mistake]  # fmt: skip
    return dialogs


def holds_a_tag(dialog) -> bool:
    """Whether a message holds one of the Llama 2 format's tags (such a dialog gets the error text, unrun)."""
    return any(tag in message["content"] for message in dialog for tag in ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"))


def expected_chat_error(dialogs, chat_format, max_prompt_len):
    """The documented error for these dialogs (check_dialog's rules, dialog by dialog, then each prompt's
    length), as (type, message pattern), or None."""
    if not dialogs:
        return ValueError, "no dialogs given"
    for index, dialog in enumerate(dialogs):
        if not isinstance(dialog, list) or not dialog:
            return ValueError, f"dialog {index} must be a non-empty list of messages"
        for number, message in enumerate(dialog):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                return TypeError, f"dialog {index}, message {number}: expected a dict with 'role' and 'content'"
            if not isinstance(message["content"], str):
                return TypeError, f"dialog {index}, message {number}: content must be a str"
        roles = [message["role"] for message in dialog]
        turns = roles[1:] if roles[0] == "system" else roles
        if not turns:
            return ValueError, f"dialog {index} has only a system message"
        if any(role != ("user" if number % 2 == 0 else "assistant") for number, role in enumerate(turns)):
            return ValueError, f"dialog {index}: roles must go system \\(optional\\), user, assistant"
        if turns[-1] != "user":
            return ValueError, f"dialog {index} must end with a user message"
    for index, dialog in enumerate(dialogs):
        if not holds_a_tag(dialog) and len(chat_format.encode_dialog_prompt(dialog)) > max_prompt_len:
            return ValueError, f"dialog {index} is \\d+ tokens long"
    return None


def test_random_dialogs_get_answers_or_the_documented_error_before_generating(counted):
    """Valid dialogs, or with one mistake in one of them, or none: each call either answers every dialog (those holding
    a tag of the format with the error text) or raises the one error the documentation gives for the first
    mistake, before any forward pass. At least a quarter of the calls reach generation."""
    max_prompt_len = counted.model.params.max_seq_len - 1
    reached = []

    @FAST
    @given(
        dialogs=st.lists(valid_dialogs(), min_size=1, max_size=3),
        mistake=st.sampled_from([None] * 6 + list(MISTAKES)),
        data=st.data(),
    )
    def check(dialogs, mistake, data):
        if mistake is not None:
            dialogs = broken(dialogs, mistake, data.draw)
        expected = expected_chat_error(dialogs, counted.chat_format, max_prompt_len)
        results = []
        runs = expected is None and not all(map(holds_a_tag, dialogs))  # refused dialogs are not run
        call = lambda: results.extend(counted.chat_completion(dialogs, temperature=0, max_gen_len=3))  # noqa: E731
        reached.append(refused(call, counted, expected, runs))
        if results:
            assert len(results) == len(dialogs)
            for dialog, result in zip(dialogs, results):
                assert result["generation"]["role"] == "assistant"
                assert (result["generation"]["content"] == UNSAFE_REQUEST_ERROR) == holds_a_tag(dialog)

    check()
    assert sum(reached) >= len(reached) / 4, f"only {sum(reached)} of {len(reached)} calls reached generation"


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_hundreds_of_generations_in_one_process_do_not_grow_memory(llama):
    prompts = ["The sea", "Once upon a time", "", "A"]

    def run(count):
        for index in range(count):
            llama.text_completion(prompts[: 1 + index % 3], temperature=0.8, max_gen_len=6, stop=["\n"])
            list(llama.stream_chat([[{"role": "user", "content": prompts[index % 4]}]], max_gen_len=4))

    run(30)  # warm-up: allocator pools, lazily built tables
    gc.collect()
    tensors_before = sum(issubclass(type(obj), torch.Tensor) for obj in gc.get_objects())
    before = resident_bytes()
    run(150)  # 300 generations: a completion and a streamed chat each time
    gc.collect()
    growth = resident_bytes() - before
    tensors_after = sum(issubclass(type(obj), torch.Tensor) for obj in gc.get_objects())
    assert tensors_after <= tensors_before, f"{tensors_after - tensors_before} tensors left alive by 300 generations"
    assert growth < 16 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 300 generations"


# ---- one generation at a time per Llama ----------------------------------------------------------------------

THREAD_PROMPTS = [["The sea", "Once upon"], ["A quick brown fox"], ["She said", "Numbers: 1 2", "x"]]


def test_calls_from_several_threads_wait_their_turn_and_get_the_results_of_sequential_calls(llama):
    expected = [llama.text_completion(prompts, temperature=0, max_gen_len=12) for prompts in THREAD_PROMPTS * 2]
    results = [None] * len(expected)
    start = threading.Barrier(len(expected))

    def run(index):
        start.wait()
        results[index] = llama.text_completion((THREAD_PROMPTS * 2)[index], temperature=0, max_gen_len=12)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(expected))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert results == expected


def test_a_call_while_a_stream_is_half_read_is_refused_and_the_stream_stays_right(llama):
    final = llama.text_completion(["The sea"], temperature=0, max_gen_len=10)[0]["generation"]
    stream = llama.stream_completion(["The sea"], temperature=0, max_gen_len=10)
    text = next(stream)[0]
    with pytest.raises(RuntimeError, match="a stream not read to its end.*close\\(\\)"):
        llama.text_completion(["Once upon"], temperature=0, max_gen_len=10)
    other = llama.stream_completion(["Once upon"], temperature=0, max_gen_len=10)
    with pytest.raises(RuntimeError, match="in the middle of another generation"):
        next(other)
    text += "".join(pieces[0] for pieces in stream)
    assert text == final, "the refused calls did not touch the stream's cache"
    assert llama.text_completion(["The sea"], temperature=0, max_gen_len=10)[0]["generation"] == final


def test_a_stream_closed_or_dropped_early_frees_the_llama(llama):
    stream = llama.stream_completion(["The sea"], temperature=0, max_gen_len=10)
    next(stream)
    stream.close()
    llama.text_completion(["x"], max_gen_len=2)
    stream = llama.stream_chat([[{"role": "user", "content": "Hi"}]], max_gen_len=10)
    next(stream)
    del stream
    gc.collect()
    llama.text_completion(["x"], max_gen_len=2)


def test_the_callers_code_between_streamed_steps_runs_outside_inference_mode(llama):
    for _ in llama.stream_completion(["The sea"], max_gen_len=4):
        assert not torch.is_inference_mode_enabled()
        assert not torch.ones(1).is_inference()


# ---- any params.json, any command line ---------------------------------------------------------------------------

JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.sampled_from([0, 1, 2, 4, 8, 32, 64, 400, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
PARAMS_KEYS = st.sampled_from(
    ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
     "rope_theta", "max_seq_len", "max_batch_size", "moe"]
)  # fmt: skip


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    args = small_args()
    return write_checkpoint(tmp_path_factory.mktemp("params"), args, random_model(args, seed=52).state_dict())


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(changes=st.dictionaries(PARAMS_KEYS, JSON_VALUES, max_size=4), dropped=st.lists(PARAMS_KEYS, max_size=2))
def test_any_params_json_loads_or_is_refused_with_a_documented_error(
    small_checkpoint, tokenizer_path, changes, dropped
):
    params = {key: value for key, value in (meta_params(small_args()) | changes).items() if key not in dropped}
    (small_checkpoint / "params.json").write_text(json.dumps(params))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # settings this library does not know
        try:
            llama = Llama.build(small_checkpoint, tokenizer_path, max_seq_len=16, max_batch_size=1, device="cpu")
        except ValueError as error:
            message = str(error)
            assert "\n" not in message, message
            named = [key for key in [*changes, *dropped] if key in message]
            assert "params.json" in message or named, f"the message names neither params.json nor a setting: {message}"
            return
    assert llama.model.params.n_layers == 2, "only settings that match the tensors load"


COMMAND_WORDS = [
    "reshard", "fold-norms", "to-hf", "from-hf", "train", "--overwrite", "--overwrite=maybe", "--no-overwrite",
    "--overwrite=no", "--model-parallel-size", "--model_parallel_size", "2", "0", "-1", "3.5", "x", "out", ".", "..",
    "--tokenizer-path", "--max-file-bytes", "--max-position-embeddings", "--text-path", "missing.txt", "--out-dir",
    "--dim", "--steps", "--dtype", "int8", "--device", "tpu", "SRC", "",
]  # fmt: skip


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(words=st.lists(st.sampled_from(COMMAND_WORDS), max_size=8))
def test_any_command_line_ends_with_a_status_and_at_most_one_line_of_error(
    small_checkpoint, tmp_path, monkeypatch, capsys, words
):
    monkeypatch.chdir(tmp_path)  # whatever it writes lands here
    monkeypatch.setattr("warnings.showwarning", warnings.showwarning)
    argv = [str(small_checkpoint) if word == "SRC" else word for word in words]
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse: --help, or a malformed command line
        status = exit.code
    assert status in (0, 1, 2), argv
    error = capsys.readouterr().err
    if status:
        assert len([line for line in error.splitlines() if line.startswith("error")]) == 1, (argv, error)
        assert "Traceback" not in error
