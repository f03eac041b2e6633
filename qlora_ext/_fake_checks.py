"""The argument rules of the qlora ops (csrc/op_checks.cpp), for their fake kernels.

A call with meta tensors, or under ``torch.compile``'s tracing, runs the fake kernel instead of
the C++ one. Without these checks it would return a tensor of whatever shape it was asked for:
``to_nf4`` of 100 elements on the meta device, or a LoRALinear built there with dimensions the
real kernels refuse, failed only later, on a real device, with a message about something else.
The messages say what the C++ checks say (the same exception types, argument and rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from qlora_ext._dtypes import FLOAT_DTYPES
from qlora_ext._tables import BLOCK_SIZE, SCALER_BLOCK_SIZE

def _name(dtype: torch.dtype) -> str:
    """A dtype as the C++ messages name it: as Python does (torch.float64)."""
    return str(dtype)


def check_defined(op: str, arg: str, t: Tensor | None) -> None:
    if t is None:
        raise ValueError(f"qlora::{op}: argument '{arg}' must be a tensor; got None")


def check_same_device(op: str, ref_arg: str, ref: Tensor, **args: Tensor | None) -> None:
    """The kernels' device rule. The dispatcher sends a call with any meta tensor to the fake
    kernel, so without it a meta component mixed with CPU ones would return an uninitialised CPU
    tensor instead of an error."""
    for name, t in args.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"qlora::{op}: argument '{name}' must be on the same device as '{ref_arg}' ({ref.device}); got {t.device}"
            )


def check_float_dtype(op: str, arg: str, t: Tensor) -> None:
    check_defined(op, arg, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"qlora::{op}: argument '{arg}' must have dtype float32, bfloat16 or float16; got {_name(t.dtype)}")


def check_quantizable(op: str, arg: str, weight: Tensor) -> None:
    check_float_dtype(op, arg, weight)
    if weight.numel() == 0:
        raise ValueError(f"qlora::{op}: argument '{arg}' must not be empty; got shape {list(weight.shape)}")
    if weight.numel() % BLOCK_SIZE != 0:
        raise ValueError(
            f"qlora::{op}: argument '{arg}' must have a number of elements divisible by {BLOCK_SIZE} (the NF4 block "
            f"size); got {weight.numel()} elements (shape {list(weight.shape)})"
        )


def check_components(op: str, packed: Tensor, absmax_codes: Tensor, absmax_scales: Tensor, absmax_offset: Tensor) -> int:
    """The number of weight elements the components encode."""
    for name, t, want in (("packed", packed, torch.uint8), ("absmax_codes", absmax_codes, torch.uint8),
                          ("absmax_scales", absmax_scales, torch.float32), ("absmax_offset", absmax_offset, torch.float32)):
        check_defined(op, name, t)
        if t.dtype != want:
            raise TypeError(f"qlora::{op}: argument '{name}' must have dtype {str(want).removeprefix('torch.')}; got {_name(t.dtype)}")
    check_same_device(op, "packed", packed, absmax_codes=absmax_codes, absmax_scales=absmax_scales, absmax_offset=absmax_offset)
    bytes_per_block = BLOCK_SIZE // 2
    if packed.numel() == 0 or packed.numel() % bytes_per_block != 0:
        raise ValueError(
            f"qlora::{op}: argument 'packed' must hold a positive multiple of {bytes_per_block} bytes (two 4-bit codes "
            f"per byte, 64 codes per block); got {packed.numel()}"
        )
    nblocks = packed.numel() // bytes_per_block
    if absmax_codes.numel() != nblocks:
        raise ValueError(
            f"qlora::{op}: argument 'absmax_codes' must hold one code per 64-element block, {nblocks} for 'packed' of "
            f"{packed.numel()} bytes; got {absmax_codes.numel()}"
        )
    groups = (nblocks + SCALER_BLOCK_SIZE - 1) // SCALER_BLOCK_SIZE
    if absmax_scales.numel() != groups:
        raise ValueError(
            f"qlora::{op}: argument 'absmax_scales' must hold one scale per 256 blocks, {groups} for {nblocks} blocks; "
            f"got {absmax_scales.numel()}"
        )
    if absmax_offset.numel() != 1:
        raise ValueError(f"qlora::{op}: argument 'absmax_offset' must hold exactly one value; got {absmax_offset.numel()}")
    return nblocks * BLOCK_SIZE


def check_dequantize(components: Sequence[Tensor], shape: Sequence[int], dtype: torch.dtype) -> None:
    numel = check_components("dequantize_nf4", *components)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"qlora::dequantize_nf4: argument 'dtype' must be float32, bfloat16 or float16; got {_name(dtype)}")
    if any(d < 0 for d in shape) or math.prod(shape) != numel:
        raise ValueError(
            f"qlora::dequantize_nf4: argument 'shape' must have {numel} elements (what the components encode); got {list(shape)}"
        )


def check_matmul_input(op: str, x: Tensor, x_arg: str, components: Sequence[Tensor], dim: int, dim_arg: str) -> None:
    """The rules of linear_nf4 (x, out_features) and of its backward op (grad_y, in_features)."""
    numel = check_components(op, *components)
    check_float_dtype(op, x_arg, x)
    check_same_device(op, "packed", components[0], **{x_arg: x})
    if dim <= 0 or numel % dim != 0:
        raise ValueError(f"qlora::{op}: argument '{dim_arg}' must be a positive divisor of the weight's {numel} elements; got {dim}")
    features = numel // dim
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(
            f"qlora::{op}: argument '{x_arg}' must have last dimension {features} ({numel} weight elements / {dim_arg} "
            f"{dim}); got shape {list(x.shape)}"
        )


def check_bias(op: str, bias: Tensor | None, x: Tensor, out_features: int) -> None:
    if bias is None:
        return
    if bias.dtype != x.dtype:
        raise TypeError(f"qlora::{op}: argument 'bias' must have the dtype of 'x' ({_name(x.dtype)}); got {_name(bias.dtype)}")
    check_same_device(op, "x", x, bias=bias)
    if bias.dim() != 1 or bias.shape[0] != out_features:
        raise ValueError(f"qlora::{op}: argument 'bias' must have shape [{out_features}]; got shape {list(bias.shape)}")
