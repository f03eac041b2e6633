"""Typed wrappers over ``torch.ops.qlora.*``, each followed by its fake kernel and autograd; at the
end, the CPU kernels' settings (``torch.ops.qlora_cpu.*``: which instruction set, bf16 BLAS tiles).

The kernels are C++ (CPU) and CUDA, registered by the compiled library; the fake kernels here let
``torch.compile`` trace the ops without running them (and meta tensors go through them), with
the kernels' argument checks (``_fake_checks``). Storage layout: docs/nf4_format.md.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from qlora_ext import _extension  # noqa: F401  (registers torch.ops.qlora)
from qlora_ext._fake_checks import check_bias, check_dequantize, check_matmul_input, check_quantizable
from qlora_ext._tables import BLOCK_SIZE, SCALER_BLOCK_SIZE
from qlora_ext._transforms import forward_ad_reaches, functorch_active

_ops = torch.ops.qlora


def quantize_nf4(weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NF4 + double quantization: (packed, absmax_codes, absmax_scales, absmax_offset)."""
    return _ops.quantize_nf4(weight)


@torch.library.register_fake("qlora::quantize_nf4")
def _quantize_nf4_fake(weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_quantizable("quantize_nf4", "weight", weight)
    nblocks = weight.numel() // BLOCK_SIZE
    groups = (nblocks + SCALER_BLOCK_SIZE - 1) // SCALER_BLOCK_SIZE
    return (
        weight.new_empty(nblocks * BLOCK_SIZE // 2, dtype=torch.uint8),
        weight.new_empty(nblocks, dtype=torch.uint8),
        weight.new_empty(groups, dtype=torch.float32),
        weight.new_empty((), dtype=torch.float32),
    )


def _quantize_setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output)


def _quantize_backward(ctx, *grads):
    return None  # rounding to codes has no useful gradient; the outputs are marked as such


torch.library.register_autograd("qlora::quantize_nf4", _quantize_backward, setup_context=_quantize_setup_context)


def dequantize_nf4(
    packed: Tensor,
    absmax_codes: Tensor,
    absmax_scales: Tensor,
    absmax_offset: Tensor,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> Tensor:
    """The dense tensor of ``shape`` and ``dtype`` that the four NF4 components encode."""
    if isinstance(shape, (str, bytes, Tensor)) or not isinstance(shape, Sequence):
        raise TypeError(f"qlora::dequantize_nf4: argument 'shape' must be a list or tuple of ints; got {type(shape).__name__}")
    return _ops.dequantize_nf4(packed, absmax_codes, absmax_scales, absmax_offset, list(shape), dtype)


@torch.library.register_fake("qlora::dequantize_nf4")
def _dequantize_nf4_fake(packed, absmax_codes, absmax_scales, absmax_offset, shape, dtype):
    check_dequantize((packed, absmax_codes, absmax_scales, absmax_offset), shape, dtype)
    return packed.new_empty(shape, dtype=dtype)


def linear_nf4(
    x: Tensor,
    packed: Tensor,
    absmax_codes: Tensor,
    absmax_scales: Tensor,
    absmax_offset: Tensor,
    out_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """``x @ W.T (+ bias)`` with W [out_features, in] given as its four NF4 components."""
    forward_mode = forward_ad_reaches(x, bias)
    if forward_mode or functorch_active():  # (see the functions' comment below)
        function = _LinearNF4ForwardAD if forward_mode else _LinearNF4Function
        return function.apply(x, packed, absmax_codes, absmax_scales, absmax_offset, out_features, bias)
    return _ops.linear_nf4(x, packed, absmax_codes, absmax_scales, absmax_offset, out_features, bias)


@torch.library.register_fake("qlora::linear_nf4")
def _linear_nf4_fake(x, packed, absmax_codes, absmax_scales, absmax_offset, out_features, bias=None):
    check_matmul_input("linear_nf4", x, "x", (packed, absmax_codes, absmax_scales, absmax_offset), out_features, "out_features")
    check_bias("linear_nf4", bias, x, out_features)
    return x.new_empty((*x.shape[:-1], out_features))


def linear_nf4_grad_input(
    grad_y: Tensor,
    packed: Tensor,
    absmax_codes: Tensor,
    absmax_scales: Tensor,
    absmax_offset: Tensor,
    in_features: int,
) -> Tensor:
    """``grad_y @ W`` with W [out, in_features] given as its four NF4 components."""
    forward_mode = forward_ad_reaches(grad_y)
    if forward_mode or functorch_active():
        function = _GradInputNF4ForwardAD if forward_mode else _GradInputNF4Function
        return function.apply(grad_y, packed, absmax_codes, absmax_scales, absmax_offset, in_features)
    return _ops.linear_nf4_grad_input(grad_y, packed, absmax_codes, absmax_scales, absmax_offset, in_features)


@torch.library.register_fake("qlora::linear_nf4_grad_input")
def _linear_nf4_grad_input_fake(grad_y, packed, absmax_codes, absmax_scales, absmax_offset, in_features):
    check_matmul_input(
        "linear_nf4_grad_input", grad_y, "grad_y", (packed, absmax_codes, absmax_scales, absmax_offset), in_features, "in_features"
    )
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


# Autograd. W is frozen: its components never get a gradient, and backward keeps only them (and
# sizes), never a dense copy of W. The two linear ops are each other's backward, so double
# backward works too.


def _linear_setup_context(ctx, inputs, output) -> None:
    x, packed, absmax_codes, absmax_scales, absmax_offset, _, _ = inputs
    ctx.save_for_backward(packed, absmax_codes, absmax_scales, absmax_offset)
    ctx.in_features = x.shape[-1]


def _linear_backward(ctx, grad_y: Tensor):
    weight = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = linear_nf4_grad_input(grad_y, *weight, ctx.in_features)
    if len(ctx.needs_input_grad) > 6 and ctx.needs_input_grad[6]:  # bias=None leaves it out
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, grad_bias


torch.library.register_autograd("qlora::linear_nf4", _linear_backward, setup_context=_linear_setup_context)


def _grad_input_setup_context(ctx, inputs, output) -> None:
    grad_y, packed, absmax_codes, absmax_scales, absmax_offset, _ = inputs
    ctx.save_for_backward(packed, absmax_codes, absmax_scales, absmax_offset)
    ctx.out_features = grad_y.shape[-1]


def _grad_input_backward(ctx, grad_grad_x: Tensor):
    grad_grad_y = None
    if ctx.needs_input_grad[0]:
        grad_grad_y = linear_nf4(grad_grad_x, *ctx.saved_tensors, ctx.out_features)
    return grad_grad_y, None, None, None, None, None


torch.library.register_autograd(
    "qlora::linear_nf4_grad_input", _grad_input_backward, setup_context=_grad_input_setup_context
)


# torch.func and forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd / hessian).
# register_autograd's function has no setup_context, which torch.func needs (grad and jacrev
# refused the op), and no forward rule: torch runs an op whose inputs need no gradient below
# autograd, so a dual x's tangent was silently dropped (a zero tangent from torch.func.jvp). While
# a transform is at work (qlora_ext._transforms), the wrappers above go through these functions
# instead: the first with backward only, the second with a forward rule too, taken only where
# forward mode reaches the call (torch.compile refuses a function with a jvp). Both ops are linear
# in their first argument (and in bias), so the tangent is the same op applied to the tangents.
# Otherwise (training, torch.compile) the ops are called directly.


class _LinearNF4Function(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, packed, absmax_codes, absmax_scales, absmax_offset, out_features, bias):
        return _ops.linear_nf4(x, packed, absmax_codes, absmax_scales, absmax_offset, out_features, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _linear_setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        return _linear_backward(ctx, grad_y)


class _LinearNF4ForwardAD(_LinearNF4Function):
    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _linear_setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[1:5])
        ctx.x_shape, ctx.x_dtype, ctx.out_features = inputs[0].shape, inputs[0].dtype, inputs[5]

    @staticmethod
    def jvp(ctx, x_tangent, _packed, _codes, _scales, _offset, _out_features, bias_tangent):
        # The weight's components are not differentiable (as in backward: the weight is frozen).
        weight = ctx.saved_tensors
        if x_tangent is None:
            x_tangent = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=weight[0].device)
        return linear_nf4(x_tangent, *weight, ctx.out_features, bias_tangent)


class _GradInputNF4Function(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, packed, absmax_codes, absmax_scales, absmax_offset, in_features):
        return _ops.linear_nf4_grad_input(grad_y, packed, absmax_codes, absmax_scales, absmax_offset, in_features)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _grad_input_setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_grad_x: Tensor):
        return _grad_input_backward(ctx, grad_grad_x)


class _GradInputNF4ForwardAD(_GradInputNF4Function):
    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _grad_input_setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[1:5])
        ctx.in_features = inputs[5]

    @staticmethod
    def jvp(ctx, grad_y_tangent, _packed, _codes, _scales, _offset, _in_features):
        return linear_nf4_grad_input(grad_y_tangent, *ctx.saved_tensors, ctx.in_features)


# vmap (torch.func.vmap: per-sample gradients, jacrev). Without these rules torch ran the linear ops
# once per sample, with a warning. Both take any leading dims, so a batched x or grad_y is one call
# with its batch dim in front; a weight batched too (one per sample) is one call per sample.


def _batch_in_front(t: Tensor, dim: int | None, batch_size: int) -> Tensor:
    return t.movedim(dim, 0) if dim is not None else t.expand(batch_size, *t.shape)


def _call_per_sample(op, batch_size: int, in_dims, args) -> tuple[Tensor, int]:
    samples = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(batch_size)]
    return torch.stack(samples), 0


@torch.library.register_vmap("qlora::linear_nf4")
def _linear_nf4_vmap(info, in_dims, x, packed, absmax_codes, absmax_scales, absmax_offset, out_features, bias=None):
    weight = (packed, absmax_codes, absmax_scales, absmax_offset)
    if any(d is not None for d in in_dims[1:5]):
        return _call_per_sample(_ops.linear_nf4, info.batch_size, in_dims, (x, *weight, out_features, bias))
    x = _batch_in_front(x, in_dims[0], info.batch_size)
    bias_dim = in_dims[6] if len(in_dims) > 6 else None
    if bias_dim is None:
        return _ops.linear_nf4(x, *weight, out_features, bias), 0
    y = _ops.linear_nf4(x, *weight, out_features)  # a bias per sample: [batch, out] onto [batch, ..., out]
    bias = bias.movedim(bias_dim, 0)
    return y + bias.view(bias.shape[0], *[1] * (y.dim() - 2), bias.shape[-1]).to(y.dtype), 0


@torch.library.register_vmap("qlora::linear_nf4_grad_input")
def _linear_nf4_grad_input_vmap(info, in_dims, grad_y, packed, absmax_codes, absmax_scales, absmax_offset, in_features):
    weight = (packed, absmax_codes, absmax_scales, absmax_offset)
    if any(d is not None for d in in_dims[1:5]):
        return _call_per_sample(_ops.linear_nf4_grad_input, info.batch_size, in_dims, (grad_y, *weight, in_features))
    return _ops.linear_nf4_grad_input(_batch_in_front(grad_y, in_dims[0], info.batch_size), *weight, in_features), 0


def cpu_kernel_isa() -> str:
    """The CPU kernels in use: "avx512", "avx2" or "portable"."""
    return torch.ops.qlora_cpu.cpu_kernel_isa()


def set_cpu_kernel_isa(name: str) -> None:
    """Chooses the CPU kernels: "auto" (the best this CPU runs), "avx512", "avx2" or "portable".

    For the whole process, every thread: a call already running finishes with the kernels it
    started with, and each call reads the choice once, so it never mixes two."""
    torch.ops.qlora_cpu.set_cpu_kernel_isa(name)


def available_cpu_kernel_isas() -> list[str]:
    """The CPU kernel tables this CPU and build run, best first ("avx512", "avx2", "portable").
    Found by choosing each in turn (then the one in use again): call it while no op runs."""
    before, found = cpu_kernel_isa(), []
    for name in ("avx512", "avx2", "portable"):
        try:
            set_cpu_kernel_isa(name)
            found.append(name)
        except ValueError:
            pass
    set_cpu_kernel_isa(before)
    return found


def cpu_bf16_gemm() -> bool:
    """Whether CPU ``linear_nf4`` multiplies bf16 activations (more rows than the fused small-M
    kernels take) by bf16 tiles of W with torch's bf16 BLAS, rounding each output once, rather than
    in float32: by default where the CPU has AVX512-BF16; ``QLORA_CPU_BF16_GEMM=0`` or ``=1`` in
    the environment decides instead, at each call."""
    return torch.ops.qlora_cpu.cpu_bf16_gemm()


def _check_isa_from_environment() -> None:
    """``QLORA_CPU_ISA`` in the environment picks the CPU kernels (the library reads it when the
    first CPU op runs); a name this CPU or build cannot use is said here, not silently replaced."""
    name = os.environ.get("QLORA_CPU_ISA")
    if name:
        try:
            set_cpu_kernel_isa(name)
        except ValueError as e:
            warnings.warn(f"environment variable QLORA_CPU_ISA is ignored: {e}; the CPU kernels are {cpu_kernel_isa()!r}")


_check_isa_from_environment()
