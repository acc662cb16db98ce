"""Run under torchrun by test_model_parallel.py and test_quantize.py: build from a checkpoint folder (quantized
as it loads if a fourth argument names a scheme), and on rank 0 save the logits of a fixed batch and the greedy
and sampled tokens of a few prompts to OUT (helpers.fixed_outputs, which the tests run in one process)."""

import sys

import torch

from helpers import fixed_outputs
from llama.distributed import is_main_process

ckpt_dir, tokenizer_path, out_path = sys.argv[1:4]
outputs = fixed_outputs(ckpt_dir, tokenizer_path, sys.argv[4] if len(sys.argv) > 4 else None)
if is_main_process():
    torch.save(outputs, out_path)
