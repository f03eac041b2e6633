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
    """The dtype autocast computes in on ``device_type`` where it is on there, else None. The meta
    device has no autocast state to ask (torch raises); ``torch.amp.is_autocast_available`` would
    tell, but torch.compile before torch 2.12 cannot trace it, and a compiled region is fullgraph."""
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
