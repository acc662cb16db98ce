"""A reference PyTorch implementation of Llama-2-style decoders: the model (`llama.model`), its tokenizer,
checkpoint loading, text and chat generation, training (`llama.train`), and a small bundled demo model
(`demo_checkpoint()`)."""

from llama.checkpoint import demo_checkpoint
from llama.generation import ChatPrediction, CompletionPrediction, Dialog, Llama, Message
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__all__ = [
    "ChatPrediction",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelArgs",
    "Tokenizer",
    "Transformer",
    "demo_checkpoint",
]
