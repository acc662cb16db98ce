"""Weight-only quantization of the model's linear layers: int8 with one scale per output channel, or int4 with a
scale and a zero point per group of input channels. Decoding one token reads every weight once, so its speed is
bounded by the weights' bytes: int8 reads a quarter of float32's, int4 about an eighth.

The schemes, stated once:

    int8:  weight ~ q * scale,               q in [-127, 127], one float32 scale per output row
    int4:  weight ~ (q - 8) * scale + zero,  q in [0, 15], a bfloat16 scale and zero per group of input channels

Quantization is a transform of tensors and of state dicts (`quantize_weight`, `quantize_state_dict`), the same
whether a checkpoint is quantized as it loads or written quantized to disk, so both give the same model. In a
checkpoint, a quantized layer `X` keeps its name: `X.weight` holds q (int8, or for int4 two values per byte, the
even input channel in the low four bits), beside `X.scales` and, for int4, `X.zeros`; the embedding and the
norms stay in floating point. `QuantizedLinear` computes with PyTorch's weight-only kernels where they exist and
agree with the plain formula, else by dequantizing and multiplying (the same results, slower).

The block schemes q8_0 and q4_0, which round the activations too, are in llama/block_quant.py; the functions
here take either kind of scheme.
"""

import contextlib
import operator
import re
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from torch import Tensor, nn

from llama import block_quant
from llama.block_quant import BlockQuantization
from llama.distributed import is_main_process
from llama.parallel import ColumnParallelLinear, RowParallelLinear
from llama.values import whole_number

GROUP_SIZES = (32, 64, 128)
_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_WEIGHTS_PER_BLOCK = 1 << 20  # quantized at a time: bounds the float32 temporaries of a large matrix


@dataclass(frozen=True)
class Quantization:
    """A weight-only scheme: 8 bits (per output channel) or 4 bits (per group of `group_size` input channels)."""

    bits: int
    group_size: Optional[int] = None  # 4 bits only

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def __str__(self) -> str:
        return self.name if self.bits == 8 else f"int4 in groups of {self.group_size}"

    def params(self) -> dict:
        """The scheme as params.json records it, under "quantization"."""
        return {"bits": 8} if self.bits == 8 else {"bits": 4, "group_size": self.group_size}

    def weight_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    def scale_dtype(self) -> torch.dtype:
        """The dtype of the stored scales (and zeros): float32 per output channel, bfloat16 per group."""
        return torch.float32 if self.bits == 8 else torch.bfloat16


Scheme = Union[Quantization, BlockQuantization]


def quantization(bits, group_size=None) -> Scheme:
    """The scheme for `bits` ("int8" or "int4", or 8 or 4; or the block schemes "q8_0" and "q4_0") and, for
    int4, `group_size` (32, 64 or 128; default 32). Raises ValueError naming the allowed values."""
    number = None
    if isinstance(bits, str) and bits.strip().lower() in block_quant.SCHEMES:
        if group_size is not None:
            raise ValueError(f"{bits} has one scale per block of 32: group_size applies to int4, got {group_size!r}")
        return block_quant.SCHEMES[bits.strip().lower()]
    if isinstance(bits, str):
        number = {"int8": 8, "int4": 4, "8": 8, "4": 4}.get(bits.strip().lower())
    elif not isinstance(bits, bool):
        with contextlib.suppress(TypeError):
            number = operator.index(bits)
    if number not in (8, 4):
        hint = ": group_size applies to quantize='int4'" if bits is None else ""
        blocks = ", or 'q8_0' or 'q4_0' (activations rounded too)" if isinstance(bits, str) else ""
        raise ValueError(f"quantize must be 'int8' or 'int4' (8 or 4 bits){blocks}, got {bits!r}{hint}")
    bits = number
    if bits == 8:
        if group_size is not None:
            raise ValueError(f"int8 has one scale per output channel: group_size applies to int4, got {group_size!r}")
        return Quantization(8)
    group_size = 32 if group_size is None else whole_number(group_size, "group_size")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    return Quantization(4, group_size)


def scheme_from_params(value, source: str) -> Scheme:
    """The scheme that params.json's "quantization" entry records. Raises ValueError naming `source`."""
    if isinstance(value, dict) and set(value) == {"scheme"} and value["scheme"] in block_quant.SCHEMES:
        return block_quant.SCHEMES[value["scheme"]]
    if not isinstance(value, dict) or set(value) - {"bits", "group_size"} or "bits" not in value:
        raise ValueError(
            f"{source}: quantization must be {{'bits': 8}}, {{'bits': 4, 'group_size': N}}, {{'scheme': 'q8_0'}} "
            f"or {{'scheme': 'q4_0'}}, got {value!r}"
        )
    try:
        return quantization(value["bits"], value.get("group_size"))
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def is_quantized(name: str) -> bool:
    """True for the weights a scheme quantizes: every linear layer's, `output` included; not the embedding or
    the norms."""
    return name == "output.weight" or (name.endswith(".weight") and name.split(".")[-2] in _LINEARS)


# The schemes, tensor by tensor ------------------------------------------------------------------------------


def quantize_weight(weight: Tensor, scheme: Scheme, scales: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The quantized form of one (out_features, in_features) weight: {"weight": q, "scales": ..., and for int4
    "zeros": ...} (see the module's docstring; for q8_0 and q4_0, llama/block_quant.py). For int8, `scales`
    may give each row's scale (for a slice of the columns of a matrix whose rows were scaled whole). Rows are
    quantized a block at a time, in one float32 buffer reused for every block: a large matrix needs no float32
    copy of itself."""
    rows = max(1, _WEIGHTS_PER_BLOCK // max(1, weight.shape[1]))
    buffer = torch.empty(min(rows, len(weight)), weight.shape[1], device=weight.device)
    blocks = []
    for start in range(0, len(weight), rows):
        block = buffer[: len(weight[start : start + rows])].copy_(weight[start : start + rows])
        blocks.append(_quantize_rows(block, scheme, None if scales is None else scales[start : start + rows]))
    return {key: torch.cat([block[key] for block in blocks]) for key in blocks[0]}


def _quantize_rows(weight: Tensor, scheme: Scheme, scales: Optional[Tensor]) -> dict[str, Tensor]:
    """Quantize a float32 block of rows, overwriting it."""
    if isinstance(scheme, BlockQuantization):
        return block_quant.quantize_blocks(weight, scheme)
    if scheme.bits == 8:
        scales = int8_scales(weight) if scales is None else scales
        q = weight.div_(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return {"weight": q, "scales": scales}
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // scheme.group_size, scheme.group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)  # (out, groups)
    # The scale and zero are rounded to bfloat16 first, and q chosen for the rounded values.
    scale = ((high - low) / 15).clamp_(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    zero = (low + 8 * scale.float()).to(torch.bfloat16)
    q = groups.sub_(zero.float()[..., None]).div_(scale.float()[..., None]).round_().add_(8).clamp_(0, 15)
    q = q.to(torch.uint8).view(out_features, in_features)
    return {"weight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scale, "zeros": zero}


def stored_weight_dtypes(scheme: Scheme) -> tuple[torch.dtype, ...]:
    """The dtypes of a quantized checkpoint's weights: q4_0's in uint8, and int8 where a layer keeps int8."""
    return (torch.uint8, torch.int8) if scheme == block_quant.Q4_0 else (scheme.weight_dtype(),)


def row_scaled(scheme: Scheme) -> bool:
    """Whether one scale covers each whole output row (int8): a rank that holds some of a row's columns must
    take the scale of the whole row."""
    return scheme == Quantization(8)


def int8_scales(weight: Tensor) -> Tensor:
    """int8's scale of each row of `weight`: its largest magnitude maps to 127 (float32, (out_features,))."""
    return (weight.float().abs().amax(dim=1) / 127).clamp_(min=torch.finfo(torch.float32).tiny)


def dequantize_weight(parts: dict[str, Tensor], scheme: Scheme, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (out_features, in_features) weight in `dtype` that the quantized `parts` stand for."""
    if isinstance(scheme, BlockQuantization):
        return block_quant.dequantize_blocks(parts, scheme, dtype)
    if scheme.bits == 8:
        return (parts["weight"].float() * parts["scales"].float()[:, None]).to(dtype)
    packed = parts["weight"]  # (out, in / 2): the even input channel in the low bits
    q = _unpack(packed).float()  # (out, in)
    scales = parts["scales"].float().repeat_interleave(scheme.group_size, dim=1)
    zeros = parts["zeros"].float().repeat_interleave(scheme.group_size, dim=1)
    return ((q - 8) * scales + zeros).to(dtype)


def quantized_names(name: str, scheme: Scheme) -> list[str]:
    """The names a quantized checkpoint holds for the weight `name`."""
    return [name.removesuffix("weight") + key for key in part_shapes(torch.Size((0, 0)), scheme)]


def part_shapes(shape: torch.Size, scheme: Scheme) -> dict[str, torch.Size]:
    """The shapes of the quantized parts of an (out_features, in_features) weight."""
    if isinstance(scheme, BlockQuantization):
        return scheme.part_shapes(shape)
    out_features, in_features = shape
    if scheme.bits == 8:
        return {"weight": torch.Size(shape), "scales": torch.Size((out_features,))}
    groups = torch.Size((out_features, in_features // scheme.group_size))
    return {"weight": torch.Size((out_features, in_features // 2)), "scales": groups, "zeros": groups}


def layer_scheme(scheme: Scheme, shape: torch.Size) -> Scheme:
    """The scheme of a linear layer of unsplit (out_features, in_features) `shape` under `scheme`: the scheme
    itself, except that a block scheme's layers whose input width is not a multiple of 32 (blocks cannot cover
    it) keep int8's weight-only product."""
    if isinstance(scheme, BlockQuantization) and shape[1] % block_quant.BLOCK:
        return Quantization(8)
    return scheme


def warn_weight_only_layers(shapes: dict[str, torch.Size], scheme: Scheme) -> None:
    """Warn (from the main process) naming the layers of unsplit `shapes` that keep int8 under `scheme`."""
    kept: dict[str, list] = {}
    for name, shape in shapes.items():
        if is_quantized(name) and layer_scheme(scheme, shape) != scheme:
            kept.setdefault(re.sub(r"^layers\.\d+\.|\.weight$", "", name), []).append(shape[1])
    if kept and is_main_process():
        listing = ", ".join(f"{name} in {len(widths)} layer(s), {widths[0]} wide" for name, widths in kept.items())
        warnings.warn(
            f"{scheme}: layers whose input width is not a multiple of 32 keep int8's weight-only product: {listing}",
            stacklevel=4,  # the caller of Llama.build
        )


def quantized_shapes(shapes: dict[str, torch.Size], scheme: Scheme) -> dict[str, torch.Size]:
    """The unsplit shapes of a quantized checkpoint, from those of the floating-point one."""
    result = {}
    for name, shape in shapes.items():
        if not is_quantized(name):
            result[name] = shape
            continue
        for key, part_shape in part_shapes(shape, layer_scheme(scheme, shape)).items():
            result[name.removesuffix("weight") + key] = part_shape
    return result


def quantized_bytes(weights: int, scheme: Optional[Scheme]) -> int:
    """About how many bytes `weights` linear-layer weights take quantized with `scheme` (0 for None)."""
    if scheme is None:
        return 0
    if isinstance(scheme, BlockQuantization):
        return weights * scheme.weight_bits // 8 + weights // block_quant.BLOCK * 2  # a float16 scale per block
    if scheme.bits == 8:
        return weights
    return weights // 2 + weights // scheme.group_size * 4  # two bfloat16 numbers per group


def check_divisible(shapes: dict[str, torch.Size], scheme: Scheme, model_parallel_size: int = 1) -> None:
    """Raise ValueError when a layer's input channels on one rank do not divide into whole groups (int4) or
    blocks (q8_0, q4_0) of the scheme (one may not straddle two ranks' slices), naming the group size."""
    for name, shape in shapes.items():
        if not is_quantized(name) or layer_scheme(scheme, shape) == Quantization(8):
            continue
        row_parallel = name.split(".")[-2] in ("wo", "w2")
        per_rank = shape[1] // model_parallel_size if row_parallel else shape[1]
        blocks, group = isinstance(scheme, BlockQuantization), getattr(scheme, "group_size", block_quant.BLOCK)
        if per_rank % group:
            where = f" on each of {model_parallel_size} ranks" if row_parallel and model_parallel_size > 1 else ""
            unit = f"{scheme}'s blocks of {group}" if blocks else f"groups of group_size={group}"
            remedy = f"choose a group size that divides {per_rank}" + (", or fewer ranks" if where else "")
            if blocks:
                remedy = f"choose a number of ranks that splits its {shape[1] // group} blocks evenly"
            raise ValueError(f"{name} has {per_rank} input channels{where}, which do not divide into {unit}: {remedy}")


def quantize_state_dict(state: dict[str, Tensor], scheme: Scheme) -> dict[str, Tensor]:
    """The state dict (whole, unsplit) with every linear layer's weight quantized (see `quantized_names`), each
    with its `layer_scheme`."""
    result = {}
    for name, tensor in state.items():
        if not is_quantized(name):
            result[name] = tensor
            continue
        scheme_here = layer_scheme(scheme, tensor.shape)
        result.update(zip(quantized_names(name, scheme_here), quantize_weight(tensor, scheme_here).values()))
    return result


# The layer --------------------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A drop-in for the model's column- and row-parallel linear layers with quantized weights: this rank's
    slice of the weight, its scales (and zeros), and the same communication between ranks as the layer it
    replaces. Built empty; `load` fills it with this rank's slice, in the form the chosen kernel reads."""

    def __init__(self, layer: Union[ColumnParallelLinear, RowParallelLinear], scheme: Scheme):
        super().__init__()
        self.scheme = scheme
        self.in_features, self.out_features = layer.weight.shape[1], layer.weight.shape[0]  # this rank's
        self.row_parallel = isinstance(layer, RowParallelLinear) and fs_init.get_model_parallel_world_size() > 1
        self.gather_output = isinstance(layer, ColumnParallelLinear) and layer.gather_output
        self.kernel = "dequantize"  # which computation forward uses; set by load
        # Placeholders, as large as what load puts in their place (in the kernel's layout).
        for key, shape in part_shapes(layer.weight.shape, scheme).items():
            dtype = scheme.weight_dtype() if key == "weight" else scheme.scale_dtype()
            self.register_buffer(key, torch.empty(shape, dtype=dtype, device="meta"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}, {self.kernel}"

    @torch.no_grad()
    def load(self, parts: dict[str, Tensor], dtype: torch.dtype, plain: bool = False) -> None:
        """Hold this rank's quantized slice, `parts` as `quantize_weight` gives them, on the layer's device
        (where `to_empty` put it), to compute in `dtype`: packed for PyTorch's kernel where one exists for this
        device, dtype and shape and gives the plain formula's results (checked once per kind, on a small
        example), else (or with plain=True) as they are, dequantized at each product. A block scheme's layer
        computes with its native kernel, or with plain=True PyTorch's block product (llama/block_quant.py)."""
        device = self.weight.device
        if isinstance(self.scheme, BlockQuantization):
            self.kernel = block_quant.kernel_for(device, plain)
        elif plain:
            self.kernel = "dequantize"
        else:
            self.kernel = _kernel_for(self.scheme, device, dtype, (self.out_features, self.in_features))
        parts = {key: tensor.to(device) for key, tensor in parts.items()}
        if self.kernel != "dequantize":
            try:
                parts = _pack_for(self.kernel, parts, self.scheme, dtype)
            except RuntimeError:  # a shape this kernel does not take
                self.kernel = "dequantize"
        if self.kernel == "dequantize":
            parts = {key: tensor if key == "weight" else tensor.to(dtype) for key, tensor in parts.items()}
        for key in ("weight", "scales", "zeros", "scales_and_zeros"):
            if hasattr(self, key):
                delattr(self, key)
        for key, tensor in parts.items():
            self.register_buffer(key, tensor.contiguous())

    def forward(self, x: Tensor) -> Tensor:
        product = _product(self.kernel, x, self._buffers, self.scheme)
        if self.row_parallel:
            return reduce_from_model_parallel_region(product)
        if self.gather_output and fs_init.get_model_parallel_world_size() > 1:
            return gather_from_model_parallel_region(product)
        return product


def _product(kernel: str, x: Tensor, parts: dict, scheme: Scheme) -> Tensor:
    """x @ weight.T for the quantized weight `parts` held in the form `kernel` reads."""
    if isinstance(scheme, BlockQuantization):
        return block_quant.product(kernel, x, parts, scheme)
    rows = x.reshape(-1, x.shape[-1])  # (tokens, in_features)
    if kernel == "int8":
        out = torch.ops.aten._weight_int8pack_mm(rows, parts["weight"], parts["scales"])
    elif kernel == "int4-cpu":
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, parts["weight"], scheme.group_size, parts["scales_and_zeros"]
        )
    elif kernel == "int4-cuda":
        out = torch.ops.aten._weight_int4pack_mm(rows, parts["weight"], scheme.group_size, parts["scales_and_zeros"])
    else:
        return F.linear(x, dequantize_weight(parts, scheme, x.dtype))
    return out.view(*x.shape[:-1], out.shape[-1])


def _pack_for(
    kernel: str, parts: dict[str, Tensor], scheme: Scheme, dtype: torch.dtype, rows: Optional[int] = None
) -> dict[str, Tensor]:
    """`parts` in the layout `kernel` reads (the int4 kernels' packing is their own, and may change between
    PyTorch releases; the checkpoint keeps the portable layout; the block kernels read it as it is). For the CPU
    int4 kernel, `rows` at a time (a multiple of 64; by default as many as make a million weights)."""
    if isinstance(scheme, BlockQuantization):
        return parts
    if kernel == "int8":
        return {"weight": parts["weight"], "scales": parts["scales"].to(dtype)}
    packed = parts["weight"]
    scales_and_zeros = torch.stack([parts["scales"], parts["zeros"]], dim=-1).transpose(0, 1).contiguous()
    if kernel == "int4-cpu":
        # Packed a block of rows at a time (its packing keeps each block of 32 rows to itself; _kernel_agrees
        # checks that it still does): the int32 copy the converter takes is 8 times the packed weight, which for
        # a 7B model's output layer would be 0.5 GB.
        convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
        rows = rows or max(64, _WEIGHTS_PER_BLOCK // (2 * packed.shape[1]) // 64 * 64)
        blocks = [convert(_unpack(packed[start : start + rows]).int(), 1) for start in range(0, len(packed), rows)]
        weight = torch.cat(blocks)
    else:  # the CUDA kernel takes its input packed with the even channel in the high bits
        q = _unpack(packed)
        weight = torch.ops.aten._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    return {"weight": weight, "scales_and_zeros": scales_and_zeros.to(dtype)}  # (groups, out, 2)


def _unpack(packed: Tensor) -> Tensor:
    """int4 values, two per byte (out, in / 2), as one per byte (out, in) in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(len(packed), -1)


_KERNELS: dict[tuple, str] = {}


def _kernel_for(scheme: Quantization, device: torch.device, dtype: torch.dtype, shape: tuple[int, int]) -> str:
    """The kernel a layer of `scheme` and (out_features, in_features) `shape` uses on `device` in `dtype`:
    PyTorch's own if it takes the shape, exists, and gives the dequantize-then-multiply results on a random
    example (checked once per kind), else "dequantize"."""
    out_features, in_features = shape
    if scheme.bits == 8:
        kernel = "int8"
        if in_features % 8:
            return "dequantize"  # the CPU kernel reads its input in blocks of 8 (in bfloat16 it crashes otherwise)
    else:
        kernel = "int4-cuda" if device.type == "cuda" else "int4-cpu"
        if device.type == "cuda" and dtype != torch.bfloat16:
            return "dequantize"  # the CUDA int4 kernel computes in bfloat16 only
        if device.type == "cpu" and out_features % 16:
            return "dequantize"  # the CPU int4 kernel packs rows in blocks of 16
    key = (kernel, scheme, device.type, dtype)
    if key not in _KERNELS:
        _KERNELS[key] = kernel if _kernel_agrees(kernel, scheme, device, dtype) else "dequantize"
    return _KERNELS[key]


def _kernel_agrees(kernel: str, scheme: Quantization, device: torch.device, dtype: torch.dtype) -> bool:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(144, 256, generator=generator)  # packed for the CPU int4 kernel in blocks of 64 rows
    x = torch.randn(3, 256, generator=generator).to(device, dtype)
    parts = {key: tensor.to(device) for key, tensor in quantize_weight(weight, scheme).items()}
    try:
        fast = _product(kernel, x, _pack_for(kernel, parts, scheme, dtype, rows=64), scheme)
    except (RuntimeError, NotImplementedError, AttributeError):  # no such kernel in this build of PyTorch
        return False
    plain = F.linear(x.float(), dequantize_weight(parts, scheme))
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    agrees = torch.allclose(fast.float(), plain, rtol=tolerance, atol=tolerance * plain.abs().max().item())
    if not agrees:
        warnings.warn(
            f"PyTorch's {kernel} kernel does not compute the {scheme.name} formula in this build "
            f"(torch {torch.__version__}): dequantizing instead, with the same results, more slowly",
            stacklevel=4,
        )
    return agrees


def quantize_model(model: nn.Module, scheme: Scheme) -> list[tuple[str, QuantizedLinear]]:
    """Swap every linear layer of `model` (built on the meta device, not yet loaded) for an empty
    QuantizedLinear of its `layer_scheme` under `scheme`; the (name, layer) pairs to load, named as the
    checkpoint names them (`layers.0.attention.wq`)."""
    swapped = []
    world_size = fs_init.get_model_parallel_world_size()
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
                out_features, in_features = child.weight.shape  # this rank's: a row-parallel layer's are split
                whole = in_features * world_size if isinstance(child, RowParallelLinear) else in_features
                layer = QuantizedLinear(child, layer_scheme(scheme, (out_features, whole)))
                setattr(parent, name, layer)
                swapped.append((f"{parent_name}.{name}".lstrip("."), layer))
    return swapped
