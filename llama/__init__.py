"""A reference PyTorch implementation of Llama-2-style decoders: the network (`llama.model`), its tokenizer,
text and chat generation (`Llama`), checkpoint loading and conversion, training (`llama.train`), the `llama`
command line, and a small bundled demo model (`demo_checkpoint()`)."""

from llama.args import ModelArgs
from llama.chat_format import Dialog, Message
from llama.generation import ChatPrediction, CompletionPrediction, Llama
from llama.loading import demo_checkpoint
from llama.model import Transformer
from llama.sampling import SamplingParams
from llama.tokenizer import Tokenizer

__all__ = [
    "ChatPrediction",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelArgs",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "demo_checkpoint",
]
