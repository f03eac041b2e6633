"""Floating-point dtypes by the names HF writes in config.json (``torch_dtype``) and in
bitsandbytes quant states, a scoped torch default dtype, and autocast's dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# The floating-point dtypes by HF's names; the CLIs' --dtype choices too.
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The same three: what NF4 quantizes from and dequantizes to, and the kernels compute in.
FLOAT_DTYPES = tuple(HF_DTYPES.values())


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` inside the block (None: left as it is), restored after."""
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` where it is on there, else None. A device
    without autocast (meta, lazy, ...) has no state to ask (torch raises), which
    ``torch.amp.is_autocast_available`` tells; torch.compile of torch 2.11 cannot trace that call,
    so while compiling (CPU, CUDA: devices with autocast) it is left out, and meta is named."""
    if device_type == "meta" or not (torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)):
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
