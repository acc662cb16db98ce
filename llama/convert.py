"""Rewriting a Meta-layout checkpoint as another one: for another number of model-parallel ranks (`reshard`),
with the RMSNorm weights folded into the layers they feed (`fold_norms`), or with its linear layers quantized
(`quantize`). Each reads its source through `ShardedCheckpoint`, transforms state dicts, and writes a new folder
through `staged_folder`; none changes its source."""

import shutil
from pathlib import Path
from typing import Optional

import torch

from llama.atomic import staged_folder
from llama.layout import (
    METRICS_FILE,
    PARAMS_FILE,
    TOKENIZER_FILE,
    PathLike,
    copy_params,
    expected_shapes,
    split_dim,
)
from llama.quantize import (
    check_divisible,
    int8_scales,
    is_quantized,
    layer_scheme,
    quantization,
    quantize_weight,
    quantized_names,
    row_scaled,
    warn_weight_only_layers,
)
from llama.shards import open_checkpoint, save_shard
from llama.values import whole_number


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


def reshard(src: PathLike, dst: PathLike, model_parallel_size: int, overwrite: bool = False) -> None:
    """Write the Meta-layout checkpoint `src` (any number of shards) to the new folder `dst` with
    `model_parallel_size` shards, one output shard at a time from the memory-mapped source shards, so that only one
    output shard is in memory. params.json, tokenizer.model and metrics.json are copied unchanged, and the shards
    keep their format (.pth or .safetensors). `dst` appears only when complete (see `staged_folder`); `src` is never
    changed. Raises ValueError for a size that does not divide the heads, key/value heads, FFN width, dim or
    vocabulary (naming which), and as `open_checkpoint` and `staged_folder` do."""
    model_parallel_size = whole_number(model_parallel_size, "model_parallel_size")
    src = Path(src)
    args, checkpoint = open_checkpoint(src)
    args.validate(model_parallel_size, remedy="choose a --model-parallel-size")
    if checkpoint.scheme is not None:
        check_divisible(expected_shapes(args), checkpoint.scheme, model_parallel_size)
    suffix = checkpoint.paths[0].suffix
    with staged_folder(dst, overwrite, source=src) as staging:
        for rank in range(model_parallel_size):
            save_shard(checkpoint.state_dict(rank, model_parallel_size), staging / f"consolidated.{rank:02d}{suffix}")
            checkpoint.release_all()  # the next output shard reads its pages again, from the page cache
        _copy_companions(src, staging)


def fold_norms(src: PathLike, dst: PathLike, overwrite: bool = False) -> None:
    """Write the Meta-layout checkpoint `src` to the new folder `dst` with its RMSNorm weights folded into the
    linear layers (see `fold_norm_weights`): same shard count and format, params.json, tokenizer.model and
    metrics.json copied. For inference the result gives the same logits (up to rounding). `dst` appears only when
    complete; `src` is never changed. Raises as `open_checkpoint` and `staged_folder` do."""
    src = Path(src)
    _, checkpoint = open_checkpoint(src)
    checkpoint.require_floating_point("folding the norm weights")
    with staged_folder(dst, overwrite, source=src) as staging:
        for path, shard in zip(checkpoint.paths, checkpoint.shards):
            save_shard(fold_norm_weights(shard), staging / path.name)
        _copy_companions(src, staging)


def quantize(
    src: PathLike,
    dst: PathLike,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    overwrite: bool = False,
    scheme: Optional[str] = None,
) -> None:
    """Write the floating-point Meta-layout checkpoint `src` to the new folder `dst` with every linear layer's
    weight quantized to `bits` (8: int8 per output channel; 4: int4 in groups of `group_size` input channels,
    default 32; see llama/quantize.py) or with the `scheme` named instead ("int8", "int4", or the block schemes
    "q8_0" and "q4_0" of llama/block_quant.py, whose layers of an input width that is not a multiple of 32 keep
    int8, as a warning says): same shard count and format, params.json recording the scheme, and
    tokenizer.model and metrics.json copied. `Llama.build` loads the result quantized, on any number of ranks that
    keeps int4's groups whole. One tensor is quantized at a time, and one output shard is held in memory. `dst`
    appears only when complete; `src` is never changed. Raises ValueError for both or neither of bits and scheme,
    an unknown scheme or group size, a group size or block that does not divide a layer's input channels, or a
    source that is already quantized, and as `open_checkpoint` and `staged_folder` do."""
    if (bits is None) == (scheme is None):
        raise ValueError("give the bits (8 or 4) or the scheme (int8, int4, q8_0 or q4_0): one of the two")
    chosen = quantization(bits if scheme is None else scheme, group_size)
    src = Path(src)
    _, checkpoint = open_checkpoint(src)
    if checkpoint.scheme is not None:
        raise ValueError(
            f"{str(src)!r} is already quantized ({checkpoint.scheme}): quantize its floating-point original instead"
        )
    check_divisible(checkpoint.shapes, chosen, len(checkpoint.paths))
    warn_weight_only_layers(checkpoint.shapes, chosen)
    with staged_folder(dst, overwrite, source=src) as staging:
        world_size = len(checkpoint.paths)
        for rank, path in enumerate(checkpoint.paths):
            shard = {}
            for name in checkpoint.shapes:
                if not is_quantized(name):
                    shard[name] = checkpoint.slice(name, rank, world_size)
                    continue
                scales, scheme_here = None, layer_scheme(chosen, checkpoint.shapes[name])
                if row_scaled(scheme_here) and split_dim(name) == 1:  # a row's scale covers all of its columns
                    scales = int8_scales(checkpoint.slice(name, 0, 1))
                parts = quantize_weight(checkpoint.slice(name, rank, world_size), scheme_here, scales)
                shard.update(zip(quantized_names(name, scheme_here), parts.values()))
                checkpoint.release_all()
            save_shard(shard, staging / path.name)
        copy_params(src, staging, chosen)
        _copy_companions(src, staging, (TOKENIZER_FILE, METRICS_FILE))


def _copy_companions(
    source: Path, destination: Path, names: tuple[str, ...] = (PARAMS_FILE, TOKENIZER_FILE, METRICS_FILE)
) -> None:
    """params.json, tokenizer.model and a trained model's metrics.json (where the length of its training windows
    is known from) go unchanged into every rewritten copy."""
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
