"""`llama generate` and `llama chat`, and the chat underneath them (llama.chat): each answer is chat_completion's
for the whole dialog so far, the history is kept and /reset clears it, Ctrl-C stops an answer and the chat goes
on, the key/value cache is kept between turns so that a turn feeds the model only what the cache does not hold,
generate prints what text_completion gives as it comes, and both run under torchrun. That a batch fed from the
cache gives the tokens of a full prefill, on any rows, is test_generation.py's claim."""

import io
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO_ROOT, child_env, run_python
from llama import Llama, demo_checkpoint
from llama.chat import Chat
from llama.distributed import compute_threads, default_threads
from llama.model import Transformer
from llama.terminal import RULE

DEMO = ["--device", "cpu", "--threads", "1"]  # the demo model, as the demo fixture builds it
MESSAGES = ["Good morrow, sir.", "What news?", "Farewell."]


@pytest.fixture(scope="module")
def demo():
    return Llama.build(*demo_checkpoint(), max_seq_len=256, max_batch_size=1, device="cpu")


@pytest.fixture
def chat(run_main, monkeypatch):
    """`llama chat` on the demo model in this process, greedy, reading `lines`: (status, stdout, stderr)."""

    def run(lines, *options):
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
        return run_main("chat", *DEMO, "--temperature", "0", *options)

    return run


def dialog_answers(demo, messages, max_gen_len, system=None, replies=()):
    """chat_completion's greedy answer to each message after the whole dialog before it; `replies`, where given,
    stand in for the first answers."""
    dialog = [{"role": "system", "content": system}] if system else []
    answers = []
    for number, message in enumerate(messages):
        dialog.append({"role": "user", "content": message})
        answer = demo.chat_completion([dialog], temperature=0, max_gen_len=max_gen_len)[0]["generation"]["content"]
        answer = replies[number] if number < len(replies) else answer
        dialog.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return answers


def transcript(messages, answers):
    return "".join(f"User: {message}\nAssistant: {answer}\n" for message, answer in zip(messages, answers))


def common_prefix_len(first, second):
    return next((index for index, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))


# ---- llama chat -----------------------------------------------------------------------------------------------


def test_chat_answers_each_message_as_chat_completion_answers_the_whole_dialog_so_far(chat, demo):
    status, stdout, stderr = chat(MESSAGES, "--max-gen-len", "16", "--system", "Speak plainly.")
    assert status == 0, stderr
    expected = dialog_answers(demo, MESSAGES, 16, "Speak plainly.")
    assert stdout == transcript(MESSAGES, expected)
    alone = dialog_answers(demo, MESSAGES[1:2], 16, "Speak plainly.")[0]
    assert alone != expected[1], "the second answer must depend on the history for this test to show it is kept"
    assert "no chat model" in stderr and "/reset" in stderr


def test_reset_starts_the_conversation_over_with_only_the_system_prompt(chat, demo):
    status, stdout, stderr = chat(["What news?", "/reset", "What news?"], "--max-gen-len", "12", "--system", "Hi.")
    assert status == 0, stderr
    first, without_reset = dialog_answers(demo, ["What news?", "What news?"], 12, "Hi.")
    assert first != without_reset, "the answer after the history must differ for this test to show /reset"
    assert stdout == f"User: What news?\nAssistant: {first}\nUser: /reset\n" + transcript(["What news?"], [first])
    assert "(the conversation starts over)" in stderr


def test_each_turn_feeds_the_model_only_the_tokens_its_cache_does_not_hold(chat, demo, monkeypatch):
    expected = dialog_answers(demo, MESSAGES, 16)
    calls = []  # (start_pos, tokens of row 0) of each forward pass; None where a turn begins
    forward, send = Transformer.forward, Chat.send

    def recorded(self, tokens, start_pos=0, **kwargs):
        calls.append((start_pos, tokens[0].tolist()))
        return forward(self, tokens, start_pos, **kwargs)

    monkeypatch.setattr(Transformer, "forward", recorded)
    monkeypatch.setattr(Chat, "send", lambda self, message: calls.append(None) or send(self, message))
    status, stdout, stderr = chat(MESSAGES, "--max-gen-len", "16")
    assert status == 0 and stdout == transcript(MESSAGES, expected), stderr
    turns = [[]]
    for call in calls[1:]:
        turns.append([]) if call is None else turns[-1].append(call)
    held, dialog, previous_prompt = [], [], []  # held: the tokens whose keys and values the cache holds
    for message, answer, turn in zip(MESSAGES, expected, turns):
        dialog.append({"role": "user", "content": message})
        prompt = demo.chat_format.encode_dialog_prompt(dialog)
        start, fed = turn[0]
        assert start == min(common_prefix_len(held, prompt), len(prompt) - 1) and fed == prompt[start:]
        assert start >= len(previous_prompt), "the earlier prompt was read again"
        positions, widths = [position for position, _ in turn], [len(tokens) for _, tokens in turn]
        assert widths[1:] == [1] * (len(turn) - 1), "after the prefill, one token a step"
        assert positions[1:] == [position + width for position, width in zip(positions, widths[:-1])]
        held = held[:start] + [token for _, tokens in turn for token in tokens]
        dialog.append({"role": "assistant", "content": answer})
        previous_prompt = prompt


def test_ctrl_c_stops_an_answer_keeps_what_was_said_and_the_chat_goes_on(chat, demo, monkeypatch):
    forward, calls = Transformer.forward, []

    def interrupted(self, tokens, start_pos=0, **kwargs):
        calls.append(start_pos)
        if len(calls) == 6:  # the prefill and four steps of the first answer have run: Ctrl-C now
            raise KeyboardInterrupt
        return forward(self, tokens, start_pos, **kwargs)

    monkeypatch.setattr(Transformer, "forward", interrupted)
    status, stdout, stderr = chat(MESSAGES[:2], "--max-gen-len", "16")
    assert status == 0, stderr
    head, tail = f"User: {MESSAGES[0]}\nAssistant: ", f"\nUser: {MESSAGES[1]}\nAssistant: "
    assert stdout.startswith(head) and tail in stdout, stdout
    said = stdout[len(head) : stdout.index(tail)]
    full = dialog_answers(demo, MESSAGES[:1], 16)[0]
    assert said and full.startswith(said) and len(said) < len(full), "the answer stopped partway"
    after = dialog_answers(demo, MESSAGES[:2], 16, replies=[said])[1]
    assert stdout == head + said + tail + after + "\n", "the next answer follows the history with what was said"
    assert "(answer stopped)" in stderr


class InterruptedOnce(io.StringIO):
    """Standard input whose first read is interrupted, as Ctrl-C at the prompt interrupts it."""

    def readline(self, *args):
        if not getattr(self, "interrupted", False):
            self.interrupted = True
            raise KeyboardInterrupt
        return super().readline(*args)


def test_ctrl_c_at_the_prompt_says_how_to_end_the_chat_and_goes_on(run_main, demo, monkeypatch):
    monkeypatch.setattr(sys, "stdin", InterruptedOnce(f"{MESSAGES[0]}\n"))
    status, stdout, stderr = run_main("chat", *DEMO, "--temperature", "0", "--max-gen-len", "8")
    assert status == 0, stderr
    assert stdout == transcript(MESSAGES[:1], dialog_answers(demo, MESSAGES[:1], 8))
    assert "/exit or Ctrl-D ends the chat)" in stderr


def _read_until(fd: int, output: bytearray, text: str, start: int = 0, limit: float = 120) -> int:
    """Read the terminal's output into `output` until `text` appears after index `start`; its index."""
    deadline = time.monotonic() + limit  # a guard against a hang, not a measurement
    while output.find(text.encode(), start) < 0:
        assert time.monotonic() < deadline, f"no {text!r} in {output.decode(errors='replace')!r}"
        if select.select([fd], [], [], 1)[0]:
            output += os.read(fd, 4096)
    return output.find(text.encode(), start)


def test_ctrl_c_in_a_terminal_stops_the_answer_and_the_chat_goes_on(demo, tmp_path):
    """The real program in a pseudo-terminal, one of its steps waiting for the signal (tests/slow_step_worker.py)
    so that SIGINT, what Ctrl-C sends, comes while the first answer streams."""
    controller, terminal = pty.openpty()
    ready = tmp_path / "waiting"
    command = ["tests/slow_step_worker.py", str(ready), "chat", *DEMO, "--temperature", "0", "--max-gen-len", "40"]
    process = subprocess.Popen(
        [sys.executable, *command], cwd=REPO_ROOT, env=child_env(), stdin=terminal, stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    output = bytearray()
    try:
        _read_until(controller, output, "User: ")
        os.write(controller, f"{MESSAGES[0]}\n".encode())
        first = _read_until(controller, output, "Assistant: ") + len("Assistant: ")
        deadline = time.monotonic() + 120  # a guard against a hang, not a measurement
        while not ready.exists():  # the program waits in the middle of its answer
            assert process.poll() is None and time.monotonic() < deadline, output.decode(errors="replace")
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stopped = _read_until(controller, output, "(answer stopped)", first)
        os.write(controller, f"{MESSAGES[1]}\n".encode())
        second = _read_until(controller, output, "Assistant: ", stopped) + len("Assistant: ")
        end = _read_until(controller, output, "User: ", second)
        os.write(controller, b"/exit\n")
        assert process.wait(timeout=120) == 0, output.decode(errors="replace")
    finally:
        process.kill()
        os.close(controller)
    text = output.decode().replace("\r\n", "\n")
    said = text[text.index("Assistant: ") + len("Assistant: ") : text.index("\n(answer stopped)")]
    full = dialog_answers(demo, MESSAGES[:1], 40)[0]
    assert said and full.startswith(said) and len(said) < len(full), "the answer stopped partway"
    answer = output[second:end].decode().replace("\r\n", "\n").removesuffix("\n")
    assert answer == dialog_answers(demo, MESSAGES[:2], 40, replies=[said])[1]


def test_chat_under_torchrun_reads_on_rank_0_and_prints_what_one_process_prints(chat):
    status, single, stderr = chat(MESSAGES[:2], "--max-gen-len", "12")
    assert status == 0, stderr
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llama", "chat"]
    lines = "".join(f"{message}\n" for message in MESSAGES[:2])
    launched = run_python([*torchrun, *DEMO, "--temperature", "0", "--max-gen-len", "12"], input=lines)
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout == single, "two processes answer as one, printed once"


# ---- llama generate, threads ----------------------------------------------------------------------------------

GENERATE_PROMPTS = ["ROMEO:", "JULIET: O gentle night,"]
SAMPLING = ["--temperature", "0.8", "--top-p", "0.95", "--top-k", "40", "--seed", "5", "--max-gen-len", "24"]


def test_generate_prints_what_text_completion_gives_as_it_comes_from_arguments_or_standard_input(
    run_main, demo, capsys, monkeypatch
):
    results = demo.text_completion(
        GENERATE_PROMPTS, temperature=0.8, top_p=0.95, top_k=40, seed=5, max_gen_len=24, stop=["!"]
    )
    texts = [prompt + result["generation"] for prompt, result in zip(GENERATE_PROMPTS, results)]
    expected = f"\n{RULE}\n".join(texts) + "\n"
    printed = []  # what was printed before each forward pass
    forward = Transformer.forward
    monkeypatch.setattr(
        Transformer, "forward",
        lambda self, *args, **kwargs: printed.append(capsys.readouterr().out) or forward(self, *args, **kwargs),
    )  # fmt: skip
    status, stdout, stderr = run_main("generate", *GENERATE_PROMPTS, *DEMO, *SAMPLING, "--stop", "!")
    assert (status, "".join(printed) + stdout, stderr) == (0, expected, "")
    streamed = [len(text) for text in printed if text]
    assert len(streamed) > len(GENERATE_PROMPTS) * 2, "each text comes piece by piece, while the model runs"
    monkeypatch.setattr(Transformer, "forward", forward)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{prompt}\n" for prompt in GENERATE_PROMPTS)))
    assert run_main("generate", *DEMO, *SAMPLING, "--stop", "!") == (0, expected, "")


def test_threads_default_to_the_physical_cores_shared_among_torchruns_processes_and_are_put_back(run_main, monkeypatch):
    monkeypatch.setattr("llama.distributed.physical_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads() == 4
    before = torch.get_num_threads()
    with compute_threads() as number:
        assert number == torch.get_num_threads() == 4
    assert torch.get_num_threads() == before
    assert run_main("generate", "x", "--threads", "0") == (1, "", "error: threads must be a positive integer, got 0\n")
