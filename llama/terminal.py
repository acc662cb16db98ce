"""A model in the terminal: `llama generate` continues texts and `llama chat` holds a conversation, each streaming
its text as it comes, on the bundled demo model when no checkpoint is given, in one process or under torchrun
(every rank computes, rank 0 reads standard input and prints). The example scripts reach the same code:
example_chat_completion.py --interactive is `chat_in_terminal`, and both build their model with `load_generator`.
"""

import argparse
import sys
from typing import Optional

import torch.distributed as dist

from llama.chat import Chat
from llama.distributed import compute_threads, is_main_process
from llama.generation import Llama
from llama.layout import tokenizer_file, trained_context_len
from llama.loading import DEMO_CONTEXT_LEN, demo_checkpoint

RULE = "-" * 72  # between the texts of `llama generate`, as example_text_completion.py prints them
CHAT_HELP = "type a message and press Enter; /reset starts over, /exit or Ctrl-D ends the chat"
DEMO_CHAT_NOTE = (
    "note: no --ckpt-dir given, so this is the bundled demo model, trained on Shakespeare's plays only: it is no "
    "chat model, and its replies are play-like text, not answers. For answers, pass --ckpt-dir of a chat model "
    "(Llama 2 chat, Llama 3.x instruct)."
)


def say(*args, **kwargs) -> None:
    """print, on rank 0 only (every rank computes the same text), at once."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def load_generator(
    ckpt_dir: Optional[str],
    tokenizer_path: Optional[str],
    max_seq_len: Optional[int],
    max_batch_size: int,
    default_max_seq_len: Optional[int] = None,
    **build,
) -> tuple[Llama, bool]:
    """`Llama.build` for a command or example, and whether it runs the bundled demo model: the demo model when
    neither `ckpt_dir` nor `tokenizer_path` is given, with a context of at most the 256 tokens it was trained
    on (saying so on standard error when more was asked for); the tokenizer defaults to the one in `ckpt_dir`.
    `max_seq_len` defaults to `default_max_seq_len`, else the length the model was trained on where its folder
    records it, else 512. `build`: Llama.build's other keyword arguments. Raises ValueError for
    `tokenizer_path` without `ckpt_dir`, and as `Llama.build` does."""
    on_demo = ckpt_dir is None and tokenizer_path is None
    if on_demo:
        ckpt_dir, tokenizer_path = demo_checkpoint()
        if max_seq_len is not None and max_seq_len > DEMO_CONTEXT_LEN and is_main_process():
            print(f"note: the demo model was trained on {DEMO_CONTEXT_LEN}-token windows: --max-seq-len "
                  f"{max_seq_len} lowered to {DEMO_CONTEXT_LEN}", file=sys.stderr)  # fmt: skip
        max_seq_len = min(max_seq_len or default_max_seq_len or DEMO_CONTEXT_LEN, DEMO_CONTEXT_LEN)
    elif ckpt_dir is None:
        raise ValueError(
            "--tokenizer-path was given without --ckpt-dir: give the checkpoint folder too, or neither to run the "
            "bundled demo model"
        )
    else:
        tokenizer_path = tokenizer_file(ckpt_dir, tokenizer_path)
        max_seq_len = max_seq_len or default_max_seq_len or trained_context_len(ckpt_dir) or 512
    return Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, **build), on_demo


def read_line(prompt: str = "", echo: bool = False) -> Optional[str]:
    """A line of standard input (without its line break), read on rank 0 and shared with every rank; None at
    the end of input (Ctrl-D on a terminal). On a terminal it is typed after `prompt`; read from a file or a
    pipe, with `echo` it is printed after `prompt`, so that a transcript reads like the terminal session."""
    line = None
    if is_main_process():
        if sys.stdin.isatty():
            try:
                line = input(prompt)
            except EOFError:
                print(flush=True)  # Ctrl-D: the shell's prompt starts on a line of its own
        else:
            line = sys.stdin.readline()
            line = line.rstrip("\r\n") if line else None
            if line is not None and echo:
                print(f"{prompt}{line}", flush=True)
    if _several_processes():
        shared = [line]
        dist.broadcast_object_list(shared, src=0)
        line = shared[0]
    return line


def _several_processes() -> bool:
    # Ctrl-C then ends the run, as torchrun does: one rank stopping an answer on its own would leave the others
    # waiting for it in the next step's collectives.
    return dist.is_initialized() and dist.get_world_size() > 1


def chat_in_terminal(chat: Chat) -> None:
    """The interactive chat: each line of standard input a message, each answer streamed after "Assistant: ",
    notices on standard error. /reset starts over, /exit or the end of input ends it; in one process Ctrl-C
    stops an answer (what was said stays in the history) and the chat goes on."""
    ctrl_c = "Ctrl-C ends the run" if _several_processes() else "Ctrl-C stops an answer"
    say(f"Chat started: {CHAT_HELP}; {ctrl_c}.", file=sys.stderr)
    while True:
        try:
            line = read_line("User: ", echo=True)
        except KeyboardInterrupt:
            if _several_processes():
                raise
            say(f"\n({CHAT_HELP})", file=sys.stderr)
            continue
        if line is None or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            chat.reset()
            say("(the conversation starts over)", file=sys.stderr)
        elif line.strip():
            _answer(chat, line)


def _answer(chat: Chat, message: str) -> None:
    try:
        reply = chat.send(message)
    except ValueError as error:
        say(f"error: {error}", file=sys.stderr)
        return
    if reply.dropped:
        say(f"(dropped the {reply.dropped} oldest messages to fit max_seq_len)", file=sys.stderr)
    say("Assistant: ", end="")
    try:
        for piece in reply.pieces:
            say(piece, end="")
    except KeyboardInterrupt:
        if _several_processes():
            raise
        reply.pieces.close()
        say()
        say("(answer stopped)", file=sys.stderr)
        return
    say()


def _sampling(options: dict) -> dict:
    """The sampling settings among a command's options (taken out of them)."""
    names = ("temperature", "top_p", "top_k", "seed", "stop")
    return {name: options.pop(name) for name in names if name in options}


def generate(prompts: list[str], threads: Optional[int], max_gen_len: Optional[int], **options) -> str:
    """`llama generate`: continue each prompt (none: each line of standard input), one after another, printing
    the prompt (in bold on a terminal) and streaming its continuation, a rule between two texts. Returns ""
    (nothing more to print). Raises ValueError and FileNotFoundError as `load_generator` and
    `stream_completion` do."""
    sampling = _sampling(options)
    with compute_threads(threads):
        generator, _ = load_generator(max_batch_size=1, **options)
        bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
        if not prompts and sys.stdin.isatty():
            say("(no PROMPT given: type the prompts, one a line; Ctrl-D ends)", file=sys.stderr)
        lines = iter(prompts) if prompts else iter(read_line, None)
        for number, prompt in enumerate(lines):
            if number:
                say(RULE)
            say(f"{bold}{prompt}{plain}", end="")
            try:
                for pieces in generator.stream_completion([prompt], max_gen_len=max_gen_len, **sampling):
                    say(pieces[0], end="")
            finally:
                say()  # the text ends its line, also before the notice of Ctrl-C or of an error
    return ""


def chat(system: Optional[str], threads: Optional[int], max_gen_len: Optional[int], **options) -> str:
    """`llama chat`: an interactive chat (see `chat_in_terminal`) with the model, in its chat format. Returns ""
    (nothing more to print). Raises ValueError and FileNotFoundError as `load_generator` and `Chat` do."""
    sampling = _sampling(options)
    with compute_threads(threads):
        generator, on_demo = load_generator(max_batch_size=1, **options)
        if on_demo:
            say(DEMO_CHAT_NOTE, file=sys.stderr)
        chat_in_terminal(Chat(generator, system, max_gen_len, **sampling))
    return ""


def _option(flag: str, help: str, **settings) -> tuple[str, dict]:
    return flag, dict(settings, help=help)


_MODEL_OPTIONS = (
    _option("--ckpt-dir", "a Meta-layout checkpoint folder (default: the bundled demo model)", metavar="DIR"),
    _option("--tokenizer-path", "its tokenizer.model (default: DIR/tokenizer.model)", metavar="FILE"),
    _option("--max-seq-len", "the context in tokens, prompt and answer together (default: the length the model "
            f"was trained on where its folder records it, else 512; the demo model's {DEMO_CONTEXT_LEN})",
            type=int, metavar="N"),
    _option("--device", "cpu or cuda (default: CUDA when available)", metavar="NAME"),
    _option("--dtype", "float32, bfloat16 or float16 (default: bfloat16 on GPUs that support it, float16 on "
            "other GPUs, float32 on the CPU; bfloat16 for a quantized model)", metavar="NAME"),
    _option("--quantize", "int8, int4, q8_0 or q4_0: quantize the linear layers as they load", metavar="NAME"),
    _option("--group-size", "int4's group of input channels: 32, 64 or 128 (default 32)", type=int, metavar="N"),
    _option("--compile", "compile the decoding step (a slower start, then faster steps)",
            action=argparse.BooleanOptionalAction, default=False),
    _option("--threads", "PyTorch's CPU threads (default: the machine's physical cores, shared among the "
            "processes torchrun starts on it)", type=int, metavar="N"),
)  # fmt: skip
# Speculative decoding (llama/speculative.py), for the commands and the example scripts alike.
SPECULATION_OPTIONS = (
    _option("--speculate", "speculative decoding: propose K tokens per step, which the model checks in one pass "
            "(the same text; with --prompt-lookup or --draft-ckpt-dir)", type=int, metavar="K"),
    _option("--prompt-lookup", "propose what followed the last N tokens where they occur earlier in the text",
            type=int, metavar="N"),
    _option("--draft-ckpt-dir", "propose with this draft model's greedy or sampled tokens (same tokenizer)",
            metavar="DIR"),
    _option("--draft-quantize", "int8, int4, q8_0 or q4_0: quantize the draft model as it loads", metavar="NAME"),
)  # fmt: skip
_SAMPLING_OPTIONS = (
    _option("--temperature", "randomness of the sampling; 0 is greedy", type=float, default=0.6, metavar="X"),
    _option("--top-p", "sample from the smallest set of most likely tokens whose probabilities add up to this",
            type=float, default=0.9, metavar="X"),
    _option("--top-k", "sample among the K most likely tokens only (0: no limit)", type=int, default=0, metavar="K"),
    _option("--seed", "seed the sampling of each text or answer, for the same text every time", type=int,
            metavar="N"),
)  # fmt: skip
GENERATE_OPTIONS = (
    _option("prompts", "the texts to continue (default: each line of standard input)", nargs="*", metavar="PROMPT"),
    *_MODEL_OPTIONS,
    *SPECULATION_OPTIONS,
    *_SAMPLING_OPTIONS,
    _option("--max-gen-len", "the most tokens generated per text (default: to the end of the context)", type=int,
            metavar="N"),
    _option("--stop", "end a text before TEXT (repeat for several)", action="append", metavar="TEXT"),
)  # fmt: skip
CHAT_OPTIONS = (
    _option("--system", "a system prompt, kept through the whole chat", metavar="TEXT"),
    *_MODEL_OPTIONS,
    *SPECULATION_OPTIONS,
    *_SAMPLING_OPTIONS,
    _option("--max-gen-len", "the most tokens of one answer (default: a quarter of the context)", type=int,
            metavar="N"),
)  # fmt: skip
