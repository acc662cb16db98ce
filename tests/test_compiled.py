"""The compiled decoding step (llama/compiled.py) computes what the eager step computes: the same greedy tokens
and the same logprobs (up to float32 rounding), across a change of cache window, and the prefill stays eager;
also with quantized weights, whose kernels run inside the compiled graph."""

import torch

from helpers import random_model, small_args, write_checkpoint
from llama import Llama
from llama.compiled import CompiledStep

PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58], [1, 60, 61, 62]]


def test_compiled_step_decodes_the_eager_tokens_and_logprobs_across_windows(tokenizer):
    model = random_model(small_args(), seed=11)
    eager = Llama(model, tokenizer)
    compiled = Llama(model, tokenizer, compile=True)
    assert isinstance(compiled.decode_step, CompiledStep)
    # Windows of 32 and 64: the 20-token prompt's steps cross from one to the other. Inductor's Python wrapper
    # here, which compiles faster: the C++ one, the default on the CPU, is the next test's.
    compiled.decode_step = CompiledStep(model, min_window=32, cpp_wrapper=False)
    expected, expected_logprobs = eager.generate(PROMPTS, max_gen_len=30, temperature=0, logprobs=True)
    tokens, logprobs = compiled.generate(PROMPTS, max_gen_len=30, temperature=0, logprobs=True)
    assert tokens == expected
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected_logprobs), rtol=1e-5, atol=1e-5)


def test_compiled_step_of_a_quantized_model_decodes_the_eager_tokens(tokenizer_path, tmp_path):
    """int4, whose kernel reads weights packed in its own layout (int8's reads the checkpoint's layout)."""
    scheme = "int4"
    args = small_args()  # every input width divides into int4's groups of 32; output rows into the kernel's 16
    folder = write_checkpoint(tmp_path / "float", args, random_model(args, seed=12).state_dict())
    eager = Llama.build(folder, tokenizer_path, 64, 2, device="cpu", dtype="float32", quantize=scheme)
    assert {layer.kernel for layer in eager.model.modules() if hasattr(layer, "kernel")} == {"int4-cpu"}
    compiled = Llama(eager.model, eager.tokenizer, compile=True)
    assert compiled.decode_step.cpp_wrapper
    expected, expected_logprobs = eager.generate(PROMPTS, max_gen_len=20, temperature=0, logprobs=True)
    tokens, logprobs = compiled.generate(PROMPTS, max_gen_len=20, temperature=0, logprobs=True)
    assert tokens == expected
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected_logprobs), rtol=1e-4, atol=1e-4)
