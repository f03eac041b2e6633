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

from qlora_ext._arguments import parse_error_text

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


# The safetensors reference implementation refuses longer headers; a damaged length field could
# otherwise ask for any amount of memory.
_MAX_HEADER_BYTES = 100_000_000

_Spec = tuple[torch.dtype, tuple[int, ...], int, int]


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"the header names tensors more than once: {twice[:10]}")
    return dict(pairs)


def _read_header(path: str, file) -> tuple[dict, dict[str, _Spec], int]:  # noqa: ANN001
    """(metadata, {name: (dtype, shape, start, end)}, offset of the data) of an open safetensors
    file, every entry checked: a loader that checks all entries before loading any then never
    meets a short or inconsistent file halfway through.

    Raises:
        ValueError: a malformed header, naming the file, the entry and the value.
    """

    def malformed(why: str) -> ValueError:
        return ValueError(f"{path} is not a safetensors file: {why}")

    file_size = os.fstat(file.fileno()).st_size
    try:
        (length,) = struct.unpack("<Q", file.read(8))
    except struct.error as e:
        raise malformed(str(e)) from None
    if length > min(file_size - 8, _MAX_HEADER_BYTES):
        raise malformed(f"its header length field says {length} bytes, more than the file's {file_size - 8} bytes after it "
                        f"or the format's limit of {_MAX_HEADER_BYTES} (a truncated or corrupt file)")
    try:
        header = json.loads(file.read(length), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # invalid JSON or UTF-8, a 5000-digit number, nesting, a tensor named twice
        raise malformed(parse_error_text(e)[:300]) from None
    if not isinstance(header, dict):
        raise malformed(f"its header must be a JSON object; got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise malformed(f"its __metadata__ must be a JSON object; got {metadata!r:.100}")
    base = 8 + length
    data_size = file_size - base
    specs: dict[str, _Spec] = {}
    for name, spec in header.items():
        if not isinstance(spec, dict) or any(key not in spec for key in ("dtype", "shape", "data_offsets")):
            raise malformed(f"tensor '{name}' must have dtype, shape and data_offsets; got {spec!r:.200}")
        code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(shape, list) or not all(_is_size(n) for n in shape):
            raise malformed(f"tensor '{name}' must have a shape that is a list of sizes >= 0; got {shape!r:.100}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(n) for n in offsets):
            raise malformed(f"tensor '{name}' must have data_offsets [start, end] of two integers >= 0; got {offsets!r:.100}")
        if not isinstance(code, str) or code not in _CODE_DTYPES:
            raise ValueError(f"{path}: tensor '{name}' has dtype {code!r:.50}, which this reader does not support "
                             f"(it reads {sorted(_CODE_DTYPES)})")
        dtype, (start, end) = _CODE_DTYPES[code], offsets
        if not start <= end <= data_size or end - start != tensor_nbytes(shape, dtype):
            raise ValueError(
                f"{path}: tensor '{name}' ({code} {shape}) has data offsets {[start, end]} that do not fit "
                f"its size or the file's {data_size} data bytes (a truncated or corrupt file)"
            )
        specs[name] = (dtype, tuple(shape), start, end)
    # As the format requires, the tensors' bytes follow one another with no gap and no overlap
    # (two tensors sharing bytes would load the same values under two names).
    position = 0
    for name, (_, _, start, end) in sorted(specs.items(), key=lambda item: item[1][2:]):
        if start != position:
            what = "overlap the tensor before it" if start < position else f"leave bytes {position} to {start} unused"
            raise malformed(f"tensor '{name}' has data offsets {[start, end]} that {what} (a corrupt file)")
        position = end
    if position != data_size:
        raise malformed(f"its tensors end at data byte {position}, but the file has {data_size} data bytes (a corrupt file)")
    return metadata, specs, base


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
            self.metadata, self._specs, self._base = _read_header(path, self._file)
        except BaseException:
            self._file.close()
            raise

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
