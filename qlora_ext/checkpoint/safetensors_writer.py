"""Writes a safetensors file one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; a 5 GB shard of a
merged model would then be 5 GB of extra RAM. The format is simple enough to stream instead: an
8-byte little-endian header length, a JSON header with each tensor's dtype, shape and byte range,
then the raw bytes in that order. Shapes are known in advance, so the header is written first and
each tensor is produced, written and dropped in turn.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

_DTYPE_CODES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * torch.empty((), dtype=dtype).element_size()


def write_safetensors(
    path: str,
    specs: Sequence[tuple[str, Sequence[int], torch.dtype]],
    produce: Callable[[str], Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes ``path`` holding the tensors named in ``specs``, calling ``produce(name)`` for each
    just before its bytes are written.

    Args:
        path: the file to write (use a temporary name; see ``qlora_ext.checkpoint.atomic``).
        specs: (name, shape, dtype) of every tensor, in file order.
        produce: returns the tensor for a name, of exactly the promised shape and dtype.
        metadata: string pairs for the header (transformers expects {"format": "pt"}).

    Raises:
        ValueError: an unsupported dtype, or a produced tensor that breaks its spec.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"write_safetensors: tensor '{name}' has unsupported dtype {dtype}")
        size = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header so data starts 8-aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype in specs:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"write_safetensors: tensor '{name}' must be {dtype} of shape {list(shape)}; "
                    f"got {tensor.dtype} of shape {list(tensor.shape)}"
                )
            # Raw little-endian bytes, as the format stores them (x86 and ARM hosts are LE).
            f.write(memoryview(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()))
            del tensor
