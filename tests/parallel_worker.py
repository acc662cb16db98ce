"""Run under torchrun by test_model_parallel.py and test_quantize.py: for each job of the JSON list JOBS
([checkpoint folder, tokenizer path, quantization scheme or null], ...), build the model (quantized as it loads
where a scheme is named) and compute the logits of a fixed batch and the greedy and sampled tokens of a few
prompts (helpers.fixed_outputs, which the tests run in one process); rank 0 saves the list of results to OUT.
Several jobs share one launch, since starting torchrun and its processes costs more than the jobs; rank 0 writes
`job N` to standard error before job N, so that a test can tell which job printed what."""

import json
import os
import sys

import torch

from helpers import fixed_outputs

out_path, jobs = sys.argv[1], json.loads(sys.argv[2])
main_process = os.environ["RANK"] == "0"
results = []
for number, (ckpt_dir, tokenizer_path, scheme) in enumerate(jobs):
    if main_process:
        print(f"job {number}", file=sys.stderr, flush=True)
    results.append(fixed_outputs(ckpt_dir, tokenizer_path, scheme))
if main_process:
    torch.save(results, out_path)
