"""LoRALinear's training forward and backward as one autograd function:
``y = base(x) + scaling * (dropout(x) @ A.T) @ B.T`` with a frozen base weight (NF4 or dense).

Composed from modules, that sum costs four [tokens, out] tensors in forward (the adapter's
output, its scaled copy, the sum, and the base output) and, in backward, a scaled copy of the
output gradient and a second [tokens, in] gradient that autograd then adds to the base's. Here
the adapter is added into the base output by one ``addmm_`` (the BLAS epilogue does the
scaling and the sum), and backward adds the adapter's share of the input gradient into the
base's gradient the same way; the adapter's [tokens, rank] intermediate is all it keeps besides
the inputs. Same products, fewer bytes: on the 2-core CPU a forward + backward of one LoRA
linear (512 tokens, rank 8, fp32, in/out among 256, 768 and 2048) took 15-36% less time
(measured ad hoc, not in bench/).

Backward is written in differentiable ops of the inputs, so second derivatives work (with
``create_graph`` it recomputes that intermediate and adds out of place). Under torch.func
transforms (vmap has no in-place rule) the adds are out of place too, and where forward-mode AD
reaches the call a subclass with a ``jvp`` is taken (qlora_ext._transforms).

The weight gets no gradient (that is what "frozen" means here; a trainable base takes the
composed path in ``LoRALinear``), and the adapter computes in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qlora_ext import ops
from qlora_ext._transforms import forward_ad_reaches, functorch_active
from qlora_ext.nf4 import NF4Tensor


def _base_forward(x: Tensor, weight: tuple[Tensor, ...], out_features: int, bias: Tensor | None) -> Tensor:
    if len(weight) == 1:
        return F.linear(x, weight[0], bias)
    if bias is not None:  # (under autocast a bf16 x meets an fp32 bias: cast as linear_nf4 and F.linear do)
        bias = bias.to(x.dtype)
    return ops.linear_nf4(x, *weight, out_features, bias)


def _base_grad_input(grad_y: Tensor, weight: tuple[Tensor, ...], in_features: int) -> Tensor:
    if len(weight) == 1:  # under autocast a dense fp32 weight met a bf16 x in forward: cast as it did
        return grad_y @ weight[0].to(grad_y.dtype)
    return ops.linear_nf4_grad_input(grad_y, *weight, in_features)


def _save_for_backward(ctx, inputs, output) -> None:
    x, x_lora, a_weight, b_weight, scaling, bias, out_features, *weight = inputs
    weight = [w for w in weight if w is not None]
    # The inputs themselves are saved (not views or casts made here), so that backward, written in
    # differentiable ops of them, also gives second derivatives.
    ctx.save_for_backward(x if x_lora is None else x_lora, output[1], a_weight, b_weight, *weight)
    ctx.scaling, ctx.in_features, ctx.lora_in_is_x = scaling, x.shape[-1], x_lora is None
    ctx.bias_dtype = None if bias is None else bias.dtype


class _LoRALinearFunction(torch.autograd.Function):
    """Inputs: x [..., in]; x_lora (dropout(x)) or None when the adapter sees x itself; the
    adapter weights A [rank, in] and B [out, rank]; scaling; bias or None; out_features; then the
    base weight as one dense tensor and three Nones, or as its four NF4 components. Outputs:
    y [..., out], and the adapter's intermediate [tokens, rank] for backward (not differentiable).

    Written with ``setup_context`` (no ``ctx`` in forward) and ``generate_vmap_rule``, so that
    torch.func's transforms (grad, vmap: per-sample gradients) take it as they take plain ops.
    (A fixed argument list, no ``*weight``: torch.compile, tracing it without grad, counts a
    ``*args`` as one parameter and then passes a ctx to forward.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, x_lora, a_weight, b_weight, scaling, bias, out_features, w0, w1, w2, w3):
        weight = (w0,) if w1 is None else (w0, w1, w2, w3)
        in_features = x.shape[-1]
        lora_input = x if x_lora is None else x_lora
        y = _base_forward(x, weight, out_features, bias)  # [..., out], fresh
        a = torch.mm(lora_input.reshape(-1, in_features), a_weight.to(x.dtype).t())  # [t, rank]
        if functorch_active():  # vmap has no in-place rule (it ran addmm_ sample by sample)
            return y + scaling * torch.mm(a, b_weight.to(x.dtype).t()).view(y.shape), a
        y.view(-1, out_features).addmm_(a, b_weight.to(x.dtype).t(), alpha=scaling)  # y += scaling * a @ B.T
        return y, a

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        _save_for_backward(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_y, grad_a=None):
        lora_input, a, a_weight, b_weight, *weight = ctx.saved_tensors
        lora_in = lora_input.reshape(-1, ctx.in_features)  # [t, in]
        a_w, b_w = a_weight.to(grad_y.dtype), b_weight.to(grad_y.dtype)
        if torch.is_grad_enabled():  # create_graph: the saved product has no history; recompute it
            a = torch.mm(lora_in, a_w.t())
        g = grad_y.reshape(-1, grad_y.shape[-1])  # [t, out]
        grad_a = torch.mm(g, b_w) * ctx.scaling  # [t, rank]: d loss / d (x_lora @ A.T)
        grad_a_weight = grad_b_weight = grad_x = grad_x_lora = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_a_weight = torch.mm(grad_a.t(), lora_in).to(a_weight.dtype)  # [rank, in]
        if ctx.needs_input_grad[3]:
            # [out, rank], as the transpose of a [rank, out] product: MKL takes a quarter of the
            # time for that shape (24 vs 94 us at 512 tokens, out 768; 85 vs 267 at out 2048;
            # measured ad hoc on the 2-core AVX-512 Xeon, not in bench/)
            grad_b_weight = (torch.mm(a.t(), g) * ctx.scaling).t().to(b_weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = _base_grad_input(grad_y, weight, ctx.in_features)  # [..., in], fresh
            # create_graph: no in-place on an op's output; vmap: no in-place rule
            if ctx.lora_in_is_x and (torch.is_grad_enabled() or functorch_active()):
                grad_x = grad_x + torch.mm(grad_a, a_w).view(grad_x.shape)
            elif ctx.lora_in_is_x:
                grad_x.view(-1, ctx.in_features).addmm_(grad_a, a_w)
        if ctx.needs_input_grad[1]:
            grad_x_lora = torch.mm(grad_a, a_w).view(lora_input.shape)
        if ctx.needs_input_grad[5]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_x_lora, grad_a_weight, grad_b_weight, None, grad_bias, None, None, None, None, None


class _LoRALinearForwardAD(_LoRALinearFunction):
    """The same function with a forward-mode rule (torch.func.jvp, jacfwd, torch.autograd.forward_ad),
    taken only where forward mode reaches the call (qlora_ext._transforms): torch.compile does not
    trace a function that has a ``jvp``."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        # The intermediate a stays differentiable here, with its own tangent: for a non-differentiable
        # output torch wants None from jvp, but under jvp(vmap(...)) None hits an internal assert.
        _save_for_backward(ctx, inputs, output)
        x, x_lora, a_weight, b_weight, _, _, out_features, *weight = inputs
        ctx.save_for_forward(x if x_lora is None else x_lora, output[1], a_weight, b_weight, *(w for w in weight if w is not None))
        ctx.out_shape, ctx.out_features = (*x.shape[:-1], out_features), out_features

    @staticmethod
    def jvp(ctx, x_t, x_lora_t, a_weight_t, b_weight_t, _scaling, bias_t, _out_features, *_weight_t):
        """y's tangent: each input's tangent through y's (bi)linear terms; the frozen weight has none."""
        lora_input, a, a_weight, b_weight, *weight = ctx.saved_tensors
        dtype = a.dtype
        lora_in = lora_input.reshape(-1, ctx.in_features)
        y_t = a.new_zeros(ctx.out_shape)
        if x_t is not None or bias_t is not None:
            base_in = x_t if x_t is not None else lora_input.new_zeros(lora_input.shape)
            y_t = y_t + _base_forward(base_in, tuple(weight), ctx.out_features, bias_t)
        lora_in_t = x_t if ctx.lora_in_is_x else x_lora_t
        a_t = None  # the tangent of a = lora_in @ A.T
        if lora_in_t is not None:
            a_t = torch.mm(lora_in_t.reshape(-1, ctx.in_features), a_weight.to(dtype).t())
        if a_weight_t is not None:
            term = torch.mm(lora_in, a_weight_t.to(dtype).t())
            a_t = term if a_t is None else a_t + term
        flat = y_t.view(-1, ctx.out_features)
        if a_t is not None:
            flat = flat + ctx.scaling * torch.mm(a_t, b_weight.to(dtype).t())
        if b_weight_t is not None:
            flat = flat + ctx.scaling * torch.mm(a, b_weight_t.to(dtype).t())
        return flat.view(ctx.out_shape), a_t if a_t is not None else torch.zeros_like(a)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a_weight: Tensor,
    b_weight: Tensor,
    scaling: float,
    x_lora: Tensor | None = None,
) -> Tensor:
    """``base(x) + scaling * (x_lora @ a_weight.T) @ b_weight.T``, in x's dtype.

    Args:
        x: [..., in] input of the base linear.
        weight: frozen [out, in] base weight, an ``NF4Tensor`` or a dense tensor of x's dtype.
        bias: frozen [out] base bias or None.
        a_weight: [rank, in] adapter down-projection (``lora_a.weight``).
        b_weight: [out, rank] adapter up-projection (``lora_b.weight``).
        scaling: the adapter's scale, alpha / rank.
        x_lora: the adapter's input when it is not x itself (dropout applied), shaped as x.

    Returns:
        [..., out] tensor of x's dtype. Gradients flow to x, x_lora, the adapter weights and a
        bias that requires one; never to ``weight``.
    """
    if isinstance(weight, NF4Tensor):
        base = weight.components()
    else:
        base = (weight.detach(), None, None, None)
    forward_mode = forward_ad_reaches(x, x_lora, a_weight, b_weight, bias)
    function = _LoRALinearForwardAD if forward_mode else _LoRALinearFunction
    return function.apply(x, x_lora, a_weight, b_weight, scaling, bias, weight.shape[0], *base)[0]
