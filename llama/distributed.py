"""Process and device setup: getting a torch.distributed group and fairscale's model-parallel group ready,
whether the program was started by `torchrun --nproc_per_node N` or as a plain `python script.py`, and choosing
the device and dtype to compute in."""

import atexit
import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from llama.values import whole_number

DeviceLike = Union[str, torch.device, None]


def resolve_device(device: DeviceLike = None) -> torch.device:
    """The device this process computes on: `device` if given, else CUDA when available, else the CPU.
    Under torchrun a bare "cuda" means this process's own GPU, cuda:LOCAL_RANK. Raises ValueError for an
    unknown device or CUDA on a machine without it."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} was asked for but torch sees no CUDA GPU: use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{device} was asked for (under torchrun, cuda:LOCAL_RANK) but this machine has "
                f"{torch.cuda.device_count()} CUDA GPU(s): start at most that many processes per machine "
                f"(torchrun --nproc_per_node), or compute on the CPU (device='cpu', --device cpu in the examples)"
            )
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported: use 'cpu' or 'cuda'")
    return device


def _launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _init_process_group(backend: str) -> None:
    """The default process group: the torchrun processes', or a one-process group in memory.

    Creating it makes torch replace sys.excepthook with one that prefixes every line of every later traceback
    with `[rankN]: `, the program's own errors included. Where several processes write to one terminal the
    prefix says which one failed, so it stays; a single process has nothing to tell apart, and a library must
    not change how the program that imports it reports its errors, so there the hook is put back."""
    excepthook = sys.excepthook
    if _launched_by_torchrun():
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() == 1:
        sys.excepthook = excepthook


def setup_model_parallel(model_parallel_size: Optional[int] = None, device: DeviceLike = None) -> torch.device:
    """Make sure a process group and fairscale's model-parallel group exist, and return the device to use.

    Under torchrun the group spans the launched processes (NCCL for CUDA, gloo for the CPU); otherwise a
    one-process group is created in memory, so a plain `python script.py` needs no launcher. Safe to call
    again (a second `Llama.build` in one process reuses the groups). `model_parallel_size` defaults to the
    number of processes and must equal it. Raises ValueError when it does not, or when the groups already
    exist with another size.
    """
    device = resolve_device(device)
    if not dist.is_initialized():
        _init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(shut_down)
    world_size = dist.get_world_size()
    if world_size > 1 and device.type == "cpu" and dist.get_backend() == "nccl":
        raise ValueError("the process group uses NCCL, which cannot run on the CPU: use device='cuda'")

    if model_parallel_size is None:
        model_parallel_size = world_size
    if model_parallel_size != world_size:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} but {world_size} process(es) were started: "
            f"run with `torchrun --nproc_per_node {model_parallel_size}` (or leave model_parallel_size unset)"
        )
    if fs_init.model_parallel_is_initialized():
        existing = fs_init.get_model_parallel_world_size()
        if existing != model_parallel_size:
            raise ValueError(
                f"this process already set up model parallelism of size {existing}; "
                f"a model of size {model_parallel_size} needs a new process"
            )
    else:
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes on rank 0
            fs_init.initialize_model_parallel(model_parallel_size)
    return device


def shut_down() -> None:
    """Destroy the model-parallel and process groups (run at exit when this module made them). Left to the
    interpreter's own shutdown, gloo's threads race it, and a process can die with SIGABRT ("terminate called
    without an active exception") after its work is done, which torchrun reports as a failure."""
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def ensure_model_parallel() -> int:
    """The model-parallel size, setting up groups with the defaults first if nothing has yet."""
    if not fs_init.model_parallel_is_initialized():
        setup_model_parallel()
    return fs_init.get_model_parallel_world_size()


def is_main_process() -> bool:
    """True on the process that should print (rank 0, or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device, quantized: bool = False) -> torch.dtype:
    """The dtype to compute in: `dtype` if given (a torch.dtype or its name), else bfloat16 on GPUs that
    support it, float16 on other GPUs, and on the CPU float32, or bfloat16 for a `quantized` model (PyTorch's
    quantized CPU kernels are fast in bfloat16 only: in float32 they are slower than the plain product).
    Raises ValueError for anything else."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if quantized else torch.float32
    resolved = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return resolved


def physical_cores() -> int:
    """The physical cores this process may run on, the hyper-threads of a core counted once (from Linux's CPU
    topology files); where those cannot be read, the logical CPUs it may run on."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def default_threads() -> int:
    """PyTorch's CPU threads for one process: the physical cores, shared among the processes torchrun starts on
    this machine (a second thread on the same core only competes for its arithmetic units)."""
    return max(1, physical_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@contextlib.contextmanager
def compute_threads(threads: Optional[int] = None) -> Iterator[int]:
    """Run the block with PyTorch's intra-op threads set to `threads` (None: `default_threads()`), and put the
    former number back after it; yields the number set. Raises ValueError for a number below 1."""
    number = default_threads() if threads is None else whole_number(threads, "threads")
    previous = torch.get_num_threads()
    torch.set_num_threads(number)
    try:
        yield number
    finally:
        torch.set_num_threads(previous)
