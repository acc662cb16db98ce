"""A reference PyTorch implementation of Llama-2-style decoders: the model (`llama.model`), its tokenizer,
checkpoint loading, and text and chat generation."""

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
]
