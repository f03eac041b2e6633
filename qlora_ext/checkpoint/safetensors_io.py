"""safetensors files read and written one tensor at a time, with plain file I/O.

The format: an 8-byte little-endian header length, a JSON header with each tensor's dtype, shape
and byte range, then the raw bytes. ``safetensors.torch.save_file`` needs every tensor of a file
in memory at once (a 5 GB shard of a merged model would be 5 GB of extra RAM), so writing streams
instead: shapes are known in advance, the header goes first, and each tensor is produced,
written and dropped in turn. Reading uses ``readinto`` into a fresh tensor rather than the
``safetensors`` package's memory map: tensors read from a mapping keep its pages resident (and
counted in the process's memory) for as long as any of them lives, while a read copy owns exactly
its own bytes and leaves the file's pages to the page cache.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

_DTYPE_CODES: dict[torch.dtype, str] = {
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


_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def _bytes_of(tensor: Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no numpy needed); the tensor
    must outlive the view."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


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
            data = tensor.detach().contiguous().cpu()
            f.write(_bytes_of(data))
            del tensor, data


class SafetensorsReader:
    """Reads tensors of one safetensors file by name, each into its own memory.

    Args:
        path: the file.

    Raises:
        ValueError: a folder or an unreadable file, a malformed header or a dtype this reader
            does not know.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open(path, "rb")
        except (IsADirectoryError, PermissionError) as e:
            raise ValueError(f"{path} cannot be read as a safetensors file: {e.strerror}") from None
        try:
            (length,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(length))
        except (struct.error, ValueError) as e:
            self._file.close()
            raise ValueError(f"{path} is not a safetensors file: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._base = 8 + length
        data_size = os.fstat(self._file.fileno()).st_size - self._base
        self._specs: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, spec in header.items():
            if not isinstance(spec, dict) or any(key not in spec for key in ("dtype", "shape", "data_offsets")):
                self._file.close()
                raise ValueError(f"{path} is not a safetensors file: tensor '{name}' must have dtype, shape and data_offsets; got {spec!r:.200}")
            if spec["dtype"] not in _CODE_DTYPES:
                self._file.close()
                raise ValueError(f"{path}: tensor '{name}' has dtype {spec['dtype']}, which this reader does not support")
            dtype, shape = _CODE_DTYPES[spec["dtype"]], tuple(spec["shape"])
            start, end = spec["data_offsets"]
            # Checked here, so a loader that checks every entry before loading any never finds a
            # short or inconsistent file halfway through.
            if not 0 <= start <= end <= data_size or end - start != tensor_nbytes(shape, dtype):
                self._file.close()
                raise ValueError(
                    f"{path}: tensor '{name}' ({spec['dtype']} {list(shape)}) has data offsets {[start, end]} that do not fit "
                    f"its size or the file's {data_size} data bytes (a truncated or corrupt file)"
                )
            self._specs[name] = (dtype, shape, start, end)

    def keys(self) -> list[str]:
        return list(self._specs)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._specs[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._specs[name][0]

    def get(self, name: str) -> Tensor:
        """The tensor ``name``, freshly read.

        Raises:
            ValueError: the file is shorter than its header says.
        """
        dtype, shape, start, end = self._specs[name]
        tensor = torch.empty(shape, dtype=dtype)
        if end > start:
            self._file.seek(self._base + start)
            if self._file.readinto(_bytes_of(tensor)) != end - start:
                raise ValueError(f"{self.path}: tensor '{name}' is truncated")
        return tensor

    def close(self) -> None:
        self._file.close()
