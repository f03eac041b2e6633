"""Whether torch.func transforms (vmap, grad, jvp, jacrev, hessian ...) or forward-mode AD
(``torch.autograd.forward_ad``) are at work on a call.

The package's fast paths are written for ordinary training and ``torch.compile``: the linear ops'
autograd comes from ``torch.library.register_autograd`` (no setup_context that torch.func needs,
no forward-mode rule), and the fused autograd functions of the modules add in place and keep
buffers. While a transform is at work they give way to forms the transforms take; otherwise (and
so under ``torch.compile`` of ordinary training) nothing changes. Dual levels are process-wide, so
outside torch.func transforms forward mode counts only where a call's own tensors carry a tangent.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad


def functorch_active() -> bool:
    """A torch.func transform is active (calls inside vmap, grad, jvp, jacrev ...)."""
    # Asked this way so that torch.compile (dynamo) can answer it while tracing, on torch 2.11 as
    # on 2.14. Other ways failed: dynamo on 2.11 cannot call get_dynamic_layer_stack_depth, and
    # `peek_interpreter_stack() is not None` was always True under dynamo.
    return isinstance(torch._C._functorch.peek_interpreter_stack(), torch._C._functorch.CInterpreter)


def forward_ad_reaches(*tensors: Tensor | None) -> bool:
    """Forward-mode AD may need the call's output tangent: a torch.func jvp (jacfwd, hessian,
    linearize ...) is active, or one of ``tensors`` has a tangent at an open dual level. Inside any
    torch.func transform it also answers yes while a dual level is open (the tangents of vmapped
    tensors cannot be looked up) and while torch.compile traces (see below): a function with a jvp
    gives the same results, only a little more work."""
    functorch = functorch_active()
    if functorch:
        if torch.compiler.is_compiling():
            # dynamo cannot trace these functions under a transform ("You tried to vmap over
            # ApplyTemplate"); one with a jvp it refuses cleanly, running that part eagerly
            return True
        jvp = torch._C._functorch.TransformType.Jvp
        if any(interpreter.key() == jvp for interpreter in torch._C._functorch.get_interpreter_stack() or ()):
            return True
    if forward_ad._current_level >= 0:  # (unpack_dual cannot look into a vmapped tensor: under torch.func, yes)
        return functorch or any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


def transforms_reach(*tensors: Tensor | None) -> bool:
    """A torch.func transform is active, or forward-mode AD reaches one of ``tensors``."""
    return functorch_active() or forward_ad_reaches(*tensors)


def unwrapped(t: Tensor) -> Tensor:
    """The tensor a torch.func transform wrapped (for grad, jvp or vmap), else ``t`` itself."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def vmapped(t: Tensor) -> bool:
    """``t`` is batched by a torch.func.vmap (under any other transforms' wrappers): its values
    cannot be read (``int(t)``, ``bool(t.any())``, boolean-mask indexing)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.is_batchedtensor(t):
            return True
        t = torch._C._functorch.get_unwrapped(t)
    return False
