"""Meta's checkpoint layout, stated once: what a checkpoint folder holds, the settings in its `params.json`, and
the tensors of its state dict (their names, unsplit shapes, and the dimension along which model-parallel shards
split each). Loading, resharding, training and every converter read and write checkpoints through this module.

A folder holds `params.json`, `tokenizer.model` and one shard per model-parallel rank, `consolidated.NN.pth`
(or `consolidated.NN.safetensors`), each with the rank's slice of every split tensor and a whole copy of the
others.
"""

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama.args import ModelArgs
from llama.model import Transformer
from llama.quantize import Quantization, scheme_from_params

PathLike = Union[str, Path]

PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tokenizer.model"
METRICS_FILE = "metrics.json"  # what `llama train` measured, and its settings
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.(pth|safetensors)")

# The settings params.json holds, under Meta's names: the architecture only (and, for Llama 3.1 and 3.2, the
# rotary scaling). Batch and sequence sizes are chosen when a model is loaded.
PARAM_KEYS = (
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
    "rope_theta",
)  # fmt: skip

# The key of params.json that records how a quantized checkpoint's weights are stored (see llama/quantize.py).
QUANTIZATION_KEY = "quantization"

# Keys Meta's checkpoints may hold that are not weights of the model: the 7B shards carry the rotary table
# (`rope.freqs`), which the model computes itself.
IGNORED_KEYS = frozenset({"rope.freqs"})


def check_folder(path: PathLike, kind: str = "checkpoint", holds: str = PARAMS_FILE) -> Path:
    """`path` as a Path, once it is known to be a folder: every command checks the folder it reads this way,
    before anything in it. Raises FileNotFoundError when nothing is there and ValueError for a file, each
    naming the `kind` of folder expected and what it `holds`; TypeError for something other than a path."""
    if not isinstance(path, (str, os.PathLike)):  # a (ckpt_dir, tokenizer_path) pair given whole, for one
        raise TypeError(f"the {kind} folder must be a path (str or Path), got {type(path).__name__} {path!r}")
    folder = Path(path)
    if folder.is_file():
        raise ValueError(f"{kind} path {str(folder)!r} is a file: pass the folder that holds {holds}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{kind} folder {str(folder)!r} does not exist")
    return folder


def tokenizer_file(ckpt_dir: PathLike, tokenizer_path: Optional[PathLike] = None) -> Path:
    """`tokenizer_path` when given, else where a checkpoint folder keeps its tokenizer, ckpt_dir/tokenizer.model:
    the default of every command and example script."""
    return Path(tokenizer_path) if tokenizer_path is not None else Path(ckpt_dir) / TOKENIZER_FILE


def trained_context_len(ckpt_dir: PathLike) -> Optional[int]:
    """The length of the windows the model in `ckpt_dir` was trained on, where its folder records it (in the
    metrics.json that `llama train` writes beside the weights), else None. params.json never holds it: Meta's
    loader passes max_seq_len itself and refuses keys it does not know."""
    try:
        settings = json.loads((Path(ckpt_dir) / METRICS_FILE).read_text())["settings"]
        length = settings["max_seq_len"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None


def read_settings(path: Path, what_holds_it: str) -> dict:
    """The JSON object of settings in `path` (params.json, config.json). Raises FileNotFoundError, saying
    `what_holds_it`, when the file is missing, and ValueError when it is not a JSON object."""
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, not a file of settings: {what_holds_it}")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: {what_holds_it}")
    try:
        settings = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(settings, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object of model settings, got {type(settings).__name__}")
    return settings


def read_model_args(ckpt_dir: PathLike, **overrides) -> ModelArgs:
    """ModelArgs from `ckpt_dir/params.json`, with `overrides` (for example max_seq_len) applied on top.

    Keys ModelArgs does not know are skipped with one warning that lists them. Raises FileNotFoundError if
    the folder or params.json is missing, ValueError if params.json is not a JSON object of settings.
    """
    params_path = check_folder(ckpt_dir) / PARAMS_FILE
    params = read_settings(
        params_path, "a Meta-layout checkpoint folder holds params.json and consolidated.NN.pth files"
    )

    known = {field.name for field in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(params) - known - {QUANTIZATION_KEY})
    if unknown:
        warnings.warn(
            f"{params_path}: ignoring settings this library does not know: {', '.join(unknown)}", stacklevel=2
        )
    missing = [name for name in ("dim", "n_layers", "n_heads") if name not in params]
    if missing:
        raise ValueError(f"{str(params_path)!r} gives no {', '.join(missing)}: params.json must give dim, n_layers "
                         "and n_heads (the other settings have defaults)")  # fmt: skip
    args = ModelArgs(**{name: value for name, value in params.items() if name in known} | overrides)
    try:
        args.check_settings(vocab_from_tokenizer=True)
    except ValueError as error:
        raise ValueError(f"{str(params_path)!r}: {error}") from None
    return args


def read_quantization(ckpt_dir: PathLike) -> Optional[Quantization]:
    """The scheme a quantized checkpoint's params.json records, or None for a floating-point checkpoint.
    Raises as `read_settings` does, and ValueError for a malformed entry."""
    params_path = Path(ckpt_dir) / PARAMS_FILE
    params = read_settings(params_path, "a Meta-layout checkpoint folder holds params.json")
    if QUANTIZATION_KEY not in params:
        return None
    return scheme_from_params(params[QUANTIZATION_KEY], repr(str(params_path)))


def write_params(folder: PathLike, args: ModelArgs) -> None:
    """Write `folder/params.json` for `args` as Meta writes it: the architecture under PARAM_KEYS, leaving out
    settings that are None (no key/value grouping, no FFN multiplier), and the rotary scaling only where it is
    used (Llama 2's own code refuses keys it does not know)."""
    params = {name: getattr(args, name) for name in PARAM_KEYS if getattr(args, name) is not None}
    if args.use_scaled_rope:
        params["use_scaled_rope"] = True
        if args.rope_scaling_factor != ModelArgs.rope_scaling_factor:
            params["rope_scaling_factor"] = args.rope_scaling_factor
    (Path(folder) / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")


def copy_params(source: PathLike, destination: PathLike, scheme: Quantization) -> None:
    """Copy `source/params.json` to `destination` as it is, recording the quantization `scheme`."""
    params = read_settings(Path(source) / PARAMS_FILE, "a Meta-layout checkpoint folder holds params.json")
    params[QUANTIZATION_KEY] = scheme.params()
    (Path(destination) / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")


def split_dim(name: str, ndim: int = 2) -> Optional[int]:
    """The dimension along which Meta's model-parallel shards split tensor `name` (of `ndim` dimensions): 0 for
    the column-parallel layers (each rank holds some output rows: wq, wk, wv, w1, w3, output), 1 for the
    row-parallel layers and the embedding (each rank holds some input columns: wo, w2, tok_embeddings), None for
    tensors every rank holds whole (the norms, rope.freqs). A quantized layer's `scales` and `zeros` (see
    llama/quantize.py) split as its weight does when they are per group (2-D), and with its output rows when
    they are per output channel (1-D), so a row-parallel layer's per-channel scales are held whole."""
    if name.endswith((".scales", ".zeros")):
        dim = split_dim(name.rsplit(".", 1)[0] + ".weight")
        return None if ndim == 1 and dim == 1 else dim
    if name == "output.weight" or name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")):
        return 0
    if name == "tok_embeddings.weight" or name.endswith(("wo.weight", "w2.weight")):
        return 1
    return None


def unsplit_shape(name: str, local_shape: torch.Size, model_parallel_size: int) -> torch.Size:
    """The whole tensor's shape, from the shape of one rank's slice of it when split over that many ranks."""
    dim = split_dim(name, len(local_shape))
    if dim is None:
        return local_shape
    return local_shape[:dim] + (local_shape[dim] * model_parallel_size,) + local_shape[dim + 1 :]


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


def expected_shapes(args: ModelArgs, model: Optional[Transformer] = None) -> dict[str, torch.Size]:
    """The unsplit shape of every tensor of a checkpoint of `args`, read off the model itself: `model` if given
    (a Transformer of `args` on any device), else one built on the meta device (in no memory at all). The state
    dict's names are the model's parameter names."""
    if model is None:
        with meta_device():
            model = Transformer(args)
    model_parallel_size = fs_init.get_model_parallel_world_size()
    return {name: unsplit_shape(name, tensor.shape, model_parallel_size) for name, tensor in model.state_dict().items()}


def parameter_count(args: ModelArgs) -> int:
    """The number of weights of a model of `args`, all ranks together, from its settings alone: for settings
    too large to build even on the meta device (`expected_shapes` gives the same count, see the tests)."""
    dim, heads, kv_heads = args.dim, args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    per_layer = 2 * dim * heads + 2 * dim * kv_heads + 3 * dim * args.ffn_hidden_dim + 2 * dim
    return 2 * args.vocab_size * dim + dim + args.n_layers * per_layer


def check_layer_count(shapes: dict[str, torch.Size], args: ModelArgs, source: str) -> None:
    """Raise ValueError when the tensors hold another number of layers than params.json gives (before a model
    of params.json's size is built to compare shapes: a wrong n_layers may be huge)."""
    indices = {int(name.split(".")[1]) for name in shapes if re.match(r"layers\.\d+\.", name)}
    held = max(indices) + 1 if indices else 0
    if held != args.n_layers:
        raise ValueError(f"{source} holds {held} layers but its params.json says n_layers={args.n_layers}")


def check_shapes(
    shapes: dict[str, torch.Size],
    expected: dict[str, torch.Size],
    source: str,
    config: str = PARAMS_FILE,
    ignored: Callable[[str], bool] = IGNORED_KEYS.__contains__,
) -> None:
    """Raise ValueError naming every missing or unexpected tensor of `shapes` (name -> shape), or the first
    tensor whose shape differs from `expected` (with both shapes). `source` names the checkpoint and `config` the
    file the expected shapes come from, for the message; names for which `ignored` is true may be present."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(name for name in set(shapes) - set(expected) if not ignored(name))
    if missing or unexpected:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        raise ValueError(f"{source} does not match the model built from {config}: {'; '.join(problems)}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            hint = ""
            if name in ("tok_embeddings.weight", "output.weight") and shapes[name][0] != shape[0]:
                hint = " (the vocabulary size differs: use the tokenizer.model that came with this checkpoint)"
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(shapes[name])} but the model built from {config} "
                f"expects {tuple(shape)}{hint}"
            )
