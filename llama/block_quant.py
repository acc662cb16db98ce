"""Quantized activations and integer products: llama.cpp's q8_0 and q4_0 block schemes. The weights are stored in
blocks of 32 input channels with one scale each; at run time the activations are rounded to int8 in blocks of 32
with one scale each, each block's product is summed in 32-bit integers, then scaled:

    q8_0 weights:  w ~ q * d,         q in [-127, 127] (int8), one float16 d per block of 32 input channels
    q4_0 weights:  w ~ (q - 8) * d,   q in [0, 15], two to a byte, one float16 d per block
    activations:   x ~ p * e,         p in [-127, 127] (int8), e = the block's largest |x| / 127 (float32)
    product:       y[n] = sum over blocks b of d[n, b] * e[b] * (sum over the block of (q or q - 8) * p, in int32)

Unlike the weight-only int8 and int4 (llama/quantize.py), which multiply the activations as they are, these
round the activations too: they change what the model computes, a little, in exchange for products of bytes,
which CPUs compute many at a time (llama/block_kernels.py). Layers whose input width is not a multiple of 32
cannot be cut into blocks, and keep int8's weight-only product (llama/quantize.py's `layer_scheme`).

In a checkpoint a layer `X` keeps its name: `X.weight` holds q (int8 for q8_0; for q4_0 16 bytes per block, value
j of the block in the low four bits of byte j and value j + 16 in the high four bits), and `X.scales` the float16
scales, (out_features, in_features / 32).
"""

import warnings
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from llama.block_kernels import BUILT, best_variant, operators

BLOCK = 32
_PRODUCTS_PER_STEP = 1 << 22  # the PyTorch product's int32 temporaries, in elements


@dataclass(frozen=True)
class BlockQuantization:
    """q8_0 (weight_bits=8) or q4_0 (weight_bits=4): weights and activations in blocks of 32 (see the module)."""

    weight_bits: int

    @property
    def name(self) -> str:
        return f"q{self.weight_bits}_0"

    def __str__(self) -> str:
        return self.name

    def params(self) -> dict:
        """The scheme as params.json records it, under "quantization"."""
        return {"scheme": self.name}

    def weight_dtype(self) -> torch.dtype:
        return torch.int8 if self.weight_bits == 8 else torch.uint8

    def scale_dtype(self) -> torch.dtype:
        return torch.float16

    def part_shapes(self, shape: torch.Size) -> dict[str, torch.Size]:
        """The shapes of the quantized parts of an (out_features, in_features) weight."""
        out_features, in_features = shape
        return {
            "weight": torch.Size((out_features, in_features * self.weight_bits // 8)),
            "scales": torch.Size((out_features, in_features // BLOCK)),
        }


Q8_0, Q4_0 = BlockQuantization(8), BlockQuantization(4)
SCHEMES = {scheme.name: scheme for scheme in (Q8_0, Q4_0)}


def quantize_blocks(weight: Tensor, scheme: BlockQuantization) -> dict[str, Tensor]:
    """The quantized parts {"weight": q, "scales": d} of a float32 (out_features, in_features) weight, which it
    overwrites. Each scale is rounded to float16 first (at least float16's smallest normal magnitude, so that a
    block of zeros divides to zeros), and q chosen for the rounded scale: q8_0 maps the block's largest magnitude
    to 127; q4_0, as llama.cpp, maps the value of largest magnitude, with its sign, to -8 (q = 0). Raises
    ValueError for an input width that is not a multiple of 32."""
    out_features, in_features = weight.shape
    if in_features % BLOCK:
        raise ValueError(
            f"{scheme} quantizes blocks of {BLOCK} input channels, and {in_features} is not a multiple of {BLOCK}: "
            "keep such a layer in int8 (llama.quantize.layer_scheme chooses it)"
        )
    blocks = weight.view(out_features, in_features // BLOCK, BLOCK)
    if scheme.weight_bits == 8:
        scales = _float16_scales(blocks.abs().amax(dim=2) / 127)  # (out, blocks)
        q = blocks.div_(scales.float()[..., None]).round_().clamp_(-127, 127).to(torch.int8)
        return {"weight": q.view(out_features, in_features), "scales": scales}
    extreme = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True))[..., 0]  # signed, (out, blocks)
    scales = _float16_scales(extreme / -8)
    q = blocks.div_(scales.float()[..., None]).round_().add_(8).clamp_(0, 15).to(torch.uint8)
    packed = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)  # (out, blocks, 16)
    return {"weight": packed.view(out_features, in_features // 2), "scales": scales}


def _float16_scales(scales: Tensor) -> Tensor:
    tiny = torch.finfo(torch.float16).tiny
    return torch.where(scales < 0, scales.clamp(max=-tiny), scales.clamp(min=tiny)).half()


def weight_integers(weight: Tensor, scheme: BlockQuantization) -> Tensor:
    """The integer factor of every weight, q for q8_0 and q - 8 for q4_0: int8, (out_features, blocks, 32)."""
    if scheme.weight_bits == 8:
        return weight.view(len(weight), -1, BLOCK)
    packed = weight.view(len(weight), -1, BLOCK // 2)
    return torch.cat([packed & 15, packed >> 4], dim=2).to(torch.int8) - 8


def dequantize_blocks(parts: dict[str, Tensor], scheme: BlockQuantization, dtype: torch.dtype) -> Tensor:
    """The (out_features, in_features) weight in `dtype` that the quantized `parts` stand for."""
    integers = weight_integers(parts["weight"], scheme).float()
    return (integers * parts["scales"].float()[..., None]).flatten(1).to(dtype)


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., in_features) rounded in blocks of 32: the integers p, int8 (..., blocks, 32), and the float32
    scales e (..., blocks), the block's largest magnitude over 127 (at least float32's smallest normal number,
    so that a block of zeros divides to zeros); p is x / e rounded to the nearest integer, ties to even."""
    blocks = x.float().unflatten(-1, (-1, BLOCK))
    scales = (blocks.abs().amax(dim=-1) / 127).clamp_(min=torch.finfo(torch.float32).tiny)
    return (blocks / scales[..., None]).round_().to(torch.int8), scales


def block_product(x: Tensor, parts: dict[str, Tensor], scheme: BlockQuantization) -> Tensor:
    """x @ weight.T for quantized `parts`, computed as the scheme says, in PyTorch operations: the fallback of
    the native kernels, and their reference. Weight rows are taken a few at a time, to bound the int32
    products held at once."""
    rows = x.reshape(-1, x.shape[-1])
    q, x_scales = quantize_activations(rows)  # (tokens, blocks, 32), (tokens, blocks)
    weights, w_scales = weight_integers(parts["weight"], scheme), parts["scales"].float()  # (out, blocks, 32)
    step = max(1, _PRODUCTS_PER_STEP // max(1, q.numel()))
    outputs = []
    for start in range(0, len(weights), step):
        products = q[:, None].int() * weights[None, start : start + step].int()  # (tokens, step, blocks, 32)
        integers = products.sum(dim=-1, dtype=torch.int32)  # each block's product, summed in 32-bit integers
        scales = x_scales[:, None] * w_scales[None, start : start + step]  # (tokens, step, blocks)
        outputs.append((integers.float() * scales).sum(dim=-1))
    return torch.cat(outputs, dim=1).to(x.dtype).view(*x.shape[:-1], len(weights))


def kernel_for(device: torch.device, plain: bool = False) -> str:
    """The kernel a block layer on `device` computes with: the best native variant this CPU runs (see
    llama/block_kernels.py) where it builds and agrees with `block_product` (checked once per variant), else
    (or with plain=True, or off the CPU) "torch", the PyTorch product."""
    if plain or device.type != "cpu":
        return "torch"
    variant = best_variant()
    return variant if variant is not None and native_agrees(variant) else "torch"


def product(kernel: str, x: Tensor, parts: dict[str, Tensor], scheme: BlockQuantization) -> Tensor:
    """x @ weight.T with `kernel` ("torch" or a native variant) for the quantized `parts`."""
    if kernel == "torch":
        return block_product(x, parts, scheme)
    linear = getattr(BUILT.get(kernel) or operators(kernel), f"{scheme.name}_linear")
    out = linear(x.reshape(-1, x.shape[-1]).float(), parts["weight"], parts["scales"])
    return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


@cache
def native_agrees(variant: str) -> bool:
    """Whether `variant`'s kernels give `block_product`'s results on a random example (up to float32's
    rounding of the sums); warns where they do not."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=generator)
    for scheme in (Q8_0, Q4_0):
        parts = quantize_blocks(torch.randn(48, 256, generator=generator), scheme)
        expected = block_product(x, parts, scheme)
        if not torch.allclose(product(variant, x, parts, scheme), expected, rtol=1e-4, atol=1e-4):
            warnings.warn(
                f"the {variant} {scheme} kernel does not compute the scheme: using PyTorch's product", stacklevel=4
            )
            return False
    return True
