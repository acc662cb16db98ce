"""Loading a Meta-layout checkpoint into a Transformer, on any number of model-parallel ranks, holding the weights
about once in host memory; and the small model bundled with the package."""

import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from llama.args import ModelArgs
from llama.layout import (
    PARAMS_FILE,
    TOKENIZER_FILE,
    PathLike,
    check_layer_count,
    check_shapes,
    expected_shapes,
    meta_device,
    parameter_count,
    read_model_args,
    read_quantization,
    split_dim,
    trained_context_len,
)
from llama.model import KVCache, Transformer
from llama.quantize import (
    Quantization,
    QuantizedLinear,
    check_divisible,
    int8_scales,
    quantize_model,
    quantize_weight,
    quantized_bytes,
    quantized_names,
    quantized_shapes,
    row_scaled,
    warn_weight_only_layers,
)
from llama.shards import ShardedCheckpoint
from llama.tokenizer import Tokenizer

# The small model that ships inside the package (trained by `python -m llama train` on Shakespeare's plays),
# and the length of the windows it was trained on: past that many positions its text falls apart.
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_CONTEXT_LEN = 256


def demo_checkpoint() -> tuple[Path, Path]:
    """The bundled demo model, a few million parameters trained on Shakespeare's plays, as a pair of paths (not a
    folder): `ckpt_dir, tokenizer_path = demo_checkpoint()`, then `Llama.build(ckpt_dir, tokenizer_path, ...)`.
    Raises FileNotFoundError if the package was installed without its data files."""
    tokenizer_path = DEMO_DIR / TOKENIZER_FILE
    for path in (DEMO_DIR / PARAMS_FILE, DEMO_DIR / "consolidated.00.pth", tokenizer_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"the bundled demo model file {str(path)!r} is missing: reinstall the package with `pip install .`"
            )
    return DEMO_DIR, tokenizer_path


def trained_on(ckpt_dir: PathLike, length: int) -> str:
    """The start of a warning that the model in `ckpt_dir` learned a context of `length` tokens."""
    model = "the demo model" if Path(ckpt_dir).resolve() == DEMO_DIR else f"the model in {str(ckpt_dir)!r}"
    return f"{model} was trained on {length}-token windows"


def reshard_command(ckpt_dir: PathLike, model_parallel_size: int) -> str:
    """The command line that writes a copy of `ckpt_dir` with `model_parallel_size` shards into the current
    folder (never beside the source, which may be read-only or inside the installed package)."""
    folder = Path(ckpt_dir)
    destination = f"{folder.resolve().name}-mp{model_parallel_size}"
    return (
        f"python -m llama reshard {shlex.quote(str(folder))} {shlex.quote(destination)} "
        f"--model-parallel-size {model_parallel_size}"
    )


def model_args_for(ckpt_dir: PathLike, tokenizer: Tokenizer, max_seq_len: int, max_batch_size: int) -> ModelArgs:
    """The settings of `ckpt_dir` for a model that holds max_batch_size sequences of max_seq_len tokens in its
    cache, split over the processes started: a vocab_size of -1 is taken from the tokenizer. Warns when a
    model whose trained context is known (see `trained_context_len`) is asked for a longer one. Raises as
    `read_model_args` does, and ValueError for a tokenizer of another vocabulary or settings that do not
    divide by the number of processes."""
    args = read_model_args(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    trained = trained_context_len(ckpt_dir)
    if trained is not None and max_seq_len > trained:
        warnings.warn(
            f"{trained_on(ckpt_dir, trained)}: past that position its text falls apart (max_seq_len={max_seq_len}; "
            f"keep prompt and generation within {trained} tokens)",
            stacklevel=3,
        )
    if args.vocab_size == -1:
        args.vocab_size = tokenizer.n_words
    if args.vocab_size != tokenizer.n_words:
        raise ValueError(
            f"the tokenizer {str(tokenizer.path)!r} has {tokenizer.n_words} pieces but params.json says "
            f"vocab_size={args.vocab_size}: use the tokenizer.model that came with this checkpoint"
        )
    args.validate(fs_init.get_model_parallel_world_size())
    return args


def load_model(
    ckpt_dir: PathLike,
    args: ModelArgs,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = False,
    quantize: Optional[Quantization] = None,
) -> Transformer:
    """The Transformer for model-parallel `rank`, with its slice of the checkpoint's weights, on `device` in
    `dtype`, whatever the number of shards: each rank reads only the slices it needs from the shards that hold
    them, and rank 0 warns once when the shard count differs from the model-parallel size (with the `reshard`
    command that makes a matching copy).

    The model is built on the meta device and its parameters allocated once, uninitialised; each slice is
    copied into place from the memory-mapped shards, whose pages are released as soon as they are copied, so
    host memory holds the weights about once while loading. (The parameters are copies, not the mapped file
    itself: a model that used the file's pages would crash with a bus error if the file were rewritten in
    place.) With `quantize`, each linear layer's weight is quantized as it is read (see llama/quantize.py), so
    memory holds the quantized weights and one floating-point tensor at a time; a quantized checkpoint (its
    params.json says so) loads quantized as it is. With progress=True, a line on standard error shows the shard
    being read and the share of tensors copied. Raises ValueError for a corrupt shard, shards that disagree,
    missing, unexpected or mis-shaped tensors, `quantize` given for a quantized checkpoint, or groups that do
    not divide a rank's input channels.
    """
    world_size = fs_init.get_model_parallel_world_size()
    stored = read_quantization(ckpt_dir)
    if stored is not None and quantize is not None:
        raise ValueError(
            f"{str(ckpt_dir)!r} is already quantized ({stored}): load it without quantize= (quantizing again "
            "would only lose precision), or quantize its floating-point original"
        )
    scheme = stored or quantize
    check_memory(args, device, dtype, world_size, f"the model of {str(Path(ckpt_dir) / PARAMS_FILE)!r}", scheme)
    checkpoint = ShardedCheckpoint(ckpt_dir, stored)
    check_layer_count(checkpoint.shapes, args, f"checkpoint {str(ckpt_dir)!r}")
    with meta_device():
        model = Transformer(args)
    expected = expected_shapes(args, model)
    check_shapes(
        checkpoint.shapes,
        expected if stored is None else quantized_shapes(expected, stored),
        f"checkpoint {str(ckpt_dir)!r}",
    )
    if scheme is not None:
        check_divisible(expected, scheme, world_size)
        warn_weight_only_layers(expected, scheme)
    if rank == 0:
        _warn_if_resliced(ckpt_dir, len(checkpoint.paths), world_size)
    layers = quantize_model(model, scheme) if scheme is not None else []
    model = model.to(dtype=dtype).to_empty(device=device)
    for cache in (module for module in model.modules() if isinstance(module, KVCache)):
        for buffer in cache.buffers():  # not the quantized layers' placeholders: loading replaces those
            buffer.zero_()
    loaders = [_loader(parameter, name, checkpoint, rank, world_size) for name, parameter in model.named_parameters()]
    loaders += [_quantized_loader(layer, name, checkpoint, stored, rank, world_size, dtype) for name, layer in layers]
    _run_loaders(loaders, checkpoint, progress)
    return model


def _warn_if_resliced(ckpt_dir: PathLike, shards: int, world_size: int) -> None:
    """Warn when the shard count differs from the model-parallel size, naming the command that makes a copy
    that loads without reslicing."""
    if shards != world_size:
        warnings.warn(
            f"{str(ckpt_dir)!r} has {shards} shard(s) and this run has model-parallel size "
            f"{world_size}: resharded on the fly (each process read its slices from the shards that hold them). "
            f"To load without reslicing, make a matching copy once: {reshard_command(ckpt_dir, world_size)}",
            stacklevel=4,  # the caller of Llama.build
        )


@torch.no_grad()
def _run_loaders(loaders: list, checkpoint: ShardedCheckpoint, progress: bool) -> None:
    """Run each loader; with progress, a line on standard error shows the shard read and the share done."""
    for index, load in enumerate(loaders, 1):
        shard = checkpoint.paths[load()].name
        if progress:
            print(f"\rloading {shard}: {index}/{len(loaders)} tensors", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)


def check_memory(
    args: ModelArgs,
    device: torch.device,
    dtype: torch.dtype,
    world_size: int,
    source: str,
    scheme: Optional[Quantization] = None,
) -> None:
    """Raise ValueError, before anything is allocated, when this process's share of the weights (its linear
    layers quantized with `scheme`, if given) and the key/value cache does not fit the memory available on
    `device` (on the CPU, shared by the processes of this machine). `source` names the model in the message.
    Nothing is checked where the available memory cannot be read."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    floating = (
        parameter_count(args) if scheme is None else args.vocab_size * args.dim + (2 * args.n_layers + 1) * args.dim
    )
    weights = floating * itemsize + quantized_bytes(parameter_count(args) - floating, scheme)
    weights //= world_size
    cache = 2 * args.n_layers * args.max_batch_size * args.max_seq_len * args.kv_heads * args.head_dim * itemsize
    cache = cache // world_size + 2 * args.max_seq_len * args.head_dim // 2 * 8  # and the complex64 rotary table
    available = _available_memory(device)
    if device.type == "cpu":
        weights, cache = weights * _local_processes(), cache * _local_processes()
    if available is not None and weights + cache > available:
        raise ValueError(
            f"{source} needs {(weights + cache) / 1e9:,.1f} GB on {device} ({weights / 1e9:,.1f} GB of weights in "
            f"{str(dtype).removeprefix('torch.')}{'' if scheme is None else f', linear layers in {scheme}'}, "
            f"{cache / 1e9:,.1f} GB of key/value cache for max_batch_size="
            f"{args.max_batch_size} x max_seq_len={args.max_seq_len}) but {available / 1e9:,.1f} GB are available: "
            f"lower max_seq_len or max_batch_size, use a smaller dtype, or more processes"
        )


def _available_memory(device: torch.device) -> Optional[int]:
    """Bytes free to allocate on `device`, or None where that cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _local_processes() -> int:
    """How many processes of this run share this machine (torchrun says so); 1 for a plain python."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _loader(parameter: torch.Tensor, name: str, checkpoint: ShardedCheckpoint, rank: int, world_size: int):
    """Copy this rank's slice of `name` into `parameter`: each piece straight to its place (no joined copy in
    between), its file pages let go as soon as it is copied. The loader returns the number of the last shard
    read."""

    def load() -> int:
        dim, start = split_dim(name, parameter.dim()) or 0, 0
        for number, view in checkpoint.pieces(name, rank, world_size):
            parameter.narrow(dim, start, view.shape[dim]).copy_(view)
            start += view.shape[dim]
            checkpoint.release(name, number)
        return number

    return load


def _quantized_loader(
    layer: QuantizedLinear,
    name: str,
    checkpoint: ShardedCheckpoint,
    stored_as: Optional[Quantization],
    rank: int,
    world_size: int,
    dtype: torch.dtype,
):
    """Fill the quantized `layer` with this rank's slice: read as stored (`stored_as` the checkpoint's scheme),
    or quantized from the floating-point weight as it is read (the same values `quantize_state_dict` writes:
    int8's per-row scales come from the whole row, also where a rank holds only some of its columns). The
    loader returns the number of the last shard read."""
    weight_name, scheme = f"{name}.weight", layer.scheme
    names = quantized_names(weight_name, scheme) if stored_as is not None else [weight_name]

    def load() -> int:
        if stored_as is not None:
            parts = {
                key: checkpoint.slice(part, rank, world_size) for key, part in zip(("weight", "scales", "zeros"), names)
            }
        else:
            scales = None
            if row_scaled(scheme) and split_dim(weight_name) == 1 and world_size > 1:
                scales = int8_scales(checkpoint.slice(weight_name, 0, 1))
            parts = quantize_weight(checkpoint.slice(weight_name, rank, world_size), scheme, scales)
        layer.load(parts, dtype)
        for part in names:
            for number in range(len(checkpoint.paths)):
                checkpoint.release(part, number)
        return checkpoint.pieces(weight_name if stored_as is None else names[0], rank, world_size)[-1][0]

    return load
