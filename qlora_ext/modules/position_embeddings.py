"""Rotary positional embeddings (RoPE) in the HF Llama convention ("rotate half").

The two halves of each head dimension form the rotated pairs: element ``i`` pairs with
``i + head_dim / 2``. Meta's original checkpoints pair adjacent elements instead; their q/k
projection rows are permuted on load (``qlora_ext.checkpoint``), so one convention serves both.

For float32 input outside ``torch.compile`` the rotation is one autograd function that writes its
output in three passes (``x * cos``, then a multiply-add into each half) and backward the same
way, where the formula also builds the negated half and the concatenation and autograd slices its
gradient back apart. On the 2-core CPU a forward + backward of [2, 256, 12, 64] took 0.43 instead
of 1.1 ms (measured ad hoc, not in bench/). Compiled code keeps the formula, which inductor fuses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qlora_ext._arguments import is_finite_real
from qlora_ext._transforms import transforms_reach


class _RotateHalfFunction(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin`` for float32 x, with ``rotate_half(x) = cat(-x2, x1)``."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # noqa: ANN001
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1.0)  # x1 c - x2 s
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])  # x2 c + x1 s
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: ANN001, ANN206
        # Linear in x with constant tables: the transposed rotation. In place on a fresh tensor,
        # which autograd can still differentiate (the tables get no gradient).
        cos, sin = ctx.saved_tensors
        half = grad_out.shape[-1] // 2
        grad_x = grad_out * cos
        grad_x[..., :half].addcmul_(grad_out[..., half:], sin[..., half:])  # g1 c + g2 s
        grad_x[..., half:].addcmul_(grad_out[..., :half], sin[..., :half], value=-1.0)  # g2 c - g1 s
        return grad_x, None, None


class RotaryPositionalEmbeddings(nn.Module):
    """Rotates query/key vectors by position-dependent angles ``pos * base^(-2i / dim)``.

    Args:
        dim: the head dimension (even).
        max_seq_len: positions with a precomputed cos/sin entry.
        base: the frequency base (Llama-2: 10000).

    Raises:
        ValueError: ``dim`` is odd or not positive, or ``max_seq_len`` is not positive.
    """

    def __init__(self, dim: int, max_seq_len: int = 4096, base: float = 10_000.0):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"RotaryPositionalEmbeddings: argument 'dim' must be a positive even number; got {dim}")
        if max_seq_len <= 0:
            raise ValueError(f"RotaryPositionalEmbeddings: argument 'max_seq_len' must be positive; got {max_seq_len}")
        if not (is_finite_real(base) and base > 0):
            raise ValueError(f"RotaryPositionalEmbeddings: argument 'base' must be a finite number > 0; got {base!r}")
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.rope_init()

    def rope_init(self, device: torch.device | str | None = None) -> None:
        """(Re)computes the cos/sin tables, on ``device`` (default: where they are now, or, from the
        meta device, torch's current default device).

        A model built on the meta device calls this once its weights are materialized: after
        ``to_empty(device=...)``, or, as torchtune's recipes do, inside ``with torch.device(...)``.
        """
        if device is None and hasattr(self, "cos") and self.cos.device.type != "meta":
            device = self.cos.device
        # Same arithmetic as HF's LlamaRotaryEmbedding (int64 arange cast to float32, then a
        # float32 power and outer product) so the tables agree with it bit for bit.
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim))
        positions = torch.arange(self.max_seq_len, dtype=torch.int64, device=device).float()
        freqs = torch.outer(positions, inv_freq)  # [max_seq_len, dim / 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [max_seq_len, dim]
        # Non-persistent: derived data, never part of a checkpoint.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor, *, input_pos: Tensor | None = None) -> Tensor:
        """Applies the rotation.

        Args:
            x: [b, s, n_heads, head_dim].
            input_pos: positions of the s tokens, [s] or [b, s] (int); default ``arange(s)``.

        Returns:
            The rotated tensor, same shape and dtype as ``x``.
        """
        seq_len = x.shape[1]
        if input_pos is None:
            cos, sin = self.cos[:seq_len], self.sin[:seq_len]  # [s, d]
        else:
            cos, sin = self.cos[input_pos], self.sin[input_pos]  # [s, d] or [b, s, d]
        # Cast the tables to x's dtype before multiplying, as HF does, so bf16 runs round alike.
        cos = cos.unsqueeze(-2).to(x.dtype)  # [..., s, 1, d]: broadcast over heads
        sin = sin.unsqueeze(-2).to(x.dtype)
        if x.dtype == torch.float32 and not torch.compiler.is_compiling() and not transforms_reach(x):
            return _RotateHalfFunction.apply(x, cos, sin)  # (torch.func and forward-mode AD take the formula)
        half = self.dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
