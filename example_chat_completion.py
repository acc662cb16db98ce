"""Answer dialogs with a Llama 2 chat checkpoint, in the Llama 2 chat format: a few built-in dialogs, or
an interactive chat that streams its answers. With no checkpoint given it runs the bundled demo model, which
shows the mechanics but is no chat model.

    python example_chat_completion.py
    python example_chat_completion.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
    python example_chat_completion.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model --interactive
    torchrun --nproc_per_node 2 example_chat_completion.py --ckpt_dir llama-2-13b-chat/ --tokenizer_path tokenizer.model
"""

import sys
from collections.abc import Iterator
from typing import Optional

import fire
import torch.distributed as dist

from llama import Dialog, Llama, demo_checkpoint
from llama.distributed import is_main_process
from llama.generation import has_special_tags, trim_dialog

DIALOGS: list[Dialog] = [
    [{"role": "user", "content": "What should I pack for a weekend of hiking in the mountains?"}],
    [
        {"role": "user", "content": "I'm planting a small vegetable garden."},
        {"role": "assistant", "content": "Lovely! Tomatoes, lettuce and beans are easy to start with."},
        {"role": "user", "content": "Which of those needs the most sun?"},
    ],
    [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "system", "content": "You are a patient teacher who explains with everyday examples."},
        {"role": "user", "content": "What is a prime number?"},
    ],
]


def say(*args, **kwargs) -> None:
    if is_main_process():  # every rank computes the same text; one prints it
        print(*args, **kwargs, flush=True)


def user_lines() -> Iterator[str]:
    """User turns, one line each, read on rank 0 and shared with the other ranks; ends at /exit or end of input."""
    while True:
        line = None
        if is_main_process():
            if sys.stdin.isatty():
                try:
                    line = input("User: ")
                except EOFError:
                    line = None
            else:
                line = sys.stdin.readline()
                line = line.rstrip("\n") if line else None
                if line is not None:
                    print(f"User: {line}", flush=True)  # a transcript reads like the terminal session
        if dist.is_initialized() and dist.get_world_size() > 1:
            shared = [line]
            dist.broadcast_object_list(shared, src=0)
            line = shared[0]
        if line is None or line.strip() == "/exit":
            return
        yield line


def chat(generator: Llama, system: Optional[str], temperature: float, top_p: float, max_gen_len: int) -> None:
    """The interactive loop: keeps the history, streams each answer, trims the oldest turns when needed."""
    max_prompt_len = generator.model.params.max_seq_len - max_gen_len
    history: Dialog = [{"role": "system", "content": system}] if system else []
    say("Chat started: type a message and press Enter; /exit or end of input quits.", file=sys.stderr)
    for line in user_lines():
        if not line.strip():
            continue
        dialog = history + [{"role": "user", "content": line}]
        if has_special_tags(dialog):
            say("error: [INST], [/INST], <<SYS>> and <</SYS>> are not allowed in messages", file=sys.stderr)
            continue
        try:
            dialog, dropped = trim_dialog(generator.tokenizer, dialog, max_prompt_len)
        except ValueError as error:
            say(f"error: {error}", file=sys.stderr)
            continue
        if dropped:
            say(f"(dropped the {dropped} oldest messages to fit max_seq_len)", file=sys.stderr)
        say("Assistant: ", end="")
        answer = ""
        for pieces in generator.stream_chat([dialog], temperature=temperature, top_p=top_p, max_gen_len=max_gen_len):
            say(pieces[0], end="")
            answer += pieces[0]
        say()
        history = dialog + [{"role": "assistant", "content": answer}]


DEMO_NOTE = (
    "Note: no --ckpt_dir given, so this runs the bundled demo model. It was trained on Shakespeare's plays only and "
    "is no chat model: its replies are play-like text, not answers. For answers, pass --ckpt_dir and "
    "--tokenizer_path of a Llama 2 chat model (for example llama-2-7b-chat/).\n"
)


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_gen_len: Optional[int] = None,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    interactive: bool = False,
    system: Optional[str] = None,
):
    try:
        on_demo = ckpt_dir is None and tokenizer_path is None
        if on_demo:
            ckpt_dir, tokenizer_path = demo_checkpoint()
            # Its replies are no answers, and past its training context of 256 tokens they fall apart: a short
            # sample shows the mechanics.
            max_gen_len = max_gen_len or 64
        elif ckpt_dir is None or tokenizer_path is None:
            raise ValueError("give both --ckpt_dir and --tokenizer_path, or neither to run the bundled demo model")
        generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype)
        if on_demo:
            say(DEMO_NOTE)
        if interactive:
            # Leave room for history: an answer gets at most a quarter of the context unless told otherwise.
            chat(generator, system, temperature, top_p, max_gen_len or max_seq_len // 4)
            return
        results = generator.chat_completion(DIALOGS, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    except (FileNotFoundError, ValueError, TypeError) as error:
        sys.exit(f"error: {error}")
    for dialog, result in zip(DIALOGS, results):
        for message in dialog:
            say(f"{message['role'].capitalize()}: {message['content']}")
        say(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        say("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
