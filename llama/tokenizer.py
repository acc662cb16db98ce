"""The tokenizer that ships with a checkpoint (`tokenizer.model`): SentencePiece for Llama 2, tiktoken for Llama 3,
3.1 and 3.2, chosen from the file's content. Both turn text into ids and back behind one interface: `n_words`,
`bos_id`, `eos_id`, `pad_id`, `stop_ids` (the ids that end a turn), `encode`, `decode`."""

import base64
import binascii
import os
import re
from collections.abc import Iterator, Sequence

from sentencepiece import SentencePieceProcessor


def check_unicode(s: str) -> None:
    """Raise ValueError if `s` cannot be written as UTF-8: Python strings may hold lone surrogates
    (from a bad decode or a "\\ud800" escape) that no tokenizer can encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = s[error.start : error.end]
        raise ValueError(
            f"text is not valid Unicode: {bad!r} at index {error.start} is a lone surrogate; "
            f"decode the input with errors='replace' or remove it"
        ) from None


class Tokenizer:
    """`Tokenizer(path)` loads either kind: a file of base64 tokens and ranks is Llama 3's tiktoken model
    (`TiktokenTokenizer`), anything else is read as a SentencePiece model (`SentencePieceTokenizer`). Raises
    FileNotFoundError if the file does not exist, ValueError if it is a folder, a model of neither kind, or
    one without BOS and EOS."""

    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int  # -1 where there is no padding piece
    stop_ids: frozenset[int]  # generation ends a sequence at any of these

    def __new__(cls, model_path):
        if cls is Tokenizer:
            cls = TiktokenTokenizer if _is_tiktoken_file(_checked_path(model_path)) else SentencePieceTokenizer
        return super().__new__(cls)

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of `s`, with BOS in front and EOS at the end when asked; text that looks like a special
        token is encoded as text. Raises TypeError for a non-string and ValueError for a string that is not
        valid Unicode (a lone surrogate)."""
        if not isinstance(s, str):
            raise TypeError(f"can only encode a str, got {type(s).__name__}: {s!r}")
        check_unicode(s)
        return [self.bos_id] * bos + self._encode(s) + [self.eos_id] * eos

    def _encode(self, s: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        raise NotImplementedError


def _checked_path(model_path) -> str:
    model_path = os.fspath(model_path)
    if os.path.isdir(model_path):
        raise ValueError(f"tokenizer path {model_path!r} is a folder: pass the tokenizer.model file inside it")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(
            f"tokenizer file {model_path!r} does not exist: pass the tokenizer.model that came with the checkpoint"
        )
    return model_path


def _is_tiktoken_file(path: str) -> bool:
    with open(path, "rb") as file:
        first_line = file.readline(1024)
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?\n?", first_line) is not None


class SentencePieceTokenizer(Tokenizer):
    """The SentencePiece model of Llama 2 checkpoints. BOS and EOS decode to no text."""

    def __init__(self, model_path):
        model_path = _checked_path(model_path)
        self.path = model_path
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(model_path)
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{model_path!r} is not a SentencePiece model file ({error})") from error
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1 for Llama's tokenizer: it has no padding piece
        self.stop_ids = frozenset({self.eos_id})
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"the tokenizer {model_path!r} has no {'BOS' if self.bos_id < 0 else 'EOS'} piece: Llama's prompts "
                "start with BOS and sequences end with EOS; use the tokenizer.model that came with the checkpoint"
            )

    def _encode(self, s: str) -> list[int]:
        return self.sp_model.encode(s)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp_model.decode(list(ids))


# Llama 3's pre-tokenization, which tiktoken applies before its byte-pair merges: contractions, words with one
# leading non-letter, numbers of up to three digits, runs of punctuation, line breaks, other whitespace.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)  # fmt: skip
# The 256 special tokens that follow the 128,000 byte-pair tokens, in id order (Llama 3.1's names).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", *(f"<|reserved_special_token_{number}|>" for number in range(2, 247)),
]  # fmt: skip
# tiktoken fails on very long input and slows on long runs without a change between space and non-space:
# text is encoded in pieces of at most this many characters, and runs are cut at this length.
MAX_ENCODE_CHARS, MAX_RUN_CHARS = 400_000, 25_000


class TiktokenTokenizer(Tokenizer):
    """The tiktoken byte-pair model of Llama 3, 3.1 and 3.2: 128,000 tokens, then 256 special ones. Special
    tokens decode to their text (`<|eot_id|>`); a turn ends at `<|eot_id|>`, `<|eom_id|>` or `<|end_of_text|>`.
    Needs the `tiktoken` package."""

    def __init__(self, model_path):
        model_path = _checked_path(model_path)
        self.path = model_path
        try:
            import tiktoken
        except ImportError:
            raise ValueError(
                f"{model_path!r} is a Llama 3 tokenizer, which needs the tiktoken package: pip install tiktoken"
            ) from None
        ranks = read_tiktoken_ranks(model_path)
        self.special_tokens = {token: len(ranks) + index for index, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=os.path.basename(model_path),
            pat_str=LLAMA3_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids = frozenset(self.special_tokens[name] for name in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))

    def _encode(self, s: str) -> list[int]:
        return [token for piece in _pieces(s) for token in self.model.encode(piece, disallowed_special=())]

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """The byte-pair tokens of a tiktoken model file and their ranks. Raises ValueError naming the line that is
    not a base64 token and a rank."""
    ranks = {}
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(
                    f"{path!r}, line {number}, is not a base64 token and its rank: {line[:80]!r}"
                ) from None
    return ranks


def _pieces(s: str) -> Iterator[str]:
    """`s` in pieces that tiktoken encodes as it would the whole (pieces end where space meets non-space, except
    within a run longer than MAX_RUN_CHARS, which is cut)."""
    for start in range(0, len(s), MAX_ENCODE_CHARS):
        chunk = s[start : start + MAX_ENCODE_CHARS]
        piece_start, run_length = 0, 0
        for index in range(len(chunk)):
            if index and chunk[index].isspace() == chunk[index - 1].isspace():
                run_length += 1
                if run_length >= MAX_RUN_CHARS:
                    yield chunk[piece_start:index]
                    piece_start, run_length = index, 0
            else:
                run_length = 0
        yield chunk[piece_start:]
