"""Claims about the GPU path: the same results on CUDA as on the CPU, CUDA-graph decoding equal to eager
decoding, loading that holds one copy of the weights on the GPU, and torchrun with NCCL. Skipped on machines
without a CUDA GPU (CI has none); run on one with `python -m pytest tests/test_cuda.py`."""

import pytest
import torch

from helpers import random_model, run_python, run_torchrun, small_args, write_checkpoint
from llama import Llama, demo_checkpoint
from llama.cuda_graphs import DecodeGraphs
from llama.decoding import EagerStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOLERANCE = dict(rtol=1e-4, atol=1e-4)  # float32 on two devices: different kernels, different summation orders


@pytest.fixture(autouse=True)
def exact_float32_matmul():
    """TF32 (10-bit mantissa) products would differ from the CPU's far beyond float32 rounding."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50], [1, 60, 61, 62, 63]]


def test_model_on_the_gpu_gives_the_cpu_logits():
    args = small_args()
    model = random_model(args, seed=21)
    tokens = torch.randint(0, args.vocab_size, (3, 20))
    with torch.no_grad():
        on_cpu = model(tokens[:, :12], 0)
        on_cpu_step = model(tokens[:, 12:13], 12)
        model.cuda()
        on_gpu = model(tokens[:, :12].cuda(), 0)
        on_gpu_step = model(tokens[:, 12:13].cuda(), 12)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, **TOLERANCE)
    torch.testing.assert_close(on_gpu_step.cpu(), on_cpu_step, **TOLERANCE)


def units_in_the_last_place(value: torch.Tensor) -> torch.Tensor:
    """The spacing of `value`'s dtype at each element (its unit in the last place), as float32."""
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[value.dtype]
    exponent = torch.floor(torch.log2(value.float().abs().clamp_min(torch.finfo(value.dtype).tiny)))
    return torch.exp2(exponent - mantissa_bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_kernel_on_the_gpu_equals_meta_formula(dtype):
    """The fused GPU kernel normalises in float32 and rounds once, as the written-out formula does: every element
    within one unit in the last place of `dtype` (the kernels may take the reciprocal square root differently,
    which can move a rounding by one step, not more)."""
    from llama.model import RMSNorm

    norm = RMSNorm(4096, eps=1e-5).to(dtype).cuda()
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = (torch.randn(4, 7, 4096, device="cuda") * 3).to(dtype)
    with torch.no_grad():
        expected = norm._norm(x.float()).type_as(x) * norm.weight
        difference = (norm(x).float() - expected.float()).abs()
    ulps = difference / units_in_the_last_place(expected)
    assert ulps.max() <= 1, f"{int((ulps > 1).sum())} elements differ by more than one ulp (at most {ulps.max():.1f})"


def test_graph_decoding_equals_eager_decoding_across_windows_and_batch_sizes(tokenizer):
    """300 new tokens cross from the 256-position window into the 512 one; batches of 3 and 1 use their own
    graphs; greedy tokens are equal and logprobs agree to float32 rounding."""
    model = random_model(small_args(max_seq_len=600, max_batch_size=3), seed=22).cuda()
    graphs = Llama(model, tokenizer, cuda_graphs=True)
    eager = Llama(model, tokenizer, cuda_graphs=False)
    assert isinstance(graphs.decode_step, DecodeGraphs) and isinstance(eager.decode_step, EagerStep)
    for prompts in (PROMPTS, PROMPTS[:1]):
        fast, fast_logprobs = graphs.generate(prompts, max_gen_len=300, temperature=0, logprobs=True)
        slow, slow_logprobs = eager.generate(prompts, max_gen_len=300, temperature=0, logprobs=True)
        assert fast == slow
        for first, second in zip(fast_logprobs, slow_logprobs):
            torch.testing.assert_close(torch.tensor(first), torch.tensor(second), **TOLERANCE)
    assert {key for key in graphs.decode_step.graphs} >= {(3, 256), (3, 512), (1, 256), (1, 512)}
    assert max(len(row) for row in fast) > 256  # the 512 window was really used


def test_graph_decoding_samples_the_tokens_eager_decoding_samples(tokenizer):
    model = random_model(small_args(max_seq_len=128, max_batch_size=3), seed=23).cuda()
    fast = Llama(model, tokenizer, seed=5, cuda_graphs=True).generate(PROMPTS, 60, temperature=0.9, top_p=0.95)
    slow = Llama(model, tokenizer, seed=5, cuda_graphs=False).generate(PROMPTS, 60, temperature=0.9, top_p=0.95)
    assert fast == slow


def test_graphs_are_recorded_again_when_the_model_moves(tokenizer):
    """Graphs hold memory addresses: after model.to(bfloat16) the old ones would read freed memory."""
    model = random_model(small_args(max_seq_len=64), seed=24).cuda()
    llama = Llama(model, tokenizer, cuda_graphs=True)
    llama.generate(PROMPTS, max_gen_len=20, temperature=0)
    model.to(torch.bfloat16)
    after, _ = llama.generate(PROMPTS, max_gen_len=20, temperature=0)
    eager, _ = Llama(model, tokenizer, cuda_graphs=False).generate(PROMPTS, max_gen_len=20, temperature=0)
    assert after == eager
    assert all(captured.logits.device.type == "cuda" for captured in llama.decode_step.graphs.values())


def test_cuda_graphs_on_the_cpu_are_refused(tokenizer):
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        Llama(random_model(small_args()), tokenizer, cuda_graphs=True)


def test_build_on_the_gpu_defaults_to_bfloat16_with_graphs_and_gives_the_cpu_text():
    ckpt_dir, tokenizer_path = demo_checkpoint()
    prompts = ["ROMEO:\n", "JULIET:\nO gentle night,"]
    default = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=128, max_batch_size=2, device="cuda")
    assert next(default.model.parameters()).dtype == torch.bfloat16
    assert isinstance(default.decode_step, DecodeGraphs)
    texts = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32")):
        llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=128, max_batch_size=2, device=device, dtype=dtype)
        results = llama.text_completion(prompts, temperature=0, max_gen_len=48)
        texts[device] = [result["generation"] for result in results]
    assert texts["cuda"] == texts["cpu"]
    assert all(len(text) > 40 for text in texts["cuda"])


def test_loading_onto_the_gpu_holds_one_copy_of_the_weights(tmp_path, tokenizer_path):
    """Peak GPU memory while building: the weights and the cache, plus at most one tensor in flight."""
    args = small_args(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=256, max_seq_len=64)
    ckpt_dir = write_checkpoint(tmp_path / "ckpt", args, random_model(args).state_dict())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cuda", dtype="float32")
    peak = torch.cuda.max_memory_allocated() - before
    weights = sum(p.numel() * p.element_size() for p in llama.model.parameters())
    cache = sum(b.numel() * b.element_size() for b in llama.model.buffers())
    largest = max(p.numel() * p.element_size() for p in llama.model.parameters())
    assert weights > 20e6
    assert peak <= weights + cache + largest + 2**20, (peak, weights, cache)


def test_example_under_torchrun_on_the_gpu_prints_what_plain_python_prints():
    """One process with NCCL (the GPU backend) and CUDA graphs: the same text as without torchrun."""
    arguments = ["example_text_completion.py", "--temperature", "0", "--max_gen_len", "32"]
    plain = run_python(arguments)
    launched = run_torchrun(1, arguments)
    assert plain.returncode == 0, plain.stderr
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout == plain.stdout and "ROMEO" in plain.stdout


def test_a_gpu_the_machine_lacks_is_refused_with_the_fix():
    """Under torchrun with more processes than GPUs, rank N asks for cuda:N: a clear error, not a CUDA crash."""
    from llama.distributed import resolve_device

    with pytest.raises(ValueError, match="start at most that many processes"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_on_the_gpu_with_graphs_writes_the_eager_text(tmp_path, tokenizer_path, scheme):
    """Quantized layers on CUDA (PyTorch's kernels where they agree with the plain formula) inside recorded
    graphs decode what eager decoding on the same device decodes, and the layers use a kernel, not the plain
    path."""
    from llama.quantize import QuantizedLinear

    args = small_args(dim=256, n_heads=4, n_kv_heads=2, multiple_of=128)
    folder = write_checkpoint(tmp_path / "model", args, random_model(args, seed=3).state_dict())
    results = {}
    for graphs in (False, True):
        generator = Llama.build(folder, tokenizer_path, max_seq_len=64, max_batch_size=3, device="cuda",
                                dtype="bfloat16", quantize=scheme, cuda_graphs=graphs)  # fmt: skip
        kernels = {layer.kernel for layer in generator.model.modules() if isinstance(layer, QuantizedLinear)}
        assert "dequantize" not in kernels, kernels
        results[graphs], _ = generator.generate(PROMPTS, max_gen_len=24, temperature=0)
    assert results[True] == results[False]
