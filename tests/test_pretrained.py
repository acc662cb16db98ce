"""A real pretrained model (../shared/models/stories260K, trained on children's stories) generates fluent
English through the public API and the example scripts, in one process and under torchrun."""

import re

import pytest
import torch

from helpers import run_torchrun, write_checkpoint
from llama import Llama
from llama.layout import read_model_args
from llama.shards import load_shard

# Words a correct model uses all the time in these stories; a broken one (wrong RoPE pairing, wrong
# grouped-query head mapping, misplaced norm) produces fragments and invented words instead.
COMMON_WORDS = set(
    """a an the and but so to of in on at with for from up out into was were is are be had has have did do
    said saw see looked wanted loved liked went came played play happy sad big little small red one day time
    once upon there then very too not it its he she her his him they them their we you i me my mom dad girl
    boy friend friends named lily tim ball park toy toys tree sky sun fun together what that this all can""".split()
)


def assert_fluent_story(text: str) -> None:
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 20, f"too short to judge: {text!r}"
    common = sum(word.lower() in COMMON_WORDS for word in words) / len(words)
    assert common >= 0.5, f"only {common:.0%} common words, not fluent English: {text!r}"
    assert "Lily" in text or "Tim" in text, f"the story's usual characters are missing: {text!r}"
    assert text.count(".") >= 2, f"no sentences: {text!r}"


@pytest.fixture(scope="module")
def stories(stories_dir):
    return Llama.build(
        str(stories_dir), str(stories_dir / "tokenizer.model"), max_seq_len=256, max_batch_size=2, device="cpu"
    )


def test_greedy_decoding_from_a_prompt_and_from_bos_alone_is_fluent_english(stories):
    results = stories.text_completion(["Once upon a time", ""], temperature=0, max_gen_len=80)
    for result in results:
        assert_fluent_story(result["generation"])


def test_sampling_with_top_p_is_fluent_english_too(stories):
    assert_fluent_story(
        stories.text_completion(["Once upon a time"], temperature=0.6, top_p=0.9, max_gen_len=80)[0]["generation"]
    )


def test_bfloat16_on_the_cpu_is_fluent_and_starts_like_float32(stories_dir, stories):
    half = Llama.build(
        str(stories_dir),
        str(stories_dir / "tokenizer.model"),
        max_seq_len=256,
        max_batch_size=1,
        device="cpu",
        dtype=torch.bfloat16,
    )
    assert half.model.output.weight.dtype == torch.bfloat16
    text = half.text_completion(["Once upon a time"], temperature=0, max_gen_len=60)[0]["generation"]
    assert_fluent_story(text)
    # bfloat16 keeps about 3 significant digits: the opening words agree with float32.
    full = stories.text_completion(["Once upon a time"], temperature=0, max_gen_len=60)[0]["generation"]
    assert text.split()[:6] == full.split()[:6]


def example_args(ckpt_dir, stories_dir):
    return ["--ckpt_dir", str(ckpt_dir), "--tokenizer_path", str(stories_dir / "tokenizer.model"), "--temperature", "0"]


@pytest.fixture
def plain_example(stories_dir, run_example):
    """example_text_completion.py on stories260K in one plain process (this one)."""
    plain = run_example("example_text_completion.py", *example_args(stories_dir, stories_dir))
    assert plain.returncode == 0, plain.stderr
    return plain.stdout


def test_example_text_completion_prints_stories_with_python_and_with_torchrun(stories_dir, plain_example):
    texts = plain_example.split("-" * 72 + "\n")
    assert len(texts) == 5 and texts[1].startswith("Once upon a time, in a village by the sea,")
    assert_fluent_story(texts[1].removeprefix("Once upon a time, in a village by the sea,"))
    launched = run_torchrun(1, ["example_text_completion.py", *example_args(stories_dir, stories_dir)])
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout == plain_example


def test_example_text_completion_on_two_processes_prints_what_one_process_prints(stories_dir, plain_example, tmp_path):
    args = read_model_args(stories_dir)
    split = write_checkpoint(tmp_path / "two", args, load_shard(stories_dir / "consolidated.00.pth"), n_shards=2)
    double = run_torchrun(2, ["example_text_completion.py", *example_args(split, stories_dir)])
    assert double.returncode == 0, double.stderr
    assert double.stdout == plain_example, "rank 0 alone prints, and the split model greedy-decodes the same text"


def test_example_chat_completion_answers_every_dialog(stories_dir, run_example):
    result = run_example("example_chat_completion.py", *example_args(stories_dir, stories_dir), "--max_gen_len", "24")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> Assistant: ") == 4
    assert "System: Answer in one sentence." in result.stdout


def test_example_reports_a_bad_checkpoint_folder_in_one_line(tmp_path, stories_dir, run_example):
    tokenizer_path = stories_dir / "tokenizer.model"
    result = run_example(
        "example_text_completion.py", "--ckpt_dir", tmp_path / "missing", "--tokenizer_path", tokenizer_path
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: checkpoint folder") and "Traceback" not in result.stderr
