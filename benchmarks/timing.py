"""How the benchmarks time: synchronised wall-clock rounds with the implementations in alternating order, a
memory-bandwidth probe sampled under the same conditions, and probes run in a fresh process."""

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Optional

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (CUDA runs asynchronously); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds that `function()` took, synchronised on both ends, and what it returned."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def probe_gib(shape: Optional[str], device: torch.device) -> float:
    """GiB of float32 for the bandwidth probes: 1 on the CPU, 4 on a GPU (whose product over 1 GiB takes a
    millisecond), far larger than any cache; 1/16 for a random model of the smoke-test shape `tiny`, whose
    figures show only that the run works, and whose 1 GiB of random numbers would take most of its run."""
    if shape == "tiny":
        return 1 / 16
    return 4.0 if device.type == "cuda" else 1.0


class BandwidthProbe:
    """Bytes per second streamed by a float32 matrix-vector product over a matrix of `gib` GiB (see probe_gib),
    read once per product, as decoding reads the weights. Sampled between the timed rounds, so that the floor is
    measured under the same conditions as the figures compared with it."""

    def __init__(self, device: torch.device, gib: float):
        columns = 8192
        self.device = device
        self.matrix = torch.randn(int(gib * 2**30 / 4 / columns), columns, device=device)
        self.vector = torch.randn(columns, device=device)
        torch.mv(self.matrix, self.vector)  # warm-up: page faults, thread pool, library handles
        self.samples: list[float] = []

    def sample(self, count: int = 3) -> None:
        for _ in range(count):
            seconds, _ = timed(lambda: torch.mv(self.matrix, self.vector), self.device)
            self.samples.append(self.matrix.numel() * self.matrix.element_size() / seconds)

    def median(self) -> float:
        return statistics.median(self.samples)


def bandwidth(gib: float = 1.0, count: int = 5) -> dict[str, float]:
    """Bytes per second of a streaming read (a sum over `gib` GiB of float32) and of a float32
    matrix-vector product over as many bytes; medians of `count`."""
    matrix = torch.randn(int(gib * 2**30 / 4 / 8192), 8192)
    vector = torch.randn(8192)
    figures = {}
    for name, work in (("sum", lambda: matrix.sum()), ("matrix-vector product", lambda: torch.mv(matrix, vector))):
        work()
        seconds = []
        for _ in range(count):
            start = time.perf_counter()
            work()
            seconds.append(time.perf_counter() - start)
        figures[name] = matrix.numel() * 4 / statistics.median(seconds)
    return figures


def time_rounds(
    generators: dict[str, Callable],
    work: list[tuple[str, list[list[int]], int]],
    warmup: int,
    repeats: int,
    device: torch.device,
    probe: Optional[BandwidthProbe] = None,
) -> tuple[dict, dict]:
    """Run every job of `work` (name, prompts, new tokens) with every generator, `warmup` untimed rounds then
    `repeats` timed ones, the generators back to back in an order that alternates between rounds; the probe,
    if any, sampled after each timed round. Returns the seconds per generator and job, and the tokens each
    produced in the last round."""
    times = {name: {job: [] for job, _, _ in work} for name in generators}
    tokens = {name: {} for name in generators}
    for round_number in range(warmup + repeats):
        order = list(generators) if round_number % 2 == 0 else list(reversed(generators))
        for job, prompts, new_tokens in work:
            for name in order:
                seconds, out = timed(lambda: generators[name](prompts, new_tokens), device)  # noqa: B023
                if round_number >= warmup:
                    times[name][job].append(seconds)
                tokens[name][job] = out
        if round_number >= warmup and probe is not None:
            probe.sample()
    return times, tokens


def run_probe(command: list[str], what: str) -> dict:
    """Run a probe script (its path and arguments) in a fresh Python process and return the figures it prints as
    its last line of JSON. Raises RuntimeError naming `what`, with the probe's errors."""
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])
