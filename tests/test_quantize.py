"""Weight-only quantization: int8 per output channel and int4 per group round-trip within half a quantization
step; every kernel computes what dequantizing and multiplying computes; a checkpoint quantized as it loads is the
checkpoint written quantized to disk, on one rank and on two; a quantized model still generates the text of the
floating-point one; and mistakes get clear errors."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import fixed_outputs, random_model, run_parallel_jobs, small_args, write_checkpoint
from llama import Llama
from llama.convert import quantize, reshard
from llama.loading import demo_checkpoint
from llama.perplexity import sequence_nll, text_perplexity
from llama.quantize import (
    QuantizedLinear,
    dequantize_weight,
    quantization,
    quantize_weight,
)

INT8, INT4 = quantization("int8"), quantization("int4", 32)
ARGS = small_args()  # every linear layer's input width divides into groups of 32, also on two ranks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_path):
    folder = tmp_path_factory.mktemp("quantize") / "float"
    return write_checkpoint(folder, ARGS, random_model(ARGS, seed=5).state_dict(), tokenizer_path=tokenizer_path)


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory):
    """The checkpoint written quantized by `llama quantize`, per scheme (the block schemes q8_0 and q4_0 too,
    for the two-process test: tests/test_block_quant.py tests the rest of them)."""
    folder = tmp_path_factory.mktemp("quantized")
    quantize(checkpoint, folder / "int8", bits=8)
    quantize(checkpoint, folder / "int4", bits=4, group_size=32)
    for scheme in ("q8_0", "q4_0"):
        quantize(checkpoint, folder / scheme, scheme=scheme)
    return {scheme: folder / scheme for scheme in ("int8", "int4", "q8_0", "q4_0")}


def weights(rows=48, columns=256, seed=0) -> torch.Tensor:
    """Weights of varied scale per row, with an outlier, as trained layers have."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * torch.rand(rows, 1, generator=generator)
    weight[3, 17] = 5.0
    return weight


def test_int8_round_trip_is_within_half_a_step_of_each_row():
    weight = weights()
    parts = quantize_weight(weight, INT8)
    step = weight.abs().amax(dim=1, keepdim=True) / 127  # the scheme: the largest magnitude of a row maps to 127
    error = (dequantize_weight(parts, INT8) - weight).abs()
    assert parts["weight"].dtype == torch.int8 and parts["weight"].abs().max() == 127
    assert torch.all(error <= step / 2 * (1 + 1e-5)), f"largest error {(error / step).max():.3f} steps"


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_is_within_half_a_step_of_each_group(group_size):
    weight = weights()
    scheme = quantization("int4", group_size)
    parts = quantize_weight(weight, scheme)
    groups = weight.view(len(weight), -1, group_size)
    step = (groups.amax(dim=2) - groups.amin(dim=2)) / 15  # 16 levels from each group's minimum to its maximum
    step = step.repeat_interleave(group_size, dim=1)
    # The scale and zero are stored in bfloat16: the zero's rounding may shift the levels by 2^-9 of itself.
    zero_rounding = parts["zeros"].float().abs().repeat_interleave(group_size, dim=1) * 2**-8
    error = (dequantize_weight(parts, scheme) - weight).abs()
    assert parts["weight"].shape == (48, 128) and parts["weight"].dtype == torch.uint8, "two 4-bit values per byte"
    assert torch.all(error <= step / 2 * 1.01 + zero_rounding), f"largest error {(error / step).max():.3f} steps"


def test_int4_keeps_the_even_input_channel_in_the_low_four_bits():
    # Channel c holds (c mod 16) / 16: the group runs from 0 to 15/16 in steps of 1/16, so q = c mod 16 exactly.
    weight = (torch.arange(32) % 16 / 16).repeat(16, 1)
    packed = quantize_weight(weight, INT4)["weight"]  # (16, 16)
    expected = torch.tensor([(2 * i) % 16 | ((2 * i + 1) % 16) << 4 for i in range(16)], dtype=torch.uint8)
    assert torch.equal(packed, expected.repeat(16, 1)), f"got {packed[0].tolist()}"


def quantized_layer(scheme, weight, dtype, plain=False) -> QuantizedLinear:
    layer = QuantizedLinear(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False), scheme)
    layer = layer.to_empty(device="cpu")
    layer.load(quantize_weight(weight, scheme), dtype, plain=plain)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("scheme", [INT8, INT4], ids=["int8", "int4"])
def test_each_kernel_computes_the_dequantized_product(scheme, dtype):
    weight = weights(rows=64, columns=256)
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    layer = quantized_layer(scheme, weight, dtype)
    assert layer.kernel != "dequantize", f"PyTorch {torch.__version__} has a {scheme.name} CPU kernel"
    expected = F.linear(x.double(), dequantize_weight(quantize_weight(weight, scheme), scheme, torch.float64))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16 keeps 8 bits of each product and sum
    torch.testing.assert_close(layer(x).double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max())


def test_int4_packed_in_blocks_of_rows_equals_packed_whole(monkeypatch):
    """Loading packs int4 weights for PyTorch's CPU kernel a block of rows at a time, to bound the converter's
    int32 copy; the blocks' packing joined is the whole matrix's packing, a last block of 16 rows included."""
    weight = weights(rows=144, columns=256)
    whole = quantized_layer(INT4, weight, torch.bfloat16)
    monkeypatch.setattr("llama.quantize._WEIGHTS_PER_BLOCK", 64 * 256)  # blocks of 64 rows: 64, 64, 16
    blocks = quantized_layer(INT4, weight, torch.bfloat16)
    assert whole.kernel == blocks.kernel == "int4-cpu"
    assert torch.equal(whole.weight, blocks.weight)


@pytest.mark.parametrize("scheme", [INT8, INT4], ids=["int8", "int4"])
def test_the_plain_path_computes_the_dequantized_product(scheme):
    weight = weights(rows=64, columns=256)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    layer = quantized_layer(scheme, weight, torch.float32, plain=True)
    assert layer.kernel == "dequantize"
    expected = x.double() @ dequantize_weight(quantize_weight(weight, scheme), scheme, torch.float64).T
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "scheme, rows, columns",
    [(INT8, 64, 100), (INT4, 40, 64)],
    ids=["int8: 100 input channels (the kernel reads blocks of 8)", "int4: 40 rows (the kernel packs 16)"],
)
def test_a_shape_the_kernel_cannot_take_takes_the_plain_path(scheme, rows, columns):
    weight = weights(rows=rows, columns=columns)
    layer = quantized_layer(scheme, weight, torch.bfloat16)
    assert layer.kernel == "dequantize"
    x = torch.randn(2, columns).bfloat16()
    expected = F.linear(x.float(), dequantize_weight(quantize_weight(weight, scheme), scheme))
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def logits_of(generator: Llama) -> torch.Tensor:
    tokens = torch.randint(0, ARGS.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return generator.model(tokens, 0)


def build(folder, tokenizer_path, **options) -> Llama:
    return Llama.build(folder, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu", **options)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_as_it_loads_equals_quantized_on_disk(checkpoint, quantized, tokenizer_path, scheme):
    on_load = logits_of(build(checkpoint, tokenizer_path, quantize=scheme))
    from_disk = logits_of(build(quantized[scheme], tokenizer_path))
    assert torch.equal(on_load, from_disk), "the same quantized values, the same kernels"


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_logits_stay_close_to_the_floating_point_ones(checkpoint, tokenizer_path, scheme):
    exact = logits_of(build(checkpoint, tokenizer_path))
    approximate = logits_of(build(checkpoint, tokenizer_path, quantize=scheme))
    relative = ((approximate - exact).norm() / exact.norm()).item()
    bound = {"int8": 0.02, "int4": 0.2}[scheme]  # int4 has 16 levels per group, int8 255 per row
    assert 0 < relative < bound, f"{scheme}: relative error {relative:.4f}"


PARALLEL_CASES = [("int8", "disk", "on load"), ("int4", "on load", "disk"), ("q8_0", "disk", "on load"),
                  ("q4_0", "on load", "disk")]  # fmt: skip


def quantized_sources(checkpoint, quantized, scheme):
    """Where a quantized model comes from: its checkpoint on disk, or the float one quantized as it loads."""
    return {"disk": (quantized[scheme], None), "on load": (checkpoint, scheme)}


@pytest.fixture(scope="module")
def two_processes(checkpoint, quantized, tokenizer_path, tmp_path_factory):
    """Each case's second source run by 2 processes, all in one torchrun launch: {scheme: outputs}."""
    sources = [quantized_sources(checkpoint, quantized, scheme)[two] for scheme, _, two in PARALLEL_CASES]
    jobs = [(folder, tokenizer_path, option) for folder, option in sources]
    results, _ = run_parallel_jobs(2, jobs, tmp_path_factory.mktemp("parallel") / "outputs.pt")
    return {scheme: result for (scheme, _, _), result in zip(PARALLEL_CASES, results)}


@pytest.mark.parametrize("scheme, one, two", PARALLEL_CASES)
def test_two_processes_give_the_logits_of_one_quantized_model(
    checkpoint, quantized, tokenizer_path, two_processes, scheme, one, two
):
    """int8's row-parallel layers (wo, w2) keep one scale per whole row: a rank holding half the row's columns
    must use the scale of the whole row, or its products differ from one process's. The block schemes' split
    into whole blocks (wo: one of 32 on each rank), whose activations each rank rounds alone."""
    folder, option = quantized_sources(checkpoint, quantized, scheme)[one]
    single = fixed_outputs(folder, tokenizer_path, option)
    parallel = two_processes[scheme]
    assert parallel["world_size"] == 2
    # Row-parallel layers sum partial products in another order, and the CPU int4 kernel and the plain path
    # (a rank's 200 vocabulary rows do not pack in blocks of 16) round differently.
    torch.testing.assert_close(parallel["logits"], single["logits"], rtol=1e-4, atol=1e-4)
    assert parallel["greedy"] == single["greedy"]


def test_a_quantized_checkpoint_reshards_and_loads_to_the_same_logits(quantized, tokenizer_path, tmp_path):
    reshard(quantized["int4"], tmp_path / "two", model_parallel_size=2)
    assert json.loads((tmp_path / "two" / "params.json").read_text())["quantization"] == {"bits": 4, "group_size": 32}
    torch.testing.assert_close(
        logits_of(build(tmp_path / "two", tokenizer_path)), logits_of(build(quantized["int4"], tokenizer_path))
    )


def test_int8_demo_model_writes_the_float_text_for_the_first_50_tokens():
    ckpt_dir, tokenizer_path = demo_checkpoint()
    prompts = ["ROMEO:\n", "First Citizen:\nBefore we proceed"]
    texts = {}
    for scheme in (None, "int8"):
        generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=128, max_batch_size=2, quantize=scheme)
        tokens, _ = generator.generate([generator.tokenizer.encode(p, bos=True, eos=False) for p in prompts],
                                       max_gen_len=50, temperature=0)  # fmt: skip
        texts[scheme] = tokens
    assert texts["int8"] == texts[None]


def test_a_quantized_model_streams_chats_and_scores(quantized, tokenizer_path):
    generator = build(quantized["int4"], tokenizer_path)
    prompts = ["The quick brown fox", "Once upon a time"]
    settings = dict(max_gen_len=12, temperature=0)
    pieces = list(generator.stream_completion(prompts, **settings))
    completed = generator.text_completion(prompts, **settings)
    assert ["".join(step[row] for step in pieces) for row in range(2)] == [c["generation"] for c in completed]
    answer = generator.chat_completion([[{"role": "user", "content": "What is two plus two?"}]], max_gen_len=8)
    assert answer[0]["generation"]["role"] == "assistant"
    # Scores of the prompt's own tokens (the first, BOS, which nothing predicts, gets 0): log-softmax of one
    # forward pass over the prompt.
    scored = generator.text_completion(["The quick brown fox"], max_gen_len=1, logprobs=True, echo=True)[0]
    tokens = generator.tokenizer.encode("The quick brown fox", bos=True, eos=False)
    with torch.no_grad():
        logits = generator.model(torch.tensor([tokens]), use_cache=False)[0].float()
    expected = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(scored["logprobs"][1 : len(tokens)]), expected, rtol=0, atol=0.05)


def test_int8_stories260k_writes_the_float_text_for_the_first_50_tokens(stories_dir):
    texts = {}
    for scheme in (None, "int8"):
        generator = Llama.build(stories_dir, stories_dir / "tokenizer.model", 128, 1, quantize=scheme)
        tokens, _ = generator.generate([generator.tokenizer.encode("Once upon a time", bos=True, eos=False)],
                                       max_gen_len=50, temperature=0)  # fmt: skip
        texts[scheme] = tokens
    assert texts["int8"] == texts[None]


# ---- perplexity ----------------------------------------------------------------------------------------------


def test_perplexity_of_a_short_text_is_exp_of_the_mean_nll_of_one_forward_pass(checkpoint, tokenizer_path):
    generator = build(checkpoint, tokenizer_path)
    text = "The quick brown fox jumps over the lazy dog."
    tokens = generator.tokenizer.encode(text, bos=True, eos=False)
    with torch.no_grad():
        logits = generator.model(torch.tensor([tokens]), use_cache=False)[0].double()  # (len, vocab)
    nll = -torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(tokens[1:])[:, None]).sum().item()
    result = text_perplexity(generator.model, generator.tokenizer, text, window=64, stride=32)
    assert result.tokens == len(tokens) - 1 and result.chars == len(text)
    assert result.perplexity == pytest.approx(math.exp(nll / (len(tokens) - 1)), rel=1e-6)
    assert result.bits_per_char == pytest.approx(nll / math.log(2) / len(text), rel=1e-6)


def test_perplexity_in_windows_scores_each_token_once_given_its_window(checkpoint, tokenizer_path):
    """Windows of 8 tokens, 3 apart: each token is scored in the first window that holds it after its start,
    from a forward pass over that window alone (computed here token by token)."""
    generator = build(checkpoint, tokenizer_path)
    tokens = torch.randint(3, ARGS.vocab_size, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    window, stride, expected = 8, 3, 0.0
    for target in range(1, len(tokens)):
        start = 0
        while start + window <= target:  # the first window whose span holds the target after its first token
            start += stride
        with torch.no_grad():
            logits = generator.model(torch.tensor([tokens[start:target]]), use_cache=False)[0, -1].double()
        expected -= torch.log_softmax(logits, dim=-1)[tokens[target]].item()
    nats, count = sequence_nll(generator.model, tokens, window, stride)
    assert count == len(tokens) - 1
    assert nats == pytest.approx(expected, rel=1e-5)


def test_the_perplexity_command_prints_its_figures(checkpoint, tmp_path, run_main):
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little girl who loved to read books about the sea.\n" * 3)
    status, out, err = run_main("perplexity", "--ckpt-dir", checkpoint, "--text-path", text, "--max-seq-len", "32",
                                "--quantize", "int8")  # fmt: skip
    assert status == 0, err
    assert out.startswith("perplexity ") and "nats per token" in out and "bits per character" in out


# ---- mistakes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits, group_size, message",
    [
        (3, None, "quantize must be 'int8' or 'int4' (8 or 4 bits), got 3"),
        ("int2", None, "quantize must be 'int8' or 'int4'"),
        (4, 48, "group_size must be one of 32, 64, 128, got 48"),
        (8, 32, "group_size applies to int4"),
        (None, 32, "group_size applies to quantize='int4'"),
    ],
)
def test_an_unknown_scheme_is_refused(checkpoint, tokenizer_path, bits, group_size, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(checkpoint, tokenizer_path, quantize=bits, group_size=group_size)


def test_the_quantize_command_refuses_bits_3_in_one_line(checkpoint, tmp_path, run_main):
    status, _, err = run_main("quantize", checkpoint, tmp_path / "out", "--bits", "3")
    assert status == 1 and err == "error: quantize must be 'int8' or 'int4' (8 or 4 bits), got 3\n"
    assert not (tmp_path / "out").exists()


def test_a_group_size_that_does_not_divide_a_layer_is_named(checkpoint, tokenizer_path, tmp_path):
    # The attention reads dim = 64 channels, which groups of 128 do not divide, and groups of 64 divide on one
    # rank but not on two (wo: 32 each).
    with pytest.raises(ValueError, match="wq.weight has 64 input channels, which do not divide into groups of "
                                         "group_size=128: choose a group size that divides 64"):  # fmt: skip
        build(checkpoint, tokenizer_path, quantize="int4", group_size=128)
    quantize(checkpoint, tmp_path / "g64", bits=4, group_size=64)
    with pytest.raises(ValueError, match="wo.weight has 32 input channels on each of 2 ranks, which do not divide "
                                         "into groups of group_size=64: choose a group size that divides 32, or "
                                         "fewer ranks"):  # fmt: skip
        reshard(tmp_path / "g64", tmp_path / "two", model_parallel_size=2)
    assert not (tmp_path / "two").exists()


def test_quantizing_a_quantized_checkpoint_is_refused(quantized, tokenizer_path, tmp_path):
    with pytest.raises(ValueError, match="is already quantized \\(int8\\): quantize its floating-point original"):
        quantize(quantized["int8"], tmp_path / "again", bits=4)
    with pytest.raises(ValueError, match="is already quantized \\(int4 in groups of 32\\): load it without quantize="):
        build(quantized["int4"], tokenizer_path, quantize="int8")


@pytest.mark.parametrize("conversion", ["fold-norms", "to-hf"])
def test_conversions_that_need_floating_point_weights_refuse_a_quantized_checkpoint(quantized, tmp_path, run_main,
                                                                                    conversion):  # fmt: skip
    status, _, err = run_main(conversion, quantized["int8"], tmp_path / "out")
    assert status == 1 and "is quantized (int8)" in err and "needs the floating-point weights" in err, err
    assert not (tmp_path / "out").exists()


def test_weights_of_another_dtype_than_the_scheme_are_refused(quantized, tokenizer_path, tmp_path):
    import shutil

    folder = Path(shutil.copytree(quantized["int8"], tmp_path / "bad"))
    shard = torch.load(folder / "consolidated.00.pth", weights_only=True)
    shard["layers.0.attention.wq.weight"] = shard["layers.0.attention.wq.weight"].float()
    torch.save(shard, folder / "consolidated.00.pth")
    with pytest.raises(
        ValueError, match="layers.0.attention.wq.weight has dtype float32 .* quantized as int8, stored as int8"
    ):
        build(folder, tokenizer_path)
