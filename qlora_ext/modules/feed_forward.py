"""The SwiGLU feed-forward block of Llama-2."""

from __future__ import annotations

from torch import Tensor, nn


class FeedForward(nn.Module):
    """``w2(silu(w1(x)) * w3(x))`` (torchtune's attribute names: w1 gate, w2 down, w3 up).

    Args:
        gate_proj: embed_dim -> hidden_dim (nn.Linear or LoRALinear).
        down_proj: hidden_dim -> embed_dim.
        up_proj: embed_dim -> hidden_dim.
        activation: applied to the gate; default SiLU.
    """

    def __init__(self, *, gate_proj: nn.Module, down_proj: nn.Module, up_proj: nn.Module, activation: nn.Module | None = None):
        super().__init__()
        self.w1 = gate_proj
        self.w2 = down_proj
        self.w3 = up_proj
        self.activation = activation if activation is not None else nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.activation(self.w1(x)) * self.w3(x))
