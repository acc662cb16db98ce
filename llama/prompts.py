"""What a caller passes, turned into prompt tokens that fit the model: token lists, strings and dialogs, each
checked where it enters, a mistake named with the prompt's place in the batch and the fix."""

import warnings
from collections.abc import Sequence
from typing import Optional

from llama.args import ModelArgs
from llama.chat_format import ChatFormat, Dialog, check_dialog
from llama.tokenizer import Tokenizer


def fit_prompt(
    prompt: Sequence[int], index: int, params: ModelArgs, limit: int, keep: Optional[int] = None, what: str = "prompt"
) -> list[int]:
    """The token ids of prompt `index` of a batch, at most `limit` long: with `keep` (truncation), one longer
    than `keep` keeps BOS and its last tokens, `keep` in all; without, a prompt longer than `limit` is refused.
    Raises ValueError for a prompt that is not a non-empty list of ids of the model's vocabulary, or too long."""
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"{what} {index} must be a list of token ids, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError(f"{what} {index} has no tokens: give at least one (BOS)")
    if not all(isinstance(token, int) and 0 <= token < params.vocab_size for token in prompt):
        raise ValueError(f"{what} {index} has token ids outside 0..{params.vocab_size - 1}: {prompt!r}")
    if keep is not None and len(prompt) > keep:
        return list(prompt[:1]) + list(prompt[len(prompt) - keep + 1 :])  # keep BOS, drop the oldest tokens
    if len(prompt) > limit:
        raise ValueError(
            f"{what} {index} is {len(prompt)} tokens long, more than the {limit} that fit "
            f"(max_seq_len={params.max_seq_len}, leaving room to generate): shorten it, "
            f"pass truncate=True to keep its end, or build with a larger max_seq_len"
        )
    return list(prompt)


def check_token_prompts(prompt_tokens: Sequence[Sequence[int]], params: ModelArgs) -> list[list[int]]:
    """Prompts given as token ids, each up to max_seq_len long (filling the context scores it). Raises
    ValueError for an empty batch and as `fit_prompt` does."""
    if isinstance(prompt_tokens, str) or not isinstance(prompt_tokens, Sequence) or not prompt_tokens:
        raise ValueError("no prompts given: pass a non-empty list of token id lists")
    return [fit_prompt(prompt, index, params, limit=params.max_seq_len) for index, prompt in enumerate(prompt_tokens)]


def truncated_len(params: ModelArgs, max_gen_len: Optional[int]) -> int:
    """How many tokens a truncated prompt keeps: as many as leave room for `max_gen_len` new tokens; with
    max_gen_len None (as far as the context goes), all that fit before one new token; where max_gen_len leaves
    no room for a prompt (max_seq_len - 1 or more), half the context."""
    if max_gen_len is None:
        return params.max_seq_len - 1
    if max_gen_len < params.max_seq_len - 1:
        return params.max_seq_len - max_gen_len
    return max(1, params.max_seq_len // 2)


def encode_prompts(
    tokenizer: Tokenizer, prompts: Sequence[str], params: ModelArgs, truncate: bool, max_gen_len: Optional[int] = None
) -> list[list[int]]:
    """The tokens of each prompt string, after BOS, leaving room for one new token; with truncate=True, a long
    prompt keeps BOS and its end, leaving room for `max_gen_len` new tokens (see `truncated_len`). Raises
    TypeError for a prompt that is not a string, ValueError for an empty list, invalid Unicode or a prompt too
    long."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("no prompts given: pass a non-empty list of strings")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {index} must be a str, got {type(prompt).__name__}: {prompt!r}")
    encoded = []
    for index, prompt in enumerate(prompts):
        try:
            encoded.append((index, tokenizer.encode(prompt, bos=True, eos=False)))
        except ValueError as error:
            raise ValueError(f"prompt {index}: {error}") from None
    return _fit_all(encoded, params, truncate, max_gen_len, "prompt")


def encode_dialogs(
    chat_format: ChatFormat,
    dialogs: Sequence[Dialog],
    params: ModelArgs,
    truncate: bool,
    max_gen_len: Optional[int] = None,
) -> tuple[list[list[int]], list[str]]:
    """The prompt tokens of the dialogs that run (truncated as `encode_prompts` does), and for every dialog the
    format's refusal ("": it runs). Raises ValueError or TypeError for malformed dialogs (see `check_dialog`)
    and as `fit_prompt` does."""
    if isinstance(dialogs, str) or not isinstance(dialogs, Sequence) or not dialogs:
        raise ValueError("no dialogs given: pass a non-empty list of dialogs")
    for index, dialog in enumerate(dialogs):
        check_dialog(dialog, index)
    refusals = [chat_format.refusal(dialog) for dialog in dialogs]
    encoded = [
        (index, chat_format.encode_dialog_prompt(dialog)) for index, dialog in enumerate(dialogs) if not refusals[index]
    ]
    return _fit_all(encoded, params, truncate, max_gen_len, "dialog"), refusals


def _fit_all(
    prompts: list[tuple[int, list[int]]], params: ModelArgs, truncate: bool, max_gen_len: Optional[int], what: str
) -> list[list[int]]:
    """Every (index, prompt) fitted (see `fit_prompt`), leaving room for one new token, or with truncate=True
    cut to `truncated_len`; saying so once when max_gen_len is too large for any prompt to precede it."""
    limit = params.max_seq_len - 1
    keep = truncated_len(params, max_gen_len) if truncate else None
    too_long = max_gen_len is not None and max_gen_len >= limit
    if keep is not None and too_long and any(len(prompt) > keep for _, prompt in prompts):
        warnings.warn(
            f"max_gen_len={max_gen_len} leaves no room for a prompt in max_seq_len={params.max_seq_len}: "
            f"truncated {what}s keep their last {keep} tokens, and generation stops where the context ends; "
            f"build with a larger max_seq_len for longer generations",
            stacklevel=4,
        )
    return [fit_prompt(prompt, index, params, limit, keep, what) for index, prompt in prompts]
