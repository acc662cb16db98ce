"""Answer a few dialogs with a Llama 2 chat checkpoint, in the Llama 2 chat format.

python example_chat_completion.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
torchrun --nproc_per_node 2 example_chat_completion.py --ckpt_dir llama-2-13b-chat/ --tokenizer_path tokenizer.model
"""

import sys
from typing import Optional

import fire

from llama import Dialog, Llama
from llama.distributed import is_main_process

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


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_gen_len: Optional[int] = None,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
):
    try:
        generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype)
        results = generator.chat_completion(DIALOGS, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    except (FileNotFoundError, ValueError, TypeError) as error:
        sys.exit(f"error: {error}")
    if is_main_process():  # every rank computes the same text; one prints it
        for dialog, result in zip(DIALOGS, results):
            for message in dialog:
                print(f"{message['role'].capitalize()}: {message['content']}")
            print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
            print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
