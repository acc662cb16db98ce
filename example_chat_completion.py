"""Answer dialogs with a chat checkpoint (Llama 2 chat, or Llama 3.x instruct), in its chat format, which its
tokenizer decides: a few built-in dialogs, or an interactive chat that streams its answers. With no checkpoint
given it runs the bundled demo model, which shows the mechanics but is no chat model.

    python example_chat_completion.py
    python example_chat_completion.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
    python example_chat_completion.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model --interactive
    torchrun --nproc_per_node 2 example_chat_completion.py --ckpt_dir llama-2-13b-chat/ --tokenizer_path tokenizer.model
"""

import argparse
import sys
from collections.abc import Iterator
from typing import Optional

import torch.distributed as dist

from llama import Dialog, Llama
from llama.chat_format import trim_dialog
from llama.cli import parse_arguments, readable_warnings
from llama.distributed import is_main_process
from llama.examples import BOOLEAN_OPTIONS, build_example, example_parser

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
        refusal = generator.chat_format.refusal(dialog)
        if refusal:
            say(f"error: the chat format refuses this message: {refusal}", file=sys.stderr)
            continue
        try:
            dialog, dropped = trim_dialog(generator.chat_format, dialog, max_prompt_len)
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
    "is no chat model: its replies are play-like text, not answers. For answers, pass --ckpt_dir of a chat model "
    "(for example llama-2-7b-chat/, or Llama 3's 8B instruct model) and, where its tokenizer.model is not in that "
    "folder, --tokenizer_path.\n"
)


def build_parser() -> argparse.ArgumentParser:
    parser = example_parser(__doc__.split("\n\n")[0], max_seq_len=None, max_gen_len=None)
    parser.set_defaults(interactive=False)
    parser.add_argument(
        "--interactive", action=argparse.BooleanOptionalAction,
        help="chat from standard input, streaming each answer, instead of answering the built-in dialogs",
    )  # fmt: skip
    parser.add_argument("--system", help="a system prompt for the interactive chat")
    parser.epilog = (
        "--max-seq-len defaults to 512 (the demo model: 256); --max-gen-len to the rest of the context (the "
        "demo model: 64 tokens; interactive: a quarter of the context)"
    )
    return parser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_arguments(build_parser(), argv, booleans=("--interactive", *BOOLEAN_OPTIONS))


def main() -> None:
    readable_warnings()
    options = parse_args()
    try:
        generator, on_demo = build_example(options, default_max_seq_len=512)
        max_gen_len = options.max_gen_len
        if on_demo:
            # Its replies are no answers: a short sample shows the mechanics.
            say(DEMO_NOTE)
            max_gen_len = max_gen_len or 64
        if options.interactive:
            # Leave room for history: an answer gets at most a quarter of the context unless told otherwise.
            max_seq_len = generator.model.params.max_seq_len
            chat(generator, options.system, options.temperature, options.top_p, max_gen_len or max_seq_len // 4)
            return
        results = generator.chat_completion(
            DIALOGS, temperature=options.temperature, top_p=options.top_p, max_gen_len=max_gen_len
        )
    except (FileNotFoundError, ValueError, TypeError) as error:
        sys.exit(f"error: {error}")
    for dialog, result in zip(DIALOGS, results):
        for message in dialog:
            say(f"{message['role'].capitalize()}: {message['content']}")
        say(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        say("\n==================================\n")


if __name__ == "__main__":
    main()
