"""RMSNorm as in Llama-2: normalize by the root mean square, in float32, then scale."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last dimension.

    Args:
        dim: size of the last dimension (and of the learned ``scale``).
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # The statistic is taken in float32 even for bf16 activations (as Llama and HF do): the
        # mean of squares of 4096 bf16 values loses too much otherwise. Casting back before the
        # scale multiply matches HF's rounding order exactly.
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.scale
