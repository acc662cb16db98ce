"""Speculative decoding against plain decoding, greedy, batch 1, eager, on three prompts: one that repeats a
passage (given twice, then its start again), an ordinary one, and one with no repeats. For each, the acceptance
rate (proposals kept), tokens per verification pass and tokens/s with and without speculation, checking on the
way that both give the same tokens. Times include the prompt. Prints a markdown table.

    python benchmarks/speculative.py                                    # the demo model, prompt lookup
    python benchmarks/speculative.py --ckpt-dir ../shared/models/stories260K --texts stories
    python benchmarks/speculative.py --draft-ckpt-dir llama/demo_draft --speculate 2  # its trained draft
    python benchmarks/speculative.py --draft-ckpt-dir random            # a draft that is always wrong
    python benchmarks/speculative.py --shape 110m --draft-ckpt-dir self --draft-quantize int8

--draft-ckpt-dir random is a random model of the model's width and tokenizer, with --random-draft-layers layers
(default 1); self is the model itself
(quantized with --draft-quantize, it is a cheaper copy); --shape runs a random model of benchmarks/random_model.py.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from padded_tokenizer import write_tokenizer  # noqa: E402
from random_model import SHAPES, random_state_dict, write_checkpoint  # noqa: E402
from tables import cpu_name  # noqa: E402

from llama.generation import Llama  # noqa: E402
from llama.layout import read_model_args, tokenizer_file  # noqa: E402
from llama.loading import demo_checkpoint  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

# The opening of tiny shakespeare, the demo model's training text.
SHAKESPEARE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\n"
    "You are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
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


def random_checkpoint(folder: Path, shape, tokenizer_path: Optional[Path], seed: int) -> tuple[Path, Path]:
    """A random model of `shape` (ModelArgs) written to `folder`, with a copy of `tokenizer_path` (or, without
    one, a padded tokenizer of its vocabulary): (ckpt_dir, tokenizer_path)."""
    write_checkpoint(folder, shape, random_state_dict(shape, torch.bfloat16, seed=seed))
    tokenizer = folder / "tokenizer.model"
    if tokenizer_path is None:
        return folder, write_tokenizer(tokenizer, shape.vocab_size)
    shutil.copy(tokenizer_path, tokenizer)
    return folder, tokenizer


def checkpoints(options: argparse.Namespace, workdir: Path) -> tuple[Path, Path, Optional[Path]]:
    """(ckpt_dir, tokenizer_path, draft_ckpt_dir) for the options: the demo model, --ckpt-dir or a random model
    of --shape; the draft in --draft-ckpt-dir, a random model of the model's width ("random", of
    --random-draft-layers layers) or the model itself ("self")."""
    if options.shape:
        ckpt_dir, tokenizer_path = random_checkpoint(workdir / "model", SHAPES[options.shape], None, seed=0)
    elif options.ckpt_dir:
        ckpt_dir, tokenizer_path = Path(options.ckpt_dir), tokenizer_file(options.ckpt_dir)
    else:
        ckpt_dir, tokenizer_path = demo_checkpoint()
    draft = options.draft_ckpt_dir
    if draft == "random":
        args = read_model_args(ckpt_dir, max_seq_len=256, max_batch_size=1)
        args.vocab_size = Tokenizer(tokenizer_path).n_words
        args.n_layers = options.random_draft_layers or args.n_layers
        draft, _ = random_checkpoint(workdir / "draft", args, tokenizer_path, seed=1)
    elif draft == "self":
        draft = ckpt_dir
    return Path(ckpt_dir), Path(tokenizer_path), None if draft is None else Path(draft)


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-dir", help="a checkpoint folder (default: the demo model)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a random model of this shape instead")
    parser.add_argument("--texts", choices=sorted(TEXTS), default="shakespeare", help="the prompts' style")
    parser.add_argument("--speculate", type=int, default=4)
    parser.add_argument("--prompt-lookup", type=int, default=None, help="N (default 2 without a draft)")
    parser.add_argument("--draft-ckpt-dir", help="a folder, random (always wrong) or self (the model)")
    parser.add_argument("--draft-quantize")
    parser.add_argument(
        "--random-draft-layers", type=int, default=1, help="layers of the random draft (0: as many as the model)"
    )
    parser.add_argument("--max-gen-len", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory() as workdir:
        ckpt_dir, tokenizer_path, draft_dir = checkpoints(options, Path(workdir))
        prompt_lookup = options.prompt_lookup or (None if draft_dir else 2)
        # The trained models learned a context of 256; the padded tokenizer of a random one spells text in bytes.
        max_seq_len = 1024 if options.shape else 256
        plain = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, 1, device="cpu")
        speculative = Llama.build(
            ckpt_dir, tokenizer_path, max_seq_len, 1, device="cpu", speculate=options.speculate,
            prompt_lookup=prompt_lookup, draft_ckpt_dir=draft_dir, draft_quantize=options.draft_quantize,
        )  # fmt: skip
        rows = table(plain, speculative, TEXTS[options.texts], options.max_gen_len, options.repeats)
    proposer = f"prompt lookup n={prompt_lookup}" if prompt_lookup else f"draft {options.draft_ckpt_dir}"
    if options.draft_quantize:
        proposer += f" ({options.draft_quantize})"
    model = f"random {options.shape}" if options.shape else ckpt_dir
    lines = [
        f"{model}, k={options.speculate}, {proposer}, greedy, {options.max_gen_len} tokens, "
        f"{options.threads} threads, {cpu_name()}, load average {os.getloadavg()[0]:.1f} at the end",
        "",
        "| prompt | proposals kept | tokens per pass | plain tokens/s | speculative tokens/s | speed-up |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
