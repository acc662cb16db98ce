"""Whatever a caller passes, the only exceptions are the documented ones (TypeError, ValueError), with a
message; Unicode edge cases round-trip; and many generations in one process do not leak memory."""

import gc
import json
import threading
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import meta_params, random_model, small_args, write_checkpoint
from llama.cli import main
from llama.generation import Llama

DOCUMENTED = (TypeError, ValueError)


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


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(
    prompts=st.lists(st.text(max_size=40), min_size=0, max_size=5),
    temperature=st.one_of(st.floats(allow_nan=True), st.integers(-2, 2)),
    top_p=st.one_of(st.floats(allow_nan=True), st.just(0.9)),
    top_k=st.one_of(st.integers(-3, 500), st.just(0)),
    stop=st.one_of(st.none(), st.lists(st.text(max_size=4), max_size=3), st.text(max_size=3)),
    echo=st.booleans(),
)
def test_random_completion_calls_raise_only_documented_errors(llama, prompts, temperature, top_p, top_k, stop, echo):
    try:
        results = llama.text_completion(
            prompts, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, echo=echo, max_gen_len=3
        )
    except DOCUMENTED as error:
        assert str(error)
        return
    assert len(results) == len(prompts) and all(isinstance(r["generation"], str) for r in results)


message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "bot", ""]),
        "content": st.one_of(st.text(max_size=30), st.sampled_from(["[INST]", "<</SYS>>", "hi"]), st.integers()),
    }
)
dialog = st.one_of(st.lists(message, max_size=5), st.just("not a dialog"), st.just([["nested"]]))


@FAST
@given(dialogs=st.lists(dialog, max_size=4))
def test_random_chat_calls_raise_only_documented_errors(llama, dialogs):
    try:
        results = llama.chat_completion(dialogs, temperature=0, max_gen_len=3)
    except DOCUMENTED as error:
        assert str(error)
        return
    assert len(results) == len(dialogs)
    assert all(r["generation"]["role"] == "assistant" and isinstance(r["generation"]["content"], str) for r in results)


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
    run(300)
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


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
        except (ValueError, FileNotFoundError) as error:
            assert str(error) and "\n" not in str(error)
            return
    assert llama.model.params.n_layers == 2, "only settings that match the tensors load"


COMMAND_WORDS = [
    "reshard", "fold-norms", "to-hf", "from-hf", "train", "--overwrite", "--overwrite=maybe", "--no-overwrite",
    "--overwrite=no", "--model-parallel-size", "--model_parallel_size", "2", "0", "-1", "3.5", "x", "out", ".", "..",
    "--tokenizer-path", "--max-file-bytes", "--max-position-embeddings", "--text-path", "missing.txt", "--out-dir",
    "--dim", "--steps", "--dtype", "int8", "--device", "tpu", "SRC", "",
]  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
