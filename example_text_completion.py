"""Complete a few text prompts with a Llama 2 checkpoint, or with the bundled demo model when none is given.

python example_text_completion.py
python example_text_completion.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model
torchrun --nproc_per_node 2 example_text_completion.py --ckpt_dir llama-2-13b/ --tokenizer_path tokenizer.model
"""

import sys
from typing import Optional

import fire

from llama import Llama, demo_checkpoint
from llama.distributed import is_main_process

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


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
):
    try:
        on_demo = ckpt_dir is None and tokenizer_path is None
        if on_demo:
            ckpt_dir, tokenizer_path = demo_checkpoint()
        elif ckpt_dir is None or tokenizer_path is None:
            raise ValueError("give both --ckpt_dir and --tokenizer_path, or neither to run the bundled demo model")
        prompts = DEMO_PROMPTS if on_demo else PROMPTS
        generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype)
        results = generator.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    except (FileNotFoundError, ValueError, TypeError) as error:
        sys.exit(f"error: {error}")
    if is_main_process():  # every rank computes the same text; one prints it
        for prompt, result in zip(prompts, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
