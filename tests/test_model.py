"""Claims about the architecture, each checked numerically against a second formulation of the same maths."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fairscale_layers

from helpers import random_model, small_args, write_checkpoint, written_out_logits
from llama import Llama
from llama.layout import meta_device
from llama.model import (
    Attention,
    FeedForward,
    KVCache,
    ModelArgs,
    RMSNorm,
    Transformer,
    TransformerBlock,
    apply_rotary_emb,
    precompute_freqs_cis,
    repeat_kv,
)

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32


def causal_mask(seqlen: int) -> torch.Tensor:
    return torch.full((seqlen, seqlen), float("-inf")).triu(1)


# ---- shapes and sizes -------------------------------------------------------------------------------------


def test_every_module_returns_the_documented_shape():
    args = small_args()
    torch.manual_seed(0)
    bs, seqlen, head_dim = 3, 7, args.dim // args.n_heads
    x = torch.randn(bs, seqlen, args.dim)
    freqs_cis = precompute_freqs_cis(head_dim, seqlen)
    assert freqs_cis.shape == (seqlen, head_dim // 2) and freqs_cis.dtype == torch.complex64
    assert RMSNorm(args.dim)(x).shape == (bs, seqlen, args.dim)
    xq, xk = torch.randn(bs, seqlen, args.n_heads, head_dim), torch.randn(bs, seqlen, args.n_kv_heads, head_dim)
    rq, rk = apply_rotary_emb(xq, xk, freqs_cis)
    assert rq.shape == xq.shape and rk.shape == xk.shape
    assert repeat_kv(xk, 2).shape == (bs, seqlen, args.n_heads, head_dim)
    positions = torch.arange(seqlen)
    assert Attention(args)(x, freqs_cis, causal_mask(seqlen), positions).shape == (bs, seqlen, args.dim)
    assert FeedForward(args.dim, args.ffn_hidden_dim)(x).shape == (bs, seqlen, args.dim)
    block = TransformerBlock(0, args)
    assert block(x, freqs_cis, causal_mask(seqlen), positions, cache_len=seqlen).shape == (bs, seqlen, args.dim)
    logits = Transformer(args)(torch.randint(0, args.vocab_size, (bs, seqlen)))
    assert logits.shape == (bs, seqlen, args.vocab_size) and logits.dtype == torch.float32


LLAMA_2_SIZES = {
    # name: (ModelArgs, published parameter count in billions, published feed-forward width)
    "7B": (ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000), 6.738, 11008),
    "13B": (ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000), 13.016, 13824),
    "70B": (
        ModelArgs(
            dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, ffn_dim_multiplier=1.3, multiple_of=4096
        ),
        68.98,
        28672,
    ),
}


@pytest.mark.parametrize("size", LLAMA_2_SIZES)
def test_llama_2_configurations_have_the_published_parameter_counts_and_ffn_widths(size):
    args, billions, ffn_width = LLAMA_2_SIZES[size]
    assert args.ffn_hidden_dim == ffn_width
    with meta_device():  # shapes only: a 70B model in no memory at all
        model = Transformer(args)
    assert all(param.device.type == "meta" for param in model.parameters())
    count = sum(param.numel() for param in model.parameters())
    digits = len(str(billions).split(".")[1])
    assert round(count / 1e9, digits) == billions, f"{size}: {count:,} parameters, published {billions}B"
    assert model.layers[0].feed_forward.w1.weight.shape == (ffn_width, args.dim)


# ---- norm ----------------------------------------------------------------------------------------------------


def test_rmsnorm_divides_by_the_root_mean_square_then_scales():
    """Inputs whose mean square is about eps, so that a norm without eps (or with another) is off by far more
    than float32 rounding."""
    torch.manual_seed(0)
    eps = 1e-5
    norm = RMSNorm(16, eps=eps)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(4, 16, dtype=torch.float64) * eps**0.5
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * norm.weight.double()
    without_eps = x / torch.sqrt((x**2).mean(-1, keepdim=True)) * norm.weight.double()
    assert (expected - without_eps).abs().max() > 0.1, "eps matters at this scale"
    torch.testing.assert_close(norm(x.float()).double(), expected, **TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rmsnorm_kernel_equals_meta_formula_normalise_in_float32_round_then_scale(dtype):
    """F.rms_norm stands in for Meta's `_norm(x.float()).type_as(x) * weight`: the same numbers, bit for bit."""
    torch.manual_seed(0)
    norm = RMSNorm(512, eps=1e-5).to(dtype)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = (torch.randn(8, 3, 512) * 3).to(dtype)
    with torch.no_grad():
        assert torch.equal(norm(x), norm._norm(x.float()).type_as(x) * norm.weight)


def test_rmsnorm_in_float16_stays_finite_where_squares_overflow_float16():
    # 300**2 = 90000 > 65504, the largest float16: a float16 mean of squares would be inf and the output 0.
    x = torch.full((2, 8), 300.0, dtype=torch.float16)
    out = RMSNorm(8).half()(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, torch.ones_like(out), rtol=1e-3, atol=1e-3)


# ---- rotary embeddings ---------------------------------------------------------------------------------------


def rotate_with_real_matrices(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE written as real 2x2 rotations of channel pairs (2i, 2i+1), angles computed in float64."""
    bs, seqlen, heads, head_dim = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    for t in range(seqlen):
        rotation = torch.zeros(head_dim, head_dim, dtype=torch.float64)
        for i in range(head_dim // 2):
            angle = t * theta ** (-2 * i / head_dim)
            c, s = math.cos(angle), math.sin(angle)
            rotation[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        out[:, t] = x[:, t].double() @ rotation.T
    return out


@pytest.mark.parametrize("theta", [10000.0, 1000000.0])
def test_complex_rope_equals_real_2x2_rotations_of_adjacent_channel_pairs(theta):
    torch.manual_seed(0)
    xq, xk = torch.randn(2, 12, 4, 16), torch.randn(2, 12, 2, 16)
    rq, rk = apply_rotary_emb(xq, xk, precompute_freqs_cis(16, 12, theta))
    torch.testing.assert_close(rq.double(), rotate_with_real_matrices(xq, theta), **TOLERANCE)
    torch.testing.assert_close(rk.double(), rotate_with_real_matrices(xk, theta), **TOLERANCE)


def test_rope_makes_query_key_products_depend_only_on_the_position_difference():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    freqs_cis = precompute_freqs_cis(32, 64)

    def score(query_pos, key_pos):
        rq, _ = apply_rotary_emb(q, q, freqs_cis[query_pos : query_pos + 1])
        rk, _ = apply_rotary_emb(k, k, freqs_cis[key_pos : key_pos + 1])
        return (rq * rk).sum()

    for offset in (0, 5, 40):
        torch.testing.assert_close(score(10 + offset, 3 + offset), score(10, 3), rtol=1e-4, atol=1e-4)


# ---- attention -----------------------------------------------------------------------------------------------


def test_grouped_query_attention_equals_multi_head_attention_with_repeated_key_value_heads():
    gqa_args = small_args(n_heads=8, n_kv_heads=2)
    gqa = random_model(gqa_args, seed=1)
    mha = random_model(small_args(n_heads=8, n_kv_heads=None), seed=2)
    head_dim, n_rep = gqa_args.head_dim, 4
    state = gqa.state_dict()
    for name, tensor in list(state.items()):
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            # key/value head j serves query heads j*n_rep .. j*n_rep + n_rep - 1
            heads = tensor.view(gqa_args.n_kv_heads, head_dim, gqa_args.dim)
            state[name] = heads.repeat_interleave(n_rep, dim=0).reshape(-1, gqa_args.dim)
    mha.load_state_dict(state)
    tokens = torch.randint(0, gqa_args.vocab_size, (2, 10))
    with torch.no_grad():
        # Through the cache (decoding, where the CPU's attention kernel groups the heads itself) and without it.
        torch.testing.assert_close(gqa(tokens), mha(tokens), **TOLERANCE)
        torch.testing.assert_close(gqa(tokens, use_cache=False), mha(tokens, use_cache=False), **TOLERANCE)
    # ... while its key/value cache is n_heads / n_kv_heads = 4 times smaller.
    assert mha.layers[0].attention.kv_cache.keys.numel() == n_rep * gqa.layers[0].attention.kv_cache.keys.numel()


def test_value_path_is_linear_each_head_acts_through_one_dim_by_dim_matrix():
    """Why no activation before wo: for fixed attention weights, a head's contribution is
    softmax(QK^T) @ x @ (wo_h @ wv_h)^T, one dim x dim matrix. Only the softmax is non-linear here."""
    args = small_args(n_heads=4, n_kv_heads=2)
    attention = random_model(args, seed=3).layers[0].attention
    torch.manual_seed(0)
    seqlen, head_dim, n_rep = 9, args.head_dim, 2
    x = torch.randn(2, seqlen, args.dim)
    freqs_cis = precompute_freqs_cis(head_dim, seqlen)
    with torch.no_grad():
        output = attention(x, freqs_cis, causal_mask(seqlen), torch.arange(seqlen))
        xq = attention.wq(x).view(2, seqlen, args.n_heads, head_dim)
        xk = attention.wk(x).view(2, seqlen, args.n_kv_heads, head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        expected = torch.zeros_like(output)
        for h in range(args.n_heads):
            kv = h // n_rep
            weights = F.softmax(
                xq[:, :, h] @ xk[:, :, kv].transpose(1, 2) / math.sqrt(head_dim) + causal_mask(seqlen), dim=-1
            )
            wv_h = attention.wv.weight[kv * head_dim : (kv + 1) * head_dim]  # (head_dim, dim)
            wo_h = attention.wo.weight[:, h * head_dim : (h + 1) * head_dim]  # (dim, head_dim)
            merged = wo_h @ wv_h  # (dim, dim): value and output projection in one matrix
            expected += weights @ x @ merged.T
    torch.testing.assert_close(output, expected, **TOLERANCE)


def test_fused_attention_kernel_gives_the_logits_of_a_written_out_forward():
    """The model (scaled_dot_product_attention, complex rotary products, F.rms_norm) gives the logits of the
    whole network written out from the published formulas in float64 (helpers.written_out_logits: explicit
    softmax(q k^T / sqrt(head_dim)), real rotations, one head at a time): for a full pass, for chunked prefill at
    start_pos > 0 (mask over the cached prefix) and for token-by-token decoding with the cache."""
    args = small_args(n_heads=8, n_kv_heads=2)
    model = random_model(args, seed=8)
    tokens = torch.randint(0, args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    chunks = [(0, 6), (6, 7), (7, 15), (15, 16), (16, 17), (17, 20)]
    expected = written_out_logits(args, model.state_dict(), tokens).float()
    with torch.no_grad():
        full = model(tokens, 0)
        chunked = torch.cat([model(tokens[:, start:end], start) for start, end in chunks], dim=1)
    torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked, expected, rtol=1e-4, atol=1e-4)


def test_single_rank_linear_layers_compute_what_fairscale_computes():
    """On one rank the layers skip fairscale's copy/gather/reduce steps (identities there) and give its result."""
    model = random_model(small_args(), seed=10)
    x = torch.randn(2, 5, model.params.dim)
    h = torch.randn(2, 5, model.params.ffn_hidden_dim)
    feed_forward = model.layers[0].feed_forward
    with torch.no_grad():
        for layer, fairscale_class, inputs in (
            (feed_forward.w1, fairscale_layers.ColumnParallelLinear, x),
            (model.output, fairscale_layers.ColumnParallelLinear, x),  # gathers its output across ranks
            (feed_forward.w2, fairscale_layers.RowParallelLinear, h),
        ):
            assert isinstance(layer, fairscale_class)
            torch.testing.assert_close(layer(inputs), fairscale_class.forward(layer, inputs), rtol=0, atol=0)


# ---- caching ---------------------------------------------------------------------------------------------------


def test_kv_cache_decode_token_by_token_matches_full_forward():
    args = small_args()
    model = random_model(args, seed=4)
    tokens = torch.randint(0, args.vocab_size, (3, 16))
    with torch.no_grad():
        full = model(tokens, 0)
        stepwise = torch.cat([model(tokens[:, pos : pos + 1], pos) for pos in range(tokens.shape[1])], dim=1)
    torch.testing.assert_close(stepwise, full, **TOLERANCE)


def test_chunked_prefill_with_start_pos_matches_full_forward():
    """Several tokens at start_pos > 0: each must see the whole cached prefix and the new tokens up to itself."""
    args = small_args()
    model = random_model(args, seed=5)
    tokens = torch.randint(0, args.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(tokens, 0)
        chunks = [(0, 6), (6, 7), (7, 15), (15, 20)]
        chunked = torch.cat([model(tokens[:, start:end], start) for start, end in chunks], dim=1)
    torch.testing.assert_close(chunked, full, **TOLERANCE)


def test_key_value_cache_holds_only_the_key_value_heads():
    """With 8 query heads over 2 key/value heads, every layer caches 2 heads: a quarter of the memory of
    caching what the query heads read."""
    args = small_args(n_heads=8, n_kv_heads=2)
    model = random_model(args)
    with torch.no_grad():
        model(torch.randint(0, args.vocab_size, (2, 9)), 0)
    for layer in model.layers:
        cache = layer.attention.kv_cache
        expected = (args.max_batch_size, args.max_seq_len, args.n_kv_heads, args.head_dim)
        assert cache.keys.shape == cache.values.shape == expected


def test_kv_cache_update_writes_at_the_positions_and_returns_the_first_cache_len_entries():
    cache = KVCache(max_batch_size=3, max_seq_len=8, n_kv_heads=2, head_dim=4)
    xk, xv = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    keys, values = cache.update(torch.tensor([4, 5, 6]), xk, xv, cache_len=7)
    assert keys.shape == values.shape == (2, 7, 2, 4)
    assert torch.equal(keys[:, 4:7], xk) and torch.equal(values[:, 4:7], xv)
    assert not keys[:, :4].any() and not cache.keys[2:].any(), "only the batch rows and positions given are written"


def test_positions_given_as_a_tensor_with_a_fixed_cache_len_match_full_forward():
    """The form a CUDA graph records (positions in a tensor on the device, attention over a fixed number of
    cache positions with the later ones masked) gives the logits of the plain forward, for single tokens and
    chunks, after those cache positions have held stale entries from a longer earlier sequence."""
    args = small_args(max_seq_len=32)
    model = random_model(args, seed=12)
    earlier = torch.randint(0, args.vocab_size, (2, 30))
    tokens = torch.randint(0, args.vocab_size, (2, 20))
    with torch.no_grad():
        model(earlier, 0)  # fills cache positions 0..29 with another sequence's keys and values
        full = model(tokens, 0)
        pieces = [model.forward_at(tokens[:, :5], torch.arange(0, 5), cache_len=16)]
        for pos in range(5, 12):
            pieces.append(model.forward_at(tokens[:, pos : pos + 1], torch.tensor([pos]), cache_len=16))
        pieces.append(model.forward_at(tokens[:, 12:15], torch.arange(12, 15), cache_len=32))
        for pos in range(15, 20):
            pieces.append(model.forward_at(tokens[:, pos : pos + 1], torch.tensor([pos]), cache_len=20))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOLERANCE)


@pytest.mark.parametrize(
    "positions, kwargs, message",
    [
        (torch.tensor(3), dict(cache_len=8), r"int64 tensor of shape \(1,\)"),
        (torch.tensor([3, 4]), dict(cache_len=8), r"int64 tensor of shape \(1,\)"),
        (torch.tensor([3.0]), dict(cache_len=8), r"int64 tensor of shape \(1,\)"),
        (torch.tensor([3], dtype=torch.int32), dict(cache_len=8), r"int64 tensor of shape \(1,\)"),
        (torch.tensor([3]), dict(cache_len=0), "cache_len must be an integer from seqlen=1"),
        (torch.tensor([3]), dict(cache_len=65), "max_seq_len=64"),
        (torch.tensor([3]), dict(cache_len=8.0), "cache_len must be an integer"),
        (torch.tensor([3]), dict(cache_len=8, tokens=torch.zeros(5, 1, dtype=torch.long)), "batch of 5 does not fit"),
        (torch.tensor([3], device="meta"), dict(cache_len=8), "positions are on meta but the model is on cpu"),
    ],
)
def test_tensor_position_misuse_is_refused_with_the_fix(positions, kwargs, message):
    model = random_model(small_args())
    kwargs = dict(kwargs)
    tokens = kwargs.pop("tokens", torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=message):
        model.forward_at(tokens, positions, **kwargs)


def test_start_pos_must_be_an_integer():
    model = random_model(small_args())
    with pytest.raises(ValueError, match="start_pos must be an integer, got 2.5"):
        model(torch.zeros(1, 1, dtype=torch.long), 2.5)


def test_last_only_gives_the_last_position_of_the_full_logits():
    args = small_args()
    model = random_model(args, seed=9)
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens, 0)
        prefill = model(tokens[:, :8], 0, last_only=True)
        decode = model(tokens[:, 8:9], 8, last_only=True)
        chunk = model(tokens[:, 9:12], 9, last_only=True)
    assert prefill.shape == (2, 1, args.vocab_size)
    torch.testing.assert_close(torch.cat([prefill, decode, chunk], dim=1), full[:, [7, 8, 11]], **TOLERANCE)


def test_logits_at_a_position_do_not_depend_on_later_tokens():
    args = small_args()
    model = random_model(args, seed=6)
    tokens = torch.randint(0, args.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % args.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :8], model(tokens)[:, :8], **TOLERANCE)


def test_forward_beyond_the_cache_raises_a_clear_error():
    args = small_args(max_batch_size=2, max_seq_len=8)
    model = random_model(args)
    with pytest.raises(ValueError, match="does not fit the key/value cache"):
        model(torch.zeros(1, 4, dtype=torch.long), 6)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        model(torch.zeros(3, 1, dtype=torch.long), 0)


def test_norm_eps_from_params_json_changes_the_logits_as_a_written_out_norm_does(tmp_path, tokenizer_path):
    """A checkpoint whose params.json gives norm_eps=0.5 (large, so that its effect is far above rounding) loads
    into a model whose logits are those of the written-out forward with that eps, and not those with Llama 2's."""
    args = small_args(norm_eps=0.5)
    state = random_model(args, seed=13).state_dict()
    folder = write_checkpoint(tmp_path / "eps", args, state, tokenizer_path=tokenizer_path)
    assert json.loads((folder / "params.json").read_text())["norm_eps"] == 0.5
    model = Llama.build(folder, folder / "tokenizer.model", max_seq_len=32, max_batch_size=2, device="cpu").model
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens, 0)
    torch.testing.assert_close(logits, written_out_logits(args, state, tokens).float(), rtol=1e-4, atol=1e-4)
    llama_2_eps = written_out_logits(dataclasses.replace(args, norm_eps=1e-5), state, tokens).float()
    assert (logits - llama_2_eps).abs().max() > 0.05, "the eps changes the logits by far more than the tolerance"


def test_model_moved_to_bfloat16_keeps_the_rotary_table_in_float32():
    args = small_args()
    model = random_model(args).to(torch.bfloat16)
    tokens = torch.randint(0, args.vocab_size, (1, 6))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert model.freqs_cis.dtype == torch.complex64
