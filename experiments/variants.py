"""The architecture variants the experiments compare, each built from the library's modules: wrapped layers and
frozen parameters for changes inside a block, subclasses of `Transformer` overriding `run_layers` for changes
in how the blocks are wired or what they read. `llama/model.py` itself stays the reference model."""

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from llama.args import ModelArgs
from llama.model import RMSNorm, Transformer


class ActivationBeforeOutput(nn.Module):
    """wo(activation(x)): a non-linearity applied to the heads' concatenated output before attention's output
    projection `wo`, which Llama leaves out."""

    def __init__(self, activation: nn.Module, wo: nn.Module):
        super().__init__()
        self.activation = activation
        self.wo = wo

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.activation(x))


def with_activation_before_wo(model: Transformer, activation: Callable[[], nn.Module]) -> Transformer:
    """The model with `activation()` (a new module per layer) inserted before every attention layer's `wo`;
    the weights are kept, so nn.Identity gives back the same function. Changes `model` in place and returns it."""
    for layer in model.layers:
        layer.attention.wo = ActivationBeforeOutput(activation(), layer.attention.wo)
    return model


def with_fixed_norm_weights(model: Transformer) -> Transformer:
    """The model with every RMSNorm weight frozen at its value (1 in a fresh model): those norms only divide by
    the root mean square. Changes `model` in place and returns it."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.requires_grad_(False)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """How many numbers training changes (frozen norm weights excluded)."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def kv_cache_bytes_per_token(model: Transformer, bytes_per_number: int = 2) -> int:
    """Bytes the key/value cache holds per token of context, over all layers, at `bytes_per_number` (2: the
    bfloat16 or float16 of inference); read from the cache buffers the model allocated."""
    params = model.params
    numbers = sum(buffer.numel() for name, buffer in model.named_buffers() if name.endswith(("keys", "values")))
    return numbers // (params.max_batch_size * params.max_seq_len) * bytes_per_number


class NoPositionTransformer(Transformer):
    """No positional encoding at all (NoPE): every rotation is by angle 0, the identity, so attention sees
    only which tokens come before (the causal mask), never how far back they are."""

    def run_layers(
        self, h: Tensor, freqs_cis: Tensor, mask: Optional[Tensor], positions: Tensor, cache_len: Optional[int]
    ) -> Tensor:
        return super().run_layers(h, torch.ones_like(freqs_cis), mask, positions, cache_len)


class LearnedPositionTransformer(NoPositionTransformer):
    """Learned absolute positions (GPT-2's): a trained vector per position added to the token embedding, and no
    rotation. The table has a row for each of max_seq_len positions; rows past the trained window length
    receive no gradient, so at longer contexts they hold their initial values (shrunk by weight decay)."""

    def __init__(self, params: ModelArgs):
        super().__init__(params)
        self.pos_embeddings = nn.Embedding(params.max_seq_len, params.dim)
        nn.init.normal_(self.pos_embeddings.weight, mean=0.0, std=0.02)  # as the token embedding

    def run_layers(
        self, h: Tensor, freqs_cis: Tensor, mask: Optional[Tensor], positions: Tensor, cache_len: Optional[int]
    ) -> Tensor:
        return super().run_layers(h + self.pos_embeddings(positions), freqs_cis, mask, positions, cache_len)


class DepthMixTransformer(Transformer):
    """Blocks that read across depth: block 0 reads the embedding; every later block, and the final norm,
    reads `self.mixes[i - 1]` of the streams before it: the embedding and the outputs of blocks 0 .. i - 1
    (sources (i + 1, bs, seqlen, dim), the latest last). Subclasses set the mix."""

    def make_mix(self, n_sources: int) -> nn.Module:
        raise NotImplementedError

    def __init__(self, params: ModelArgs):
        super().__init__(params)
        self.mixes = nn.ModuleList(self.make_mix(n_sources) for n_sources in range(2, params.n_layers + 2))

    def run_layers(
        self, h: Tensor, freqs_cis: Tensor, mask: Optional[Tensor], positions: Tensor, cache_len: Optional[int]
    ) -> Tensor:
        sources = [h]
        for layer_id, layer in enumerate(self.layers):
            x = self.mixes[layer_id - 1](torch.stack(sources)) if layer_id else h
            sources.append(layer(x, freqs_cis, mask, positions, cache_len))
        return self.mixes[-1](torch.stack(sources))


class DepthWeightedAverage(nn.Module):
    """DenseFormer's depth-weighted average: sum_j alpha_j * source_j, one learned scalar per source, the same
    at every position. Starts with all weight on the latest source: the plain residual stream."""

    def __init__(self, n_sources: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(n_sources))
        with torch.no_grad():
            self.alpha[-1] = 1.0

    def forward(self, sources: Tensor) -> Tensor:
        return torch.einsum("s,sbtd->btd", self.alpha, sources)  # (bs, seqlen, dim)


# The depth attention starts near the plain residual stream (0.9 of the weight on the latest source) but not at
# it exactly: a softmax saturated on one source would pass no gradient to its queries and keys.
DEPTH_ATTENTION_INITIAL_WEIGHT = 0.9


class DepthAttention(nn.Module):
    """A small attention over depth, at each position on its own: the latest source asks a query (rank
    `head_dim`), every source offers a key, and the output is the softmax-weighted sum of the sources
    themselves (no value projection, so the mix stays in the residual stream). A learned bias per source sets
    the weights where queries and keys say nothing."""

    def __init__(self, dim: int, n_sources: int, head_dim: int, norm_eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.wq = nn.Linear(dim, head_dim, bias=False)
        self.wk = nn.Linear(dim, head_dim, bias=False)
        for linear in (self.wq, self.wk):
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)
        latest_bias = math.log(DEPTH_ATTENTION_INITIAL_WEIGHT / (1 - DEPTH_ATTENTION_INITIAL_WEIGHT) * (n_sources - 1))
        self.bias = nn.Parameter(torch.zeros(n_sources))
        with torch.no_grad():
            self.bias[-1] = latest_bias

    def forward(self, sources: Tensor) -> Tensor:
        normed = self.norm(sources)  # (n_sources, bs, seqlen, dim)
        query = self.wq(normed[-1])  # (bs, seqlen, head_dim)
        keys = self.wk(normed)  # (n_sources, bs, seqlen, head_dim)
        scores = torch.einsum("btr,sbtr->sbt", query, keys) / math.sqrt(query.shape[-1])
        weights = torch.softmax(scores + self.bias[:, None, None], dim=0)  # (n_sources, bs, seqlen)
        return torch.einsum("sbt,sbtd->btd", weights, sources)


class DepthWeightedAverageTransformer(DepthMixTransformer):
    """DenseFormer-style: each block reads a learned depth-weighted average of the streams before it."""

    def make_mix(self, n_sources: int) -> nn.Module:
        return DepthWeightedAverage(n_sources)


# Queries and keys of the depth attention: small next to dim, so that the mixes add about 2% to the parameters.
DEPTH_ATTENTION_HEAD_DIM = 16


class DepthAttentionTransformer(DepthMixTransformer):
    """Each block reads an attention-weighted mix of the streams before it, the weights chosen per position."""

    def make_mix(self, n_sources: int) -> nn.Module:
        return DepthAttention(self.params.dim, n_sources, DEPTH_ATTENTION_HEAD_DIM, self.params.norm_eps)
