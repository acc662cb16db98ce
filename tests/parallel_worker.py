"""Run under torchrun by test_model_parallel.py and test_quantize.py: build from a checkpoint folder (quantized
as it loads if a fourth argument names a scheme), and on rank 0 save the logits of a fixed batch and the greedy
tokens of a few prompts to OUT."""

import sys

import torch

from llama import Llama
from llama.distributed import is_main_process

ckpt_dir, tokenizer_path, out_path = sys.argv[1:4]
quantize = sys.argv[4] if len(sys.argv) > 4 else None
generator = Llama.build(
    ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32", quantize=quantize
)
tokens = torch.randint(0, generator.model.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = generator.model(tokens, 0)
greedy, _ = generator.generate([[1, 5, 6, 7], [1, 9]], max_gen_len=16, temperature=0)
sampled, _ = generator.generate([[1, 5, 6, 7], [1, 9]], max_gen_len=16, temperature=1.0, top_p=0.9)
if is_main_process():
    torch.save(
        {"logits": logits, "greedy": greedy, "sampled": sampled, "world_size": torch.distributed.get_world_size()},
        out_path,
    )
