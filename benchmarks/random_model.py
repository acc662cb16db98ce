"""Random models for the benchmarks: the named shapes, weights with clear greedy choices, written as a
Meta-layout checkpoint with a tokenizer of the same vocabulary, and random prompts."""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from padded_tokenizer import write_tokenizer  # noqa: E402

from llama import ModelArgs  # noqa: E402
from llama.layout import expected_shapes, write_params  # noqa: E402

SHAPES = {
    # llama2.c's smallest story model: a CI-sized smoke test.
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32),
    # llama2.c's stories110M shape (feed-forward width 2048), with a Llama 2 vocabulary and untied output.
    "110m": ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256),
    "7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_state_dict(args: ModelArgs, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights with unit-scale activations and logits: random, but with clear greedy choices, so that the two
    libraries' float rounding differences do not flip near-ties."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        elif name == "tok_embeddings.weight":
            tensor = torch.randn(shape, generator=generator)
        else:
            tensor = torch.randn(shape, generator=generator) * shape[1] ** -0.5
        state[name] = tensor.to(dtype)
    return state


def write_checkpoint(folder: Path, args: ModelArgs, state: dict[str, torch.Tensor]) -> Path:
    """params.json and consolidated.00.pth, as Meta writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_params(folder, args)
    torch.save(state, folder / "consolidated.00.pth")
    return folder


def prepare_checkpoint(options: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    """(ckpt_dir, tokenizer_path): the given checkpoint (--ckpt_dir, --tokenizer_path), or a random model of
    --shape in --dtype written into workdir."""
    if options.ckpt_dir:
        return Path(options.ckpt_dir), Path(options.tokenizer_path)
    args = SHAPES[options.shape]
    ckpt_dir = write_checkpoint(workdir / "checkpoint", args, random_state_dict(args, DTYPES[options.dtype]))
    return ckpt_dir, write_tokenizer(workdir / "tokenizer.model", args.vocab_size)


def random_prompts(batch: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """BOS, then random ids above the special ones (0, 1, 2)."""
    generator = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab_size, (length - 1,), generator=generator).tolist() for _ in range(batch)]
