"""Text and chat completion: batched decoding with a key/value cache, sampling (temperature, top-k, top-p),
stop sequences, streaming with exact incremental detokenization, and the Llama 2 chat format."""

import math
import sys
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, Optional, TypedDict, Union

import torch
import torch.nn.functional as F

from llama.checkpoint import load_model, read_model_args, resolve_dtype
from llama.cuda_graphs import use_cuda_graphs
from llama.distributed import is_main_process, setup_model_parallel
from llama.model import Transformer
from llama.tokenizer import Tokenizer, check_unicode

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
        try:
            check_unicode(message["content"])
        except ValueError as error:
            raise ValueError(f"{where}, message {number}: {error}") from None
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


def trim_dialog(tokenizer: Tokenizer, dialog: Dialog, max_prompt_len: int) -> tuple[Dialog, int]:
    """Drop the oldest user/assistant exchanges of a dialog until its prompt fits `max_prompt_len` tokens,
    keeping a leading system message and the last user turn. Returns the trimmed dialog and the number of
    messages dropped. Raises ValueError if the system message and the last user turn alone do not fit."""
    check_dialog(dialog)
    system = list(dialog[:1]) if dialog[0]["role"] == "system" else []
    turns = list(dialog[len(system) :])
    dropped = 0
    while len(encode_dialog(tokenizer, system + turns)) > max_prompt_len:
        if len(turns) == 1:
            length = len(encode_dialog(tokenizer, system + turns))
            raise ValueError(
                f"the last message (with the system prompt) is {length} tokens long, more than the {max_prompt_len} "
                f"that fit: shorten it, or use a larger max_seq_len"
            )
        turns = turns[2:]  # the oldest user message and its answer
        dropped += 2
    return system + turns, dropped


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of most likely tokens whose probabilities add up to at
    least p, renormalised. probs: (batch, vocab); returns token ids (batch, 1)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_before = torch.cumsum(probs_sort, dim=-1) - probs_sort  # mass of the tokens more likely than this one
    probs_sort[probs_before > p] = 0.0  # the most likely token always stays: its mass before is 0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The next token of each row of `logits` (batch, vocab): argmax at temperature 0; otherwise a draw from
    softmax(logits / temperature), restricted to the top_k most likely tokens (0: no limit) and then to the
    top-p nucleus. Returns (batch,) token ids."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    if top_k > 0:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    # Softmax in float32: in half precision the small probabilities that top-p keeps would round to zero.
    # Shift by the maximum first, and keep the temperature a normal float32: a tiny temperature then sends the
    # others to -inf (greedy in the limit) instead of overflowing to inf, and neither extreme gives 0/0 or inf/inf.
    logits = logits.float()
    float32 = torch.finfo(torch.float32)
    temperature = min(max(temperature, float32.tiny), float32.max)
    probs = torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / temperature, dim=-1)
    return sample_top_p(probs, top_p, generator).reshape(-1)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_sampling(temperature: float, top_p: float, top_k: int, max_gen_len: Optional[int]) -> None:
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 means no limit), got {top_k!r}")
    if max_gen_len is not None and (
        not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 1
    ):
        raise ValueError(f"max_gen_len must be a positive integer or None, got {max_gen_len!r}")


def _check_stop(stop: Optional[Sequence[str]]) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str) or not isinstance(stop, Sequence):
        raise TypeError(f"stop must be a list of strings (for example stop=['\\n\\n']), got {stop!r}")
    for sequence in stop:
        if not isinstance(sequence, str) or not sequence:
            raise TypeError(f"stop must be a list of non-empty strings, got {stop!r}")
    return tuple(stop)


class TextStream:
    """Turns the tokens of one sequence, arriving one at a time, into text pieces whose concatenation is
    exactly the final text: decode(all tokens), cut before the first stop sequence.

    Each `push` decodes everything so far and hands out only what can no longer change: a byte-fallback
    character whose bytes have not all arrived decodes as U+FFFD and is held back, and so is an ending that
    could be the start of a stop sequence. `finish` hands out the rest. `prefix` (an echoed prompt) is part
    of the text; stop sequences are only looked for after it."""

    def __init__(self, tokenizer: Tokenizer, prefix: Sequence[int] = (), stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.prefix = list(prefix)
        self.generated: list[int] = []
        self.stop = tuple(stop)
        self.text = tokenizer.decode(self.prefix)
        self.generated_from = len(self.text)  # where the generated text starts
        self.emitted = 0  # characters of self.text handed out so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a generated token; return the new text that is certain. Sets `stopped` when the text now
        contains a stop sequence (the text is then cut before it)."""
        self.generated.append(token)
        self.text = self.tokenizer.decode(self.prefix + self.generated)
        found = [index for index in (self.text.find(s, self.generated_from) for s in self.stop) if index >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True
            return self.finish()
        certain = len(self.text)
        while certain > self.emitted and self.text[certain - 1] == "\ufffd":
            certain -= 1
        # The longest ending that is the start of some stop sequence waits for the next tokens.
        room = certain - self.generated_from
        certain -= max(
            (
                n
                for s in self.stop
                for n in range(1, min(len(s), room + 1))
                if self.text[certain - n : certain] == s[:n]
            ),
            default=0,
        )
        piece = self.text[self.emitted : max(certain, self.emitted)]
        self.emitted += len(piece)
        return piece

    def finish(self) -> str:
        """The text not handed out yet (nothing more will arrive)."""
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece

    def tokens_needed(self) -> int:
        """How many generated tokens the (stop-cut) text needs: those after it are dropped from the result."""
        needed = len(self.generated)
        while needed > 0 and len(self.tokenizer.decode(self.prefix + self.generated[: needed - 1])) >= len(self.text):
            needed -= 1
        return needed


class _Outcome(NamedTuple):
    tokens: list[int]
    logprobs: Optional[list[float]]
    text: Optional[str]  # None when no TextStream was used: decode(tokens)


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
        progress: Optional[bool] = None,
        cuda_graphs: Optional[bool] = None,
    ) -> "Llama":
        """Load a Meta-layout checkpoint folder and its tokenizer, ready to generate.

        Works under `torchrun --nproc_per_node N` and as a plain `python` process (a one-process group is set
        up), with any number of shards: a count other than N is resliced as it loads (see `load_model`), as long
        as N divides the heads, key/value heads, FFN width, dim and vocabulary. `device` defaults to CUDA when
        available, else the CPU; `dtype` to bfloat16 on GPUs that support it, float16 on other GPUs, float32 on
        the CPU. `seed` fixes sampling (the same on every rank, so the ranks agree on every token). `progress`
        reports loading and the batches of a long run on standard error (default: when it is a terminal, on rank
        0). `cuda_graphs` records each decoding step as a CUDA graph and replays it (see llama/cuda_graphs.py;
        default: on a CUDA device with one process). The caller's torch defaults are left alone, and build may
        be called again in the same process. Raises
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
        if progress is None:
            progress = sys.stderr.isatty() and is_main_process()
        model = load_model(ckpt_dir, args, torch.distributed.get_rank(), device, dtype, progress=progress)
        return Llama(model, tokenizer, seed, progress=progress, cuda_graphs=cuda_graphs)

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        seed: int = 1,
        progress: bool = False,
        cuda_graphs: Optional[bool] = None,
    ):
        self.model = model
        self.decode_graphs = use_cuda_graphs(model, cuda_graphs)
        self.tokenizer = tokenizer
        self.progress = progress
        self.device = next(model.parameters()).device
        # A private generator: sampling is reproducible without touching the caller's global RNG state, and
        # every rank, seeded alike and seeing the same logits, draws the same tokens.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    # ---- public API ----------------------------------------------------------------------------------------

    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        top_k: int = 0,
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Continue each prompt (a list of token ids) by up to `max_gen_len` tokens, stopping a sequence at EOS.

        Prompts of different lengths run together, in batches of at most max_batch_size; temperature 0 is
        greedy. Returns the new tokens of each prompt (the prompt too with echo=True, EOS cut off), and with
        logprobs=True, for each returned token, the log-probability the model gave it at the position that
        predicted it (0.0 for a prompt's first token, which nothing predicts). A prompt may fill the whole
        context (max_seq_len tokens): nothing is generated then, which with echo and logprobs scores it.
        Raises ValueError for an empty batch, bad token ids, a prompt longer than max_seq_len or bad sampling
        settings, and FloatingPointError if the model's logits are not finite.
        """
        _check_sampling(temperature, top_p, top_k, max_gen_len)
        if not isinstance(prompt_tokens, Sequence) or not prompt_tokens:
            raise ValueError("no prompts given: pass a non-empty list of token id lists")
        for index, prompt in enumerate(prompt_tokens):
            self._check_tokens(prompt, index, limit=self.model.params.max_seq_len, truncate=False)
        outcomes = _run_to_end(self._run(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo))
        return [o.tokens for o in outcomes], ([o.logprobs for o in outcomes] if logprobs else None)

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        top_k: int = 0,
        stop: Optional[list[str]] = None,
        truncate: bool = False,
    ) -> list[CompletionPrediction]:
        """Complete each prompt string; any number of prompts, results in input order.

        `max_gen_len` defaults to max_seq_len - 1. A sequence ends at EOS, or when its text contains one of
        the `stop` strings (the returned text ends before it). A prompt must leave room for one new token
        (at most max_seq_len - 1 tokens); with truncate=True a longer one keeps BOS and its last tokens.
        Returns one {"generation": str} per prompt (the prompt included with echo=True), plus "tokens" (the
        text of each token) and "logprobs" with logprobs=True. Raises TypeError for a non-string prompt or
        stop list, ValueError for an empty list, bad sampling settings or a prompt that is too long (naming
        it), and FloatingPointError if the model's logits are not finite.
        """
        prompt_tokens, max_gen_len, stop = self._prepare_completion(
            prompts, temperature, top_p, top_k, max_gen_len, stop, truncate
        )
        steps = self._run(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, stop)
        return [self._completion(outcome, logprobs) for outcome in _run_to_end(steps)]

    def stream_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        top_k: int = 0,
        stop: Optional[list[str]] = None,
        truncate: bool = False,
    ) -> Iterator[list[str]]:
        """`text_completion` as it happens: an iterator that yields, per decoding step, a list with the new
        text of each prompt ("" where there is none). The pieces of a prompt add up to its final
        "generation" exactly. Arguments are checked, and errors raised, before the first step."""
        prompt_tokens, max_gen_len, stop = self._prepare_completion(
            prompts, temperature, top_p, top_k, max_gen_len, stop, truncate
        )
        return self._run(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, stop, stream=True)

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        top_k: int = 0,
        stop: Optional[list[str]] = None,
        truncate: bool = False,
    ) -> list[ChatPrediction]:
        """Answer each dialog as the assistant, in the Llama 2 chat format; any number of dialogs.

        Returns one {"generation": {"role": "assistant", "content": str}} per dialog, plus "tokens" and
        "logprobs" with logprobs=True. A dialog containing a chat-format tag is not run; its answer is the
        reference's error text. `stop` and `truncate` work as in `text_completion`. Raises ValueError or
        TypeError for malformed dialogs (see `check_dialog`) and as `text_completion` does.
        """
        prompt_tokens, unsafe, max_gen_len, stop = self._prepare_chat(
            dialogs, temperature, top_p, top_k, max_gen_len, stop, truncate
        )
        outcomes = iter(
            _run_to_end(self._run(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, False, stop))
        )
        results: list[ChatPrediction] = []
        for bad in unsafe:
            outcome = _Outcome([], [], UNSAFE_REQUEST_ERROR) if bad else next(outcomes)
            completion = self._completion(outcome, logprobs)
            result: ChatPrediction = {"generation": {"role": "assistant", "content": completion.pop("generation")}}
            results.append({**result, **completion})
        return results

    def stream_chat(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        top_k: int = 0,
        stop: Optional[list[str]] = None,
        truncate: bool = False,
    ) -> Iterator[list[str]]:
        """`chat_completion` as it happens: yields, per decoding step, a list with the new answer text of each
        dialog ("" where there is none); the pieces add up to the final content exactly (for a dialog with
        chat-format tags, the error text comes in the first list)."""
        prompt_tokens, unsafe, max_gen_len, stop = self._prepare_chat(
            dialogs, temperature, top_p, top_k, max_gen_len, stop, truncate
        )
        steps = self._run(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, False, stop, stream=True)
        return _merge_unsafe(steps, unsafe)

    # ---- input checks --------------------------------------------------------------------------------------

    def _check_tokens(
        self, prompt: list[int], index: int, limit: int, truncate: bool, what: str = "prompt"
    ) -> list[int]:
        vocab_size = self.model.params.vocab_size
        if not prompt:
            raise ValueError(f"{what} {index} has no tokens: give at least one (BOS)")
        if not all(isinstance(token, int) and 0 <= token < vocab_size for token in prompt):
            raise ValueError(f"{what} {index} has token ids outside 0..{vocab_size - 1}: {prompt!r}")
        if len(prompt) > limit:
            if truncate:
                return prompt[:1] + prompt[len(prompt) - limit + 1 :]  # keep BOS, drop the oldest tokens
            raise ValueError(
                f"{what} {index} is {len(prompt)} tokens long, more than the {limit} that fit "
                f"(max_seq_len={self.model.params.max_seq_len}, leaving room to generate): shorten it, "
                f"pass truncate=True to keep its end, or build with a larger max_seq_len"
            )
        return prompt

    def _prepare_completion(self, prompts, temperature, top_p, top_k, max_gen_len, stop, truncate):
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("no prompts given: pass a non-empty list of strings")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {index} must be a str, got {type(prompt).__name__}: {prompt!r}")
        _check_sampling(temperature, top_p, top_k, max_gen_len)
        stop = _check_stop(stop)
        limit = self.model.params.max_seq_len - 1
        prompt_tokens = []
        for index, prompt in enumerate(prompts):
            try:
                tokens = self.tokenizer.encode(prompt, bos=True, eos=False)
            except ValueError as error:
                raise ValueError(f"prompt {index}: {error}") from None
            prompt_tokens.append(self._check_tokens(tokens, index, limit, truncate))
        return prompt_tokens, max_gen_len or self.model.params.max_seq_len - 1, stop

    def _prepare_chat(self, dialogs, temperature, top_p, top_k, max_gen_len, stop, truncate):
        if isinstance(dialogs, str) or not isinstance(dialogs, Sequence) or not dialogs:
            raise ValueError("no dialogs given: pass a non-empty list of dialogs")
        for index, dialog in enumerate(dialogs):
            check_dialog(dialog, index)
        _check_sampling(temperature, top_p, top_k, max_gen_len)
        stop = _check_stop(stop)
        unsafe = [has_special_tags(dialog) for dialog in dialogs]
        limit = self.model.params.max_seq_len - 1
        prompt_tokens = [
            self._check_tokens(encode_dialog(self.tokenizer, dialog), index, limit, truncate, what="dialog")
            for index, dialog in enumerate(dialogs)
            if not unsafe[index]
        ]
        return prompt_tokens, unsafe, max_gen_len or self.model.params.max_seq_len - 1, stop

    def _completion(self, outcome: _Outcome, logprobs: bool) -> CompletionPrediction:
        text = self.tokenizer.decode(outcome.tokens) if outcome.text is None else outcome.text
        result: CompletionPrediction = {"generation": text}
        if logprobs:
            result["tokens"] = [self.tokenizer.decode([token]) for token in outcome.tokens]
            result["logprobs"] = outcome.logprobs
        return result

    # ---- decoding ------------------------------------------------------------------------------------------

    def _run(
        self, prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, stop=(), stream=False
    ) -> Generator[list[str], None, list[_Outcome]]:
        """Decode the prompts in batches of at most max_batch_size. Yields the new text of every prompt per
        step when text is followed (streaming or stop sequences); returns the outcomes in input order."""
        batch_size = self.model.params.max_batch_size
        starts = range(0, len(prompt_tokens), batch_size)
        outcomes: list[_Outcome] = []
        for number, start in enumerate(starts):
            if self.progress and len(starts) > 1:
                print(f"generating batch {number + 1}/{len(starts)}", file=sys.stderr, flush=True)
            batch = prompt_tokens[start : start + batch_size]
            streams = None
            if stream or stop:
                streams = [TextStream(self.tokenizer, prompt if echo else (), stop) for prompt in batch]
            steps = self._decode_batch(batch, max_gen_len, temperature, top_p, top_k, logprobs, echo, streams)
            while True:
                try:
                    pieces = next(steps)
                except StopIteration as finished:
                    outcomes += finished.value
                    break
                if stream:
                    yield [""] * start + pieces + [""] * (len(prompt_tokens) - start - len(batch))
        return outcomes

    @torch.inference_mode()
    def _decode_batch(
        self, prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, streams
    ) -> Generator[list[str], None, list[_Outcome]]:
        params = self.model.params
        bsz = len(prompt_tokens)
        prompt_lens = [len(prompt) for prompt in prompt_tokens]
        min_prompt_len, max_prompt_len = min(prompt_lens), max(prompt_lens)
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)

        # Prompts are left-aligned; position t of a shorter prompt is generated while a longer one is still
        # being read, so the whole batch advances one position per step after the shortest prompt.
        pad_id = -1  # never fed to the model: every position before cur_pos is filled
        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompt_tokens):
            tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        is_prompt = tokens != pad_id
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float32, device=self.device) if logprobs else None
        # end[row]: one past the row's last returned token; it shrinks when the row stops early.
        end = [min(length + max_gen_len, total_len) for length in prompt_lens]
        done = [length >= row_end for length, row_end in zip(prompt_lens, end)]

        def record_logprobs(logits: torch.Tensor, start: int) -> None:
            # logits[:, i] predicts the token at start + 1 + i
            targets = tokens[:, start + 1 : start + 1 + logits.shape[1]]
            picked = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            token_logprobs[:, start + 1 : start + 1 + logits.shape[1]] = picked

        if min_prompt_len == total_len and logprobs:
            # Nothing to generate (every prompt fills the context): score the prompts.
            record_logprobs(self.model.forward(tokens, 0)[:, :-1], 0)

        graphs = self.decode_graphs
        if graphs is not None:
            graphs.refresh()
        queued = None  # with CUDA graphs: the logits of the step for cur_pos, already queued on the GPU
        prev_pos = 0
        for cur_pos in range(min_prompt_len, total_len):
            if queued is not None:
                logits, queued = queued, None  # (bs, 1, vocab)
            else:
                # (bs, cur_pos - prev_pos, vocab) for logprobs, else (bs, 1, vocab): the next token needs the last
                logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos, last_only=not logprobs)
            last = logits[:, -1]
            # -inf marks a token as impossible; NaN, +inf or nothing possible means the model broke. Such a row
            # is sampled from zeros so that the draw cannot crash, and reported below with where it happened.
            # One reduction finds them all: the row maximum is NaN if any logit is, +inf if any is, and -inf
            # only if every one is.
            usable = torch.isfinite(last.amax(dim=-1))
            next_token = sample(torch.where(usable[:, None], last, 0.0), temperature, top_p, top_k, self.generator)
            # Where the prompt still has a token at cur_pos, keep it instead of the sample.
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                record_logprobs(logits, prev_pos)
            prev_pos = cur_pos

            # The one host synchronisation per step: EOS, stop sequences and streaming need the tokens on the host.
            on_host = torch.stack((next_token, usable.long()))
            if graphs is not None and cur_pos + 1 < total_len:
                # Queue the next step before waiting: the GPU computes it while the host reads this one (else it
                # would idle for the host's bookkeeping and the graph's launch, about a tenth of a 7B step). The
                # tokens come back through their own copy and event, which do not wait for the queued step. If
                # every sequence stops here, that step is wasted: it wrote cache entries nothing reads.
                on_host = on_host.to("cpu", non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
                queued = graphs(tokens[:, cur_pos : cur_pos + 1], cur_pos)
                copied.synchronize()
            new_tokens, usable = on_host.tolist()
            pieces = [""] * bsz
            for row in range(bsz):
                if done[row] or cur_pos < prompt_lens[row]:
                    continue
                if not usable[row]:
                    raise FloatingPointError(
                        f"the model's logits for sequence {row} at generation step {cur_pos - prompt_lens[row]} "
                        f"(position {cur_pos}) hold NaN or +inf, or rule out every token: the weights hold "
                        f"inf/nan or the dtype overflowed "
                        f"(float16 overflows most easily; try bfloat16 or float32)"
                    )
                if new_tokens[row] == self.tokenizer.eos_id:
                    end[row], done[row] = cur_pos, True
                    continue
                if streams is not None:
                    pieces[row] = streams[row].push(new_tokens[row])
                    if streams[row].stopped:
                        end[row], done[row] = prompt_lens[row] + streams[row].tokens_needed(), True
                if cur_pos + 1 >= end[row]:
                    done[row] = True
            if streams is not None:
                yield pieces
            if all(done):
                break
        if streams is not None:
            rest = [text_stream.finish() for text_stream in streams]
            if any(rest):
                yield rest

        outcomes = []
        for row, length in enumerate(prompt_lens):
            start = 0 if echo else length
            outcomes.append(
                _Outcome(
                    tokens=tokens[row, start : end[row]].tolist(),
                    logprobs=token_logprobs[row, start : end[row]].tolist() if logprobs else None,
                    text=None if streams is None else streams[row].text,
                )
            )
        return outcomes


def _run_to_end(steps: Generator[list[str], None, list[_Outcome]]) -> list[_Outcome]:
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value


def _merge_unsafe(steps: Iterator[list[str]], unsafe: list[bool]) -> Iterator[list[str]]:
    """Spread the pieces of the dialogs that ran over all dialogs; the ones that did not run (chat-format
    tags) get their error text in the first list."""
    errors_sent = False
    for pieces in steps:
        answered = iter(pieces)
        yield [("" if errors_sent else UNSAFE_REQUEST_ERROR) if bad else next(answered) for bad in unsafe]
        errors_sent = True
    if not errors_sent and any(unsafe):
        yield [UNSAFE_REQUEST_ERROR if bad else "" for bad in unsafe]
