"""Text and chat completion: batched decoding with a key/value cache, nucleus sampling, and the Llama 2
chat format."""

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Optional, TypedDict, Union

import torch
import torch.nn.functional as F

from llama.checkpoint import load_model, read_model_args, resolve_dtype
from llama.distributed import setup_model_parallel
from llama.model import Transformer
from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # the text of each returned token, with logprobs=True
    logprobs: list[float]  # with logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]
    logprobs: list[float]


# The Llama 2 chat format, byte for byte: the chat models were fine-tuned on exactly these strings.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_REQUEST_ERROR = "Error: special tags are not allowed as part of the prompt."


def check_dialog(dialog: Dialog, index: int = 0) -> None:
    """Raise ValueError (TypeError for wrong types) unless `dialog` is a list of {"role", "content"} messages
    going system (optional), user, assistant, user, ..., user. `index` is the dialog's place in its batch,
    for the message."""
    where = f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError(f"{where} must be a non-empty list of messages, got {dialog!r}")
    for number, message in enumerate(dialog):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TypeError(f"{where}, message {number}: expected a dict with 'role' and 'content', got {message!r}")
        if not isinstance(message["content"], str):
            raise TypeError(
                f"{where}, message {number}: content must be a str, got {type(message['content']).__name__}"
            )
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if not turns:
        raise ValueError(f"{where} has only a system message: add a user message after it")
    for number, message in enumerate(turns):
        expected = "user" if number % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"{where}: roles must go system (optional), user, assistant, user, ...; "
                f"message {number + len(dialog) - len(turns)} has role {message['role']!r} where {expected!r} belongs"
            )
    if turns[-1]["role"] != "user":
        raise ValueError(f"{where} must end with a user message, for the model to answer")


def has_special_tags(dialog: Dialog) -> bool:
    """Whether any message contains a tag of the chat format, which would let a user forge turns."""
    return any(tag in message["content"] for message in dialog for tag in SPECIAL_TAGS)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """The prompt tokens of a checked dialog in the Llama 2 chat format: a leading system message is merged
    into the first user turn; every finished user/assistant pair is `[INST] user [/INST] answer ` between
    BOS and EOS; the final user turn is `[INST] user [/INST]` with BOS only, for the model to continue."""
    if dialog[0]["role"] == "system":
        first_user = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": "user", "content": first_user}] + list(dialog[2:])
    tokens: list[int] = []
    for user, answer in zip(dialog[0:-1:2], dialog[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(text, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of most likely tokens whose probabilities add up to at
    least p, renormalised. probs: (batch, vocab); returns token ids (batch, 1)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_before = torch.cumsum(probs_sort, dim=-1) - probs_sort  # mass of the tokens more likely than this one
    probs_sort[probs_before > p] = 0.0  # the most likely token always stays: its mass before is 0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def _check_sampling(temperature: float, top_p: float, max_gen_len: Optional[int]) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if max_gen_len is not None and (
        isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 1
    ):
        raise ValueError(f"max_gen_len must be a positive integer or None, got {max_gen_len!r}")


class Llama:
    @staticmethod
    def build(
        ckpt_dir: Union[str, Path],
        tokenizer_path: Union[str, Path],
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
    ) -> "Llama":
        """Load a Meta-layout checkpoint folder and its tokenizer, ready to generate.

        Works under `torchrun --nproc_per_node N` and as a plain `python` process (a one-process group is set
        up), with any number of shards: a count other than N is resliced as it loads (see `load_model`), as long
        as N divides the heads, key/value heads, FFN width, dim and vocabulary. `device` defaults to CUDA when
        available, else the CPU; `dtype` to bfloat16 on GPUs that support it, float16 on other GPUs, float32 on
        the CPU. `seed` fixes sampling (the same on every rank, so the ranks agree on every token). The caller's
        torch defaults are left alone, and build may be called again in the same process. Raises
        FileNotFoundError for a missing folder, params.json, shard or tokenizer, and ValueError for anything
        that does not fit: a malformed params.json, a model-parallel size that does not divide the model, a
        corrupt shard, shards that disagree, a tensor of the wrong shape, a tokenizer of another vocabulary
        size, or non-positive sizes.
        """
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        device = setup_model_parallel(model_parallel_size, device)
        dtype = resolve_dtype(dtype, device)
        tokenizer = Tokenizer(tokenizer_path)
        args = read_model_args(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if args.vocab_size == -1:
            args.vocab_size = tokenizer.n_words
        if args.vocab_size != tokenizer.n_words:
            raise ValueError(
                f"the tokenizer {str(tokenizer_path)!r} has {tokenizer.n_words} pieces but params.json says "
                f"vocab_size={args.vocab_size}: use the tokenizer.model that came with this checkpoint"
            )
        args.validate(torch.distributed.get_world_size())
        model = load_model(ckpt_dir, args, torch.distributed.get_rank(), device, dtype)
        return Llama(model, tokenizer, seed)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        # A private generator: sampling is reproducible without touching the caller's global RNG state.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Continue each prompt (a list of token ids) by up to `max_gen_len` tokens, stopping a sequence at EOS.

        All prompts run as one batch; prompts of different lengths are fine. temperature 0 is greedy.
        Returns the new tokens of each prompt (the prompt too with echo=True, EOS and what follows cut off),
        and with logprobs=True, for each returned token, the log-probability the model gave it at the
        position that predicted it (0.0 for a prompt's first token, which nothing predicts).
        Raises ValueError for an empty batch, too many prompts, or a prompt longer than max_seq_len.
        """
        params = self.model.params
        _check_sampling(temperature, top_p, max_gen_len)
        bsz = len(prompt_tokens)
        if bsz == 0:
            raise ValueError("no prompts given: pass a non-empty list")
        if bsz > params.max_batch_size:
            raise ValueError(
                f"{bsz} prompts but max_batch_size={params.max_batch_size}: pass at most {params.max_batch_size} "
                f"prompts per call, or build with a larger max_batch_size"
            )
        for index, prompt in enumerate(prompt_tokens):
            if not prompt:
                raise ValueError(f"prompt {index} has no tokens: give at least one (BOS)")
            if not all(isinstance(token, int) and 0 <= token < params.vocab_size for token in prompt):
                raise ValueError(f"prompt {index} has token ids outside 0..{params.vocab_size - 1}: {prompt!r}")
            if len(prompt) > params.max_seq_len:
                raise ValueError(
                    f"prompt {index} is {len(prompt)} tokens long, more than max_seq_len={params.max_seq_len}: "
                    f"shorten it or build with a larger max_seq_len"
                )
        min_prompt_len = min(len(prompt) for prompt in prompt_tokens)
        max_prompt_len = max(len(prompt) for prompt in prompt_tokens)
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)

        # Prompts are left-aligned; position t of a shorter prompt is generated while a longer one is still
        # being read, so the whole batch advances one position per step after the shortest prompt.
        pad_id = -1  # never fed to the model: every position before cur_pos is filled
        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompt_tokens):
            tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        is_prompt = tokens != pad_id
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float32, device=self.device) if logprobs else None
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=self.device)

        def record_logprobs(logits: torch.Tensor, start: int) -> None:
            # logits[:, i] predicts the token at start + 1 + i
            targets = tokens[:, start + 1 : start + 1 + logits.shape[1]]
            log_probs = F.log_softmax(logits, dim=-1)
            token_logprobs[:, start + 1 : start + 1 + logits.shape[1]] = log_probs.gather(
                -1, targets.unsqueeze(-1)
            ).squeeze(-1)

        if min_prompt_len == total_len:
            # Nothing to generate (every prompt fills the context): score the prompts.
            logits = self.model.forward(tokens, 0)
            if logprobs:
                record_logprobs(logits[:, :-1], 0)

        prev_pos = 0
        for cur_pos in range(min_prompt_len, total_len):
            logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos)  # (bs, cur_pos - prev_pos, vocab)
            if temperature > 0:
                probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
                next_token = sample_top_p(probs, top_p, self.generator).reshape(-1)
            else:
                next_token = torch.argmax(logits[:, -1], dim=-1)
            # Where the prompt still has a token at cur_pos, keep it instead of the sample.
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                record_logprobs(logits, prev_pos)
            eos_reached |= ~is_prompt[:, cur_pos] & (next_token == self.tokenizer.eos_id)
            prev_pos = cur_pos
            if bool(eos_reached.all()):
                break

        out_tokens, out_logprobs = [], []
        for row, prompt in enumerate(prompt_tokens):
            start = 0 if echo else len(prompt)
            end = min(len(prompt) + max_gen_len, total_len)
            row_tokens = tokens[row, start:end].tolist()
            row_logprobs = token_logprobs[row, start:end].tolist() if logprobs else None
            # Cut at the first generated EOS (an EOS inside an echoed prompt stays).
            generated = row_tokens[len(prompt) - start :]
            if self.tokenizer.eos_id in generated:
                cut = len(prompt) - start + generated.index(self.tokenizer.eos_id)
                row_tokens = row_tokens[:cut]
                row_logprobs = row_logprobs[:cut] if logprobs else None
            out_tokens.append(row_tokens)
            out_logprobs.append(row_logprobs)
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> list[CompletionPrediction]:
        """Complete each prompt string. `max_gen_len` defaults to max_seq_len - 1. Returns one
        {"generation": str} per prompt (the prompt included with echo=True), plus "tokens" and "logprobs"
        with logprobs=True. Raises TypeError for a non-string prompt and ValueError for an empty list, bad
        sampling settings, too many prompts or a prompt longer than max_seq_len (see `generate`)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("no prompts given: pass a non-empty list of strings")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {index} must be a str, got {type(prompt).__name__}: {prompt!r}")
        _check_sampling(temperature, top_p, max_gen_len)
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(prompt, bos=True, eos=False) for prompt in prompts]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, echo=echo
        )
        results: list[CompletionPrediction] = []
        for index, row_tokens in enumerate(generation_tokens):
            result: CompletionPrediction = {"generation": self.tokenizer.decode(row_tokens)}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([token]) for token in row_tokens]
                result["logprobs"] = generation_logprobs[index]
            results.append(result)
        return results

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> list[ChatPrediction]:
        """Answer each dialog as the assistant, in the Llama 2 chat format. Returns one
        {"generation": {"role": "assistant", "content": str}} per dialog, plus "tokens" and "logprobs" with
        logprobs=True. A dialog containing a chat-format tag is not run; its answer is the reference's error
        text. Raises ValueError/TypeError for malformed dialogs (see `check_dialog`) and as `generate` does."""
        if not isinstance(dialogs, Sequence) or not dialogs:
            raise ValueError("no dialogs given: pass a non-empty list of dialogs")
        for index, dialog in enumerate(dialogs):
            check_dialog(dialog, index)
        _check_sampling(temperature, top_p, max_gen_len)
        if len(dialogs) > self.model.params.max_batch_size:
            raise ValueError(
                f"{len(dialogs)} dialogs but max_batch_size={self.model.params.max_batch_size}: pass fewer per call, "
                f"or build with a larger max_batch_size"
            )
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        unsafe = [has_special_tags(dialog) for dialog in dialogs]
        prompt_tokens = [encode_dialog(self.tokenizer, dialog) for dialog, bad in zip(dialogs, unsafe) if not bad]
        generation_tokens, generation_logprobs = [], []
        if prompt_tokens:
            generation_tokens, generation_logprobs = self.generate(
                prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs
            )
        results: list[ChatPrediction] = []
        answered = 0
        for bad in unsafe:
            if bad:
                result: ChatPrediction = {"generation": {"role": "assistant", "content": UNSAFE_REQUEST_ERROR}}
                row_tokens, row_logprobs = [], []
            else:
                row_tokens = generation_tokens[answered]
                row_logprobs = generation_logprobs[answered] if logprobs else []
                answered += 1
                result = {"generation": {"role": "assistant", "content": self.tokenizer.decode(row_tokens)}}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([token]) for token in row_tokens]
                result["logprobs"] = row_logprobs
            results.append(result)
        return results
