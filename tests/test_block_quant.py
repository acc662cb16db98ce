"""The block schemes q8_0 and q4_0: weights and activations rounded in blocks of 32 with a scale each, round trips
within a quantization step, every kernel the machine runs computing the scheme as written out here (the
dequantized activations times the dequantized weights, in float64), a model quantized as it loads equal to its
checkpoint written quantized (on two ranks: tests/test_quantize.py, in the launch of the other schemes), the
pretrained model's greedy text kept, and clear errors."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from helpers import random_model, small_args, write_checkpoint
from llama import Llama
from llama.block_kernels import VARIANTS, operators, runnable_variants
from llama.block_quant import Q4_0, Q8_0, quantize_activations
from llama.convert import quantize, reshard
from llama.quantize import QuantizedLinear, quantization, quantize_weight

# Loading names the layers that keep int8 (tested below), every time.
pytestmark = pytest.mark.filterwarnings("ignore:q[48]_0. layers whose input width:UserWarning")

SCHEMES = {"q8_0": Q8_0, "q4_0": Q4_0}
KERNELS = ["torch", *VARIANTS]  # PyTorch's block product, and each native variant (where this CPU runs it)
# The FFN is 180 wide: w2's input is not a multiple of 32 and keeps int8; wo's 64 inputs split into one block
# per rank on two ranks.
ARGS = small_args(multiple_of=20)


def varied(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Values whose blocks of 32 differ in scale by up to a thousand times, as activations do; the first block of
    the first row is all positive, so that its integer product is as large as a block's can be."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, columns, generator=generator)
    scale = 10 ** torch.empty(rows, columns // 32, 1).uniform_(-2, 1, generator=generator)
    values = (values.view(rows, -1, 32) * scale).view(rows, columns)
    values[0, :32] = values[0, :32].abs() + 1
    return values


def written_out_weight(parts: dict, scheme_name: str) -> torch.Tensor:
    """The stored weight read back as the module docstring of llama/block_quant.py states it, in float64."""
    scales = parts["scales"].double().repeat_interleave(32, dim=1)  # (out, in)
    if scheme_name == "q8_0":
        return parts["weight"].double() * scales
    packed = parts["weight"].view(len(parts["weight"]), -1, 16).long()  # byte j: value j low, value j + 16 high
    values = torch.cat([packed & 15, packed >> 4], dim=2).view(len(packed), -1)
    return (values - 8).double() * scales


def written_out_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the scheme says, in float64: each block of 32 to multiples of its largest magnitude / 127."""
    blocks = x.float().view(*x.shape[:-1], -1, 32)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    return (torch.round(blocks / scale).double() * scale.double()).view(x.shape)


def block_layer(parts: dict, scheme, kernel: str) -> QuantizedLinear:
    out_features, in_features = parts["scales"].shape[0], parts["scales"].shape[1] * 32
    layer = QuantizedLinear(torch.nn.Linear(in_features, out_features, bias=False), scheme).to_empty(device="cpu")
    layer.load(parts, torch.float32, plain=kernel == "torch")
    layer.kernel = kernel  # the variant under test, where the machine's best would be chosen
    return layer


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_each_kernel_computes_the_written_out_scheme(scheme_name, kernel):
    if kernel != "torch" and kernel not in runnable_variants():
        pytest.skip(f"this CPU lacks the instructions of the {kernel} kernels")
    if kernel != "torch" and operators(kernel) is None:
        pytest.skip(f"the {kernel} kernels could not be built here (see the warning)")
    # 10 blocks: the native kernels take eight at a time, then the last two one by one.
    weight, x = varied(80, 320, seed=0), varied(6, 320, seed=1).view(2, 3, 320)
    parts = quantize_weight(weight, SCHEMES[scheme_name])
    expected = written_out_activations(x) @ written_out_weight(parts, scheme_name).T  # (2, 3, 80)
    got = block_layer(parts, SCHEMES[scheme_name], kernel)(x)
    assert got.shape == (2, 3, 80) and got.dtype == torch.float32
    # Each block's integer product is exact; only the float32 sums of the scaled blocks round.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16_activations_are_rounded_from_their_bfloat16_values(kernel):
    """A model in bfloat16 (a quantized model's default on the CPU) hands the layers bfloat16 activations: the
    scheme rounds those values, and the result comes back in bfloat16."""
    if kernel != "torch" and (kernel not in runnable_variants() or operators(kernel) is None):
        pytest.skip(f"no {kernel} kernels on this machine")
    weight, x = varied(48, 256, seed=8), varied(5, 256, seed=9).bfloat16()
    parts = quantize_weight(weight, Q8_0)
    expected = written_out_activations(x.float()) @ written_out_weight(parts, "q8_0").T
    got = block_layer(parts, Q8_0, kernel)(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, rtol=2**-8, atol=2**-8 * expected.abs().max().item())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernels use OpenMP on Linux")
@pytest.mark.parametrize("kernel", list(VARIANTS))
def test_native_kernels_share_their_rows_among_torchs_threads_with_the_same_results(kernel):
    """Built with OpenMP, at::parallel_for splits the output rows among Torch's threads (without it, its pragma is
    ignored and a kernel runs on one thread whatever torch.set_num_threads says): the library calls OpenMP's parallel
    region, and one thread or two give the same numbers, each output being the whole sum of one thread."""
    if kernel not in runnable_variants() or operators(kernel) is None:
        pytest.skip(f"no {kernel} kernels on this machine")
    name = operators(kernel).name
    library = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    assert b"GOMP_parallel" in library.read_bytes(), f"{library.name} was built without OpenMP"
    weight, x = varied(96, 256, seed=10), varied(3, 256, seed=11)
    threads = torch.get_num_threads()
    for scheme in (Q8_0, Q4_0):
        layer = block_layer(quantize_weight(weight.clone(), scheme), scheme, kernel)
        try:
            torch.set_num_threads(1)
            alone = layer(x)
            torch.set_num_threads(2)
            shared = layer(x)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(alone, shared), f"{scheme} differs between one thread and two"


def test_activations_round_within_half_a_step_of_each_block():
    x = varied(4, 256, seed=2)
    q, scales = quantize_activations(x)
    blocks = x.view(4, 8, 32)
    torch.testing.assert_close(scales, blocks.abs().amax(dim=2) / 127, rtol=0, atol=0)
    error = (q.float() * scales[..., None] - blocks).abs()
    assert q.dtype == torch.int8 and torch.all(q.abs().amax(dim=2) == 127), "each block's largest maps to 127"
    assert torch.all(error <= scales[..., None] / 2 * (1 + 1e-5)), f"largest error {(error / scales[..., None]).max()}"


def test_q8_0_round_trip_is_within_half_a_step_of_each_block():
    weight = varied(48, 256, seed=3)
    parts = quantize_weight(weight, Q8_0)
    step = parts["scales"].double().repeat_interleave(32, dim=1)  # float16 scales, q chosen for them
    error = (written_out_weight(parts, "q8_0") - weight.double()).abs()
    largest = weight.view(48, 8, 32).abs().amax(dim=2) / 127
    assert parts["scales"].dtype == torch.float16 and parts["weight"].dtype == torch.int8
    torch.testing.assert_close(parts["scales"].float(), largest, rtol=2**-10, atol=0)
    assert torch.all(error <= step / 2 * (1 + 1e-5)), f"largest error {(error / step).max():.3f} steps"


def test_q4_0_round_trip_is_within_half_a_step_but_at_the_far_end():
    """q4_0 maps each block's value of largest magnitude to -8 steps, so the other values lie within [-8, 8]
    steps; 16 levels reach -8 to 7, and a value past 7.5 steps (the opposite of the largest) rounds to 7."""
    weight = varied(48, 256, seed=4)
    parts = quantize_weight(weight, Q4_0)
    step = parts["scales"].double().abs().repeat_interleave(32, dim=1)
    error = (written_out_weight(parts, "q4_0") - weight.double()).abs()
    far = weight.double() / parts["scales"].double().repeat_interleave(32, dim=1) > 7.5
    assert parts["weight"].shape == (48, 128) and parts["weight"].dtype == torch.uint8, "two values to a byte"
    assert torch.all(error[~far] <= step[~far] / 2 * (1 + 1e-5)), f"largest error {(error / step).max():.3f} steps"
    assert torch.all(error[far] <= step[far] * (1 + 1e-5))
    extreme = weight.view(48, 8, 32).abs().argmax(dim=2)
    stored = written_out_weight(parts, "q4_0").view(48, 8, 32).gather(2, extreme[..., None])
    torch.testing.assert_close(
        stored, weight.double().view(48, 8, 32).gather(2, extreme[..., None]), rtol=2**-10, atol=0
    )


@pytest.mark.parametrize("scheme", [Q8_0, Q4_0], ids=str)
def test_a_block_of_zeros_stays_zero(scheme):
    weight = varied(16, 64, seed=5)
    weight[:, 32:] = 0
    parts = quantize_weight(weight, scheme)
    assert torch.all(written_out_weight(parts, scheme.name)[:, 32:] == 0)
    assert torch.all(block_layer(parts, scheme, "torch")(torch.zeros(1, 64)) == 0)


# ---- checkpoints ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_path):
    folder = tmp_path_factory.mktemp("block") / "float"
    return write_checkpoint(folder, ARGS, random_model(ARGS, seed=7).state_dict(), tokenizer_path=tokenizer_path)


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory):
    """The checkpoint written quantized by `llama quantize --scheme`, per scheme."""
    folder = tmp_path_factory.mktemp("block-quantized")
    with pytest.warns(UserWarning, match=r"feed_forward\.w2 in 2 layer\(s\), 180 wide"):
        for name in SCHEMES:
            quantize(checkpoint, folder / name, scheme=name)
    return {name: folder / name for name in SCHEMES}


def logits_of(generator: Llama) -> torch.Tensor:
    tokens = torch.randint(0, ARGS.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return generator.model(tokens, 0)


def build(folder, tokenizer_path, **options) -> Llama:
    return Llama.build(folder, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32",
                       **options)  # fmt: skip


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_quantized_as_it_loads_equals_quantized_on_disk_and_says_which_layers_keep_int8(
    checkpoint, quantized, tokenizer_path, scheme_name
):
    message = rf"{scheme_name}: layers whose input width is not a multiple of 32 keep int8's weight-only product: "
    with pytest.warns(UserWarning, match=message + r"feed_forward\.w2 in 2 layer\(s\), 180 wide"):
        on_load = build(checkpoint, tokenizer_path, quantize=scheme_name)
    from_disk = build(quantized[scheme_name], tokenizer_path)
    assert json.loads((quantized[scheme_name] / "params.json").read_text())["quantization"] == {"scheme": scheme_name}
    layers = dict(from_disk.model.named_modules())
    assert layers["layers.0.feed_forward.w2"].scheme == quantization("int8")
    assert layers["layers.0.attention.wo"].scheme == SCHEMES[scheme_name]
    assert torch.equal(logits_of(on_load), logits_of(from_disk)), "the same quantized values, the same kernels"


def test_a_block_checkpoint_reshards_and_loads_to_the_same_logits(quantized, tokenizer_path, tmp_path):
    reshard(quantized["q4_0"], tmp_path / "two", model_parallel_size=2)
    assert json.loads((tmp_path / "two" / "params.json").read_text())["quantization"] == {"scheme": "q4_0"}
    assert len(list((tmp_path / "two").glob("consolidated.*.pth"))) == 2
    torch.testing.assert_close(
        logits_of(build(tmp_path / "two", tokenizer_path)), logits_of(build(quantized["q4_0"], tokenizer_path))
    )


def test_q8_0_stories260k_writes_the_float_text_for_the_first_20_tokens(stories_dir):
    texts = {}
    for scheme in (None, "q8_0"):
        generator = Llama.build(stories_dir, stories_dir / "tokenizer.model", 64, 1, quantize=scheme, dtype="float32")
        tokens, _ = generator.generate([generator.tokenizer.encode("Once upon a time", bos=True, eos=False)],
                                       max_gen_len=20, temperature=0)  # fmt: skip
        texts[scheme] = tokens[0]
    assert len(texts[None]) == 20 and texts["q8_0"] == texts[None]


# ---- mistakes ------------------------------------------------------------------------------------------------


def test_a_width_blocks_cannot_cover_is_refused_where_the_scheme_must_hold_it(tmp_path, tokenizer_path):
    with pytest.raises(ValueError, match="q8_0 quantizes blocks of 32 input channels, and 48 is not a multiple of 32"):
        quantize_weight(torch.randn(4, 48), Q8_0)
    # dim 96: wo's input is three blocks, which two ranks cannot split.
    args = small_args(dim=96, n_heads=4, n_kv_heads=2, multiple_of=32)
    folder = write_checkpoint(tmp_path / "float", args, random_model(args).state_dict(), tokenizer_path=tokenizer_path)
    quantize(folder, tmp_path / "q8", scheme="q8_0")
    with pytest.raises(ValueError, match=re.escape("wo.weight has 48 input channels on each of 2 ranks, which do not "
                                                   "divide into q8_0's blocks of 32: choose a number of ranks that "
                                                   "splits its 3 blocks evenly")):  # fmt: skip
        reshard(tmp_path / "q8", tmp_path / "two", model_parallel_size=2)
    assert not (tmp_path / "two").exists()


def test_a_block_checkpoint_loaded_with_another_scheme_is_refused(quantized, tokenizer_path, run_main, tmp_path):
    with pytest.raises(ValueError, match=r"is already quantized \(q8_0\): load it without quantize="):
        build(quantized["q8_0"], tokenizer_path, quantize="int8")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n")
    status, _, err = run_main("perplexity", "--ckpt-dir", quantized["q4_0"], "--text-path", text, "--quantize", "q8_0")
    assert status == 1 and err.startswith("error: ") and "is already quantized (q4_0)" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "options, message",
    [
        (
            dict(bits=8, scheme="q8_0"),
            "give the bits (8 or 4) or the scheme (int8, int4, q8_0 or q4_0): one of the two",
        ),
        (dict(), "give the bits (8 or 4) or the scheme"),
        (dict(scheme="q5_1"), "quantize must be 'int8' or 'int4' (8 or 4 bits), or 'q8_0' or 'q4_0'"),
        (dict(scheme="q4_0", group_size=64), "q4_0 has one scale per block of 32: group_size applies to int4"),
    ],
)
def test_the_quantize_command_names_what_is_wrong(checkpoint, tmp_path, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        quantize(checkpoint, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_the_quantize_command_writes_a_block_checkpoint_once(checkpoint, tmp_path, run_main):
    status, out, err = run_main("quantize", checkpoint, tmp_path / "q8", "--scheme", "q8_0")
    assert status == 0 and out.startswith(f"wrote {tmp_path / 'q8'}"), err
    assert "keep int8's weight-only product: feed_forward.w2" in err
    status, _, err = run_main("quantize", checkpoint, tmp_path / "q8", "--scheme", "q4_0")
    assert status == 1 and "--overwrite" in err
    assert json.loads((tmp_path / "q8" / "params.json").read_text())["quantization"] == {"scheme": "q8_0"}


def test_a_params_json_naming_an_unknown_block_scheme_is_refused(quantized, tokenizer_path, tmp_path):
    import shutil

    folder = shutil.copytree(quantized["q8_0"], tmp_path / "bad")
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps(params | {"quantization": {"scheme": "q5_1"}}))
    with pytest.raises(ValueError, match=r"quantization must be .*\{'scheme': 'q8_0'\} or \{'scheme': 'q4_0'\}"):
        build(folder, tokenizer_path)
