"""What the benchmarks time: greedy decoding through this library's generator and through Hugging Face
transformers' `generate` on the same weights, each as a function of (prompts, new tokens) -> new tokens."""

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import Llama, ModelArgs, SamplingParams  # noqa: E402
from llama.cuda_graphs import DecodeGraphs  # noqa: E402
from llama.decoding import completions  # noqa: E402
from llama.hf import hf_config, meta_to_hf_state_dict  # noqa: E402

Generate = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, new tokens) -> new tokens of each


def hf_model(args: ModelArgs, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
    """transformers' LlamaForCausalLM holding the weights of `state` (our names and rotary layout), converted
    as `llama to-hf` converts them."""
    import transformers

    config = hf_config(args, dtype, 1, [2], args.max_seq_len, tied=False)
    config = transformers.LlamaConfig(**{key: value for key, value in config.items() if key != "torch_dtype"})
    hf_state = meta_to_hf_state_dict(state, args)
    # Initialised where it runs and in its dtype: a 7B model's random init is slow on the CPU, and in float32
    # first it would need twice the GPU memory.
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
    model.load_state_dict(hf_state, strict=True)
    model.generation_config.eos_token_id = None  # EOS ignored, as on our side: both do every step
    model.generation_config.pad_token_id = 0
    return model.eval()


def our_generate(llama: Llama) -> Generate:
    """Greedy decoding through this library's generator, EOS ignored: every run decodes all its tokens."""

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0, max_gen_len=new_tokens, ignore_eos=True)
        return [result.tokens for result in completions(llama.generate_steps(prompts, params))]

    return generate


def their_generate(model, device: torch.device) -> Generate:
    """Greedy decoding through transformers' `generate`, with its KV cache, EOS ignored."""

    @torch.inference_mode()
    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        input_ids = torch.tensor(prompts, device=device)
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            use_cache=True,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
        return output[:, input_ids.shape[1] :].tolist()

    return generate


def implementations(ours: Llama, theirs, device: torch.device) -> dict[str, Generate]:
    """What is timed: ours; on CUDA also the same model decoding without CUDA graphs (what the graphs buy,
    measured in the same run); and Hugging Face's, unless left out (`theirs` None)."""
    timed_ones = {"ours": our_generate(ours)}
    if isinstance(ours.decode_step, DecodeGraphs):
        timed_ones["ours_eager"] = our_generate(Llama(ours.model, ours.tokenizer, cuda_graphs=False))
    if theirs is not None:
        timed_ones["hf"] = their_generate(theirs, device)
    return timed_ones
