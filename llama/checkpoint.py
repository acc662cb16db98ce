"""Reading Meta's checkpoint layout: a folder with `params.json` and one `consolidated.NN.pth` shard per
model-parallel rank. Every way this can go wrong is reported with the file and the fix."""

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama.model import ModelArgs, Transformer

PathLike = Union[str, Path]

# Keys Meta's checkpoints may hold that are not weights of the model: the 7B shards carry the rotary
# table (`rope.freqs`), which this model computes itself.
IGNORED_KEYS = frozenset({"rope.freqs"})

_SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")


def read_model_args(ckpt_dir: PathLike, **overrides) -> ModelArgs:
    """ModelArgs from `ckpt_dir/params.json`, with `overrides` (for example max_seq_len) applied on top.

    Keys ModelArgs does not know are skipped with one warning that lists them. Raises FileNotFoundError if
    the folder or params.json is missing, ValueError if params.json is not a JSON object of settings.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(ckpt_dir)!r} does not exist")
    params_path = ckpt_dir / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(
            f"{str(params_path)!r} is missing: a Meta-layout checkpoint folder holds params.json "
            "and consolidated.NN.pth files"
        )
    try:
        params = json.loads(params_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(params_path)!r} is not valid JSON: {error}") from error
    if not isinstance(params, dict):
        raise ValueError(f"{str(params_path)!r} must hold a JSON object of model settings, got {type(params).__name__}")

    known = {field.name for field in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(params) - known)
    if unknown:
        warnings.warn(
            f"{params_path}: ignoring settings this library does not know: {', '.join(unknown)}", stacklevel=2
        )
    settings = {name: value for name, value in params.items() if name in known}
    settings.update(overrides)
    for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
        value = settings.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{str(params_path)!r}: {name} must be a number, got {value!r}")
    return ModelArgs(**settings)


def find_shards(ckpt_dir: PathLike) -> list[Path]:
    """The `consolidated.NN.pth` files of `ckpt_dir` in rank order. Raises FileNotFoundError if there are
    none, ValueError if the numbering has a gap (naming the missing shard)."""
    ckpt_dir = Path(ckpt_dir)
    numbered = {}
    for path in ckpt_dir.glob("consolidated.*.pth"):
        match = _SHARD_PATTERN.fullmatch(path.name)
        if match:
            numbered[int(match.group(1))] = path
    if not numbered:
        raise FileNotFoundError(
            f"no consolidated.NN.pth shards in {str(ckpt_dir)!r}: is this a Meta-layout checkpoint folder?"
        )
    missing = [number for number in range(max(numbered) + 1) if number not in numbered]
    if missing:
        names = ", ".join(f"consolidated.{number:02d}.pth" for number in missing)
        raise ValueError(
            f"{str(ckpt_dir)!r} has shards up to consolidated.{max(numbered):02d}.pth but is missing {names}"
        )
    return [numbered[number] for number in sorted(numbered)]


def load_shard(path: PathLike) -> dict[str, torch.Tensor]:
    """The tensors of one shard, memory-mapped where the file allows it, never unpickling code.
    Raises ValueError naming the file if it is truncated, corrupt or not a state dict."""
    path = Path(path)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(
                path, map_location="cpu", weights_only=True
            )  # the legacy (pre-zip) format cannot be mapped
    except Exception as error:  # torch reports damage as RuntimeError, EOFError, pickle or zipfile errors
        if "Weights only load failed" in str(error):
            problem = "it holds Python objects other than tensors, and loading them could run code"
        else:
            problem = "it is truncated or corrupt"
        raise ValueError(f"cannot read checkpoint shard {str(path)!r}: {problem} ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"checkpoint shard {str(path)!r} does not hold a dict of tensors")
    return state


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str) -> None:
    """Raise ValueError naming every missing or unexpected key of `state`, or the first tensor whose shape
    differs from `expected` (with both shapes). Keys in IGNORED_KEYS are allowed."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - IGNORED_KEYS)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected {', '.join(unexpected)}")
        raise ValueError(f"{source} does not match the model built from params.json: {'; '.join(problems)}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            hint = ""
            if name in ("tok_embeddings.weight", "output.weight") and state[name].shape[0] != shape[0]:
                hint = " (the vocabulary size differs: use the tokenizer.model that came with this checkpoint)"
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(state[name].shape)} "
                f"but the model expects {tuple(shape)}{hint}"
            )


class meta_device(TorchDispatchMode):
    """Inside `with meta_device():` every new tensor lives on the meta device: shapes only, no memory, no
    initialisation. `with torch.device("meta")` is not enough: fairscale's layers create their weights with
    the legacy `torch.Tensor(rows, cols)` constructor, which ignores it, so this intercepts allocations where
    every constructor ends up, in the dispatcher."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


def load_model(ckpt_dir: PathLike, args: ModelArgs, rank: int, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The Transformer for model-parallel `rank`, with its shard's weights, on `device` in `dtype`.

    The model is built on the meta device and allocated once, uninitialised, so the weights exist in memory
    once (plus the memory-mapped file) instead of a random copy and a loaded copy. Raises ValueError for a
    shard count that differs from the model-parallel size, a corrupt shard, or missing, unexpected or
    mis-shaped tensors.
    """
    with meta_device():
        model = Transformer(args)
    model_parallel_size = fs_init.get_model_parallel_world_size()
    shards = find_shards(ckpt_dir)
    if len(shards) != model_parallel_size:
        raise ValueError(
            f"{str(ckpt_dir)!r} has {len(shards)} shard(s) but this run has model-parallel size {model_parallel_size}: "
            f"run with `torchrun --nproc_per_node {len(shards)}`"
        )
    state = load_shard(shards[rank])
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    check_state_dict(state, expected, f"checkpoint shard {str(shards[rank])!r}")
    for name in IGNORED_KEYS:
        state.pop(name, None)
    model = model.to(dtype=dtype).to_empty(device=device)
    # Tensors already in the wanted dtype, for the CPU, become the parameters where they lie (in the
    # memory-mapped file) instead of being copied: the weights then take their size in memory once, not twice,
    # and are read from the file on first use. The file must then stay as it is while the model lives. The
    # parameters allocated by to_empty are never touched, so they never take memory.
    in_place = device.type == "cpu" and all(tensor.dtype == dtype for tensor in state.values())
    model.load_state_dict(state, assign=in_place)
    for buffer in model.buffers():  # the key/value caches
        buffer.zero_()
    return model


def resolve_dtype(dtype: Optional[Union[str, torch.dtype]], device: torch.device) -> torch.dtype:
    """The dtype to compute in: `dtype` if given (a torch.dtype or its name), else bfloat16 on GPUs that
    support it, float16 on other GPUs, float32 on the CPU. Raises ValueError for anything else."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    resolved = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return resolved
