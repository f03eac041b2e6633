"""Pure-PyTorch reference of every ``torch.ops.qlora`` op: the test oracle, never the fast path.

Each function follows the NF4 format of docs/nf4_format.md step by step, in float32 (the absmax
mean in float64), so that the C++ and CUDA kernels can be checked against it bit for bit (codec)
or within matmul tolerance (linear). Nothing here is tuned for speed.
"""

from __future__ import annotations

import functools
import math
import struct

import torch

from qlora_ext._tables import ABSMAX_CODE_MAP, BLOCK_SIZE, NF4_VALUES, SCALER_BLOCK_SIZE

# Lanes of the fixed reduction tree used for the absmax mean (mirrors one CUDA warp).
_LANES = 32


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    nf4 = torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    code_map = torch.tensor(ABSMAX_CODE_MAP, dtype=torch.float32, device=device)
    # Midpoints in float32, exactly as the kernels compute them.
    nf4_mid = (nf4[:-1] + nf4[1:]) / 2
    map_mid = (code_map[:-1] + code_map[1:]) / 2
    return nf4, nf4_mid, code_map, map_mid


def _nearest_code(scaled: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    # Code = number of midpoints strictly below the value: ties go to the lower code.
    return torch.bucketize(scaled, midpoints, right=False).to(torch.uint8)


# 1 / 1e-38 in float32, the kernels' compile-time constant (1e-38 is subnormal: with flush-to-zero on,
# torch.set_flush_denormal, a division by it at run time gives inf, and an all-zero block NaN).
_INVERSE_MIN_ABSMAX = struct.unpack("f", struct.pack("f", 1.0 / struct.unpack("f", struct.pack("f", 1e-38))[0]))[0]


def _scale(values: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    inv = torch.where(absmax > 1e-38, 1.0 / absmax, _INVERSE_MIN_ABSMAX)
    return (values * inv.unsqueeze(-1)).clamp(-1.0, 1.0)


def _butterfly(v: torch.Tensor) -> torch.Tensor:
    # XOR-shuffle tree over the last dim (32 lanes); every lane ends with the same sum.
    lanes = torch.arange(_LANES, device=v.device)
    for offset in (16, 8, 4, 2, 1):
        v = v + v[..., lanes ^ offset]
    return v[..., 0]


def _lane_sums(values: torch.Tensor) -> torch.Tensor:
    # values: [g, k * 32] -> [g, 32]; lane l adds elements l, l + 32, ... in order.
    g, n = values.shape
    strided = values.view(g, n // _LANES, _LANES)
    acc = torch.zeros(g, _LANES, dtype=values.dtype, device=values.device)
    for j in range(strided.shape[1]):
        acc = acc + strided[:, j, :]
    return acc


def absmax_mean(absmax: torch.Tensor) -> torch.Tensor:
    """Mean of the per-block absmax in the fixed float64 reduction order the kernels share."""
    nblocks = absmax.numel()
    groups = math.ceil(nblocks / SCALER_BLOCK_SIZE)
    padded = torch.zeros(groups * SCALER_BLOCK_SIZE, dtype=torch.float64, device=absmax.device)
    padded[:nblocks] = absmax.double()
    group_sums = _butterfly(_lane_sums(padded.view(groups, SCALER_BLOCK_SIZE)))  # [groups]
    k = math.ceil(groups / _LANES)
    padded_groups = torch.zeros(k * _LANES, dtype=torch.float64, device=absmax.device)
    padded_groups[:groups] = group_sums
    total = _butterfly(_lane_sums(padded_groups.view(1, k * _LANES)))[0]
    return (total / nblocks).float()


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4 + double quantization of ``weight`` -> (packed, absmax_codes, absmax_scales, offset)."""
    nf4, nf4_mid, code_map, map_mid = _tables(weight.device)
    blocks = weight.reshape(-1, BLOCK_SIZE).float()  # [nblocks, 64]
    absmax = blocks.abs().amax(dim=1)  # [nblocks]
    codes = _nearest_code(_scale(blocks, absmax), nf4_mid).view(-1, 2)
    packed = (codes[:, 0] << 4) | codes[:, 1]

    offset = absmax_mean(absmax)
    nblocks = absmax.numel()
    groups = math.ceil(nblocks / SCALER_BLOCK_SIZE)
    centered = torch.zeros(groups * SCALER_BLOCK_SIZE, dtype=torch.float32, device=weight.device)
    centered[:nblocks] = absmax - offset
    centered = centered.view(groups, SCALER_BLOCK_SIZE)  # zero padding never raises a group max
    scales = centered.abs().amax(dim=1)  # [groups]
    absmax_codes = _nearest_code(_scale(centered, scales), map_mid).view(-1)[:nblocks]
    return packed, absmax_codes, scales, offset


def dequantize_absmax(absmax_codes: torch.Tensor, absmax_scales: torch.Tensor, absmax_offset: torch.Tensor) -> torch.Tensor:
    """Per-block float32 absmax from its double-quantized form (multiply, then add: no FMA)."""
    _, _, code_map, _ = _tables(absmax_codes.device)
    group = torch.arange(absmax_codes.numel(), device=absmax_codes.device) // SCALER_BLOCK_SIZE
    return code_map[absmax_codes.long()] * absmax_scales[group] + absmax_offset


def dequantize_nf4(
    packed: torch.Tensor,
    absmax_codes: torch.Tensor,
    absmax_scales: torch.Tensor,
    absmax_offset: torch.Tensor,
    shape: list[int] | torch.Size,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dense tensor of ``shape`` and ``dtype`` from the four NF4 components."""
    nf4, _, _, _ = _tables(packed.device)
    absmax = dequantize_absmax(absmax_codes, absmax_scales, absmax_offset)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1, BLOCK_SIZE).long()
    return (nf4[codes] * absmax.unsqueeze(1)).to(dtype).view(shape)


def linear_nf4(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax_codes: torch.Tensor,
    absmax_scales: torch.Tensor,
    absmax_offset: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with W the float32 dequantized weight, computed in float64 and
    returned in float64: the exact result the kernels' rounding is measured against."""
    in_features = x.shape[-1]
    w = dequantize_nf4(packed, absmax_codes, absmax_scales, absmax_offset, [out_features, in_features], torch.float32)
    y = x.double() @ w.double().t()
    return y if bias is None else y + bias.double()


def linear_nf4_grad_input(
    grad_y: torch.Tensor,
    packed: torch.Tensor,
    absmax_codes: torch.Tensor,
    absmax_scales: torch.Tensor,
    absmax_offset: torch.Tensor,
    in_features: int,
) -> torch.Tensor:
    """``grad_y @ W``, in float64 (as ``linear_nf4``): the input gradient of the linear."""
    out_features = grad_y.shape[-1]
    w = dequantize_nf4(packed, absmax_codes, absmax_scales, absmax_offset, [out_features, in_features], torch.float32)
    return grad_y.double() @ w.double()
