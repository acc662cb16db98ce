"""The native kernels of the q8_0 and q4_0 block products (llama/block_kernels.cpp), built at first use with
`torch.utils.cpp_extension` and chosen by the instructions the CPU has.

Each variant is compiled for one instruction set, with the flags that name it (never -march=native, which would
tie the build to the CPU that made it), into a build folder of its own under Torch's extension folder
(TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions), named by the variant and the source's digest,
where later processes find it built (compiling one takes about 6 CPU-seconds). A variant runs
only on a CPU that lists every instruction it was compiled with. Where none does, or no compiler is found, the
layers compute with the PyTorch block product of llama/block_quant.py: the same results, more slowly, and
`pip install` never needs a compiler.
"""

import hashlib
import os
import shutil
import sys
import warnings
from functools import cache
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("block_kernels.cpp")

# Variant -> (the CPU features it needs, as /proc/cpuinfo names them; the compiler flags that enable them).
# Best first: `best_variant` takes the first the CPU can run.
VARIANTS = {
    "avx512vnni": (
        ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
        ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
    ),
    "avx2": (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
}
# Variant -> its operators, once built and loaded: a plain lookup, which torch.compile traces as a constant.
BUILT: dict = {}


@cache
def cpu_features() -> frozenset:
    """The instruction-set features of this machine's CPU, as Linux lists them in /proc/cpuinfo; empty where
    that cannot be read (another system): then no native variant runs."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    for line in lines:
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def runnable_variants() -> list[str]:
    """The variants this CPU has every instruction of, best first."""
    return [name for name, (needs, _) in VARIANTS.items() if set(needs) <= cpu_features()]


def operators(variant: str):
    """The operator namespace of `variant` (torch.ops.llama_block_VARIANT_DIGEST: q8_0_linear, q4_0_linear),
    built or loaded from its build folder on first use; None, with a warning, where it cannot be built. Raises
    ValueError for a variant this CPU cannot run."""
    if variant not in runnable_variants():
        raise ValueError(f"this CPU lacks the instructions of the {variant!r} kernels: it runs {runnable_variants()}")
    return _build(variant)


# OpenMP, so that at::parallel_for (a template, compiled into the kernels) splits the rows over Torch's threads: without
# it the pragma is ignored and the kernels run on one thread. Linux only (GCC and Clang there know the flag); the
# process already holds Torch's libgomp.so.1, which the kernels then share, with its thread count.
OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()


@cache
def _build(variant: str):
    # The digest of the source and the flags in the name: an edited source or another flag builds anew, and never
    # replaces another's build.
    flags = ["-O3", "-std=c++17", *OPENMP, *VARIANTS[variant][1]]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    name = f"llama_block_{variant}_{digest}"
    try:
        from torch.utils import cpp_extension

        # Compiled from a copy in the build folder: ninja rebuilds when a source's path changes, and another
        # checkout of the same source (a clone, a copy) should find the build made.
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
        source = folder / SOURCE.name
        if not source.is_file():
            staged = folder / f"{SOURCE.name}.{os.getpid()}"
            shutil.copyfile(SOURCE, staged)
            os.replace(staged, source)
        cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=[*flags, f"-DVARIANT={name}"],
            extra_ldflags=list(OPENMP),
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no ninja, headers missing: the PyTorch product still works
        warnings.warn(
            f"the {variant} q8_0/q4_0 kernels could not be built ({type(error).__name__}: {str(error)[:200]}): "
            "the layers compute the same products in PyTorch, more slowly",
            stacklevel=2,
        )
        return None
    namespace = getattr(torch.ops, name)
    for operator in ("q8_0_linear", "q4_0_linear"):
        # Shapes for torch.compile, which traces the operator without running it.
        torch.library.register_fake(f"{name}::{operator}")(_output_like)
    BUILT[variant] = namespace
    return namespace


def _output_like(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def best_variant() -> Optional[str]:
    """The fastest variant that this CPU runs and that builds, or None."""
    for variant in runnable_variants():
        if operators(variant) is not None:
            return variant
    return None
