"""Lazy access to the tensors of a checkpoint directory, one tensor at a time.

Each format becomes a list of ``Entry`` objects (name, shape, and a function that reads just that
tensor), so a loader can check every name and shape before reading any data and then hold one
tensor in memory at a time. Every tensor returned owns its memory (nothing aliases a file
mapping), so a tensor the loader drops is gone. safetensors files are read per key with plain
file reads. ``.bin`` / ``.pth`` files are memory-mapped (``torch.load(mmap=True)``); each tensor
is copied out and, on Linux, the pages it was read from are released again (``madvise``), so
reading a 13 GB Meta checkpoint does not leave 13 GB of it resident.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import io
import mmap
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable

import torch
from torch import Tensor

from qlora_ext.checkpoint.bnb4bit import Bnb4bitWeight, bnb4bit_aux_keys, bnb4bit_weight_names
from qlora_ext.checkpoint.config import read_json, refuse_special_file
from qlora_ext.checkpoint.convert import meta_shard_dim
from qlora_ext.checkpoint.safetensors_io import SafetensorsReader

HF_INDEX_FILES = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))


@dataclasses.dataclass
class Entry:
    """One tensor of a checkpoint: ``load()`` reads it (a dense tensor or an NF4Tensor, on CPU)."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], Tensor]
    dtype: torch.dtype | None = None  # as stored (None: an NF4 weight folded from several tensors)


class TensorFiles(contextlib.ExitStack):
    """The raw tensors of several checkpoint files, by key, opened lazily.

    Use as a context manager; files stay open (mapped) until it exits.

    Raises:
        ValueError: a key appears in two files; a torch file that cannot be read, holds no tensors
            at its top level, or has a storage record shorter than its pickle says.
    """

    def __init__(self, paths: list[str]):
        super().__init__()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._readers: dict[str, Callable[[], Tensor]] = {}
        self._where: dict[str, str] = {}
        self.paths = list(paths)
        for path in paths:
            refuse_special_file(path, "a checkpoint file")
            if path.endswith(".safetensors"):
                self._add_safetensors(path)
            else:
                self._add_torch(path)

    def _add(self, key: str, shape, dtype: torch.dtype, reader: Callable[[], Tensor], path: str) -> None:
        if key in self._where:
            raise ValueError(f"checkpoint key '{key}' appears in both {self._where[key]} and {path}")
        self._where[key] = path
        self.shapes[key] = tuple(shape)
        self.dtypes[key] = dtype
        self._readers[key] = reader

    def _add_safetensors(self, path: str) -> None:
        reader = SafetensorsReader(path)
        self.callback(reader.close)
        for key in reader.keys():
            self._add(key, reader.shape(key), reader.dtype(key), lambda reader=reader, key=key: reader.get(key), path)

    def _add_torch(self, path: str) -> None:
        mapped = True
        try:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:
                # Files in torch's legacy (pre-zip) format cannot be mapped: read whole.
                state = torch.load(path, map_location="cpu", weights_only=True)
                mapped = False
        except FileNotFoundError:
            raise
        except pickle.UnpicklingError as e:
            refused = refused_pickle_global(e)
            if refused is None:  # a text file or a broken pickle; torch's advice to unpickle it unsafely does not apply
                detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
                raise ValueError(_unreadable_torch_file(path, detail.group(1) if detail else e)) from None
            raise ValueError(python_objects_refused(f"checkpoint file {path}", refused)) from None
        except Exception as e:  # noqa: BLE001  (a truncated download, a text file, a folder: all unreadable alike)
            raise ValueError(_unreadable_torch_file(path, e)) from None
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint file {path} must hold a dict of tensors; got {type(state).__name__}")
        if state and not any(isinstance(v, Tensor) for v in state.values()):
            held = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(state.items())[:8])
            raise ValueError(f"checkpoint file {path} holds no tensors at its top level, only {held}{' ...' if len(state) > 8 else ''} "
                             "(a training checkpoint wrapping the weights?); save the model's state_dict() alone")
        short = _short_record(path) if mapped else None
        if short is not None:  # a mapped load reads the rest from the next record: wrong weights, silently
            raise ValueError(f"checkpoint file {path} cannot be read: {short}")
        # Drop our dict at exit so the mapped storages can go.
        self.callback(state.clear)
        for key, value in state.items():
            if isinstance(value, Tensor):
                self._add(key, value.shape, value.dtype, lambda state=state, key=key, mapped=mapped: _copy_out(state[key], mapped), path)

    def keys(self) -> set[str]:
        return set(self.shapes)

    def get(self, key: str) -> Tensor:
        return self._readers[key]()


# torch.load(weights_only=True) names what it refused in one of two ways: a global it does not
# allow ("Unsupported global: GLOBAL torch.optim.sgd.SGD was not an allowed global ..."), or one
# from a module it blocks outright ("unsupported GLOBAL posix.system whose module posix is blocked").
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)|unsupported GLOBAL ([\w.]+) whose module")


def refused_pickle_global(error: pickle.UnpicklingError) -> str | None:
    """The Python object (``module.name``) that ``torch.load(weights_only=True)`` refused to
    unpickle, or None where the file is unreadable for another reason (truncated, not a pickle)."""
    match = _REFUSED_GLOBAL.search(str(error))
    return None if match is None else match[1] or match[2]


def python_objects_refused(what: str, refused: str) -> str:
    """The message for a pickle holding Python objects besides tensors. It is refused, never
    unpickled, as that can run the objects' code; torch's advice to load it unsafely is not repeated."""
    return (f"{what} holds Python objects besides tensors, and loading them could run code (torch.load(weights_only=True) "
            f"refuses to unpickle {refused}); save the model's state_dict() alone, or convert the file to safetensors")


# Bytes per element of the storage types a torch file's pickle names (torch.UntypedStorage counts bytes).
_STORAGE_ITEMSIZE = {
    "UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1, "ShortStorage": 2, "HalfStorage": 2,
    "BFloat16Storage": 2, "IntStorage": 4, "FloatStorage": 4, "LongStorage": 8, "DoubleStorage": 8,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
}


class _StandIn:
    """What every global of the pickle becomes while its storages are counted: nothing is imported or run."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __call__(self, *args, **kwargs) -> _StandIn:
        return _StandIn()

    def __setitem__(self, key, value) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


class _StorageSizes(pickle.Unpickler):
    """Reads a torch file's data.pkl for the byte size of each storage record it declares."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.sizes: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> _StandIn:
        return _StandIn(name)

    def persistent_load(self, pid) -> _StandIn:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            kind, key, numel = pid[1], pid[2], pid[4]
            itemsize = _STORAGE_ITEMSIZE.get(getattr(kind, "name", None))
            if itemsize is not None and isinstance(numel, int):
                self.sizes[str(key)] = numel * itemsize
        return _StandIn()


def _short_record(path: str) -> str | None:
    """A storage record of a zip-format torch file shorter than its pickle says, described; None
    where every record holds its storage (or the file cannot be checked this way).
    ``torch.load(mmap=True)`` does not compare the two, and takes the missing bytes from what
    follows the record; its reading without mmap refuses such a file."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = {info.filename: info.file_size for info in archive.infolist()}
            pickled = next((name for name in records if name.endswith("data.pkl")), None)
            if pickled is None:
                return None
            unpickler = _StorageSizes(archive.read(pickled))
            unpickler.load()
    except Exception:  # noqa: BLE001  (not a zip, or a pickle of another shape: torch.load read it, nothing to add)
        return None
    prefix = pickled[: -len("data.pkl")]
    for key, nbytes in unpickler.sizes.items():
        size = records.get(f"{prefix}data/{key}")
        if size is not None and size < nbytes:
            return f"its record data/{key} holds {size} bytes where its tensor data needs {nbytes} (the file is damaged inside)"
    return None


def _unreadable_torch_file(path: str, e: Exception | str) -> str:
    reason = f"{type(e).__name__}: {e}" if isinstance(e, Exception) else e
    return f"checkpoint file {path} cannot be read as a torch state dict (truncated, or not a checkpoint): {reason}"


_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _copy_out(tensor: Tensor, mapped: bool) -> Tensor:
    """A copy of a tensor that lives in a file mapping; the mapping's pages under it are then
    dropped from memory (they are clean copies of the file: a later read faults them in again)."""
    copy = tensor.clone()
    if mapped and _libc is not None:
        page = mmap.PAGESIZE
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if last > first:
            _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
    return copy


# Weight files under other names (torchtune's checkpointers write model-00001-of-00001.bin,
# hf_model_0001_0.pt or meta_model_0.pt) are read when named, as torchtune's checkpointers take them.
OTHER_NAMES_HINT = (
    "; weight files of other names are read when named: checkpoint_files=[...] (load_checkpoint, "
    "llama2_from_checkpoint), checkpointer.checkpoint_files in a trainer config, --checkpoint-files for the generate CLI"
)


def hf_weight_files(checkpoint_dir: str) -> list[str]:
    """The weight files of a HF checkpoint, looked for in transformers' order: the single
    ``model.safetensors``, its shards per the index, then the same for ``pytorch_model.bin``.

    An index none of whose shards is there, beside a complete ``pytorch_model*.bin`` set, is passed
    over with a warning: torchtune's ``tune download`` skipped ``*.safetensors`` files (its
    ``--ignore-patterns`` default before 0.5) and kept their index.

    Raises:
        FileNotFoundError: none of the known file names is there, or a shard the index names is
            missing.
    """
    without_shards = None  # the FileNotFoundError of an index none of whose shards is here
    for index_name, single_name in HF_INDEX_FILES:
        if os.path.exists(os.path.join(checkpoint_dir, single_name)):
            _warn_passed_over(without_shards, single_name)
            return [os.path.join(checkpoint_dir, single_name)]
        index_path = os.path.join(checkpoint_dir, index_name)
        if os.path.exists(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index_path} must map tensor names to shard files under 'weight_map'; got {weight_map!r:.200}")
            names = sorted(set(weight_map.values()))
            # A shard is a file in the checkpoint's folder (it may be a link, as in the HF hub cache):
            # an index must not make the loader read files elsewhere.
            outside = [n for n in names if os.path.isabs(n) or os.path.normpath(n).split(os.sep)[0] == os.pardir]
            if outside:
                raise ValueError(f"{index_path} names shard files outside {checkpoint_dir}: {outside}; "
                                 "shards are named relative to the checkpoint's folder, inside it")
            missing = [n for n in names if not os.path.isfile(os.path.join(checkpoint_dir, n))]
            if missing:
                error = FileNotFoundError(f"{index_path} names shards that do not exist (or are no files): {missing}")
                if len(missing) < len(names) or without_shards is not None:
                    raise error
                without_shards = error
                continue
            _warn_passed_over(without_shards, f"{index_name} and its shards")
            return [os.path.join(checkpoint_dir, n) for n in names]
    if without_shards is not None:
        raise without_shards
    looked_for = [name for pair in HF_INDEX_FILES for name in pair]
    found = sorted(os.listdir(checkpoint_dir))
    if "adapter_config.json" in found:  # torchtune's save_adapter_weights_only epoch folder (config.json copied beside)
        hint = ("; it holds an adapter without its model: load the base model's folder, with this one as the adapter "
                "(adapter_dir, --adapter-dir)")
    else:
        hint = OTHER_NAMES_HINT
    raise FileNotFoundError(f"no HF weights in {checkpoint_dir}: looked for {looked_for}; found {found}{hint}")


def _warn_passed_over(without_shards: FileNotFoundError | None, reading: str) -> None:
    if without_shards is not None:
        warnings.warn(f"{without_shards} (torchtune's tune download skips *.safetensors files); reading {reading} instead",
                      UserWarning, stacklevel=3)


def hf_entries(files: TensorFiles) -> list[Entry]:
    """The entries of a HF checkpoint, bitsandbytes 4-bit weights folded into one NF4 entry each."""
    keys = files.keys()
    int8 = sorted(k for k in keys if k.endswith((".SCB", ".weight_format")))
    if int8:  # LLM.int8's row scales: the int8 weights beside them would otherwise show up as "not floating point"
        raise ValueError(
            f"HF checkpoint: bitsandbytes 8-bit weights (load_in_8bit; keys like {int8[0]!r}) are not supported; only "
            "bitsandbytes 4-bit NF4 with double quantization, or dense weights"
        )
    entries = []
    consumed: set[str] = set()
    for name in bnb4bit_weight_names(keys):
        weight = Bnb4bitWeight(name, files)
        entries.append(Entry(name, weight.shape, weight.load))
        consumed |= {name, *bnb4bit_aux_keys(name, keys)}
    for key in sorted(keys - consumed):
        entries.append(Entry(key, files.shapes[key], lambda key=key: files.get(key), files.dtypes[key]))
    return entries


def meta_weight_files(checkpoint_dir: str) -> list[str]:
    """``consolidated.00.pth``, ``consolidated.01.pth``, ... in shard (model-parallel rank) order.

    Raises:
        FileNotFoundError: there are none.
        ValueError: as ``meta_shard_order``.
    """
    paths = glob.glob(os.path.join(checkpoint_dir, "consolidated.*.pth"))
    if not paths:
        raise FileNotFoundError(
            f"no Meta weights in {checkpoint_dir}: looked for consolidated.*.pth; found {sorted(os.listdir(checkpoint_dir))}"
            f"{OTHER_NAMES_HINT}"
        )
    return meta_shard_order(paths)


_META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


def meta_shard_order(paths: list[str]) -> list[str]:
    """Meta's shard files in rank order, whatever order they come in: ``consolidated.NN.pth``
    holds model-parallel rank NN, and ranks 0 to N-1 need one file each (a gap would shift every
    later shard's rows into the wrong place).

    Raises:
        ValueError: a file not so named, two files of one rank, or a rank without a file.
    """
    ranked: dict[int, str] = {}
    for path in paths:
        match = _META_SHARD.fullmatch(os.path.basename(path))
        if match is None:
            raise ValueError(f"Meta checkpoint file {path}: the shards of a model-parallel checkpoint must be named "
                             "consolidated.NN.pth, NN the shard's rank")
        rank = int(match[1])
        if rank in ranked:
            raise ValueError(f"Meta checkpoint files {ranked[rank]} and {path} are both model-parallel rank {rank}")
        ranked[rank] = path
    missing = sorted(set(range(max(ranked) + 1)) - set(ranked))
    if missing:
        names = [os.path.basename(ranked[r]) for r in sorted(ranked)]
        raise ValueError(
            f"Meta checkpoint in {os.path.dirname(paths[0])}: no shard for model-parallel rank(s) {missing} "
            f"(consolidated.{missing[0]:02d}.pth); ranks 0 to {max(ranked)} need one file each; found {names}"
        )
    return [ranked[rank] for rank in sorted(ranked)]


def meta_entries(shards: list[TensorFiles]) -> list[Entry]:
    """The entries of a Meta checkpoint; model-parallel shards (in rank order) are concatenated
    per tensor.

    Raises:
        ValueError: shards hold different keys, or a tensor whose shards differ in a dim other
            than the one they are concatenated along (any dim, for a replicated tensor).
    """
    keys = shards[0].keys()
    for shard in shards[1:]:
        if shard.keys() != keys:
            raise ValueError(f"Meta checkpoint: {shard.paths[0]} holds other keys than {shards[0].paths[0]}: "
                             f"{sorted(shard.keys() ^ keys)[:10]}")
    entries = []
    for key in sorted(keys):
        dim = meta_shard_dim(key) if len(shards) > 1 else None
        first = shards[0].shapes[key]
        for shard in shards[1:]:
            shape = shard.shapes[key]
            if len(shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(shape, first)) if i != dim):
                rule = "every dim (it is replicated)" if dim is None else f"every dim but {dim}, which they are concatenated along"
                raise ValueError(f"Meta checkpoint: '{key}' is {list(shape)} in {shard.paths[0]} and {list(first)} in "
                                 f"{shards[0].paths[0]}; the model-parallel shards of a tensor agree in {rule}")
        if dim is None:
            entries.append(Entry(key, shards[0].shapes[key], lambda key=key: shards[0].get(key), shards[0].dtypes[key]))
            continue
        shape = list(shards[0].shapes[key])
        shape[dim] = sum(s.shapes[key][dim] for s in shards)
        entries.append(Entry(key, tuple(shape), lambda key=key, dim=dim: torch.cat([s.get(key) for s in shards], dim),
                             shards[0].dtypes[key]))
    return entries
