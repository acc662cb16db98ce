"""What a caller passes, turned into prompt tokens that fit the model: token lists, strings and dialogs, each
checked where it enters, a mistake named with the prompt's place in the batch and the fix."""

from collections.abc import Sequence

from llama.args import ModelArgs
from llama.chat_format import ChatFormat, Dialog, check_dialog
from llama.tokenizer import Tokenizer


def fit_prompt(
    prompt: Sequence[int], index: int, params: ModelArgs, limit: int, truncate: bool = False, what: str = "prompt"
) -> list[int]:
    """The token ids of prompt `index` of a batch, at most `limit` long: a longer one keeps BOS and its last
    tokens with truncate=True, and is refused otherwise. Raises ValueError for a prompt that is not a non-empty
    list of ids of the model's vocabulary, or too long."""
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"{what} {index} must be a list of token ids, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError(f"{what} {index} has no tokens: give at least one (BOS)")
    if not all(isinstance(token, int) and 0 <= token < params.vocab_size for token in prompt):
        raise ValueError(f"{what} {index} has token ids outside 0..{params.vocab_size - 1}: {prompt!r}")
    if len(prompt) > limit:
        if truncate:
            return list(prompt[:1]) + list(prompt[len(prompt) - limit + 1 :])  # keep BOS, drop the oldest tokens
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


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], params: ModelArgs, truncate: bool) -> list[list[int]]:
    """The tokens of each prompt string, after BOS, leaving room for one new token. Raises TypeError for a
    prompt that is not a string, ValueError for an empty list, invalid Unicode or a prompt too long."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("no prompts given: pass a non-empty list of strings")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {index} must be a str, got {type(prompt).__name__}: {prompt!r}")
    tokens = []
    for index, prompt in enumerate(prompts):
        try:
            encoded = tokenizer.encode(prompt, bos=True, eos=False)
        except ValueError as error:
            raise ValueError(f"prompt {index}: {error}") from None
        tokens.append(fit_prompt(encoded, index, params, params.max_seq_len - 1, truncate))
    return tokens


def encode_dialogs(
    chat_format: ChatFormat, dialogs: Sequence[Dialog], params: ModelArgs, truncate: bool
) -> tuple[list[list[int]], list[str]]:
    """The prompt tokens of the dialogs that run, and for every dialog the format's refusal ("": it runs).
    Raises ValueError or TypeError for malformed dialogs (see `check_dialog`) and as `fit_prompt` does."""
    if isinstance(dialogs, str) or not isinstance(dialogs, Sequence) or not dialogs:
        raise ValueError("no dialogs given: pass a non-empty list of dialogs")
    for index, dialog in enumerate(dialogs):
        check_dialog(dialog, index)
    refusals = [chat_format.refusal(dialog) for dialog in dialogs]
    limit = params.max_seq_len - 1
    prompts = [
        fit_prompt(chat_format.encode_dialog_prompt(dialog), index, params, limit, truncate, what="dialog")
        for index, dialog in enumerate(dialogs)
        if not refusals[index]
    ]
    return prompts, refusals
