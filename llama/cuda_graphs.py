"""The decoding step on a GPU, captured once as a CUDA graph and replayed for every new token.

Why: a decoding step at batch 1 is about 30 small kernels per layer (1,000 for a 7B model), each of which
eager PyTorch launches from Python. For a large model on a fast GPU the launches take longer than the kernels:
the GPU waits for the CPU. A CUDA graph records the kernels of one step once and replays them all with one
launch, so the step takes as long as the GPU needs to read the weights.

A graph replays exactly what it recorded: the same kernels on the same memory with the same shapes. So the
position is a tensor on the GPU that is filled before each replay (`Transformer.forward_at` takes one), and
attention reads a fixed window of the cache. One graph serves every position of its window; the windows are
powers of two from `min_window` up to max_seq_len, so a step reads at most twice the cache it needs (short
contexts read a short window). A graph is recorded for each (batch size, window) the first time it is needed.
"""

from typing import Optional, Union

import torch

from llama.compiled import CompiledStep
from llama.decoding import EagerStep, cache_window
from llama.model import Transformer


class _Captured:
    """One recorded step: its graph and the static tensors it reads and writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph, tokens: torch.Tensor, positions: torch.Tensor, logits):
        self.graph = graph
        self.tokens = tokens  # (bsz, 1) int64, filled before each replay
        self.positions = positions  # (1,) int64, filled before each replay
        self.logits = logits  # (bsz, 1, vocab) float32, written by each replay


class DecodeGraphs:
    """The decoding step (see llama.decoding.Step) from recorded CUDA graphs: one-token steps replay a graph,
    longer ones (the prefill) run the model eagerly. `fetch` queues the next step's replay before it waits for
    this step's tokens, so that the GPU computes it while the host does its bookkeeping (else the GPU would idle
    for that and for the graph's launch, about a tenth of a 7B model's step). If every sequence stops, the queued
    step is wasted: it wrote cache entries nothing reads.

    The results equal the eager forward's up to the summation order of a larger attention window (a masked
    position adds an exact zero). The graphs hold the addresses of the model's parameters and cache: if those
    change (`model.to(...)`, replaced parameters), the next sequence notices and records them again. Weights
    changed in place (`load_state_dict`, `copy_`) are seen by the next replay.
    """

    def __init__(self, model: Transformer, min_window: int = 256):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}")
        self.model = model
        self.min_window = min_window
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()  # shared: steps replay one at a time, never together
        self.addresses = self._addresses()
        self.queued: Optional[tuple[int, torch.Tensor]] = None  # (position, logits) of a step already queued

    def begin(self) -> None:
        self.refresh()
        self.queued = None  # computed for the last batch, which may have left off where this one starts

    def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool) -> torch.Tensor:
        if self.queued is not None and self.queued[0] == start_pos:
            logits, self.queued = self.queued[1], None
            return logits
        if tokens.shape[1] == 1:
            return self.replay(tokens, start_pos)
        return self.model(tokens, start_pos, last_only=last_only)

    def fetch(self, values: torch.Tensor, tokens: torch.Tensor, next_pos: Optional[int]) -> list:
        if next_pos is None:
            return values.tolist()
        # The values come back through their own copy and event, which do not wait for the queued step.
        on_host = values.to("cpu", non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self.queued = (next_pos, self.replay(tokens[:, next_pos : next_pos + 1], next_pos))
        copied.synchronize()
        return on_host.tolist()

    def _addresses(self) -> tuple[int, ...]:
        return tuple(tensor.data_ptr() for tensor in (*self.model.parameters(), *self.model.buffers()))

    def refresh(self) -> None:
        """Drop the recorded graphs if the model's tensors moved since they were recorded."""
        addresses = self._addresses()
        if addresses != self.addresses:
            self.graphs.clear()
            self.pool = torch.cuda.graph_pool_handle()  # the old pool went with its graphs: it cannot be reused
            self.addresses = addresses

    def window(self, start_pos: int) -> int:
        """The cache window for a token at start_pos: the smallest power of two (at least min_window) that
        holds positions 0..start_pos, capped at max_seq_len."""
        return cache_window(start_pos, self.min_window, self.model.params.max_seq_len)

    def replay(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits (bsz, 1, vocab) for `tokens` (bsz, 1) at position start_pos, as model.forward gives them.
        The returned tensor is overwritten by the next replay: use it (or copy it) before then."""
        bsz, seqlen = tokens.shape
        params = self.model.params
        if seqlen != 1 or not 0 <= start_pos < params.max_seq_len or not 1 <= bsz <= params.max_batch_size:
            raise ValueError(
                f"a decoding step takes one token per sequence for at most max_batch_size={params.max_batch_size} "
                f"sequences at a position below max_seq_len={params.max_seq_len}; got tokens of shape "
                f"{tuple(tokens.shape)} at position {start_pos}"
            )
        key = (bsz, self.window(start_pos))
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(tokens, start_pos, key[1])
        else:
            captured.tokens.copy_(tokens)
            captured.positions.fill_(start_pos)
            captured.graph.replay()
        return captured.logits

    def _capture(self, tokens: torch.Tensor, start_pos: int, window: int) -> _Captured:
        """Record the step for this batch size and window. The warm-up runs compute the real step (the same
        keys and values written to the same cache positions), so recording in the middle of a generation
        leaves its cache as the eager step would, and the logits returned are the step's."""
        static_tokens = tokens.clone()
        static_positions = torch.tensor([start_pos], dtype=torch.long, device=tokens.device)

        def step() -> torch.Tensor:
            return self.model.forward_at(static_tokens, static_positions, cache_len=window)

        # Recording must follow warm-up on a side stream: the first calls set up library handles and
        # workspaces that may not be created while recording.
        side = torch.cuda.Stream(device=tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()
        graph.replay()  # recording ran nothing: this computes the step
        return _Captured(graph, static_tokens, static_positions, logits)


def decode_step(
    model: torch.nn.Module, cuda_graphs: Optional[bool], compile: bool = False
) -> Union[DecodeGraphs, CompiledStep, EagerStep]:
    """The decoding step for `model`: DecodeGraphs, CompiledStep with compile=True, or EagerStep for eager
    decoding. cuda_graphs=None: graphs for a Transformer on a CUDA device with one model-parallel process
    (with several, each step's all-reduces would be recorded too, which is not tested here) unless compiling;
    True: graphs, or ValueError where they cannot run; False: no graphs."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    if compile and cuda_graphs:
        raise ValueError("compile=True and cuda_graphs=True are two ways to the same end: choose one")
    if cuda_graphs is None:
        world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        cuda_graphs = on_cuda and world_size == 1 and isinstance(model, Transformer) and not compile
    elif cuda_graphs and not on_cuda:
        raise ValueError("cuda_graphs=True needs the model on a CUDA device; use cuda_graphs=False or None")
    if cuda_graphs:
        return DecodeGraphs(model)
    return CompiledStep(model) if compile else EagerStep(model)
