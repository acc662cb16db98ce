"""Complete a few text prompts with a Llama 2 checkpoint.

python example_text_completion.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model
torchrun --nproc_per_node 2 example_text_completion.py --ckpt_dir llama-2-13b/ --tokenizer_path tokenizer.model
"""

import sys
from typing import Optional

import fire

from llama import Llama
from llama.distributed import is_main_process

PROMPTS = [
    "The best way to learn a new language is",
    "Once upon a time, in a village by the sea,",
    # A few examples, then the model carries on the pattern.
    "Capital cities:\nFrance: Paris\nJapan: Tokyo\nCanada: Ottawa\nKenya:",
    "A short poem about the first snow of winter:\n",
]


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
):
    try:
        generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype)
        results = generator.text_completion(PROMPTS, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    except (FileNotFoundError, ValueError, TypeError) as error:
        sys.exit(f"error: {error}")
    if is_main_process():  # every rank computes the same text; one prints it
        for prompt, result in zip(PROMPTS, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
