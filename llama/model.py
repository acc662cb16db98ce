"""The Llama network, in the order a reader needs it: norm, rotary embeddings, key/value cache, attention,
feed-forward, block, transformer; its settings are `ModelArgs` (llama/args.py).

Parameter names are the names in Meta's checkpoints (`wq`, `w1`, `attention_norm`, ...), so a state-dict key
points straight at the line that uses it. The linear layers and the embedding are fairscale's model-parallel
layers, split the way Meta's shards are split: on N ranks, each rank holds 1/N of the heads and of the
feed-forward width, and the layers gather or sum the partial results themselves.
"""

import math
import operator
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ParallelEmbedding
from torch import Tensor, nn

from llama.args import ModelArgs
from llama.distributed import ensure_model_parallel
from llama.parallel import ColumnParallelLinear, RowParallelLinear


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps), times a learned weight per channel: LayerNorm without the mean subtraction
    and the bias: cheaper, and as good in the experiments of the paper that proposed it."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        # self._norm(x.float()).type_as(x) * self.weight, as Meta's reference writes it: normalised in float32
        # (in float16 the mean of squares overflows, in bfloat16 it loses digits), rounded to x's dtype, then
        # scaled in it. F.rms_norm computes the same in float32 for half-precision input, in one GPU kernel
        # instead of seven (a decoding step of a 7B model runs 65 norms).
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


def precompute_freqs_cis(
    dim: int, end: int, theta: float = 10000.0, device: Optional[torch.device] = None, scaling: Optional[float] = None
) -> Tensor:
    """The rotation of every position: entry (t, i) is exp(j * t * theta^(-2i/dim)), a unit complex number, the
    frequencies rescaled by `scaling` as Llama 3.1 does (see `scale_rope_frequencies`) when given.

    Returns a complex64 tensor of shape (end, dim // 2), always in float32 precision whatever the model's dtype.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))  # (dim/2,)
    if scaling is not None:
        inv_freq = scale_rope_frequencies(inv_freq, scaling)
    positions = torch.arange(end, device=device, dtype=torch.float32)  # (end,)
    angles = torch.outer(positions, inv_freq)  # (end, dim/2)
    return torch.polar(torch.ones_like(angles), angles)


# Llama 3.1 and 3.2 stretch a context first trained on 8192 positions: rotations whose wavelength is short next
# to it keep their frequency, long ones are slowed down by the factor, and those between are blended.
ROPE_ORIGINAL_CONTEXT, ROPE_LOW_FREQ_FACTOR, ROPE_HIGH_FREQ_FACTOR = 8192, 1.0, 4.0


def scale_rope_frequencies(inv_freq: Tensor, factor: float) -> Tensor:
    """Llama 3.1's rescaling of the rotary frequencies (dim/2,) for longer contexts, by `factor` (8 for Llama
    3.1, 32 for Llama 3.2 1B and 3B)."""
    wavelength = 2 * math.pi / inv_freq
    long_wavelength = ROPE_ORIGINAL_CONTEXT / ROPE_LOW_FREQ_FACTOR  # slower rotations: divided by the factor
    short_wavelength = ROPE_ORIGINAL_CONTEXT / ROPE_HIGH_FREQ_FACTOR  # faster rotations: unchanged
    smooth = (ROPE_ORIGINAL_CONTEXT / wavelength - ROPE_LOW_FREQ_FACTOR) / (
        ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR
    )
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > long_wavelength, inv_freq / factor, blended)
    return torch.where(wavelength < short_wavelength, inv_freq, scaled)


def apply_rotary_emb(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate queries and keys by their positions' angles.

    Channels (2i, 2i+1) of each head are read as one complex number and multiplied by freqs_cis[t, i]: a
    rotation in that plane, done as one complex product instead of a 2x2 matrix. Meta's checkpoints were
    trained with this adjacent pairing (Hugging Face pairs i with i + head_dim/2 and permutes wq/wk to match).
    xq: (bs, seqlen, heads, head_dim), xk: (bs, seqlen, kv_heads, head_dim), freqs_cis: (seqlen, head_dim/2) for
    every row alike, or (bs, seqlen, head_dim/2), each row at its own positions.
    """
    xq_complex = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (bs, seqlen, heads, head_dim/2)
    xk_complex = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.unsqueeze(-2)  # ([bs,] seqlen, 1, head_dim/2): broadcast over heads (and batch)
    xq_out = torch.view_as_real(xq_complex * freqs_cis).flatten(3)  # (bs, seqlen, heads, head_dim)
    xk_out = torch.view_as_real(xk_complex * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


# scaled_dot_product_attention's enable_gqa (PyTorch 2.5 on): grouped query heads read their key/value head.
GQA_IN_ATTENTION = torch.__version__ >= "2.5"


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """Grouped-query attention: query head h reads key/value head h // n_rep.
    (bs, seqlen, kv_heads, head_dim) -> (bs, seqlen, kv_heads * n_rep, head_dim)."""
    if n_rep == 1:
        return x
    bs, seqlen, kv_heads, head_dim = x.shape
    return (
        x[:, :, :, None, :]
        .expand(bs, seqlen, kv_heads, n_rep, head_dim)
        .reshape(bs, seqlen, kv_heads * n_rep, head_dim)
    )


class KVCache(nn.Module):
    """The keys and values of the positions a sequence has been through, kept so that each new token computes
    only its own. One per attention layer, preallocated for max_batch_size sequences of max_seq_len tokens.

    It holds only the key/value heads: grouping n_rep query heads per key/value head divides its size by
    n_rep (8 for Llama 2 70B), which is what makes long contexts fit."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("keys", torch.zeros(shape), persistent=False)
        self.register_buffer("values", torch.zeros(shape), persistent=False)

    def update(self, positions: Tensor, xk: Tensor, xv: Tensor, cache_len: int) -> tuple[Tensor, Tensor]:
        """Write the new keys and values xk, xv (bs, seqlen, kv_heads, head_dim) of batch row i into cache row i,
        at `positions`: (seqlen,) for every row alike, or (bs, seqlen), each row at its own. Return the cached
        keys and values of positions 0 .. cache_len - 1, (bs, cache_len, kv_heads, head_dim) each. The positions
        are a tensor, not a slice, so that one recorded CUDA graph serves every step."""
        bsz = xk.shape[0]
        rows = torch.arange(bsz, device=xk.device)[:, None]  # (bs, 1), broadcast against the positions
        self.keys.index_put_((rows, positions), xk)
        self.values.index_put_((rows, positions), xv)
        return self.keys[:bsz, :cache_len], self.values[:bsz, :cache_len]


# Fresh (untrained) weights; checkpoints overwrite them. GPT-2's 0.02 keeps the initial logits near uniform.
_init_weight = partial(nn.init.normal_, mean=0.0, std=0.02)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions and a key/value cache, this rank's heads only."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        model_parallel_size = ensure_model_parallel()
        self.n_local_heads = args.n_heads // model_parallel_size
        self.n_local_kv_heads = args.kv_heads // model_parallel_size
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        # Column-parallel: each rank computes its own heads. Row-parallel wo sums the ranks' partial outputs.
        self.wq = ColumnParallelLinear(
            args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False, init_method=_init_weight
        )
        self.wk = ColumnParallelLinear(
            args.dim, args.kv_heads * self.head_dim, bias=False, gather_output=False, init_method=_init_weight
        )
        self.wv = ColumnParallelLinear(
            args.dim, args.kv_heads * self.head_dim, bias=False, gather_output=False, init_method=_init_weight
        )
        self.wo = RowParallelLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=_init_weight
        )
        self.kv_cache = KVCache(args.max_batch_size, args.max_seq_len, self.n_local_kv_heads, self.head_dim)

    def forward(
        self, x: Tensor, freqs_cis: Tensor, mask: Optional[Tensor], positions: Tensor, cache_len: Optional[int] = None
    ) -> Tensor:
        """x: (bs, seqlen, dim) standing at `positions`, (seqlen,) for every row or (bs, seqlen) per row, rotated
        by freqs_cis (positions' shape, then head_dim/2). With cache_len, the new keys and values go into the
        cache and the queries read cache positions 0 .. cache_len - 1, the mask hiding those after each query's
        own (None: all are visible); without it (training, scoring) the tokens attend to each other only, and
        the cache is left alone: writing it in place would overwrite tensors autograd keeps for the backward
        pass. The mask is additive, broadcast to (bs, heads, seqlen, context_len)."""
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)  # (bs, seqlen, heads, head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (bs, seqlen, kv_heads, head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        if cache_len is not None:
            xk, xv = self.kv_cache.update(positions, xk, xv, cache_len)  # (bs, cache_len, kv_heads, head_dim)

        xq = xq.transpose(1, 2)  # (bs, heads, seqlen, head_dim)
        # softmax(xq @ keys^T / sqrt(head_dim) + mask) @ values, in one fused kernel that never materialises
        # the (seqlen, context_len) scores and accumulates half-precision inputs in float32 (in half precision
        # the small weights of a long context would round to zero). No activation follows: the output is a
        # weighted average of values, and the value path (wv, then wo) is linear. The non-linearities are the
        # softmax weights, SwiGLU and the norms.
        if self.n_rep > 1 and cache_len is not None and x.device.type == "cpu" and GQA_IN_ATTENTION:
            # Decoding on the CPU, the kernel reads each key/value head for its n_rep query heads itself: copying
            # the cache n_rep times over (repeat_kv) cost more than the attention, at batch 8 most of all. The
            # sums are the same. (On a GPU, a mask and grouped heads together would leave only the slow kernel.)
            keys, values = xk.transpose(1, 2), xv.transpose(1, 2)  # (bs, kv_heads, context_len, head_dim)
            output = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, enable_gqa=True)
        else:
            keys = repeat_kv(xk, self.n_rep).transpose(1, 2)  # (bs, heads, context_len, head_dim)
            values = repeat_kv(xv, self.n_rep).transpose(1, 2)
            output = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask)  # (bs, heads, seqlen, head_dim)
        output = output.transpose(1, 2).reshape(bsz, seqlen, -1)  # (bs, seqlen, heads * head_dim)
        return self.wo(output)


class FeedForward(nn.Module):
    """The SwiGLU feed-forward network: w2(silu(w1 x) * w3 x), this rank's share of the hidden width."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        ensure_model_parallel()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_init_weight)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_init_weight)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_init_weight)

    def forward(self, x: Tensor) -> Tensor:
        # SwiGLU: w3's output, gated by SiLU of w1's output.
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """One layer: attention, then the feed-forward network, each reading a normalised copy of the residual
    stream and adding its output to it."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self, x: Tensor, freqs_cis: Tensor, mask: Optional[Tensor], positions: Tensor, cache_len: Optional[int] = None
    ) -> Tensor:
        # Pre-norm: the residual stream itself is never normalised, only what each sublayer reads from it.
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, positions, cache_len)
        return h + self.feed_forward(self.ffn_norm(h))


def attention_mask(positions: Tensor, key_positions: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive mask for queries at `positions` reading keys at `key_positions` (each (length,) for every
    row alike, or (bs, length) per row): 0 where a query may read a key, the key standing at or before the
    query's position, and -inf elsewhere (later positions, and cache entries not written yet or left over from
    an earlier sequence). Shape (1, 1, seqlen, context_len), or (bs, 1, seqlen, context_len) per row."""
    queries = positions.reshape(-1, 1, positions.shape[-1], 1)  # (1 or bs, 1, seqlen, 1): broadcast over heads
    keys = key_positions.reshape(-1, 1, 1, key_positions.shape[-1])  # (1 or bs, 1, 1, context_len)
    visible = keys <= queries
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        """The whole decoder. Sets up a one-process model-parallel group first if nothing has (fairscale's
        layers need one); under torchrun, the layers are split over the launched processes. Raises ValueError
        if a setting in `params` is invalid or does not divide by the model-parallel size."""
        super().__init__()
        params.validate(ensure_model_parallel())
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim, init_method=_init_weight)
        self.layers = nn.ModuleList(TransformerBlock(layer_id, params) for layer_id in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=_init_weight)
        # Not a buffer: Module.to(dtype) would cast a complex buffer to a real one and drop the sines.
        # Twice max_seq_len, as Meta's reference builds it; only the first max_seq_len rows are ever read.
        self.freqs_cis = self._rotary_table(None)

    def forward(self, tokens: Tensor, start_pos: int = 0, use_cache: bool = True, last_only: bool = False) -> Tensor:
        """Logits (float32, shape (batch, seqlen, vocab)) for `tokens` (batch, seqlen) standing at positions
        start_pos .. start_pos + seqlen - 1, after the positions before start_pos already went through this
        model for the same batch rows (their keys and values are in the cache). With use_cache=False (training,
        scoring whole sequences) the tokens attend causally to each other only, the cache is neither read nor
        written, autograd runs through, and the batch may be larger than max_batch_size. With `last_only`, only
        the last position's logits, shape (batch, 1, vocab): all that generation needs to pick the next token.
        Raises ValueError when the tokens do not fit max_seq_len (or, with the cache, max_batch_size)."""
        bsz, seqlen = tokens.shape
        try:
            start_pos = operator.index(start_pos)
        except TypeError:
            raise ValueError(f"start_pos must be an integer, got {start_pos!r}") from None
        if (use_cache and bsz > self.params.max_batch_size) or not 0 <= start_pos <= self.params.max_seq_len - seqlen:
            raise ValueError(
                f"batch of {bsz} at positions {start_pos}..{start_pos + seqlen - 1} does not fit the key/value cache "
                f"(max_batch_size={self.params.max_batch_size}, max_seq_len={self.params.max_seq_len})"
            )
        positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)  # (seqlen,)
        cache_len = start_pos + seqlen if use_cache else None
        # One new token reads every position up to its own, which is all there is: it needs no mask.
        return self._run(tokens, positions, cache_len, last_only, masked=seqlen > 1)

    def forward_at(
        self, tokens: Tensor, positions: Tensor, cache_len: Optional[int], last_only: bool = False
    ) -> Tensor:
        """`forward` with the positions given as a tensor: tokens (batch, seqlen) at positions (seqlen,), the
        same for every row, or (batch, seqlen), each row at its own (rows that decode while another reads a
        chunk of its prompt, or rows at different lengths). An int64 tensor on the model's device, which is not
        read on the host (on a GPU that would wait for it). With the cache, batch row i writes cache row i at
        its positions and reads cache positions 0 .. cache_len - 1, each query those up to its own: whatever a
        row reads there must be its own, written by this call or an earlier one (later entries, stale or not,
        are hidden). A CUDA graph records this with a fixed cache_len and new positions at every replay.
        cache_len=None: no cache, as forward's use_cache=False. Raises ValueError for tensors of the wrong kind
        or a cache_len outside seqlen .. max_seq_len; the positions themselves are the caller's to keep
        distinct within a row and below cache_len."""
        self._check_positions(tokens, positions, cache_len)
        return self._run(tokens, positions, cache_len, last_only, masked=True)

    def _run(
        self, tokens: Tensor, positions: Tensor, cache_len: Optional[int], last_only: bool, masked: bool
    ) -> Tensor:
        h = self.tok_embeddings(tokens)  # (bs, seqlen, dim)
        if self.freqs_cis.device != h.device:
            # Made outside inference mode even when generation asks first: the table is kept for training too,
            # and autograd refuses tensors made in inference mode.
            with torch.inference_mode(False):
                self.freqs_cis = self._rotary_table(h.device)
        freqs_cis = self.freqs_cis[positions]  # (seqlen, head_dim/2), or per row (bs, seqlen, head_dim/2)
        # With the cache, token i may read the cached prefix and the new tokens up to itself (this is what makes
        # chunked prefill right); without it, the new tokens up to itself.
        key_positions = positions if cache_len is None else torch.arange(cache_len, device=h.device)
        mask = attention_mask(positions, key_positions, h.dtype) if masked else None  # (1 or bs, 1, seqlen, ctx)
        h = self.run_layers(h, freqs_cis, mask, positions, cache_len)
        if last_only:
            # The output layer is a vocab x dim product per position (in a small model, as much as three or
            # four blocks): for a long prompt, skipping it at every position but the last saves much of the prefill.
            h = h[:, -1:]
        return self.output(self.norm(h)).float()  # (bs, seqlen, vocab), or (bs, 1, vocab)

    def run_layers(
        self, h: Tensor, freqs_cis: Tensor, mask: Optional[Tensor], positions: Tensor, cache_len: Optional[int]
    ) -> Tensor:
        """The embedded tokens h (bs, seqlen, dim) through the blocks in order; the other arguments are those
        every block takes. The one place for a subclass to try an idea on how the blocks are wired or what they
        read (an absolute position added to h, blocks reading earlier blocks' outputs): see
        docs/architecture.md, "Trying an idea"."""
        for layer in self.layers:
            h = layer(h, freqs_cis, mask, positions, cache_len)
        return h

    def _rotary_table(self, device: Optional[torch.device]) -> Tensor:
        params = self.params
        return precompute_freqs_cis(
            params.head_dim, params.max_seq_len * 2, params.rope_theta, device, params.rope_scaling
        )

    def _check_positions(self, tokens: Tensor, positions: Tensor, cache_len: Optional[int]) -> None:
        bsz, seqlen = tokens.shape
        if positions.shape not in ((seqlen,), (bsz, seqlen)) or positions.dtype != torch.long:
            raise ValueError(
                f"positions must be an int64 tensor of shape ({seqlen},), one per column of tokens, or "
                f"({bsz}, {seqlen}), one per token; got shape {tuple(positions.shape)} and dtype {positions.dtype}"
            )
        if positions.device != self.output.weight.device:
            raise ValueError(f"positions are on {positions.device} but the model is on {self.output.weight.device}")
        if cache_len is None:
            return
        if (
            isinstance(cache_len, bool)
            or not isinstance(cache_len, int)
            or not seqlen <= cache_len <= self.params.max_seq_len
        ):
            raise ValueError(
                f"cache_len must be an integer from seqlen={seqlen} to max_seq_len={self.params.max_seq_len}, "
                f"got {cache_len!r}"
            )
        if bsz > self.params.max_batch_size:
            raise ValueError(
                f"batch of {bsz} does not fit the key/value cache (max_batch_size={self.params.max_batch_size})"
            )
