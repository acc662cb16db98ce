"""Complete a few text prompts with a Llama 2 or Llama 3.x checkpoint, or the bundled demo model if none is given.

    python example_text_completion.py
    python example_text_completion.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model
    torchrun --nproc_per_node 2 example_text_completion.py --ckpt_dir llama-2-13b/ --tokenizer_path tokenizer.model

Each result is printed as one text, the prompt followed by the model's continuation (the prompt in bold on a
terminal), then a rule.
"""

import argparse
import sys

from llama.cli import parse_arguments, readable_warnings
from llama.distributed import is_main_process
from llama.examples import BOOLEAN_OPTIONS, build_example, example_parser

PROMPTS = [
    "The best way to learn a new language is",
    "Once upon a time, in a village by the sea,",
    # A few examples, then the model carries on the pattern.
    "Capital cities:\nFrance: Paris\nJapan: Tokyo\nCanada: Ottawa\nKenya:",
    "A short poem about the first snow of winter:\n",
]
# The bundled demo model knows nothing but Shakespeare's plays, so its prompts are in their format: a speaker's
# name on a line of its own, then the speech.
DEMO_PROMPTS = [
    "ROMEO:\n",
    "First Citizen:\nWhat say you to the",
    "KING HENRY VI:\nO God,",
    "JULIET:\nO gentle night,",
]
RULE = "-" * 72


def build_parser() -> argparse.ArgumentParser:
    return example_parser(__doc__.split("\n\n")[0], max_seq_len=128, max_gen_len=64)


def main() -> None:
    readable_warnings()
    options = parse_arguments(build_parser(), booleans=BOOLEAN_OPTIONS)
    try:
        generator, on_demo = build_example(options, default_max_seq_len=128)
        prompts = DEMO_PROMPTS if on_demo else PROMPTS
        results = generator.text_completion(
            prompts, temperature=options.temperature, top_p=options.top_p, max_gen_len=options.max_gen_len
        )
    except (FileNotFoundError, ValueError, TypeError) as error:
        sys.exit(f"error: {error}")
    if not is_main_process():  # every rank computes the same text; one prints it
        return
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    for prompt, result in zip(prompts, results):
        print(f"{bold}{prompt}{plain}{result['generation']}\n{RULE}")


if __name__ == "__main__":
    main()
