"""Whatever a caller passes, the only exceptions are the documented ones (TypeError, ValueError), with a
message; Unicode edge cases round-trip; and many generations in one process do not leak memory."""

import gc
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import random_model, run_python, small_args, write_checkpoint
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


LOAD_PROBE = """
import sys
import torch
from llama import Llama
from llama.checkpoint import meta_device
from llama.distributed import setup_model_parallel

def peak_rss():  # bytes; VmHWM is the peak resident size, reset by writing 5 to clear_refs
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return int(status["VmHWM"].split()[0]) * 1024

# The baseline: imports, the process group, and the ~800 modules (70 MB) the first dispatch mode imports.
setup_model_parallel(device="cpu")
with meta_device():
    torch.empty(1)
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # the imports peaked higher than where they settled: start the peak from here
baseline = peak_rss()
llama = Llama.build(sys.argv[1], sys.argv[2], max_seq_len=16, max_batch_size=1, device="cpu", dtype="float32")
llama.generate([[1, 5, 6]], max_gen_len=2, temperature=0)  # reads every weight
print(peak_rss() - baseline)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from Linux's /proc")
def test_checkpoint_in_the_models_dtype_takes_its_size_in_memory_once_not_twice(tmp_path, tokenizer_path):
    """Weights already in the wanted dtype stay where torch.load mapped them, instead of being copied into a
    second allocation: loading and using the model costs about the checkpoint's size (copying costs 2x)."""
    args = small_args(dim=512, n_layers=8, n_heads=8, n_kv_heads=None, max_seq_len=16, max_batch_size=1)
    folder = write_checkpoint(tmp_path / "ckpt", args, random_model(args).state_dict())
    checkpoint_bytes = (folder / "consolidated.00.pth").stat().st_size
    done = run_python(["-c", LOAD_PROBE, str(folder), str(tokenizer_path)])
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout.split()[-1])
    assert peak <= 1.3 * checkpoint_bytes, f"peak {peak / 2**20:.0f} MiB for a {checkpoint_bytes / 2**20:.0f} MiB file"
