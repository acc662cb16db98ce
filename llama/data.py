"""The text a model is trained on: read, split into training and validation parts at a line break, a
SentencePiece tokenizer trained on the training part with Llama's conventions, and both parts tokenized."""

import io
from pathlib import Path
from typing import NamedTuple, Union

import sentencepiece as spm
import torch


class TrainingData(NamedTuple):
    text: str  # the whole text, for its checksum
    tokenizer_model: bytes  # the serialized SentencePiece model
    bos_id: int
    train_tokens: torch.Tensor  # (n,) int64
    val_tokens: torch.Tensor
    val_chars: int


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """The text cut in two at the line break nearest before the last `val_fraction` of its characters:
    (training text, validation text). Cutting at a line break keeps both halves tokenized as in the whole."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int) -> bytes:
    """A serialized SentencePiece BPE model trained on the lines of `text`, with Llama's conventions: byte
    fallback (any text encodes, a newline is the byte piece <0x0A>), unk 0, bos 1, eos 2, no pad piece.
    Unlike Llama's, it adds no dummy space in front of the text: a prompt starts where a line of the corpus
    starts, without a space. Raises ValueError when the text is too small for `vocab_size` pieces."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([line for line in text.split("\n") if line]),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            split_digits=True,
            # Keep the text as it is (spaces, case, newlines), so that decoding gives back exactly the text.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(
            f"cannot train a tokenizer of vocab_size={vocab_size} on this text ({error}): the vocabulary holds "
            "3 special and 256 byte pieces, a piece for every distinct character, and merges that the text must be "
            "long enough to provide; choose another vocab_size or give a longer text"
        ) from error
    return model.getvalue()


def read_text(text_path: Union[str, Path]) -> str:
    """The UTF-8 text of a file. Raises FileNotFoundError or ValueError (not UTF-8) naming the file."""
    text_path = Path(text_path)
    if not text_path.is_file():
        raise FileNotFoundError(f"text file {str(text_path)!r} does not exist: pass a UTF-8 text file")
    try:
        return text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(text_path)!r} is not UTF-8 text ({error})") from error


def prepare_data(text: str, val_fraction: float, vocab_size: int, seq_len: int) -> TrainingData:
    """Split the text, train a tokenizer of vocab_size pieces on the training part and tokenize both parts.
    Raises ValueError when the text is too short for the validation split, the vocabulary or one training
    window of seq_len tokens."""
    train_text, val_text = split_text(text, val_fraction)
    if not train_text.strip() or not val_text.strip():
        raise ValueError(
            f"the text ({len(text)} characters) is too short to hold out {val_fraction:.0%} of its lines "
            "for validation: give a longer text"
        )
    tokenizer_model = train_tokenizer(train_text, vocab_size)
    tokenizer = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    train_tokens = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_tokens = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    if len(train_tokens) < seq_len + 1:
        raise ValueError(
            f"the training text is {len(train_tokens)} tokens, fewer than max_seq_len + 1 = {seq_len + 1}: "
            "give a longer text or a smaller max_seq_len"
        )
    return TrainingData(text, tokenizer_model, tokenizer.bos_id(), train_tokens, val_tokens, len(val_text))
