"""Run by test_checkpoint.py in a fresh process: load a checkpoint with Llama.build and print, as JSON, the
resident memory just before the build and the peak during the process (both in bytes, Linux)."""

import json
import sys

import torch

from llama import Llama
from llama.layout import meta_device
from llama.tokenizer import Tokenizer


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # the kernel reports KiB
    raise RuntimeError(f"no {field} in /proc/self/status")


ckpt_dir, tokenizer_path = sys.argv[1:3]
# The tokenizer and every import are loaded before the measurement starts. The first use of a torch dispatch
# mode (the meta-device build) imports torch._dynamo, sympy and more: about 70 MB, once per process, not weights.
Tokenizer(tokenizer_path)
with meta_device():
    torch.empty(0)
before = status_bytes("VmRSS")
generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=8, max_batch_size=1, device="cpu")
# The peak resident set of this process (VmHWM). getrusage's ru_maxrss is not used: Linux carries the parent's
# peak over into a child across fork and exec, so under pytest it would report the test process's memory.
peak = status_bytes("VmHWM")
parameter_bytes = sum(p.numel() * p.element_size() for p in generator.model.parameters())
print(json.dumps({"before": before, "peak": peak, "parameter_bytes": parameter_bytes}))
