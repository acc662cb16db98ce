"""Answer a few dialogs with a Llama 2 chat checkpoint, in the Llama 2 chat format (with the bundled demo
model when no checkpoint is given, which shows the mechanics but is no chat model).

python example_chat_completion.py
python example_chat_completion.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
torchrun --nproc_per_node 2 example_chat_completion.py --ckpt_dir llama-2-13b-chat/ --tokenizer_path tokenizer.model
"""

import sys
from typing import Optional

import fire

from llama import Dialog, Llama, demo_checkpoint
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
        results = generator.chat_completion(DIALOGS, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    except (FileNotFoundError, ValueError, TypeError) as error:
        sys.exit(f"error: {error}")
    if is_main_process():  # every rank computes the same text; one prints it
        if on_demo:
            print(DEMO_NOTE)
        for dialog, result in zip(DIALOGS, results):
            for message in dialog:
                print(f"{message['role'].capitalize()}: {message['content']}")
            print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
            print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
