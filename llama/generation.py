"""`Llama`: a model and its tokenizer, ready for text and chat completion, in batches of any number of prompts,
streamed or not. Every method is a thin collector over one generator, `generate_steps`, which runs the
decoding loop (llama.decoding) batch after batch."""

import inspect
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional, TypedDict, Union

import torch

from llama.chat_format import Dialog, Message, chat_format_for
from llama.cuda_graphs import decode_step
from llama.decoding import Batch, Completion, StepResult, completions, decode
from llama.distributed import is_main_process, resolve_dtype, setup_model_parallel
from llama.layout import check_folder, read_quantization
from llama.loading import load_model, model_args_for
from llama.model import Transformer
from llama.prompts import check_token_prompts, encode_dialogs, encode_prompts
from llama.quantize import quantization
from llama.sampling import SamplingParams
from llama.speculative import Speculation
from llama.speculative_options import build_speculation, check_draft, refuse_compiled_steps, speculation_settings
from llama.tokenizer import Tokenizer
from llama.turns import Turns
from llama.values import flag, whole_number


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # the text of each returned token, with logprobs=True
    logprobs: list[float]  # with logprobs=True
    top_logprobs: list[list[tuple[str, float]]]  # with top_logprobs=k: the k most likely (text, logprob) per token


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]
    logprobs: list[float]
    top_logprobs: list[list[tuple[str, float]]]


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
        quantize: Optional[str] = None,
        group_size: Optional[int] = None,
        compile: bool = False,
        speculate: Optional[int] = None,
        prompt_lookup: Optional[int] = None,
        draft_ckpt_dir: Union[str, Path, None] = None,
        draft_quantize: Optional[str] = None,
    ) -> "Llama":
        """Load a Meta-layout checkpoint folder and its tokenizer, ready to generate.

        Works under `torchrun --nproc_per_node N` and as a plain `python` process (a one-process group is set
        up), with any number of shards: a count other than N is resliced as it loads (see `load_model`), as long
        as N divides the heads, key/value heads, FFN width, dim and vocabulary. `device` defaults to CUDA when
        available, else the CPU; `dtype` to bfloat16 on GPUs that support it, float16 on other GPUs, float32 on
        the CPU (bfloat16 for a quantized model, where PyTorch's kernels are fast). `seed` fixes sampling (the
        same on every rank, so the ranks agree on every token). `progress` reports loading and the batches of a
        long run on standard error (default: when it is a terminal, on rank 0). `cuda_graphs` records each
        decoding step as a CUDA graph and replays it (see llama/cuda_graphs.py; default: on a CUDA device with
        one process); `compile` compiles it with torch.compile instead (see llama/compiled.py: tens of seconds
        to compile, then a faster step on the CPU). `quantize` quantizes the linear layers' weights as they load,
        so that memory never holds the floating-point model: "int8" or "int4" weight-only (llama/quantize.py;
        int4 `group_size` 32, 64 or 128, default 32), or llama.cpp's block schemes "q8_0" and "q4_0", which round
        the activations to int8 too (llama/block_quant.py); a checkpoint written by `llama quantize` loads
        quantized without it. The caller's torch defaults are left alone, and build may be called again in the
        same process. Raises FileNotFoundError for a missing folder, params.json, shard or
        tokenizer, and ValueError for anything that does not fit: a malformed params.json, a model-parallel
        size that does not divide the model, a corrupt shard, shards that disagree, a tensor of the wrong shape,
        a tokenizer of another vocabulary size, non-positive sizes, an unknown quantization or group size, or
        quantize= for a checkpoint that is already quantized. `speculate`=k: speculative decoding
        (docs/generation.md), k tokens proposed per step by `prompt_lookup`=n or the draft in `draft_ckpt_dir`
        (`draft_quantize` as `quantize`); ValueError for options that do not fit."""
        max_seq_len = whole_number(max_seq_len, "max_seq_len")
        max_batch_size = whole_number(max_batch_size, "max_batch_size")
        seed = whole_number(seed, "seed", minimum=None)
        if model_parallel_size is not None:
            model_parallel_size = whole_number(model_parallel_size, "model_parallel_size")
        scheme = None if quantize is None and group_size is None else quantization(quantize, group_size)
        plan = speculation_settings(speculate, prompt_lookup, draft_ckpt_dir, draft_quantize, compile, cuda_graphs)
        check_folder(ckpt_dir)  # the first file read: a wrong folder is named as such, not as a missing tokenizer
        device = setup_model_parallel(model_parallel_size, device)
        tokenizer = Tokenizer(tokenizer_path)
        args = model_args_for(ckpt_dir, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        dtype = resolve_dtype(dtype, device, quantized=scheme is not None or read_quantization(ckpt_dir) is not None)
        if progress is None:
            progress = sys.stderr.isatty() and is_main_process()
        draft = check_draft(draft_ckpt_dir, tokenizer, args)  # small reads, before the model's weights load
        model = load_model(ckpt_dir, args, torch.distributed.get_rank(), device, dtype, progress, scheme)
        speculation = build_speculation(model, plan, draft, draft_quantize, device, dtype, progress)
        return Llama(model, tokenizer, seed, progress, cuda_graphs, compile, speculation)

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        seed: int = 1,
        progress: bool = False,
        cuda_graphs: Optional[bool] = None,
        compile: bool = False,
        speculation: Optional[Speculation] = None,
    ):
        """A generator for a model already built (a Transformer, or any module with its call and `params`) and
        its tokenizer; the arguments as in `build`, and `speculation` (llama.speculative.Speculation, for a
        Transformer) to decode speculatively."""
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = chat_format_for(tokenizer)
        self.speculation = speculation
        if speculation is not None:
            refuse_compiled_steps(speculation.speculate, flag(compile, "compile"), cuda_graphs)
            cuda_graphs = False
        self.decode_step = decode_step(model, cuda_graphs, flag(compile, "compile"))
        self.progress = progress
        self.device = next(model.parameters()).device
        # A private generator: sampling is reproducible without touching the caller's global RNG state, and
        # every rank, seeded alike and seeing the same logits, draws the same tokens. It seeds the generator of
        # each sequence of a call that gives no seed of its own.
        self.generator = torch.Generator(device=self.device).manual_seed(whole_number(seed, "seed", minimum=None))
        self._turns = Turns()
        # The batch that last ran: cache row i holds the keys and values of its row i's tokens up to its `cached`.
        self._last_batch: Optional[Batch] = None

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
        seed: Optional[int] = None,
        top_logprobs: int = 0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
    ) -> tuple:
        """Continue each prompt (a list of token ids) by up to `max_gen_len` tokens, stopping a sequence at EOS.

        Prompts of different lengths run together, in batches of at most max_batch_size; temperature 0 is
        greedy. Returns the new tokens of each prompt (the prompt too with echo=True, EOS cut off), and with
        logprobs=True, for each returned token, the log-probability the model gave it at the position that
        predicted it (0.0 for a prompt's first token, which nothing predicts). A prompt may fill the whole
        context (max_seq_len tokens): nothing is generated then, which with echo and logprobs scores it. `seed`
        seeds each prompt's own sampling, so that its tokens do not depend on the other prompts of the call
        (None: seeds drawn from the `seed` the Llama was built with). With logprobs and top_logprobs=k (up to
        20), a third list: for each returned token, the k most likely tokens at its position as (token id,
        logprob) pairs, most likely first. `frequency_penalty` and `presence_penalty` as in `text_completion`.
        Raises ValueError for an empty batch, bad token ids, a prompt longer than max_seq_len or bad sampling
        settings, and FloatingPointError if the model's logits are not finite.
        """
        params = SamplingParams(
            temperature, top_p, top_k, max_gen_len, logprobs=logprobs, echo=echo, seed=seed,
            top_logprobs=top_logprobs, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        )  # fmt: skip
        results = completions(self._steps(check_token_prompts(prompt_tokens, self.model.params), params, False))
        tokens = [result.tokens for result in results]
        if top_logprobs:
            return tokens, [result.logprobs for result in results], [result.top_logprobs for result in results]
        return tokens, ([result.logprobs for result in results] if logprobs else None)

    def text_completion(
        self, prompts: list[str], temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None,
        logprobs: bool = False, echo: bool = False, top_k: int = 0, stop: Optional[list[str]] = None,
        truncate: bool = False, seed: Optional[int] = None, top_logprobs: int = 0, frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
    ) -> list[CompletionPrediction]:  # fmt: skip
        """Complete each prompt string; any number of prompts, results in input order.

        `max_gen_len` defaults to max_seq_len - 1. A sequence ends at EOS, or when its text contains one of
        the `stop` strings (the returned text ends before it). A prompt must leave room for one new token
        (at most max_seq_len - 1 tokens); with truncate=True one keeps BOS and as many of its last tokens as leave
        room for max_gen_len new ones (see `llama.prompts.truncated_len`). `seed`
        seeds each prompt's own sampling, as in `generate`; `frequency_penalty` and `presence_penalty` (-2 to
        2, OpenAI's) lower a token's logit by the first times its count among the tokens generated so far, and
        by the second if it was generated at all (see SamplingParams). Returns one {"generation": str} per
        prompt (the prompt included with echo=True), plus "tokens" (the text of each token) and "logprobs" with
        logprobs=True, and "top_logprobs" with top_logprobs=k too (up to 20): for each token, the k most likely
        at its position as (text, logprob) pairs, most likely first. With a stop sequence, the tokens and
        logprobs are those wholly inside the returned text (one that straddles the stop is left out). Raises
        TypeError for a non-string prompt or stop list, ValueError for an empty list, bad sampling settings or
        a prompt that is too long (naming it), and FloatingPointError if the model's logits are not finite.
        """
        params = SamplingParams(
            temperature, top_p, top_k, max_gen_len, stop, logprobs, echo, seed=seed, top_logprobs=top_logprobs,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        )  # fmt: skip
        prompt_tokens = encode_prompts(self.tokenizer, prompts, self.model.params, truncate, params.max_gen_len)
        steps = self._steps(prompt_tokens, params, bool(stop))
        return [self._prediction(result, params) for result in completions(steps)]

    def stream_completion(self, prompts: list[str], **settings) -> Iterator[list[str]]:
        """`text_completion` as it happens, with its keyword arguments: an iterator that yields, per decoding
        step, a list with the new text of each prompt ("" where there is none). The pieces of a prompt add up
        to its final "generation" exactly. Arguments are checked, and errors raised, before the first step."""
        params, truncate = _settings("text_completion", settings)
        prompt_tokens = encode_prompts(self.tokenizer, prompts, self.model.params, truncate, params.max_gen_len)
        return _pieces(self._steps(prompt_tokens, params, follow_text=True, streaming=True))

    def chat_completion(
        self, dialogs: list[Dialog], temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None,
        logprobs: bool = False, top_k: int = 0, stop: Optional[list[str]] = None, truncate: bool = False,
        seed: Optional[int] = None, top_logprobs: int = 0, frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
    ) -> list[ChatPrediction]:  # fmt: skip
        """Answer each dialog as the assistant, in the model's chat format (`chat_format`); any number of dialogs.

        Returns one {"generation": {"role": "assistant", "content": str}} per dialog, plus "tokens" and
        "logprobs" with logprobs=True ("top_logprobs" too with top_logprobs=k). A dialog the format refuses
        (for Llama 2, one containing a tag of the format) is not run; its answer is the format's error text.
        `stop`, `truncate`, `seed`, `top_logprobs` and the penalties work as in `text_completion`. Raises ValueError or
        TypeError for malformed dialogs (see `check_dialog`) and as `text_completion` does.
        """
        params = SamplingParams(
            temperature, top_p, top_k, max_gen_len, stop, logprobs, seed=seed, top_logprobs=top_logprobs,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        )  # fmt: skip
        prompts, refusals = encode_dialogs(self.chat_format, dialogs, self.model.params, truncate, params.max_gen_len)
        answers = iter(completions(self._steps(prompts, params, follow_text=bool(stop))))
        results: list[ChatPrediction] = []
        for refusal in refusals:
            prediction = self._prediction(Completion([], [], refusal, []) if refusal else next(answers), params)
            message: Message = {"role": "assistant", "content": prediction.pop("generation")}
            results.append({"generation": message, **prediction})
        return results

    def stream_chat(self, dialogs: list[Dialog], **settings) -> Iterator[list[str]]:
        """`chat_completion` as it happens, with its keyword arguments: yields, per decoding step, a list with
        the new answer text of each dialog ("" where there is none); the pieces add up to the final content
        exactly (for a refused dialog, the error text comes in the first list)."""
        params, truncate = _settings("chat_completion", settings)
        prompts, refusals = encode_dialogs(self.chat_format, dialogs, self.model.params, truncate, params.max_gen_len)
        return _merge_refusals(_pieces(self._steps(prompts, params, follow_text=True, streaming=True)), refusals)

    def generate_steps(
        self,
        prompt_tokens: Sequence[list[int]],
        params: SamplingParams,
        follow_text: bool = False,
        reuse_cache: bool = False,
    ) -> Iterator[StepResult]:
        """The generator under every method above: decode the prompts (lists of token ids) in batches of at
        most max_batch_size, yielding StepResults; each sequence's Completion comes with the last one of its
        batch. With follow_text, a StepResult per decoding step gives the text each sequence gained, and
        `params.stop` is applied (see llama.streaming); without, there is one StepResult per batch.

        With reuse_cache, a batch starts from the longest prefix of its prompts that the key/value cache still
        holds from this Llama's last batch (the same tokens in the same rows, as far as that batch fed them,
        also when it was stopped early) and feeds the model only the rest: what a conversation does turn after
        turn (see llama.chat). The results are those of feeding it all, up to the order of floating-point sums.
        It trusts that nothing else ran on the model since: no other Llama over the same model, no direct call.

        Raises ValueError for an empty batch, bad token ids or a prompt longer than max_seq_len (before the
        first step), FloatingPointError as the model breaks."""
        prompts = check_token_prompts(prompt_tokens, self.model.params)
        return self._steps(prompts, params, follow_text, streaming=True, reuse_cache=flag(reuse_cache, "reuse_cache"))

    # ---- results -------------------------------------------------------------------------------------------------

    def _prediction(self, result: Completion, params: SamplingParams) -> CompletionPrediction:
        text = self.tokenizer.decode(result.tokens) if result.text is None else result.text
        prediction: CompletionPrediction = {"generation": text}
        if params.logprobs:
            prediction["tokens"] = [self.tokenizer.decode([token]) for token in result.tokens]
            prediction["logprobs"] = result.logprobs
        if params.top_logprobs:
            prediction["top_logprobs"] = [
                [(self.tokenizer.decode([token]), logprob) for token, logprob in pairs] for pairs in result.top_logprobs
            ]
        return prediction

    # ---- decoding -------------------------------------------------------------------------------------------

    def _steps(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        follow_text: bool,
        streaming: bool = False,
        reuse_cache: bool = False,
    ) -> Iterator[StepResult]:
        with self._turns.turn(streaming):
            yield from self._batches(prompts, params, follow_text, reuse_cache)

    # A decorator, so that inference mode is on only while a step runs, not in the caller's code between steps.
    @torch.inference_mode()
    def _batches(
        self, prompts: list[list[int]], params: SamplingParams, follow_text: bool, reuse_cache: bool
    ) -> Iterator[StepResult]:
        size = self.model.params.max_batch_size
        starts = range(0, len(prompts), size)
        for number, start in enumerate(starts):
            if self.progress and len(starts) > 1:
                print(f"generating batch {number + 1}/{len(starts)}", file=sys.stderr, flush=True)
            batch_prompts = prompts[start : start + size]
            text_of = self.tokenizer if follow_text else None
            generators = self._row_generators(params, len(batch_prompts))
            cached = self._cached_prefix(batch_prompts, params) if reuse_cache else 0
            batch = Batch(
                batch_prompts, params, self.model.params.max_seq_len, self.device, text_of, generators, cached
            )
            self._last_batch = batch
            steps = decode(self.decode_step, batch, self.tokenizer.stop_ids, self.speculation)
            if len(batch_prompts) == len(prompts):
                yield from steps
                continue
            for step in steps:  # indices in the whole list of prompts
                before, after = [""] * start, [""] * (len(prompts) - start - len(batch_prompts))
                finished = [(start + row, completion) for row, completion in step.finished]
                yield StepResult(before + step.pieces + after, finished)

    def _cached_prefix(self, prompts: list[list[int]], params: SamplingParams) -> int:
        """How many leading positions of every prompt the cache holds already, from the last batch: at most each
        prompt's length less one (the last must be fed for the logits of the next); 0 where echoed logprobs need
        every prompt token fed."""
        last = self._last_batch
        if last is None or len(prompts) > len(last.prompt_lens) or (params.logprobs and params.echo):
            return 0
        held = last.tokens[: len(prompts), : last.cached].tolist()
        return min(min(_common_prefix_len(row, prompt), len(prompt) - 1) for row, prompt in zip(held, prompts))

    def _row_generators(self, params: SamplingParams, count: int) -> Optional[list[torch.Generator]]:
        """A generator per sequence of a batch, seeded with params.seed or else from the Llama's generator (a
        row's draws then never depend on another row's); None for greedy decoding, which draws nothing."""
        if params.temperature == 0:
            return None
        if params.seed is None:
            seeds = torch.randint(2**62, (count,), generator=self.generator, device=self.device).tolist()
        else:
            seeds = [params.seed] * count
        return [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]


def _common_prefix_len(first: Sequence[int], second: Sequence[int]) -> int:
    return next((index for index, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))


def _settings(method: str, settings: dict) -> tuple[SamplingParams, bool]:
    """SamplingParams and `truncate` from the keyword arguments of `Llama.<method>`. Raises TypeError for one
    that method does not take, and as SamplingParams does."""
    accepted = set(inspect.signature(getattr(Llama, method)).parameters) - {"self", "prompts", "dialogs"}
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise TypeError(f"{method} takes no argument {', '.join(unknown)}: it takes {', '.join(sorted(accepted))}")
    truncate = settings.pop("truncate", False)
    return SamplingParams(**settings), truncate


def _pieces(steps: Iterator[StepResult]) -> Iterator[list[str]]:
    """The text pieces of each step; the last step of a batch, which hands out what was held back, only when
    it has any."""
    for step in steps:
        if not step.finished or any(step.pieces):
            yield step.pieces


def _merge_refusals(steps: Iterator[list[str]], refusals: list[str]) -> Iterator[list[str]]:
    """Spread the pieces of the dialogs that ran over all dialogs; the refused ones get their error text in the
    first list."""
    refusals_sent = False
    for pieces in steps:
        answered = iter(pieces)
        yield [(refusal if not refusals_sent else "") if refusal else next(answered) for refusal in refusals]
        refusals_sent = True
    if not refusals_sent and any(refusals):
        yield refusals
