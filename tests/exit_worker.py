"""Run by test_model_parallel.py under torchrun: set up the process groups, run a model split over the processes
(its layers talk over gloo), and exit; the processes must end cleanly, every time."""

import torch

from llama.distributed import setup_model_parallel
from llama.model import ModelArgs, Transformer

setup_model_parallel(device="cpu")
args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, multiple_of=32, max_batch_size=1, max_seq_len=8)
with torch.no_grad():
    Transformer(args)(torch.zeros(1, 4, dtype=torch.long))
