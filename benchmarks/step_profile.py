"""Where one decoding step's time goes, eager and compiled, for each way of holding the weights: the step's wall
time at batch 1, and from PyTorch's profiler the time inside matrix products, inside attention, inside every
other PyTorch operation, and the rest (the compiled step's fused loops, Python, dispatch).

    python benchmarks/step_profile.py --shape 110m --threads 2

The model is random, in bfloat16 on disk as Meta's are, loaded as decode_side_by_side.py loads it. A step is
`llama.decode_step.forward` of one token after an 8-token prompt, as generation calls it; its wall time is the
median of --rounds rounds of --steps steps without the profiler, and the split comes from one profiled round.
The compiled step is the one `compile=True` gives but with Inductor's Python wrapper: on the CPU the library
uses its C++ wrapper, whose calls into the kernels the profiler does not see (decode_side_by_side.py times it).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_side_by_side import BLOCK_PRODUCTS, MATRIX_PRODUCTS, OURS  # noqa: E402
from random_model import prepare_checkpoint  # noqa: E402

from llama import Llama  # noqa: E402
from llama.compiled import CompiledStep  # noqa: E402

ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")


def timed_steps(llama: Llama, steps: int, start: int) -> float:
    """Seconds per step over `steps` one-token steps from position `start`."""
    token = torch.tensor([[5]])
    begin = time.perf_counter()
    for position in range(start, start + steps):
        llama.decode_step.forward(token, position, True)
    return (time.perf_counter() - begin) / steps


def profile(llama: Llama, options: argparse.Namespace) -> dict[str, float]:
    """Milliseconds per step: the whole step and its parts."""
    with torch.inference_mode():
        llama.decode_step.forward(torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]]), 0, True)
        timed_steps(llama, 4, 8)  # warm up (and compile)
        walls = [timed_steps(llama, options.steps, 12) for _ in range(options.rounds)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiled:
            timed_steps(llama, options.steps, 12)
    parts = {"matrix products": 0.0, "attention": 0.0, "other operations": 0.0}
    for event in profiled.key_averages():
        if event.key in MATRIX_PRODUCTS or event.key.endswith(BLOCK_PRODUCTS):
            part = "matrix products"
        elif event.key.startswith("aten::"):
            part = "attention" if event.key in ATTENTION else "other operations"
        else:  # the profiler's own records, and Inductor's fused loops, which it lists by name
            continue
        parts[part] += event.self_cpu_time_total / 1e3 / options.steps
    step = statistics.median(walls) * 1e3
    return {"step": step, **parts, "the rest": max(0.0, step - sum(parts.values()))}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="110m")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--arms", default=",".join(OURS))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no_compile", action="store_true", help="only the eager step")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    options.dtype, options.ckpt_dir = "bfloat16", None
    print("| arm | step | ms per step | matrix products | attention | other operations | the rest |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        ckpt_dir, tokenizer_path = prepare_checkpoint(options, Path(workdir))
        for name in options.arms.split(","):
            dtype, scheme = OURS[name]
            llama = Llama.build(ckpt_dir, tokenizer_path, 64, 1, device="cpu", dtype=dtype, quantize=scheme)
            for step in ("eager",) if options.no_compile else ("eager", "compiled"):
                if step == "compiled":  # with the Python wrapper: the C++ one calls kernels the profiler misses
                    llama = Llama(llama.model, llama.tokenizer)
                    llama.decode_step = CompiledStep(llama.model, cpp_wrapper=False)
                figures = profile(llama, options)
                print(f"| {name} | {step} | " + " | ".join(f"{value:.1f}" for value in figures.values()) + " |")


if __name__ == "__main__":
    main()
