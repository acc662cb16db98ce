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
from typing import Optional

from llama import Dialog
from llama.chat import Chat
from llama.cli import parse_arguments, readable_warnings
from llama.examples import BOOLEAN_OPTIONS, build_example, example_parser
from llama.terminal import chat_in_terminal, say

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
            # An answer gets a quarter of the context unless told otherwise (Chat's default): the rest is history.
            chat = Chat(generator, options.system, max_gen_len, temperature=options.temperature, top_p=options.top_p)
            chat_in_terminal(chat)
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
