"""Microbenchmark of one matrix product at batch 1 on the CPU, the `110m` model's shapes: the float32 product,
PyTorch's weight-only int8 and int4 kernels (bfloat16 activations, as a quantized model computes), and the q8_0
and q4_0 block kernels of llama/block_kernels.cpp, each native variant this CPU runs and, with --torch, the
PyTorch block product they fall back to.

    python benchmarks/block_product.py --threads 1 --rounds 7

Two ways to read the weights: "cached" multiplies the same matrix again and again (it stays in the CPU's
caches: the arithmetic's speed), "streaming" cycles through enough copies that every product reads its weights
from memory, as a decoding step does. Each figure is the median over --rounds rounds, the arms taking turns
within each round; with one thread the time is the process's CPU time, which another program's load on the
machine disturbs less than the wall clock; with more threads it is the wall clock.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.block_kernels import runnable_variants  # noqa: E402
from llama.block_quant import Q4_0, Q8_0, product, quantize_blocks  # noqa: E402

SHAPES = ((768, 768), (2048, 768), (768, 2048))  # (out_features, in_features): wq, w1 and w3, w2
STREAMED_BYTES = 64 << 20  # copies of the weights cycled through: more than the caches hold


def arms(out_features: int, in_features: int, copies: int, with_torch: bool) -> dict:
    """{arm: (product of one copy's weights, the copies)} for random weights of the shape."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    int8 = (weight.abs().amax(dim=1) / 127, (weight / (weight.abs().amax(dim=1, keepdim=True) / 127)).round())
    int4 = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32, generator=generator)
    weights = {
        "float32": [weight.clone() for _ in range(copies)],
        "int8": [(int8[1].to(torch.int8), int8[0].bfloat16()) for _ in range(copies)],
        "int4": [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4, 1),
                  torch.rand(in_features // 32, out_features, 2, generator=generator).bfloat16())
                 for _ in range(copies)],
        "q8_0": [quantize_blocks(weight.clone(), Q8_0) for _ in range(copies)],
        "q4_0": [quantize_blocks(weight.clone(), Q4_0) for _ in range(copies)],
    }  # fmt: skip
    x16 = x.bfloat16()
    result = {
        "float32": (lambda w: torch.nn.functional.linear(x, w), weights["float32"]),
        "int8 (PyTorch, bfloat16)": (lambda w: torch.ops.aten._weight_int8pack_mm(x16, *w), weights["int8"]),
        "int4 (PyTorch, bfloat16)": (
            lambda w: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, w[0], 32, w[1]),
            weights["int4"],
        ),
    }
    kernels = [*runnable_variants(), *(["torch"] if with_torch else [])]
    for kernel in kernels:
        for scheme in (Q8_0, Q4_0):
            result[f"{scheme} ({kernel})"] = (
                lambda parts, kernel=kernel, scheme=scheme: product(kernel, x, parts, scheme),
                weights[scheme.name],
            )
    return result


def median_microseconds(arm_list: dict, rounds: int, clock) -> dict:
    """{arm: median microseconds per product}: each round runs every arm once over all of its copies."""
    times = {name: [] for name in arm_list}
    for _ in range(rounds):
        for name, (run, copies) in arm_list.items():
            run(copies[0])  # warm: the first call of a kernel may build or load it
            start = clock()
            for weights in copies:
                run(weights)
            times[name].append((clock() - start) / len(copies) * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="PyTorch's CPU threads")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; each figure is the median")
    parser.add_argument("--torch", action="store_true", help="also the PyTorch block product (slow)")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    clock = time.process_time if options.threads == 1 else time.perf_counter
    print(f"threads={options.threads}; microseconds per product ({'CPU' if options.threads == 1 else 'wall'} time)")
    with torch.inference_mode():
        for number, (out_features, in_features) in enumerate(SHAPES):
            for mode in ("cached", "streaming"):
                copies = 1 if mode == "cached" else max(1, STREAMED_BYTES // (out_features * in_features))
                arm_list = arms(out_features, in_features, copies, options.torch)
                if mode == "cached":  # the same weights 32 times a round
                    arm_list = {name: (run, weights * 32) for name, (run, weights) in arm_list.items()}
                figures = median_microseconds(arm_list, options.rounds, clock)
                if number == 0 and mode == "cached":
                    print("| shape | weights | " + " | ".join(figures) + " |")
                    print("| --- | --- |" + " --- |" * len(figures))
                cells = " | ".join(f"{micro:,.1f}" for micro in figures.values())
                print(f"| {out_features} x {in_features} | {mode} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
