"""Meta's checkpoint layout: a folder with `params.json`, `tokenizer.model` and one `consolidated.NN.pth` (or
`consolidated.NN.safetensors`) shard per model-parallel rank.

Reading it on any number of ranks (each rank takes its slices from the shards that hold them), rewriting it for
another number of ranks (`reshard`), and folding the RMSNorm weights into the layers they feed (`fold_norms`).
Every way this can go wrong is reported with the file and the fix. The command line, which also converts to and
from Hugging Face's layout (`llama.hf`):

    python -m llama.checkpoint reshard SRC DST --model_parallel_size N [--overwrite]
    python -m llama.checkpoint fold_norms SRC DST [--overwrite]
    python -m llama.checkpoint to_hf SRC DST [--tokenizer_path T] [--max_position_embeddings 4096]
                                             [--max_file_bytes 5000000000] [--overwrite]
    python -m llama.checkpoint from_hf SRC DST [--overwrite]
"""

import contextlib
import ctypes
import dataclasses
import json
import mmap
import re
import secrets
import shlex
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import safetensors.torch
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama.model import ModelArgs, Transformer

PathLike = Union[str, Path]

# Keys Meta's checkpoints may hold that are not weights of the model: the 7B shards carry the rotary
# table (`rope.freqs`), which this model computes itself.
IGNORED_KEYS = frozenset({"rope.freqs"})

_SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.(pth|safetensors)")

# Files of a checkpoint folder that are not shards and go unchanged into every rewritten copy.
_COMPANION_FILES = ("params.json", "tokenizer.model")

# madvise(2), to let go of file pages already copied (see ShardedCheckpoint.release); None where unavailable.
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _MADV_DONTNEED = mmap.MADV_DONTNEED  # Linux
except (AttributeError, OSError, TypeError):
    _madvise = None

# The small model that ships inside the package (trained by `python -m llama.train` on Shakespeare's plays).
DEMO_DIR = Path(__file__).resolve().parent / "demo"


def demo_checkpoint() -> tuple[Path, Path]:
    """The bundled demo model, a few million parameters trained on Shakespeare's plays: (ckpt_dir,
    tokenizer_path), ready for `Llama.build`. Raises FileNotFoundError if the package was installed without
    its data files."""
    tokenizer_path = DEMO_DIR / "tokenizer.model"
    for path in (DEMO_DIR / "params.json", DEMO_DIR / "consolidated.00.pth", tokenizer_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"the bundled demo model file {str(path)!r} is missing: reinstall the package with `pip install .`"
            )
    return DEMO_DIR, tokenizer_path


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
    """The `consolidated.NN.pth` (or `consolidated.NN.safetensors`) files of `ckpt_dir` in rank order.

    Raises FileNotFoundError if there are none, ValueError if the numbering has a gap (naming the missing
    shard) or if the folder mixes the two formats.
    """
    ckpt_dir = Path(ckpt_dir)
    numbered: dict[int, Path] = {}
    suffixes = set()
    for path in ckpt_dir.glob("consolidated.*"):
        match = _SHARD_PATTERN.fullmatch(path.name)
        if match:
            numbered[int(match.group(1))] = path
            suffixes.add(path.suffix)
    if not numbered:
        raise FileNotFoundError(
            f"no consolidated.NN.pth or consolidated.NN.safetensors shards in {str(ckpt_dir)!r}: "
            "is this a Meta-layout checkpoint folder?"
        )
    if len(suffixes) > 1:
        raise ValueError(
            f"{str(ckpt_dir)!r} mixes consolidated.NN.pth and consolidated.NN.safetensors shards: "
            "keep one format (move the other files away)"
        )
    (suffix,) = suffixes
    missing = [number for number in range(max(numbered) + 1) if number not in numbered]
    if missing:
        names = ", ".join(f"consolidated.{number:02d}{suffix}" for number in missing)
        raise ValueError(
            f"{str(ckpt_dir)!r} has shards up to consolidated.{max(numbered):02d}{suffix} but is missing {names}"
        )
    return [numbered[number] for number in sorted(numbered)]


def load_shard(path: PathLike) -> dict[str, torch.Tensor]:
    """The tensors of one `.pth` or `.safetensors` shard, memory-mapped where the file allows it (nothing is
    read until used), never unpickling code. Raises ValueError naming the file if it is truncated, corrupt or
    not a state dict."""
    return _read_shard(Path(path))[0]


def _read_shard(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors, and whether they are memory-mapped from the file."""
    mapped = True
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path, device="cpu")  # memory-mapped; the format holds no code
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
                mapped = False
    except Exception as error:  # torch reports damage as RuntimeError, EOFError, pickle or zipfile errors
        if "Weights only load failed" in str(error):
            problem = "it holds Python objects other than tensors, and loading them could run code"
        else:
            problem = "it is truncated or corrupt"
        raise ValueError(f"cannot read checkpoint shard {str(path)!r}: {problem} ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"checkpoint shard {str(path)!r} does not hold a dict of tensors")
    return state, mapped


def split_dim(name: str) -> Optional[int]:
    """The dimension along which Meta's model-parallel shards split tensor `name`: 0 for the column-parallel
    layers (each rank holds some output rows: wq, wk, wv, w1, w3, output), 1 for the row-parallel layers and the
    embedding (each rank holds some input columns: wo, w2, tok_embeddings), None for tensors every rank holds
    whole (the norms, rope.freqs)."""
    if name == "output.weight" or name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")):
        return 0
    if name == "tok_embeddings.weight" or name.endswith(("wo.weight", "w2.weight")):
        return 1
    return None


class ShardedCheckpoint:
    """The shards of a Meta-layout folder, memory-mapped, seen as one unsplit state dict: `shapes` holds every
    tensor's unsplit shape, and `slice(name, rank, world_size)` gives any rank's part for any number of ranks,
    reading only the shards that hold it. Loading (on the fly) and `reshard` (to files) both use it."""

    def __init__(self, ckpt_dir: PathLike):
        """Open the shards of `ckpt_dir`. Raises as `find_shards` and `load_shard` do, and ValueError naming
        the tensor and the files when the shards disagree: a tensor only some shards hold, a whole tensor whose
        shape differs between shards, or a split tensor whose other dimensions differ."""
        self.folder = Path(ckpt_dir)
        self.paths = find_shards(self.folder)
        self.shards, self.mapped = zip(*(_read_shard(path) for path in self.paths))
        self.shapes: dict[str, torch.Size] = {}
        self._starts: dict[str, list[int]] = {}  # where each shard's piece begins along the split dimension
        first = self.paths[0].name
        for path, shard in zip(self.paths, self.shards):
            for name in sorted(set(self.shards[0]) ^ set(shard)):
                holder, lacking = (first, path.name) if name in self.shards[0] else (path.name, first)
                raise ValueError(
                    f"{str(self.folder)!r}: tensor {name} is in {holder} but not in {lacking}: "
                    "the shards come from different checkpoints"
                )
        for name in self.shards[0]:
            dim = split_dim(name)
            shapes = [shard[name].shape for shard in self.shards]
            kept = [shape if dim is None else shape[:dim] + shape[dim + 1 :] for shape in shapes]
            for path, shape, other in zip(self.paths, shapes, kept):
                if other != kept[0]:
                    what = "is held whole by every shard" if dim is None else f"is split along dimension {dim}"
                    raise ValueError(
                        f"{str(self.folder)!r}: tensor {name} {what}, but has shape {tuple(shapes[0])} in {first} "
                        f"and {tuple(shape)} in {path.name}: the shards come from different checkpoints"
                    )
            if dim is None:
                self.shapes[name] = shapes[0]
                continue
            sizes = [shape[dim] for shape in shapes]
            self._starts[name] = [sum(sizes[:number]) for number in range(len(sizes))]
            self.shapes[name] = shapes[0][:dim] + (sum(sizes),) + shapes[0][dim + 1 :]

    def pieces(self, name: str, rank: int, world_size: int) -> list[tuple[int, torch.Tensor]]:
        """Rank `rank`'s part of tensor `name` when the model is split over `world_size` ranks, as the views of
        the memory-mapped shards that hold it, in order: (shard number, view) pairs, to be joined along
        `split_dim(name)`. A whole tensor is one piece from shard 0. Raises ValueError if the split dimension
        does not divide by world_size."""
        dim = split_dim(name)
        if name not in self._starts:
            return [(0, self.shards[0][name])]
        total = self.shapes[name][dim]
        if total % world_size:
            raise ValueError(
                f"tensor {name} of {str(self.folder)!r} has {total} along dimension {dim}, "
                f"which does not divide into {world_size} equal parts: choose a model-parallel size that divides it"
            )
        start, stop = rank * total // world_size, (rank + 1) * total // world_size
        pieces = []
        for number, (shard, shard_start) in enumerate(zip(self.shards, self._starts[name])):
            tensor = shard[name]
            low, high = max(start, shard_start), min(stop, shard_start + tensor.shape[dim])
            if low < high:
                pieces.append((number, tensor.narrow(dim, low - shard_start, high - low)))
        return pieces

    def slice(self, name: str, rank: int, world_size: int) -> torch.Tensor:
        """Rank `rank`'s part of tensor `name` for `world_size` ranks as one tensor (see `pieces`): a view of
        the memory-mapped shard when one shard holds it all, else the pieces joined."""
        views = [view for _, view in self.pieces(name, rank, world_size)]
        return views[0] if len(views) == 1 else torch.cat(views, split_dim(name))

    def release(self, name: str, shard_number: int) -> None:
        """Drop the file pages under tensor `name` of a memory-mapped shard from this process's resident
        memory (Linux; elsewhere nothing happens). Call it once the tensor has been copied: touched pages of a
        mapped file count as the process's memory until unmapped, so without this, copying a checkpoint into
        parameters would hold the weights twice at the end of loading. The pages are clean (never written), so
        reading the tensor again would simply fetch them from the file again."""
        if not self.mapped[shard_number] or _madvise is None:
            return
        storage = self.shards[shard_number][name].untyped_storage()
        first = -(-storage.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE  # only whole pages inside the tensor
        last = (storage.data_ptr() + storage.nbytes()) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            _madvise(first, last - first, _MADV_DONTNEED)


def check_state_dict(shapes: dict[str, torch.Size], expected: dict[str, torch.Size], source: str) -> None:
    """Raise ValueError naming every missing or unexpected key of `shapes` (tensor name -> shape), or the first
    tensor whose shape differs from `expected` (with both shapes). Keys in IGNORED_KEYS are allowed."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - IGNORED_KEYS)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected {', '.join(unexpected)}")
        raise ValueError(f"{source} does not match the model built from params.json: {'; '.join(problems)}")
    for name, shape in expected.items():
        if shapes[name] != shape:
            hint = ""
            if name in ("tok_embeddings.weight", "output.weight") and shapes[name][0] != shape[0]:
                hint = " (the vocabulary size differs: use the tokenizer.model that came with this checkpoint)"
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(shapes[name])} but the model expects {tuple(shape)}{hint}"
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


def _unsplit_shape(name: str, local_shape: torch.Size, world_size: int) -> torch.Size:
    dim = split_dim(name)
    if dim is None:
        return local_shape
    return local_shape[:dim] + (local_shape[dim] * world_size,) + local_shape[dim + 1 :]


def reshard_command(ckpt_dir: PathLike, model_parallel_size: int) -> str:
    """The command line that writes a copy of `ckpt_dir` with `model_parallel_size` shards beside it."""
    folder = Path(ckpt_dir)
    destination = folder.with_name(f"{folder.name}-mp{model_parallel_size}")
    return (
        f"python -m llama.checkpoint reshard {shlex.quote(str(folder))} {shlex.quote(str(destination))} "
        f"--model_parallel_size {model_parallel_size}"
    )


def load_model(
    ckpt_dir: PathLike, args: ModelArgs, rank: int, device: torch.device, dtype: torch.dtype, progress: bool = False
) -> Transformer:
    """The Transformer for model-parallel `rank`, with its slice of the checkpoint's weights, on `device` in
    `dtype`, whatever the number of shards: each rank reads only the slices it needs from the shards that hold
    them, and rank 0 warns once when the shard count differs from the model-parallel size (with the `reshard`
    command that makes a matching copy).

    The model is built on the meta device and its parameters allocated once, uninitialised; each slice is
    copied into place from the memory-mapped shards, whose pages are released as soon as they are copied, so
    host memory holds the weights about once while loading. (The parameters are copies, not the mapped file
    itself: a model that used the file's pages would crash with a bus error if the file were rewritten in
    place.) With progress=True, a line on standard error shows the shard being read and the share of tensors
    copied. Raises ValueError for a corrupt shard, shards that disagree, or missing, unexpected or mis-shaped
    tensors.
    """
    with meta_device():
        model = Transformer(args)
    world_size = fs_init.get_model_parallel_world_size()
    checkpoint = ShardedCheckpoint(ckpt_dir)
    expected = {name: _unsplit_shape(name, tensor.shape, world_size) for name, tensor in model.state_dict().items()}
    check_state_dict(checkpoint.shapes, expected, f"checkpoint {str(ckpt_dir)!r}")
    if len(checkpoint.paths) != world_size and rank == 0:
        warnings.warn(
            f"{str(ckpt_dir)!r} has {len(checkpoint.paths)} shard(s) and this run has model-parallel size "
            f"{world_size}: resharded on the fly (each process read its slices from the shards that hold them). "
            f"To load without reslicing, make a matching copy once: {reshard_command(ckpt_dir, world_size)}",
            stacklevel=3,
        )
    model = model.to(dtype=dtype).to_empty(device=device)
    parameters = list(model.named_parameters())
    with torch.no_grad():
        for index, (name, parameter) in enumerate(parameters, 1):
            dim, start = split_dim(name) or 0, 0
            # Each piece goes straight to its place in the parameter (no joined copy in between), and its file
            # pages are let go as soon as it is copied.
            for number, view in checkpoint.pieces(name, rank, world_size):
                parameter.narrow(dim, start, view.shape[dim]).copy_(view)
                start += view.shape[dim]
                checkpoint.release(name, number)
                if progress:
                    shard = checkpoint.paths[number].name
                    print(f"\rloading {shard}: {index}/{len(parameters)} tensors", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    for buffer in model.buffers():  # the key/value caches
        buffer.zero_()
    return model


@contextlib.contextmanager
def staged_folder(destination: PathLike, overwrite: bool = False, source: Optional[PathLike] = None) -> Iterator[Path]:
    """Write a folder all at once: yields a new temporary folder beside `destination` to fill; when the block
    ends without error the temporary folder is renamed to `destination`, and if it raises (or is interrupted)
    the temporary folder is removed and `destination` is left as it was. An existing `destination` is replaced
    only with overwrite=True, and only after the new folder is complete. Raises FileExistsError if it exists
    without overwrite, ValueError if it is `source`, inside it or around it (a conversion never changes its
    source).
    """
    destination = Path(destination)
    if source is not None:
        target, origin = destination.resolve(), Path(source).resolve()
        if target == origin or origin in target.parents or target in origin.parents:
            raise ValueError(
                f"destination {str(destination)!r} is the source folder, inside it or around it: choose another one"
            )
    if destination.exists() and not overwrite:
        raise FileExistsError(
            f"{str(destination)!r} already exists: choose another destination, or pass --overwrite to replace it"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f"{destination.name}.tmp-{secrets.token_hex(4)}")
    staging.mkdir()  # not tempfile.mkdtemp: its folders are private to the user, and this one is the result
    try:
        yield staging
        if destination.exists():
            previous = destination.with_name(f"{destination.name}.old-{secrets.token_hex(4)}")
            destination.rename(previous)
            try:
                staging.rename(destination)
            except BaseException:
                previous.rename(destination)
                raise
            shutil.rmtree(previous)
        else:
            staging.rename(destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def save_shard(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write one shard, as safetensors or as a torch zip file by the suffix of `path`. A tensor that is a view
    of a larger one is copied first (torch.save would write the whole storage, and safetensors refuses shared
    memory); the others, memory-mapped ones included, are written as they are, without a copy in memory."""
    state = {
        name: tensor if _owns_its_storage(tensor) else tensor.clone(memory_format=torch.contiguous_format)
        for name, tensor in state.items()
    }
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)


def _owns_its_storage(tensor: torch.Tensor) -> bool:
    return (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )


def _copy_companions(source: Path, destination: Path) -> None:
    for name in _COMPANION_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)


def reshard(src: PathLike, dst: PathLike, model_parallel_size: int, overwrite: bool = False) -> None:
    """Write the Meta-layout checkpoint `src` (any number of shards) to the new folder `dst` with
    `model_parallel_size` shards, one output shard at a time from the memory-mapped source shards, so that only
    one output shard is in memory. params.json and tokenizer.model are copied unchanged, and the shards keep
    their format (.pth or .safetensors). `dst` appears only when complete (see `staged_folder`); `src` is never
    changed. Raises ValueError for a size that does not divide the heads, key/value heads, FFN
    width, dim or vocabulary (naming which), and as `ShardedCheckpoint` and `staged_folder` do.
    """
    if isinstance(model_parallel_size, bool) or not isinstance(model_parallel_size, int) or model_parallel_size < 1:
        raise ValueError(f"--model_parallel_size must be a positive integer, got {model_parallel_size!r}")
    src = Path(src)
    args = read_model_args(src)
    checkpoint = ShardedCheckpoint(src)
    if args.vocab_size == -1 and "tok_embeddings.weight" in checkpoint.shapes:
        args.vocab_size = checkpoint.shapes["tok_embeddings.weight"][0]
    args.validate(model_parallel_size)
    suffix = checkpoint.paths[0].suffix
    with staged_folder(dst, overwrite, source=src) as staging:
        for rank in range(model_parallel_size):
            shard = {name: checkpoint.slice(name, rank, model_parallel_size) for name in checkpoint.shapes}
            save_shard(shard, staging / f"consolidated.{rank:02d}{suffix}")
            del shard
            for name in checkpoint.shapes:  # the next output shard reads its pages again, from the page cache
                for number in range(len(checkpoint.paths)):
                    checkpoint.release(name, number)
        _copy_companions(src, staging)


def fold_norm_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict (whole or one Meta shard) with every RMSNorm weight multiplied into the input columns of
    the linear layers that read the norm's output, and the norm weights set to 1: attention_norm into wq, wk,
    wv; ffn_norm into w1, w3; the final norm into output. The model computes the same function (RMSNorm's weight
    scales channel j of its output, which every following layer reads through its column j). Products are taken
    in float32 and stored in each tensor's dtype. Raises ValueError if a norm or a layer it feeds is missing."""
    folded = dict(state)
    feeds = {"norm.weight": ["output.weight"]}
    for name in state:
        if name.endswith(".attention_norm.weight"):
            prefix = name.removesuffix("attention_norm.weight")
            feeds[name] = [f"{prefix}attention.{linear}.weight" for linear in ("wq", "wk", "wv")]
        elif name.endswith(".ffn_norm.weight"):
            prefix = name.removesuffix("ffn_norm.weight")
            feeds[name] = [f"{prefix}feed_forward.{linear}.weight" for linear in ("w1", "w3")]
    for norm, linears in feeds.items():
        missing = [name for name in [norm, *linears] if name not in state]
        if missing:
            raise ValueError(f"cannot fold {norm}: the checkpoint has no {', '.join(missing)}")
        scale = state[norm].float()  # (dim,)
        for linear in linears:
            weight = state[linear]  # (out_features, dim): column j reads channel j of the norm's output
            folded[linear] = (weight.float() * scale).to(weight.dtype)
        folded[norm] = torch.ones_like(state[norm])
    return folded


def fold_norms(src: PathLike, dst: PathLike, overwrite: bool = False) -> None:
    """Write the Meta-layout checkpoint `src` to the new folder `dst` with its RMSNorm weights folded into the
    linear layers (see `fold_norm_weights`): same shard count and format, params.json and tokenizer.model
    copied. For inference the result gives the same logits (up to rounding). `dst` appears only when complete;
    `src` is never changed. Raises as `ShardedCheckpoint` and `staged_folder` do."""
    src = Path(src)
    checkpoint = ShardedCheckpoint(src)
    with staged_folder(dst, overwrite, source=src) as staging:
        for path, shard in zip(checkpoint.paths, checkpoint.shards):
            folded = fold_norm_weights(shard)
            save_shard(folded, staging / path.name)
            del folded
        _copy_companions(src, staging)


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


def main() -> None:
    """`python -m llama.checkpoint COMMAND ...`: reshard, fold_norms, to_hf, from_hf. A bad argument ends the
    program with its message instead of a traceback."""
    import fire

    from llama import hf

    commands = {"reshard": reshard, "fold_norms": fold_norms, "to_hf": hf.to_hf, "from_hf": hf.from_hf}
    try:
        fire.Fire(commands)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
