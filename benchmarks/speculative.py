"""Speculative decoding against plain decoding, greedy, batch 1, eager, on three prompts: one whose passage the
text may repeat (a passage given twice, then its start again), an ordinary one, and one with no repeats. For each,
the acceptance rate (proposals kept), tokens per verification pass and tokens/s with and without speculation,
checking on the way that both give the same tokens. Times include the prompt. Prints a markdown table.

    python benchmarks/speculative.py                                    # the demo model, prompt lookup
    python benchmarks/speculative.py --ckpt-dir ../shared/models/stories260K --texts stories
    python benchmarks/speculative.py --draft-ckpt-dir llama/demo --draft-quantize int8
"""

import argparse
import platform
import time
from typing import Optional

import torch

from llama.generation import Llama
from llama.layout import tokenizer_file
from llama.loading import demo_checkpoint

SHAKESPEARE = (
    "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun. Arise, fair "
    "sun, and kill the envious moon, who is already sick and pale with grief.\n"
)
STORIES = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her red "
    "ball. One day, she saw a big dog near the tree. The dog was sad because it lost its toy.\n"
)
TEXTS = {
    "shakespeare": {
        "repeats": SHAKESPEARE * 2 + SHAKESPEARE[:40],
        "ordinary": "KING HENRY:\nWhat say you",
        "none": "O",
    },
    "stories": {"repeats": STORIES * 2 + STORIES[:40], "ordinary": "Once upon a time, there was a", "none": "Tom"},
}


def timed(generator: Llama, prompt: str, max_gen_len: int) -> tuple[float, list[int]]:
    """The time of a greedy run (prompt and generation) and the tokens it generated."""
    prompt_tokens = generator.tokenizer.encode(prompt, bos=True, eos=False)
    start = time.perf_counter()
    tokens, _ = generator.generate([prompt_tokens], max_gen_len, temperature=0)
    return time.perf_counter() - start, tokens[0]


def table(plain: Llama, speculative: Llama, prompts: dict, max_gen_len: int, repeats: int) -> list[str]:
    """A markdown row per prompt: acceptance, tokens per pass, tokens/s of each (the best of `repeats` runs,
    taken in turns, so that a busy moment of the machine slows both) and the speed-up."""
    rows = []
    for name, prompt in prompts.items():
        stats = speculative.speculation
        stats.passes = stats.proposed = stats.accepted = stats.generated = 0
        plain_s = spec_s = float("inf")
        for _ in range(repeats):
            seconds, plain_tokens = timed(plain, prompt, max_gen_len)
            plain_s = min(plain_s, seconds)
            seconds, spec_tokens = timed(speculative, prompt, max_gen_len)
            spec_s = min(spec_s, seconds)
            if spec_tokens != plain_tokens:
                raise AssertionError(f"speculative decoding changed the text of the {name!r} prompt")
        accepted = stats.accepted / stats.proposed if stats.proposed else 0.0
        rows.append(
            f"| {name} | {accepted:.0%} | {stats.generated / stats.passes:.2f} | {len(plain_tokens) / plain_s:.0f} | "
            f"{len(plain_tokens) / spec_s:.0f} | {plain_s / spec_s:.2f}x |"
        )
    return rows


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-dir", help="a checkpoint folder (default: the demo model)")
    parser.add_argument("--texts", choices=sorted(TEXTS), default="shakespeare", help="the prompts' style")
    parser.add_argument("--speculate", type=int, default=4)
    parser.add_argument("--prompt-lookup", type=int, default=None, help="N (default 2 without a draft)")
    parser.add_argument("--draft-ckpt-dir")
    parser.add_argument("--draft-quantize")
    parser.add_argument("--max-gen-len", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    ckpt_dir, tokenizer_path = demo_checkpoint() if options.ckpt_dir is None else (options.ckpt_dir, None)
    tokenizer_path = tokenizer_path or tokenizer_file(ckpt_dir)
    prompt_lookup = options.prompt_lookup or (None if options.draft_ckpt_dir else 2)
    plain = Llama.build(ckpt_dir, tokenizer_path, 256, 1, device="cpu")
    speculative = Llama.build(
        ckpt_dir, tokenizer_path, 256, 1, device="cpu", speculate=options.speculate, prompt_lookup=prompt_lookup,
        draft_ckpt_dir=options.draft_ckpt_dir, draft_quantize=options.draft_quantize,
    )  # fmt: skip
    proposer = f"prompt lookup n={prompt_lookup}" if prompt_lookup else f"draft {options.draft_ckpt_dir}"
    if options.draft_quantize:
        proposer += f" ({options.draft_quantize})"
    lines = [
        f"{ckpt_dir}, k={options.speculate}, {proposer}, greedy, {options.max_gen_len} tokens, "
        f"{options.threads} threads, {platform.processor() or platform.machine()}",
        "",
        "| prompt | proposals kept | tokens per pass | plain tokens/s | speculative tokens/s | speed-up |",
        "| --- | --- | --- | --- | --- | --- |",
        *table(plain, speculative, TEXTS[options.texts], options.max_gen_len, options.repeats),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
