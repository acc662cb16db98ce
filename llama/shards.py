"""Checkpoint shard files: finding a folder's `consolidated.NN` shards, reading them (memory-mapped, never
unpickling code), seeing them together as one unsplit state dict that gives any rank's slice for any number of
ranks, and writing shards."""

import ctypes
import mmap
import shutil
from pathlib import Path
from typing import Optional

import safetensors.torch
import torch

from llama.args import ModelArgs
from llama.layout import (
    IGNORED_KEYS,
    SHARD_PATTERN,
    PathLike,
    check_layer_count,
    check_shapes,
    expected_shapes,
    read_model_args,
    read_quantization,
    split_dim,
)
from llama.quantize import Scheme, is_quantized, quantized_shapes, stored_weight_dtypes

# madvise(2), to let go of file pages already copied (see ShardedCheckpoint.release); None where unavailable.
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _MADV_DONTNEED = mmap.MADV_DONTNEED  # Linux
except (AttributeError, OSError, TypeError):
    _madvise = None


def find_shards(ckpt_dir: PathLike) -> list[Path]:
    """The `consolidated.NN.pth` (or `consolidated.NN.safetensors`) files of `ckpt_dir` in rank order.

    Raises FileNotFoundError if there are none, ValueError if the numbering has a gap (naming the missing
    shard) or if the folder mixes the two formats.
    """
    ckpt_dir = Path(ckpt_dir)
    numbered: dict[int, Path] = {}
    suffixes = set()
    for path in ckpt_dir.glob("consolidated.*"):
        match = SHARD_PATTERN.fullmatch(path.name)
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
    for path in numbered.values():
        if not path.exists():  # a symbolic link to nothing
            raise FileNotFoundError(
                f"shard {str(path)!r} is a symbolic link to {str(path.readlink())!r}, which is missing"
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


class ShardedCheckpoint:
    """The shards of a Meta-layout folder, memory-mapped, seen as one unsplit state dict: `shapes` holds every
    tensor's unsplit shape, and `slice(name, rank, world_size)` gives any rank's part for any number of ranks,
    reading only the shards that hold it. Loading (on the fly) and `reshard` (to files) both use it."""

    def __init__(self, ckpt_dir: PathLike, scheme: Optional[Scheme] = None):
        """Open the shards of `ckpt_dir`, a checkpoint quantized with `scheme` if given. Raises as `find_shards`
        and `load_shard` do, and ValueError naming the tensor and the files when the shards disagree (a tensor
        only some shards hold, a whole tensor whose shape differs between shards, a split tensor whose other
        dimensions differ) or a tensor has a dtype its checkpoint cannot hold."""
        self.folder = Path(ckpt_dir)
        self.scheme = scheme
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
            self._check_dtypes(name)
            dim = split_dim(name, self.shards[0][name].dim())
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

    def _check_dtypes(self, name: str) -> None:
        """ValueError unless every shard holds tensor `name` in the same floating-point dtype (or, for the
        weights of a quantized checkpoint, the scheme's integer dtype): weights of another kind would be silently
        changed by loading or resharding."""
        dtypes = [shard[name].dtype for shard in self.shards]
        if name in IGNORED_KEYS:
            return
        if self.scheme is not None and is_quantized(name):
            allowed = stored_weight_dtypes(self.scheme)
            if dtypes[0] not in allowed:
                raise ValueError(
                    f"{str(self.folder)!r}: tensor {name} has dtype {str(dtypes[0]).removeprefix('torch.')} in "
                    f"{self.paths[0].name}, but params.json says the weights are quantized as {self.scheme.name}, "
                    f"stored as {' or '.join(str(dtype).removeprefix('torch.') for dtype in allowed)}"
                )
        elif not dtypes[0].is_floating_point:
            raise ValueError(
                f"{str(self.folder)!r}: tensor {name} has dtype {str(dtypes[0]).removeprefix('torch.')} in "
                f"{self.paths[0].name}: a checkpoint's weights are floating point (float32, bfloat16, float16)"
            )
        for path, dtype in zip(self.paths, dtypes):
            if dtype != dtypes[0]:
                raise ValueError(
                    f"{str(self.folder)!r}: tensor {name} is {str(dtypes[0]).removeprefix('torch.')} in "
                    f"{self.paths[0].name} but {str(dtype).removeprefix('torch.')} in {path.name}: the shards come "
                    "from different checkpoints, or one was converted on its own"
                )

    def require_floating_point(self, what: str) -> None:
        """Raise ValueError when the checkpoint is quantized: `what` (a conversion) needs its floating-point
        weights."""
        if self.scheme is not None:
            raise ValueError(
                f"{str(self.folder)!r} is quantized ({self.scheme}): {what} needs the floating-point weights; "
                "run it on the checkpoint that was quantized"
            )

    def pieces(self, name: str, rank: int, world_size: int) -> list[tuple[int, torch.Tensor]]:
        """Rank `rank`'s part of tensor `name` when the model is split over `world_size` ranks, as the views of
        the memory-mapped shards that hold it, in order: (shard number, view) pairs, to be joined along
        `split_dim(name)`. A whole tensor is one piece from shard 0. Raises ValueError if the split dimension
        does not divide by world_size."""
        dim = split_dim(name, len(self.shapes[name]))
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
        return views[0] if len(views) == 1 else torch.cat(views, split_dim(name, views[0].dim()))

    def state_dict(self, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """Rank `rank`'s part of every tensor for `world_size` ranks (see `slice`); for one rank, the whole
        unsplit state dict."""
        return {name: self.slice(name, rank, world_size) for name in self.shapes}

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

    def release_all(self) -> None:
        """`release` every tensor of every shard: the next reader fetches the pages again, from the page cache."""
        for name in self.shapes:
            for number in range(len(self.paths)):
                self.release(name, number)


def open_checkpoint(ckpt_dir: PathLike) -> tuple[ModelArgs, ShardedCheckpoint]:
    """The settings and the shards of a Meta-layout folder, checked against each other: a vocab_size of -1 is
    taken from the embedding, and every tensor must have the shape the model of params.json gives it. Raises as
    `read_model_args` and `ShardedCheckpoint` do, and ValueError naming a missing, unexpected or mis-shaped
    tensor."""
    args = read_model_args(ckpt_dir)
    scheme = read_quantization(ckpt_dir)
    checkpoint = ShardedCheckpoint(ckpt_dir, scheme)
    if args.vocab_size == -1 and "tok_embeddings.weight" in checkpoint.shapes:
        args.vocab_size = checkpoint.shapes["tok_embeddings.weight"][0]
    check_layer_count(checkpoint.shapes, args, f"checkpoint {str(ckpt_dir)!r}")
    expected = expected_shapes(args)
    check_shapes(
        checkpoint.shapes,
        expected if scheme is None else quantized_shapes(expected, scheme),
        f"checkpoint {str(ckpt_dir)!r}",
    )
    return args, checkpoint


def save_shard(state: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """Write one shard, as safetensors or as a torch zip file by the suffix of `path`. A tensor that is a view
    of a larger one is copied first (torch.save would write the whole storage, and safetensors refuses shared
    memory); the others, memory-mapped ones included, are written as they are, without a copy in memory.
    `metadata`: the safetensors header's text fields. Raises OSError when the file cannot be written (a full
    disk, named as such)."""
    state = {
        name: tensor if _owns_its_storage(tensor) else tensor.clone(memory_format=torch.contiguous_format)
        for name, tensor in state.items()
    }
    try:
        if path.suffix == ".safetensors":
            safetensors.torch.save_file(state, path, metadata=metadata)
        else:
            torch.save(state, path)
    except OSError:
        raise
    except Exception as error:  # torch's zip writer reports a failed write, a full disk above all, as RuntimeError
        size = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
        free = shutil.disk_usage(path.parent).free
        problem = f"its disk is full ({free:,} bytes free for {size:,})" if free < size else str(error)
        raise OSError(f"cannot write {str(path)!r}: {problem}") from error


def _owns_its_storage(tensor: torch.Tensor) -> bool:
    return (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )
