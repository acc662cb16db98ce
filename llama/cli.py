"""The `llama` command line (also `python -m llama`): a model's text in the terminal, and a command per job on
checkpoints and training.

    llama generate [--ckpt-dir DIR] PROMPT...
    llama chat [--ckpt-dir DIR] [--system TEXT]
    llama reshard SRC DST --model-parallel-size N
    llama fold-norms SRC DST
    llama to-hf SRC DST
    llama from-hf SRC DST
    llama quantize SRC DST --bits 8|4 [--group-size N]   (or --scheme q8_0|q4_0)
    llama train --text-path FILE --out-dir DST
    llama perplexity --ckpt-dir DIR --tokenizer-path FILE --text-path FILE [--quantize int8|int4|q8_0|q4_0]
    llama serve [--ckpt-dir DIR] [--port N] [--api-key KEY]

generate and chat stream a model's text to the terminal; perplexity prints its figures. Every command that writes
writes a new folder and never changes its source, refuses an existing destination unless given --overwrite, and
prints one line naming what it wrote. A mistake is
reported in one line on standard error (exit status 1; 2 for a malformed command line). Options may also be
spelled with underscores (--model_parallel_size).
"""

import argparse
import contextlib
import dataclasses
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, NoReturn, Optional

from llama.convert import fold_norms, quantize, reshard
from llama.data import read_text
from llama.distributed import compute_threads
from llama.generation import Llama
from llama.hf import from_hf, to_hf
from llama.layout import check_folder, tokenizer_file, trained_context_len
from llama.loading import trained_on
from llama.perplexity import text_perplexity
from llama.serve.command import SERVE_OPTIONS, serve
from llama.terminal import CHAT_OPTIONS, GENERATE_OPTIONS, chat, generate
from llama.train import TrainConfig, train

TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")
YES_NO_OPTIONS = ("--overwrite", "--compile")  # the commands' yes/no options, which take a value too


def parse_bool(value: str) -> bool:
    """True or False from a clear spelling (true/false, yes/no, 1/0, any case); ValueError for anything else."""
    word = value.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"{value!r} is not a clear yes or no: write true or false")


class Parser(argparse.ArgumentParser):
    """argparse, with mistakes reported in one line that points to --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's sentence, then its default where it has one; descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (
            action.default is None
            or action.default is argparse.SUPPRESS
            or action.required
            or not action.option_strings
        ):
            return action.help
        return f"{action.help} (default: {action.default})"


class Command(NamedTuple):
    summary: str
    run: Callable[..., object]  # the library function, called with the options as keyword arguments
    source: Optional[str]  # what SRC is; None for a command that takes no SRC and DST (it writes --out-dir)
    options: tuple[tuple[str, dict], ...] = ()  # (flag, add_argument's keyword arguments)
    writes: bool = True  # False: the command reports a result (run returns the line to print)


def _train(text_path: str, out_dir: str, device: Optional[str], overwrite: bool, **settings) -> None:
    warmup, steps = settings["warmup_steps"], settings["steps"]
    if 0 < steps <= warmup:  # checked here to name the flags: a short run trips on the default warm-up
        default = " (its default)" if warmup == TrainConfig.warmup_steps else ""
        raise ValueError(
            f"--warmup-steps {warmup}{default} must be below --steps {steps}: pass --warmup-steps {steps - 1} or "
            "less (0: no warm-up), or more --steps"
        )
    train(text_path, out_dir, TrainConfig(**settings), device, overwrite)


def _perplexity(
    ckpt_dir: str, tokenizer_path: Optional[str], text_path: str, max_seq_len: int, stride: Optional[int],
    threads: Optional[int], **build,
) -> str:  # fmt: skip
    with compute_threads(threads):  # a bad --threads is named before anything is read
        check_folder(ckpt_dir)  # first, as every command does, before the text and the tokenizer
        text = read_text(text_path)
        tokenizer_path = tokenizer_file(ckpt_dir, tokenizer_path)
        trained = trained_context_len(ckpt_dir)
        with warnings.catch_warnings():  # build's warning is about generated text; the one below about scoring
            warnings.filterwarnings("ignore", message=r"the (demo model|model in .*) was trained on \d+-token windows")
            generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=1, **build)
        stride = max(1, max_seq_len // 2) if stride is None else stride
        result = text_perplexity(generator.model, generator.tokenizer, text, max_seq_len, stride)
        if trained is not None and min(max_seq_len, result.tokens + 1) > trained:  # a window went past `trained`
            warnings.warn(
                f"{trained_on(ckpt_dir, trained)}: scoring with --max-seq-len {max_seq_len} reads past what it "
                f"learned, which makes its perplexity worse: pass --max-seq-len {trained}",
                stacklevel=2,
            )
        return str(result)


def _option(flag: str, help: str, **settings) -> tuple[str, dict]:
    return flag, dict(settings, help=help)


_METAVARS = {int: "N", float: "X", str: "NAME"}
_TRAIN_OPTIONS = (
    _option("--text-path", "the UTF-8 text file to train on", required=True, metavar="FILE"),
    _option("--out-dir", "the checkpoint folder to write", required=True, metavar="DIR"),
    *(
        _option(f"--{item.name.replace('_', '-')}", item.metadata["help"], type=item.type, default=item.default,
                metavar=_METAVARS[item.type])
        for item in dataclasses.fields(TrainConfig)
    ),
    _option("--device", "cpu or cuda (default: CUDA when available)", metavar="NAME"),
)  # fmt: skip
_TO_HF_OPTIONS = (
    _option("--tokenizer-path", "the checkpoint's tokenizer.model (default: SRC/tokenizer.model)", metavar="FILE"),
    _option("--max-position-embeddings", "the context length config.json announces (Llama 2 was trained on 4096)",
            type=int, default=4096, metavar="N"),
    _option("--max-file-bytes", "the largest safetensors file; larger models are split over several, with an index",
            type=int, default=5_000_000_000, metavar="N"),
)  # fmt: skip
_MODEL_PARALLEL_SIZE = _option(
    "--model-parallel-size",
    "the number of shards to write: one per process that will load it (it must divide the heads, key/value heads, "
    "FFN width, dim and vocabulary)",
    type=int, required=True, metavar="N",
)  # fmt: skip

_QUANTIZE_OPTIONS = (
    _option("--bits", "8: int8 with a scale per output channel; 4: int4 with a scale and zero per group",
            type=int, metavar="N"),
    _option("--scheme", "instead of --bits: int8, int4, or q8_0 or q4_0, which round the activations too and "
            "multiply bytes (blocks of 32 with a scale each)", metavar="NAME"),
    _option("--group-size", "int4's group of input channels: 32, 64 or 128 (default 32)", type=int, metavar="N"),
)  # fmt: skip
_PERPLEXITY_OPTIONS = (
    _option("--ckpt-dir", "the Meta-layout checkpoint folder", required=True, metavar="DIR"),
    _option("--tokenizer-path", "its tokenizer.model (default: DIR/tokenizer.model)", metavar="FILE"),
    _option("--text-path", "the UTF-8 text file to score", required=True, metavar="FILE"),
    _option("--max-seq-len", "the window of tokens the model reads at once", type=int, default=512, metavar="N"),
    _option("--stride", "tokens between the starts of windows (default: half the window)", type=int, metavar="N"),
    _option("--quantize", "int8, int4, q8_0 or q4_0: quantize the linear layers as they load", metavar="NAME"),
    _option("--group-size", "int4's group of input channels: 32, 64 or 128 (default 32)", type=int, metavar="N"),
    _option("--device", "cpu or cuda (default: CUDA when available)", metavar="NAME"),
    _option("--dtype", "float32, bfloat16 or float16 (default: float32 on the CPU)", metavar="NAME"),
    _option("--threads", "PyTorch's CPU threads (default: the machine's physical cores)", type=int, metavar="N"),
)  # fmt: skip

COMMANDS = {
    "generate": Command("continue texts with a model, streaming them to the terminal", generate, None,
                        GENERATE_OPTIONS, writes=False),
    "chat": Command("chat with a model in the terminal", chat, None, CHAT_OPTIONS, writes=False),
    "reshard": Command(
        "write a checkpoint with another number of shards", reshard, "Meta-layout checkpoint", (_MODEL_PARALLEL_SIZE,)
    ),
    "fold-norms": Command("fold the RMSNorm weights into the layers they feed", fold_norms, "Meta-layout checkpoint"),
    "to-hf": Command(
        "convert a checkpoint to Hugging Face's Llama layout", to_hf, "Meta-layout checkpoint", _TO_HF_OPTIONS
    ),
    "from-hf": Command("convert a Hugging Face Llama model to Meta's layout", from_hf, "Hugging Face Llama model"),
    "quantize": Command("quantize a checkpoint's linear layers: int8, int4, q8_0, q4_0", quantize,
                        "Meta-layout checkpoint", _QUANTIZE_OPTIONS),
    "train": Command("train a small model and its tokenizer on a text file", _train, None, _TRAIN_OPTIONS),
    "perplexity": Command("score a text file with a model: perplexity, nats per token, bits per character",
                          _perplexity, None, _PERPLEXITY_OPTIONS, writes=False),
    "serve": Command("serve a model over HTTP with OpenAI's API (see docs/serving.md)", serve, None, SERVE_OPTIONS,
                     writes=False),
}  # fmt: skip


def _add_options(parser: argparse.ArgumentParser, command: Command) -> None:
    if command.source is not None:
        parser.add_argument("src", help=f"the {command.source} folder to read (never changed)")
        parser.add_argument("dst", help="the folder to write; it appears only once complete")
    for flag, settings in command.options:
        parser.add_argument(flag, **settings)
    if not command.writes:
        return
    parser.add_argument(
        "--overwrite",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="replace an existing destination (only once the new folder is complete)",
    )


def _run(command: Command, options: argparse.Namespace) -> str:
    """Run the command with the options given; the line to print: what it found, or the folder it wrote."""
    values = {flag.lstrip("-").replace("-", "_"): None for flag, _ in command.options}
    values = {name: getattr(options, name) for name in values}
    if not command.writes:
        return command.run(**values)
    if command.source is None:
        command.run(**values, overwrite=options.overwrite)
        written = Path(options.out_dir)
    else:
        command.run(options.src, options.dst, **values, overwrite=options.overwrite)
        written = Path(options.dst)
    files = sorted(path.name for path in written.iterdir())
    listed = ", ".join(files[:6]) + (f" and {len(files) - 6} more files" if len(files) > 6 else "")
    return f"wrote {written}: {listed}"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, each with its options' help and defaults."""
    listing = "\n".join(f"  {name:<12}{command.summary}" for name, command in COMMANDS.items())
    parser = Parser(
        prog="llama",
        usage="llama [-h] COMMAND ...",
        description=__doc__.split("\n\n")[0],
        epilog=f"commands:\n{listing}\n\n`llama COMMAND --help` explains a command's options.",
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS, parser_class=Parser)
    for name, command in COMMANDS.items():
        description = command.summary[0].upper() + command.summary[1:] + "."
        # prog: the usage line and the --help hint read `llama reshard`, not the main parser's usage before it.
        subparser = commands.add_parser(
            name, prog=f"llama {name}", description=description, formatter_class=HelpFormatter
        )
        _add_options(subparser, command)
    return parser


def normalize_arguments(argv: Sequence[str], booleans: Sequence[str] = YES_NO_OPTIONS) -> list[str]:
    """Options spelled with underscores take dashes (--model_parallel_size -> --model-parallel-size), and a
    yes/no option (one of `booleans`) given a value (--overwrite=false, --overwrite no) becomes --overwrite or
    --no-overwrite. Raises ValueError for a value that is not a clear yes or no."""
    result: list[str] = []
    words = list(argv)
    while words:
        word = words.pop(0)
        if not word.startswith("--"):
            result.append(word)
            continue
        name, equals, value = word.partition("=")
        name = name.replace("_", "-")
        if name in booleans:
            if not equals and words and words[0].lower() in TRUE_WORDS + FALSE_WORDS:
                value, equals = words.pop(0), "="
            if equals:
                name = name if parse_bool(value) else "--no-" + name[2:]
                equals, value = "", ""
        result.append(name + equals + value)
    return result


def parse_arguments(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None, booleans: Sequence[str] = YES_NO_OPTIONS
) -> argparse.Namespace:
    """`parser.parse_args` of `argv` (default: the program's arguments) after `normalize_arguments`; a mistake
    ends the program with one line on standard error, status 2, naming the command's --help where there is one."""
    try:
        words = normalize_arguments(sys.argv[1:] if argv is None else argv, booleans)
    except ValueError as error:
        parser.error(str(error))
    options, unknown = parser.parse_known_args(words)
    if unknown:  # reported by the command's own parser, whose --help lists what it takes
        commands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        chosen = getattr(options, "command", None)
        command_parser = commands[0].choices[chosen] if commands and chosen else parser
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return options


def readable_warnings() -> None:
    """Print warnings as one line, `warning: ...`, instead of Python's file, line number and source."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"warning: {message}", file=sys.stderr if file is None else file, flush=True)

    warnings.showwarning = show


class Interrupted(BaseException):
    """A termination signal, turned into an exception so that a half-written folder is removed on the way out."""

    def __init__(self, number: int):
        super().__init__(f"signal {number}")
        self.signal = number


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal) raise Interrupted while the block runs, as Ctrl-C raises
    KeyboardInterrupt; Python's default for them would end the process without cleaning up."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may handle signals
        return

    def interrupt(number: int, frame) -> None:
        raise Interrupted(number)

    names = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {name: signal.signal(getattr(signal, name), interrupt) for name in names}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `llama COMMAND ...` with `argv` (default: the program's arguments); returns the exit status."""
    readable_warnings()
    parser = build_parser()
    options = parse_arguments(parser, argv)
    if options.command is None:
        parser.error(f"give a command: {', '.join(COMMANDS)}")
    try:
        with _signals_interrupt():
            report = _run(COMMANDS[options.command], options)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as interruption:
        number = interruption.signal if isinstance(interruption, Interrupted) else signal.SIGINT
        outcome = ": nothing was written" if COMMANDS[options.command].writes else ""
        print(f"interrupted by {signal.Signals(number).name}{outcome}", file=sys.stderr)
        return 128 + number
    if report:  # generate and chat have printed theirs
        print(report)
    return 0
