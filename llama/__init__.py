"""A reference PyTorch implementation of Llama-2-style decoders: the model (`llama.model`), its tokenizer,
checkpoint loading and conversion, text and chat generation, training (`llama.train`), and a small bundled
demo model (`demo_checkpoint()`)."""

import importlib

from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

# The generator and llama.checkpoint are imported on first use, so that `python -m llama.checkpoint` runs
# that module as a program without an imported copy of it already in place (runpy warns about that).
_LAZY = {
    "ChatPrediction": "llama.generation",
    "CompletionPrediction": "llama.generation",
    "Dialog": "llama.generation",
    "Llama": "llama.generation",
    "Message": "llama.generation",
    "demo_checkpoint": "llama.checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llama' has no attribute {name!r}")


__all__ = ["ModelArgs", "Tokenizer", "Transformer", *_LAZY]
