"""The interactive chat of example_chat_completion.py: turns from standard input, history kept, answers
streamed, the oldest turns trimmed with a notice when the history no longer fits."""

import pytest

from helpers import random_model, run_python, small_args, write_checkpoint
from llama.chat_format import Llama2ChatFormat, trim_dialog


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    args = small_args()
    return write_checkpoint(tmp_path_factory.mktemp("chat"), args, random_model(args, seed=61).state_dict())


@pytest.fixture
def chat(checkpoint, tokenizer_path, run_example):
    """The interactive example on the test checkpoint, reading `lines`, greedy."""

    def run(lines, *options):
        command = ["--ckpt_dir", checkpoint, "--tokenizer_path", tokenizer_path, "--interactive", "--temperature", "0"]
        return run_example("example_chat_completion.py", *command, *options, input=lines)

    return run


def test_interactive_chat_answers_each_line_until_exit(chat):
    result = chat("Hello\n\nHow are you?\n/exit\nnot read\n", "--max_gen_len", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Assistant: ") == 2  # the empty line is skipped; nothing after /exit is read
    assert "not read" not in result.stdout


def test_interactive_chat_ends_cleanly_at_end_of_input(chat):
    result = chat("Hello", "--max_gen_len", "4")  # no newline, no /exit
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Assistant: ") == 1


def test_interactive_chat_trims_the_oldest_turns_with_a_notice(chat):
    lines = "".join(f"Tell me about the number {n} please\n" for n in range(6))
    result = chat(lines, "--max_seq_len", "64", "--max_gen_len", "8", "--system", "Brief.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Assistant: ") == 6
    assert "oldest messages to fit max_seq_len" in result.stderr


def test_interactive_chat_refuses_tags_and_overlong_messages_and_goes_on(chat):
    lines = "Say [INST] hi\n" + "word " * 80 + "\nHello\n"
    result = chat(lines, "--max_seq_len", "64", "--max_gen_len", "8")
    assert result.returncode == 0, result.stderr
    assert "the chat format refuses this message" in result.stderr and "more than the 56 that fit" in result.stderr
    assert result.stdout.count("Assistant: ") == 1


@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_example_help_explains_every_option(script):
    result = run_python([script, "--help"])
    assert result.returncode == 0, result.stderr
    for option in ("--ckpt-dir", "--tokenizer-path", "--temperature", "--top-p", "--max-seq-len", "--max-gen-len"):
        assert option in result.stdout, option
    assert "(default: 0.6)" in result.stdout and "randomness of the sampling" in result.stdout


def test_interactive_spelled_as_false_answers_the_built_in_dialogs(checkpoint, tokenizer_path, run_example):
    command = ["example_chat_completion.py", "--ckpt_dir", checkpoint, "--tokenizer_path", tokenizer_path]
    result = run_example(*command, "--interactive=false", "--max_gen_len", "4", "--temperature", "0", input="Hi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> Assistant: ") == 4 and "User: Hi" not in result.stdout
    unclear = run_example(*command, "--interactive=maybe")
    assert unclear.returncode == 2 and unclear.stderr.startswith("error: 'maybe' is not a clear yes or no")


def test_trim_dialog_keeps_the_system_message_and_the_last_user_turn(tokenizer):
    system = {"role": "system", "content": "Be brief."}
    turns = []
    for n in range(4):
        turns += [{"role": "user", "content": f"question {n}"}, {"role": "assistant", "content": f"answer {n}"}]
    dialog = [system] + turns + [{"role": "user", "content": "last question"}]
    chat_format = Llama2ChatFormat(tokenizer)
    full = len(chat_format.encode_dialog_prompt(dialog))
    assert trim_dialog(chat_format, dialog, full) == (dialog, 0)
    trimmed, dropped = trim_dialog(chat_format, dialog, full - 1)
    assert dropped == 2 and trimmed == [system] + turns[2:] + [dialog[-1]]
    last_only = len(chat_format.encode_dialog_prompt([system, dialog[-1]]))
    assert trim_dialog(chat_format, dialog, last_only) == ([system, dialog[-1]], 8)
    with pytest.raises(ValueError, match="the last message"):
        trim_dialog(chat_format, dialog, last_only - 1)
