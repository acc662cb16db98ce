"""The SentencePiece tokenizer that ships with Llama 2 checkpoints (`tokenizer.model`)."""

import os

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
    def __init__(self, model_path: str):
        """Load a SentencePiece model file. Raises FileNotFoundError if it does not exist, ValueError if it is a
        folder, not a SentencePiece model, or one without BOS and EOS pieces."""
        model_path = os.fspath(model_path)
        if os.path.isdir(model_path):
            raise ValueError(f"tokenizer path {model_path!r} is a folder: pass the tokenizer.model file inside it")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer file {model_path!r} does not exist: pass the tokenizer.model that came with the checkpoint"
            )
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
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"the tokenizer {model_path!r} has no {'BOS' if self.bos_id < 0 else 'EOS'} piece: Llama's prompts "
                "start with BOS and sequences end with EOS; use the tokenizer.model that came with the checkpoint"
            )

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of `s`, with BOS in front and EOS at the end when asked. Raises TypeError for a non-string
        and ValueError for a string that is not valid Unicode (a lone surrogate)."""
        if not isinstance(s, str):
            raise TypeError(f"can only encode a str, got {type(s).__name__}: {s!r}")
        check_unicode(s)
        ids: list[int] = self.sp_model.encode(s)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (BOS and EOS produce no text)."""
        return self.sp_model.decode(list(ids))
