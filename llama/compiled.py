"""The decoding step compiled with `torch.compile`: on the CPU, Inductor turns the small operations between the
matrix products (norms, rotary embedding, cache writes, SwiGLU, residual additions) into a few fused C++ loops,
where eager PyTorch runs each as its own kernel, with its own allocation and dispatch, from Python.

A compiled graph is specialised to its shapes: so, as with CUDA graphs (llama/cuda_graphs.py), the position is a
tensor (`Transformer.forward_at`) and attention reads a cache window of one of a few power-of-two lengths; a
graph is compiled for each (batch size, window) the first time it is needed, which takes tens of seconds. The
prefill, and any step of several tokens, runs eagerly.
"""

from typing import Optional

import torch

from llama.decoding import cache_window
from llama.model import Transformer


class CompiledStep:
    """The decoding step (see llama.decoding.Step) with one-token steps compiled. Results equal the eager
    step's up to the summation order of fused operations and of a longer attention window (a masked position
    adds an exact zero)."""

    def __init__(self, model: Transformer, min_window: int = 256, cpp_wrapper: Optional[bool] = None):
        """cpp_wrapper: whether the graph calls its kernels from generated C++ rather than Python; by default on
        the CPU, where it takes a minute more to compile the first time and 7-11% off each step of the 110m
        model (docs/performance.md). PyTorch's profiler does not see the kernels it calls."""
        self.model = model
        self.min_window = min_window
        if cpp_wrapper is None:
            cpp_wrapper = next(model.parameters()).device.type == "cpu"
        self.cpp_wrapper = cpp_wrapper
        self.compiled = torch.compile(model.forward_at, dynamic=False, options={"cpp_wrapper": cpp_wrapper})

    def begin(self) -> None:
        pass

    def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool) -> torch.Tensor:
        if tokens.shape[1] != 1:
            return self.model.forward(tokens, start_pos, last_only=last_only)
        window = cache_window(start_pos, self.min_window, self.model.params.max_seq_len)
        positions = torch.tensor([start_pos], device=tokens.device)
        return self.compiled(tokens, positions, window, last_only=True)

    def fetch(self, values: torch.Tensor, tokens: torch.Tensor, next_pos: Optional[int]) -> list:
        return values.tolist()
