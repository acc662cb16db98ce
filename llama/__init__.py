"""A reference PyTorch implementation of Llama-2-style decoders: the model (`llama.model`), its tokenizer,
checkpoint loading and conversion, and text and chat generation."""

from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

# The generator (and with it llama.checkpoint) is imported on first use, so that `python -m llama.checkpoint`
# runs that module as a program without an imported copy of it already in place (runpy warns about that).
_GENERATION_NAMES = ("ChatPrediction", "CompletionPrediction", "Dialog", "Llama", "Message")


def __getattr__(name: str):
    if name in _GENERATION_NAMES:
        from llama import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'llama' has no attribute {name!r}")


__all__ = [
    "ChatPrediction",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelArgs",
    "Tokenizer",
    "Transformer",
]
