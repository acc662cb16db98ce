"""Speculative decoding's options, checked where they enter (`Llama.build`), and the draft model they name,
loaded with the same tokenizer and a cache as large as the model's (see llama/speculative.py)."""

from pathlib import Path
from typing import Optional

import torch

from llama.args import ModelArgs
from llama.distributed import resolve_dtype
from llama.layout import check_folder, read_model_args, read_quantization, tokenizer_file, trained_context_len
from llama.loading import load_model, model_args_for
from llama.model import Transformer
from llama.quantize import quantization
from llama.shards import find_shards
from llama.speculative import DraftModel, PromptLookup, Speculation
from llama.tokenizer import Tokenizer
from llama.values import whole_number


def speculation_settings(
    speculate: Optional[int], prompt_lookup: Optional[int], draft_ckpt_dir, draft_quantize: Optional[str],
    compile: bool = False, cuda_graphs: Optional[bool] = None,
) -> Optional[tuple[int, Optional[int]]]:  # fmt: skip
    """(speculate, prompt_lookup) once the options of `Llama.build` fit together, or None when speculation is off
    (none given). Raises ValueError naming what is wrong: k or n below 1, a proposer without speculate,
    speculate without a proposer, both proposers, or a compiled step or CUDA graphs asked for as well (the
    verification passes run eagerly)."""
    if speculate is None:
        given = {"prompt_lookup": prompt_lookup, "draft_ckpt_dir": draft_ckpt_dir, "draft_quantize": draft_quantize}
        for name, value in given.items():
            if value is not None:
                raise ValueError(f"{name}={value!r} needs speculate=K, the number of tokens proposed per pass")
        return None
    speculate = whole_number(speculate, "speculate")
    if prompt_lookup is not None:
        prompt_lookup = whole_number(prompt_lookup, "prompt_lookup")
    if (prompt_lookup is None) == (draft_ckpt_dir is None):
        raise ValueError(
            f"speculate={speculate} needs one proposer: prompt_lookup=N (copy what followed the last N tokens "
            f"earlier in the text) or draft_ckpt_dir=DIR (a draft model with the same tokenizer), "
            f"{'not both' if prompt_lookup is not None else 'got neither'}"
        )
    if draft_quantize is not None and draft_ckpt_dir is None:
        raise ValueError(f"draft_quantize={draft_quantize!r} needs draft_ckpt_dir=DIR, the draft model to quantize")
    if draft_ckpt_dir is not None:
        check_folder(draft_ckpt_dir, "draft checkpoint")
    if draft_quantize is not None:
        quantization(draft_quantize)
    refuse_compiled_steps(speculate, compile, cuda_graphs)
    return speculate, prompt_lookup


def refuse_compiled_steps(speculate: int, compile: bool, cuda_graphs: Optional[bool]) -> None:
    """ValueError when a compiled step or CUDA graphs are asked for together with speculation (its verification
    passes run eagerly)."""
    for name, value in (("compile", compile), ("cuda_graphs", cuda_graphs)):
        if value:
            raise ValueError(
                f"speculate={speculate} runs its verification passes eagerly and cannot be combined with "
                f"{name}=True: leave {name} out, or speculation"
            )


def build_speculation(
    model: Transformer, plan: Optional[tuple[int, Optional[int]]], draft: Optional[tuple[Path, ModelArgs]],
    draft_quantize: Optional[str], device: torch.device, dtype, progress: bool,
) -> Optional[Speculation]:  # fmt: skip
    """The Speculation for `model` from `speculation_settings`' result `plan` (None: none): prompt lookup, or the
    draft model that `check_draft` found (its folder and settings), quantized with `draft_quantize` as
    `Llama.build` quantizes."""
    if plan is None:
        return None
    speculate, prompt_lookup = plan
    if prompt_lookup is not None:
        return Speculation(model, speculate, PromptLookup(prompt_lookup))
    folder, draft_args = draft
    scheme = None if draft_quantize is None else quantization(draft_quantize)
    dtype = resolve_dtype(dtype, device, quantized=scheme is not None or read_quantization(folder) is not None)
    draft_model = load_model(folder, draft_args, torch.distributed.get_rank(), device, dtype, progress, scheme)
    return Speculation(model, speculate, DraftModel(draft_model))


def check_draft(draft_ckpt_dir, tokenizer: Tokenizer, args: ModelArgs) -> Optional[tuple[Path, ModelArgs]]:
    """The folder of the draft model in `draft_ckpt_dir` (None: no draft) and its settings for the model of
    settings `args` and its `tokenizer`, a cache as large as the model's. Reads only small files (params.json,
    the tokenizer, metrics.json, the shards' names), so that a draft that cannot serve is refused before the
    model's weights load. Raises FileNotFoundError for a missing folder or shards, and ValueError for a draft of another
    tokenizer or vocabulary, one trained on a shorter context than max_seq_len, and as `model_args_for` does."""
    if draft_ckpt_dir is None:
        return None
    folder = check_folder(draft_ckpt_dir, "draft checkpoint")
    own_tokenizer = tokenizer_file(folder)
    if own_tokenizer.is_file() and not same_tokenizer(tokenizer, Tokenizer(own_tokenizer)):
        raise ValueError(
            f"the draft's tokenizer {str(own_tokenizer)!r} is not the model's {str(tokenizer.path)!r}: a draft must "
            f"share the model's tokenizer, for its token ids to mean the same"
        )
    vocab_size = read_model_args(folder).vocab_size
    if vocab_size not in (-1, args.vocab_size):
        raise ValueError(
            f"the draft in {str(draft_ckpt_dir)!r} has a vocabulary of {vocab_size} tokens, the model one of "
            f"{args.vocab_size}: a draft must share the model's tokenizer"
        )
    trained = trained_context_len(folder)
    if trained is not None and trained < args.max_seq_len:
        raise ValueError(
            f"the draft in {str(draft_ckpt_dir)!r} was trained on {trained} tokens of context, fewer than "
            f"max_seq_len={args.max_seq_len}: give max_seq_len <= {trained}, or a draft trained on a longer context"
        )
    find_shards(folder)
    return folder, model_args_for(folder, tokenizer, args.max_seq_len, args.max_batch_size)


def same_tokenizer(first: Tokenizer, second: Tokenizer) -> bool:
    """Whether two tokenizers give every token id the same text (and agree on BOS and EOS)."""
    if Path(first.path).read_bytes() == Path(second.path).read_bytes():
        return True
    if (first.n_words, first.bos_id, first.eos_id) != (second.n_words, second.bos_id, second.eos_id):
        return False
    return all(first.decode([token]) == second.decode([token]) for token in range(first.n_words))
