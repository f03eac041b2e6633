"""bitsandbytes 4-bit HF checkpoints: each quantized linear ``X`` is stored as

    X.weight                                   uint8 [numel / 2, 1]   packed NF4 codes
    X.weight.absmax                            uint8 [numel / 64]     8-bit codes of the block absmax
    X.weight.quant_map                         float32 [16]           the NF4 code values
    X.weight.nested_absmax                     float32 [blocks / 256] scale of each absmax group
    X.weight.nested_quant_map                  float32 [256]          the 8-bit absmax code values
    X.weight.quant_state.bitsandbytes__nf4     uint8 JSON             blocksizes, dtype, shape, offset

(with ``bnb_4bit_quant_storage`` other than uint8, ``X.weight`` holds the same bytes viewed as that
dtype), which is this package's NF4 format (docs/nf4_format.md) with other names: bitsandbytes' absmax
codes, nested absmax and nested offset are our ``absmax_codes``, ``absmax_scales`` and
``absmax_offset``. Read, they become an ``NF4Tensor`` as stored, without quantizing again; written
(``bnb4bit_entries``), an ``NF4Tensor``'s storage is these keys byte for byte.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch
from torch import Tensor

from qlora_ext._arguments import is_finite_real, parse_error_text
from qlora_ext._dtypes import HF_DTYPES
from qlora_ext._tables import ABSMAX_CODE_MAP, BLOCK_SIZE, NF4_VALUES, SCALER_BLOCK_SIZE
from qlora_ext.nf4 import NF4Tensor, to_nf4

_STATE_SUFFIX = ".quant_state.bitsandbytes__"
_AUX = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_DTYPE_NAMES = {dtype: name for name, dtype in HF_DTYPES.items()}
BNB4BIT_DTYPES = tuple(HF_DTYPES.values())  # the dtypes a quant state can name
# bnb_4bit_quant_storage: the dtype the packed bytes are stored as (transformers' choices).
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32, torch.float64)


class Bnb4bitWeight:
    """One bitsandbytes-quantized weight of a checkpoint, checked against our format.

    Everything is checked here, from the quant state and the keys' dtypes and shapes, so a loader
    that builds every weight first finds any problem before it has loaded anything.

    Args:
        name: the weight's key (``...q_proj.weight``).
        files: the checkpoint's tensors (``readers.TensorFiles``: ``get``, ``keys()``, ``shapes``,
            ``dtypes``).

    Raises:
        ValueError: a missing auxiliary key, fp4 instead of nf4 (in the key or the quant state),
            blocksizes other than 64/256, no double quantization, a nested offset or scales that
            are not finite, code tables that differ from ours, an unknown dtype, or storage
            tensors whose dtype or size disagree with the quant state's shape.
    """

    def __init__(self, name: str, files):
        self.name = name
        self._get = files.get
        keys = files.keys()
        state_keys = sorted(k for k in keys if k.startswith(name + _STATE_SUFFIX))
        if len(state_keys) > 1:  # (bitsandbytes refuses them too; which one holds is not known)
            raise ValueError(self._message([f"it must have one quant state; got {len(state_keys)}: {state_keys}"]))
        quant_type = state_keys[0][len(name + _STATE_SUFFIX) :] if state_keys else None
        problems = []
        if quant_type != "nf4":
            problems.append(f"quant_type must be 'nf4'; got {quant_type!r}")
            raise ValueError(self._message(problems))
        if files.dtypes[state_keys[0]] != torch.uint8 or len(files.shapes[state_keys[0]]) != 1:
            raise ValueError(self._message([f"'{state_keys[0]}' must be a 1-D uint8 tensor (UTF-8 JSON bytes); got "
                                            f"{files.dtypes[state_keys[0]]} of shape {list(files.shapes[state_keys[0]])}"]))
        try:
            state = json.loads(bytes(files.get(state_keys[0]).tolist()).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            raise ValueError(self._message([f"'{state_keys[0]}' is not a UTF-8 JSON quant state: {parse_error_text(e)}"])) from None
        if not isinstance(state, dict):
            raise ValueError(self._message([f"'{state_keys[0]}' must hold a JSON object; got {type(state).__name__}"]))
        missing = [name + suffix for suffix in ("", *_AUX[:2]) if name + suffix not in keys]  # "": the packed codes
        if missing:
            problems.append(f"missing keys {missing}")
        missing_nested = [name + suffix for suffix in _AUX[2:] if name + suffix not in keys]
        missing_nested += [] if "nested_offset" in state else ["nested_offset (in the quant_state)"]
        if missing_nested:
            problems.append(f"double quantization is required (bnb_4bit_use_double_quant=True): missing {missing_nested}")
        if problems:
            raise ValueError(self._message(problems))
        if state.get("quant_type") != "nf4":  # what bitsandbytes reads back, whatever the key's suffix says
            problems.append(f"the quant_state's quant_type must be 'nf4'; got {state.get('quant_type')!r}")
        if not is_finite_real(state["nested_offset"]):
            problems.append(f"the quant_state's nested_offset must be a finite number; got {state['nested_offset']!r:.50}")
        if state.get("blocksize") != BLOCK_SIZE:
            problems.append(f"blocksize must be {BLOCK_SIZE}; got {state.get('blocksize')!r}")
        if state.get("nested_blocksize") != SCALER_BLOCK_SIZE:
            problems.append(f"nested_blocksize must be {SCALER_BLOCK_SIZE}; got {state.get('nested_blocksize')!r}")
        if not isinstance(state.get("dtype"), str) or state["dtype"] not in HF_DTYPES:
            problems.append(f"dtype must be one of {sorted(HF_DTYPES)}; got {state.get('dtype')!r}")
        if state.get("nested_dtype", "float32") != "float32":
            problems.append(f"nested_dtype must be 'float32'; got {state.get('nested_dtype')!r}")
        for suffix, table in ((".quant_map", NF4_VALUES), (".nested_quant_map", ABSMAX_CODE_MAP)):
            difference = _table_difference(files.get(name + suffix), table)
            if difference:
                problems.append(f"{name + suffix} must equal this package's table (qlora_ext._tables); {difference}")
        problems += _storage_problems(name, files, state.get("shape"))
        if not problems and not torch.isfinite(files.get(name + ".nested_absmax")).all():
            problems.append(f"{name}.nested_absmax must hold finite scales; it has NaN or Inf")
        if problems:
            raise ValueError(self._message(problems))
        self.shape = tuple(state["shape"])
        self.dtype = HF_DTYPES[state["dtype"]]
        self.offset = float(state["nested_offset"])

    def _message(self, problems: list[str]) -> str:
        return f"bitsandbytes 4-bit weight '{self.name}' cannot be read as NF4: " + "; ".join(problems)

    def load(self) -> NF4Tensor:
        """The weight as an NF4Tensor on CPU (storage as read, nothing re-quantized)."""
        # bnb_4bit_quant_storage other than uint8 (FSDP-QLoRA's bfloat16) stores the same packed
        # bytes reinterpreted as that dtype; read them back as bytes.
        packed = self._get(self.name).reshape(-1).view(torch.uint8)
        return NF4Tensor.from_components(
            packed,
            self._get(self.name + ".absmax"),
            self._get(self.name + ".nested_absmax").float(),
            torch.tensor(self.offset, dtype=torch.float32),
            self.shape,
            self.dtype,
        )


def _table_difference(stored: Tensor, table: tuple[float, ...]) -> str:
    """How a stored code table differs from ours ("" where it equals it)."""
    stored, ours = stored.float().reshape(-1), torch.tensor(table, dtype=torch.float32)
    if stored.numel() != ours.numel():
        return f"it has {stored.numel()} entries, the table {ours.numel()}"
    differ = (stored != ours).nonzero().reshape(-1).tolist()
    if not differ:
        return ""
    i = differ[0]
    what = f"it differs at {len(differ)} of {ours.numel()} entries, first at index {i}: {stored[i].item()!r} where the table has {ours[i].item()!r}"
    if table is ABSMAX_CODE_MAP and differ == [0] and stored[0].item() == -1.0:
        what += (" (bitsandbytes 0.46 to 0.49 quantized with -1.0 there on a CPU: save the model again with bitsandbytes "
                 ">= 0.50, or load its unquantized checkpoint, which is quantized on loading)")
    return what


def _storage_problems(name: str, files, shape) -> list[str]:
    """What is wrong with the dtypes and sizes of a weight's storage keys, for its quant state's shape."""
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        return [f"the quant_state's shape must be a list of positive sizes; got {shape!r}"]
    numel = math.prod(shape)
    if numel % BLOCK_SIZE:
        return [f"the quant_state's shape {shape} must have a number of elements divisible by {BLOCK_SIZE}; got {numel}"]
    blocks = numel // BLOCK_SIZE
    problems = []
    dtype, packed_bytes = files.dtypes[name], math.prod(files.shapes[name]) * _itemsize(files.dtypes[name])
    if dtype not in _STORAGE_DTYPES:
        problems.append(f"'{name}' must be stored as one of {[str(d) for d in _STORAGE_DTYPES]} (bnb_4bit_quant_storage); got {dtype}")
    elif packed_bytes != numel // 2:
        problems.append(f"'{name}' must hold {numel // 2} bytes (two codes per byte) for shape {shape}; got {packed_bytes} ({dtype} {list(files.shapes[name])})")
    for suffix, want_dtype, want_numel in ((".absmax", (torch.uint8,), blocks), (".nested_absmax", (torch.float32,), -(-blocks // SCALER_BLOCK_SIZE))):
        key = name + suffix
        got_dtype, got_numel = files.dtypes[key], math.prod(files.shapes[key])
        if got_dtype not in want_dtype or got_numel != want_numel:
            want = " or ".join(str(d) for d in want_dtype)
            problems.append(f"'{key}' must be {want} with {want_numel} elements for shape {shape}; got {got_dtype} with {got_numel}")
    return problems


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bnb4bit_weight_names(keys: set[str]) -> list[str]:
    """Keys of the weights stored by bitsandbytes (those that have a packed quant state)."""
    return sorted(k.split(_STATE_SUFFIX)[0] for k in keys if _STATE_SUFFIX in k)


def bnb4bit_aux_keys(name: str, keys: set[str]) -> list[str]:
    """The auxiliary keys that belong to the bitsandbytes weight ``name``."""
    return [k for k in keys if k.startswith(name + ".") and (k[len(name) :] in _AUX or _STATE_SUFFIX in k)]


def bnb4bit_quantization_config(compute_dtype: torch.dtype) -> dict:
    """The ``quantization_config`` of config.json that transformers writes for such a checkpoint
    (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True)``) and reads back to load it in 4 bits."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": _DTYPE_NAMES[compute_dtype],
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def bnb4bit_entries(name: str, weight: Tensor, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]]:
    """The keys that store ``weight`` in the bitsandbytes 4-bit layout, as (key, shape, dtype,
    producer) for a streaming writer, in the order transformers writes them.

    Args:
        name: the weight's key (``model.layers.0.self_attn.q_proj.weight``).
        weight: an ``NF4Tensor`` (its storage is written as it is) or a dense 2-D weight (quantized
            here, giving the 4-bit codes bitsandbytes' ``quantize_4bit`` gives, while an absmax
            code may take the other neighbour in a near-tie (docs/nf4_format.md) and the offset,
            a mean summed in another order, differ in its last bits; once to size the quant
            state, and again when its keys are written, so only one weight's codes are held).
        dtype: the dtype the weight dequantizes to (the quant state's ``dtype``); a dense weight
            is cast to it before quantizing, as bitsandbytes quantizes a checkpoint of that dtype.

    Raises:
        ValueError: a dtype bitsandbytes' quant state cannot name, or (from ``to_nf4``) a dense
            weight whose size is not a multiple of 64.
    """
    if dtype not in BNB4BIT_DTYPES:
        raise ValueError(f"bnb4bit_entries: argument 'dtype' must be one of {list(BNB4BIT_DTYPES)}; got {dtype}")
    if isinstance(weight, NF4Tensor):
        nf4 = weight
        get_nf4 = lambda: weight  # noqa: E731
    else:
        dense = weight.detach()
        get_nf4 = lambda: to_nf4(dense.to(dtype))  # noqa: E731
        nf4 = get_nf4()
    state = {
        "quant_type": "nf4",
        "blocksize": BLOCK_SIZE,
        "dtype": _DTYPE_NAMES[dtype],
        "shape": list(nf4.shape),
        "nested_blocksize": SCALER_BLOCK_SIZE,
        "nested_dtype": "float32",
        "nested_offset": float(nf4.absmax_offset),
    }
    state_bytes = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    packed_bytes = nf4.packed.numel()
    blocks = nf4.absmax_codes.numel()
    groups = nf4.absmax_scales.numel()
    del nf4  # a dense weight's codes are made again when written
    last: dict[str, NF4Tensor] = {}

    def component(attr: str) -> Callable[[], Tensor]:
        def produce() -> Tensor:
            if "nf4" not in last:  # one quantization serves the weight's keys
                last["nf4"] = get_nf4()
            value = getattr(last["nf4"], attr)
            if attr == "absmax_scales":
                last.clear()  # the last key that needs the codes
            return value.reshape(-1, 1) if attr == "packed" else value.reshape(-1)

        return produce

    def table(values: tuple[float, ...]) -> Callable[[], Tensor]:
        return lambda: torch.tensor(values, dtype=torch.float32)

    return [
        (name, (packed_bytes, 1), torch.uint8, component("packed")),
        (name + ".absmax", (blocks,), torch.uint8, component("absmax_codes")),
        (name + ".quant_map", (len(NF4_VALUES),), torch.float32, table(NF4_VALUES)),
        (name + ".nested_absmax", (groups,), torch.float32, component("absmax_scales")),
        (name + ".nested_quant_map", (len(ABSMAX_CODE_MAP),), torch.float32, table(ABSMAX_CODE_MAP)),
        (name + _STATE_SUFFIX + "nf4", tuple(state_bytes.shape), torch.uint8, lambda: state_bytes),
    ]
