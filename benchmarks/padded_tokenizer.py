"""A SentencePiece tokenizer of any vocabulary size from 300 up, for the benchmarks' random models: the
benchmarks feed token ids, so the text side does not matter, but `Llama.build` wants a tokenizer with exactly
the model's vocabulary and Llama's special ids."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.data import train_tokenizer  # noqa: E402

TRAINED_SIZE = 300  # 3 special pieces, 256 byte pieces, and some merges


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """Write to `path` a small BPE model trained here, padded with unused pieces (`<unused0>`, ...) up to
    `vocab_size` pieces; returns `path`. Raises ValueError for a `vocab_size` below 300, and ImportError naming
    the fix when protobuf, which reads and writes SentencePiece's model file, is not installed."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:  # sentencepiece ships the message classes; the protobuf runtime is separate
        raise ImportError(
            f"the benchmarks' tokenizer needs protobuf ({error}): pip install protobuf, or the test extra"
        ) from error
    if vocab_size < TRAINED_SIZE:
        raise ValueError(f"vocab_size must be at least {TRAINED_SIZE} for the benchmark's tokenizer, got {vocab_size}")
    text = "The quick brown fox jumps over the lazy dog. Once upon a time there was a little model.\n" * 50
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(train_tokenizer(text, TRAINED_SIZE))
    unused = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    for number in range(vocab_size - TRAINED_SIZE):
        model.pieces.add(piece=f"<unused{number}>", score=-1e9, type=unused)
    path.write_bytes(model.SerializeToString())
    return path
