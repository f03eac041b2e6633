"""NF4Tensor: a frozen weight stored in 4-bit NormalFloat with double-quantized absmax.

It stands in for a dense tensor of its original shape and dtype (a tensor subclass, so it can be
a module parameter, moved across devices, saved, deep-copied and traced by ``torch.compile``),
while holding only the four storage tensors of docs/nf4_format.md, about 4.13 bits per weight.

    nf4 = to_nf4(w)                  # quantize
    dense = nf4.dequantize()         # or nf4.to(torch.bfloat16): a dense tensor again
    y = linear_nf4(x, nf4)           # x @ w.T without a dense copy of w
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from qlora_ext import ops
from qlora_ext._arguments import is_int
from qlora_ext._dtypes import FLOAT_DTYPES, autocast_dtype
from qlora_ext._tables import BLOCK_SIZE, SCALER_BLOCK_SIZE

aten = torch.ops.aten

_COMPONENTS = ("packed", "absmax_codes", "absmax_scales", "absmax_offset")


class NF4Tensor(Tensor):
    """A weight in NF4 (see the module docstring); build it with ``to_nf4`` or ``from_components``.

    Attributes:
        packed: uint8 [numel / 2], two 4-bit codes per byte, the lower index in the high nibble.
        absmax_codes: uint8 [numel / 64], the 8-bit code of each block's absmax.
        absmax_scales: float32 [ceil(numel / 64 / 256)], one scale per 256 absmax codes.
        absmax_offset: float32 scalar, the mean absmax, added back after decoding.
        shape, dtype: those of the original weight; the dtype is the one it dequantizes to by
            default (``.to(dtype)`` on a module changes it without touching the storage). Each
            value is decoded exactly in float32, so ``to(torch.float32)`` of a bfloat16 NF4Tensor
            gives the NF4 values themselves, not their bfloat16 rounding (torchao rounds first).
    """

    packed: Tensor
    absmax_codes: Tensor
    absmax_scales: Tensor
    absmax_offset: Tensor

    @staticmethod
    def __new__(cls, packed, absmax_codes, absmax_scales, absmax_offset, shape, dtype):
        return Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device, requires_grad=False)

    def __init__(self, packed, absmax_codes, absmax_scales, absmax_offset, shape, dtype):
        self.packed = packed
        self.absmax_codes = absmax_codes
        self.absmax_scales = absmax_scales
        self.absmax_offset = absmax_offset

    @classmethod
    def from_components(
        cls,
        packed: Tensor,
        absmax_codes: Tensor,
        absmax_scales: Tensor,
        absmax_offset: Tensor,
        shape: torch.Size | tuple[int, ...] | list[int],
        dtype: torch.dtype,
    ) -> NF4Tensor:
        """Wraps existing storage tensors (e.g. read from a checkpoint), after checking them.

        Raises:
            TypeError: a component is not a tensor or has the wrong dtype; ``dtype`` is not float.
            ValueError: component sizes disagree with each other or with ``shape``, or they are
                on different devices.
        """
        components = dict(zip(_COMPONENTS, (packed, absmax_codes, absmax_scales, absmax_offset)))
        expected_dtypes = (torch.uint8, torch.uint8, torch.float32, torch.float32)
        for (name, t), want in zip(components.items(), expected_dtypes):
            if not isinstance(t, Tensor) or isinstance(t, NF4Tensor):
                raise TypeError(f"NF4Tensor.from_components: argument '{name}' must be a plain tensor; got {type(t).__name__}")
            if t.dtype != want:
                raise TypeError(f"NF4Tensor.from_components: argument '{name}' must have dtype {want}; got {t.dtype}")
            if t.device != packed.device:
                raise ValueError(
                    f"NF4Tensor.from_components: argument '{name}' must be on the device of 'packed' "
                    f"({packed.device}); got {t.device}"
                )
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"NF4Tensor.from_components: argument 'dtype' must be float32, bfloat16 or float16; got {dtype!r}")
        if not isinstance(shape, (torch.Size, tuple, list)) or any(not is_int(d) or d < 0 for d in shape):
            raise ValueError(f"NF4Tensor.from_components: argument 'shape' must be a list or tuple of sizes that are ints >= 0; got {shape!r}")
        numel = math.prod(shape)  # in Python ints: torch.Size.numel() wraps around past 2**63
        if numel >= 2**63:
            raise ValueError(f"NF4Tensor.from_components: argument 'shape' must have fewer than 2**63 elements; got {list(shape)}")
        shape = torch.Size(shape)
        nblocks = numel // BLOCK_SIZE
        expected_sizes = {
            "packed": numel // 2,
            "absmax_codes": nblocks,
            "absmax_scales": (nblocks + SCALER_BLOCK_SIZE - 1) // SCALER_BLOCK_SIZE,
            "absmax_offset": 1,
        }
        if numel == 0 or numel % BLOCK_SIZE:
            raise ValueError(
                f"NF4Tensor.from_components: argument 'shape' must have a positive number of elements "
                f"divisible by {BLOCK_SIZE}; got {list(shape)} ({numel} elements)"
            )
        for name, size in expected_sizes.items():
            if components[name].numel() != size:
                raise ValueError(
                    f"NF4Tensor.from_components: argument '{name}' must have {size} elements for shape "
                    f"{list(shape)}; got {components[name].numel()}"
                )
        flat = [t.reshape(-1) for t in (packed, absmax_codes, absmax_scales)]
        return cls(*flat, absmax_offset.reshape(()), shape, dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight, in ``dtype`` (default: the original dtype; any dtype, as ``.to``:
        other than float32, bfloat16 and float16, converted from the exact float32 values).

        Raises:
            TypeError: ``dtype`` is not a torch.dtype.
        """
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"NF4Tensor.dequantize: argument 'dtype' must be a torch.dtype or None; got {dtype!r:.100}")
        dtype = dtype or self.dtype
        if dtype in FLOAT_DTYPES:
            return ops.dequantize_nf4(*self.components(), self.shape, dtype)
        return ops.dequantize_nf4(*self.components(), self.shape, torch.float32).to(dtype)

    def get_original_weight(self) -> Tensor:
        """torchao's name for ``dequantize()``: the dense weight in the original dtype."""
        return self.dequantize()

    @property
    def block_size(self) -> int:
        """Weights per absmax (64; torchao's attribute)."""
        return BLOCK_SIZE

    @property
    def scaler_block_size(self) -> int:
        """Absmax values per scale (256; torchao's attribute)."""
        return SCALER_BLOCK_SIZE

    def components(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(packed, absmax_codes, absmax_scales, absmax_offset)."""
        return self.packed, self.absmax_codes, self.absmax_scales, self.absmax_offset

    @property
    def quantized_nbytes(self) -> int:
        """Bytes of storage actually held (the four components)."""
        return sum(t.numel() * t.element_size() for t in self.components())

    def __repr__(self) -> str:
        return f"NF4Tensor(shape={list(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __reduce_ex__(self, protocol):
        # nn.Parameter(nf4) is an NF4Tensor flagged as a parameter (torch's rule for tensor
        # subclasses); the flag and requires_grad travel with it.
        is_param = isinstance(self, torch.nn.Parameter)
        return _rebuild_nf4tensor, (*self.components(), tuple(self.shape), self.dtype, self.requires_grad, is_param)

    # -- tensor subclass protocol (torch.compile traces through these) -------------------------

    def __tensor_flatten__(self):
        return list(_COMPONENTS), (tuple(self.shape), self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        shape, dtype = meta
        return NF4Tensor(*(inner[name] for name in _COMPONENTS), shape, dtype)

    def _stable_hash_for_caching(self) -> str:
        return f"NF4Tensor{tuple(self.shape)}{self.dtype}"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _TORCH_FUNCTIONS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        handler = _ATEN_OPS.get(func)
        if handler is None:
            # (DistributedDataParallel broadcasts parameters through views, FSDP2 shards them by splits)
            sync = func.namespace != "aten" or func.__name__.split(".")[0] in ("view", "split", "cat", "narrow", "chunk")
            raise NotImplementedError(
                f"NF4Tensor does not support {func}; make it dense first with .dequantize() or .to(dtype)" + (
                    " (DistributedDataParallel and FSDP2 sync parameters so: leave the frozen NF4 weights out, with "
                    "DistributedDataParallel._set_params_and_buffers_to_ignore_for_model or fully_shard(ignored_params=...))"
                    if sync else "")
            )
        return handler(*args, **(kwargs or {}))


def _rebuild_nf4tensor(
    packed, absmax_codes, absmax_scales, absmax_offset, shape, dtype, requires_grad=False, is_param=False
) -> NF4Tensor:
    # Through from_components' checks: a damaged or hand-edited file is refused as it is loaded,
    # not at the first use of a weight whose components disagree with its shape.
    nf4 = NF4Tensor.from_components(packed, absmax_codes, absmax_scales, absmax_offset, tuple(shape), dtype)
    if is_param:
        return torch.nn.Parameter(nf4, requires_grad=requires_grad)
    return nf4.requires_grad_(requires_grad)


# torch.load(weights_only=True), the default, may rebuild NF4Tensors.
torch.serialization.add_safe_globals([_rebuild_nf4tensor])


def to_nf4(tensor: Tensor, block_size: int = BLOCK_SIZE, scaler_block_size: int = SCALER_BLOCK_SIZE) -> NF4Tensor:
    """Quantizes a float32, bfloat16 or float16 weight (numel divisible by 64) to NF4.

    Args:
        tensor: the dense weight; any shape, any device with qlora kernels (CPU, CUDA). (The
            argument names are torchao's, so keyword calls of its ``to_nf4`` work too.)
        block_size: weights per absmax; the format fixes it at 64 (the argument mirrors torchao).
        scaler_block_size: absmax values per scale; fixed at 256.

    Returns:
        The NF4Tensor, on the weight's device, with the weight's shape and dtype.

    Raises:
        TypeError: ``tensor`` is not a float tensor (or not a tensor at all).
        ValueError: empty weight, numel not divisible by 64, NaN or Inf in it, other block sizes.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"to_nf4: argument 'tensor' must be a torch.Tensor; got {type(tensor).__name__}")
    if not (is_int(block_size) and is_int(scaler_block_size)) or (block_size, scaler_block_size) != (BLOCK_SIZE, SCALER_BLOCK_SIZE):
        raise ValueError(
            f"to_nf4: arguments 'block_size' and 'scaler_block_size' must be {BLOCK_SIZE} and "
            f"{SCALER_BLOCK_SIZE} (the NF4 format of this package); got {block_size!r} and {scaler_block_size!r}"
        )
    if isinstance(tensor, NF4Tensor):
        raise TypeError("to_nf4: argument 'tensor' must be a dense tensor; got an NF4Tensor (already quantized)")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"to_nf4: argument 'tensor' must have dtype float32, bfloat16 or float16; got {tensor.dtype}")
    weight = tensor.detach()
    return NF4Tensor(*_quantize(weight, "to_nf4: argument 'tensor'"), weight.shape, weight.dtype)


def _quantize(weight: Tensor, argument: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``ops.quantize_nf4(weight)``, its errors on the weight (empty, numel % 64, NaN or Inf)
    naming the caller's ``argument`` ("to_nf4: argument 'tensor'") rather than the op's."""
    try:
        return ops.quantize_nf4(weight)
    except ValueError as e:
        op_argument = "qlora::quantize_nf4: argument 'weight'"
        if not str(e).startswith(op_argument):
            raise
        raise ValueError(argument + str(e)[len(op_argument):]) from None


def linear_nf4(input: Tensor, weight: NF4Tensor, bias: Tensor | None = None) -> Tensor:
    """``input @ weight.T (+ bias)`` for input [..., in] and an NF4 weight [out, in], in input's
    dtype, or under autocast in autocast's (as ``F.linear`` and torchao's ``linear_nf4``, whose
    argument names these are; the op's messages call input ``x``).

    Backward gives the gradient of input (and of bias) from the NF4 storage; the weight gets none.
    """
    if not isinstance(weight, NF4Tensor) or weight.dim() != 2:
        raise TypeError(f"linear_nf4: argument 'weight' must be a 2-D NF4Tensor; got {_describe(weight)}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "linear_nf4: argument 'weight' must be frozen (requires_grad=False): an NF4 weight gets no gradient, "
            "and training it would silently leave it as it is; train a LoRA adapter on it, or a dense weight"
        )
    dtype = autocast_dtype(input.device.type) if isinstance(input, Tensor) and input.dtype in FLOAT_DTYPES else None
    if dtype is not None:  # (autocast leaves float64 as it is)
        input = input.to(dtype)
        bias = bias.to(dtype) if isinstance(bias, Tensor) and bias.is_floating_point() else bias
    return ops.linear_nf4(input, *weight.components(), weight.shape[0], bias)


def reparametrize_as_dtype_state_dict_post_hook(
    module: torch.nn.Module,
    state_dict: dict,
    prefix: str = "",
    *args,
    dtype: torch.dtype | None = None,
    offload_to_cpu: bool = True,
) -> None:
    """State-dict post-hook: the module's NF4Tensor entries become dense tensors.

    Each entry is dequantized in ``dtype`` (default: its original dtype, where torchtune's
    default is bfloat16) and moved to CPU before the next, so only one dense weight exists on the
    device at a time. Register it with ``module._register_state_dict_hook`` (``LoRALinear`` does
    for a quantized base), or call it as torchtune's: ``hook(model, state_dict, dtype=...)``.
    """
    for name, value in list(state_dict.items()):
        if name.startswith(prefix) and isinstance(value, NF4Tensor):
            dense = value.dequantize(dtype or value.dtype)
            # (a model built on the meta device has nothing to move: its state dict stays meta)
            state_dict[name] = dense.cpu() if offload_to_cpu and not dense.is_meta else dense


def _describe(t) -> str:
    return f"{type(t).__name__} of shape {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


# -- torch functions: F.linear and Tensor.to ---------------------------------------------------


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if not isinstance(weight, NF4Tensor) or isinstance(input, NF4Tensor) or isinstance(bias, NF4Tensor):
        name, value = ("input", input) if isinstance(input, NF4Tensor) else ("bias", bias)
        raise TypeError(f"F.linear with an NF4Tensor: only 'weight' may be one; got {name} {_describe(value)}")
    return linear_nf4(input, weight, bias)


def _to(self: Tensor, *args, copy: bool = False, **kwargs) -> Tensor:
    # A dtype makes it dense (as torchao's NF4Tensor does); a device alone moves the NF4 storage.
    if len(args) >= 2 and all(isinstance(a, bool) for a in args[-2:]):  # to(dtype, non_blocking, copy)
        *args, copy = args
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    if not isinstance(self, NF4Tensor):  # dense.to(nf4): the NF4Tensor's device and dtype
        with torch._C.DisableTorchFunctionSubclass():
            return Tensor.to(self, device=device, dtype=dtype, non_blocking=non_blocking, copy=copy, memory_format=memory_format)
    moved = self
    if device is not None and torch.device(device) != self.device:
        moved = NF4Tensor(*(t.to(device, non_blocking=non_blocking) for t in self.components()), self.shape, self.dtype)
    elif copy and dtype is None:
        moved = _clone(self)
    return moved if dtype is None else _dense(moved, dtype, fresh=moved is not self)


def _set_data(self: NF4Tensor, value: Tensor) -> None:
    # nn.Module.to(dtype) (and .half(), .to(device, dtype)) on a module that is not a LoRALinear
    # sets param.data to what the conversion gave, a dense tensor: one made from an NF4Tensor,
    # holding exactly what that storage decodes to now, gives back that storage with its new dtype
    # (as LoRALinear's .to(dtype) and torchao's NF4Tensor do); any other dense tensor would hide a
    # dense copy in here. (Values are compared, not version counters: edits through .data, numpy
    # or inference mode, and changes of the storage since, escape those.)
    source = _CONVERSIONS.get(value) if isinstance(value, Tensor) else None
    if not isinstance(value, NF4Tensor) and source is not None and value.dtype in FLOAT_DTYPES and _holds(value, source[0]):
        components, owner = source
        if owner is not None and owner is not self.packed:  # another NF4Tensor's storage: a copy, as for dense data
            components = tuple(t.clone() for t in components)
        value = NF4Tensor(*components, value.shape, value.dtype)
    if not isinstance(value, NF4Tensor):
        raise TypeError(
            f"NF4Tensor: '.data' must be set to an NF4Tensor; got {_describe(value)}{_why_not_rewrapped(value, source)}. "
            "A module's NF4 weight changes dtype in place only through a conversion of itself (nn.Module.to(dtype), "
            ".half(), .bfloat16()) to float32, bfloat16 or float16; assign a new nn.Parameter(to_nf4(...), "
            "requires_grad=False) for new values"
        )
    with torch._C.DisableTorchFunctionSubclass():
        Tensor.data.__set__(self, value)
    self.packed, self.absmax_codes, self.absmax_scales, self.absmax_offset = value.components()


def _holds(dense: Tensor, components: tuple[Tensor, ...]) -> bool:
    """Whether ``dense`` is exactly what ``components`` decode to in its dtype (a tensor on the
    meta device has no values to differ)."""
    if dense.is_meta:
        return True
    return torch.equal(dense, ops.dequantize_nf4(*components, dense.shape, dense.dtype))


def _set_data_allowed(self: Tensor, other: Tensor) -> bool:
    # nn.Module._apply asks this before setting param.data to what a conversion gave (and on the
    # meta device torch answers no, so .bfloat16() replaced an NF4 parameter with a dense one):
    # yes for an NF4 parameter, so that _set_data decides.
    if isinstance(self, NF4Tensor):
        return True
    with torch._C.DisableTorchFunctionSubclass():
        return torch._has_compatible_shallow_copy_type(self, other)


def _share_memory_(self: NF4Tensor) -> NF4Tensor:
    # (torch's own moves a storage the wrapper does not have, and crashed the interpreter)
    for t in self.components():
        t.share_memory_()
    return self


def _is_shared(self: NF4Tensor) -> bool:
    return all(t.is_shared() for t in self.components())


def _why_not_rewrapped(value: Tensor, source) -> str:
    if not isinstance(value, Tensor) or source is None:
        return ""
    if value.dtype not in FLOAT_DTYPES:
        return f" (a conversion of an NF4Tensor to {value.dtype}, which NF4 cannot hold)"
    return " (a conversion of an NF4Tensor, changed since)"


_TORCH_FUNCTIONS: dict[Callable, Callable] = {
    F.linear: _linear,
    Tensor.to: _to,
    Tensor.data.__set__: _set_data,
    torch._has_compatible_shallow_copy_type: _set_data_allowed,
    Tensor.share_memory_: _share_memory_,
    Tensor.is_shared: _is_shared,
}


# -- aten ops ----------------------------------------------------------------------------------


def _detach(nf4: NF4Tensor) -> NF4Tensor:
    return NF4Tensor(*nf4.components(), nf4.shape, nf4.dtype)


def _clone(nf4: NF4Tensor, memory_format=None) -> NF4Tensor:
    return NF4Tensor(*(t.clone() for t in nf4.components()), nf4.shape, nf4.dtype)


# Dense tensors made by converting an NF4Tensor (held weakly, by identity, never on the tensor
# itself, which torch.save and deepcopy would carry along) -> (the NF4 storage they came from,
# and that storage's owner: None when it is a fresh copy moved to another device). _set_data
# takes such a conversion back as NF4 while it still holds what the storage decodes to.
_CONVERSIONS = WeakIdKeyDictionary()


def _dense(nf4: NF4Tensor, dtype: torch.dtype, *, fresh: bool = False) -> Tensor:
    # NF4 values are exact in float32, so other dtypes (float64, integers) convert from that.
    dense = nf4.dequantize(dtype)
    # A compiled region never sets .data from it. (On torch 2.11 AOTAutograd's fake tensors get in:
    # a few entries that go with the compiled graphs.)
    if not torch.compiler.is_compiling():
        _CONVERSIONS[dense] = (nf4.components(), None if fresh else nf4.packed)
    return dense


def _to_copy(nf4: NF4Tensor, dtype=None, device=None, non_blocking=False, **_) -> Tensor:
    if dtype is not None and (device is None or torch.device(device) == nf4.device):
        return _dense(nf4, dtype)  # a new tensor already: no copy of the storage first
    moved = NF4Tensor(*(t.to(device or t.device, copy=True, non_blocking=non_blocking) for t in nf4.components()), nf4.shape, nf4.dtype)
    return moved if dtype is None else _dense(moved, dtype, fresh=True)


def _to_dtype(nf4: NF4Tensor, dtype: torch.dtype, non_blocking: bool = False, copy: bool = False, memory_format=None) -> Tensor:
    return _dense(nf4, dtype)  # (under inference_mode, .half() and .to(dtype) come here)


def _has_compatible_shallow_copy_type(nf4: NF4Tensor, other: Tensor) -> bool:
    # nn.Module.to(dtype) under inference_mode asks before setting .data: yes, so that _set_data
    # decides (it takes back a conversion of the storage, and refuses other data by name).
    return True


def foreign_nf4_values(t: Tensor) -> Tensor:
    """torchao's NF4Tensor (an entry of a torchtune state dict) as its dense values, to quantize
    again; any other tensor as it is."""
    if type(t) is not Tensor and type(t) is not torch.nn.Parameter and not isinstance(t, NF4Tensor) \
            and callable(getattr(t, "get_original_weight", None)):
        return t.get_original_weight()
    return t


def _copy_(dst: Tensor, src: Tensor, non_blocking: bool = False) -> Tensor:
    # Loading a state dict copies into parameters: a dense source is quantized on the way in, and
    # an NF4 source is dequantized into a dense destination.
    if src.shape != dst.shape:
        raise ValueError(f"NF4Tensor.copy_: argument 'src' must have shape {list(dst.shape)}; got {list(src.shape)}")
    if not isinstance(dst, NF4Tensor):
        dense = _dense(src, dst.dtype if dst.dtype in FLOAT_DTYPES else src.dtype)
        return dst.copy_(dense, non_blocking=non_blocking)
    if isinstance(src, NF4Tensor):
        components = src.components()
        for name, d, s in zip(("packed", "absmax_codes", "absmax_scales", "absmax_offset"), dst.components(), components):
            if d.numel() != s.numel():
                raise ValueError(f"NF4Tensor.copy_: argument 'src' must have {d.numel()} {name} for shape {list(dst.shape)}; "
                                 f"got {s.numel()}")
    else:
        src = foreign_nf4_values(src)
        cast = src.to(device=dst.device, dtype=dst.dtype)
        try:
            components = _quantize(cast, "NF4Tensor.copy_: argument 'src'")
        except ValueError:
            _refuse_overflow(src, cast)  # the non-finite value may be one the cast made
            raise
    for d, s in zip(dst.components(), components):
        d.copy_(s.reshape(d.shape), non_blocking=non_blocking)
    return dst


def _refuse_overflow(src: Tensor, cast: Tensor) -> None:
    """A ValueError naming the first finite value of ``src`` that is infinite in ``cast`` (its
    conversion to the weight's dtype), if there is one."""
    if src.dtype == cast.dtype:
        return
    overflowed = torch.isfinite(src.to(cast.device)) & ~torch.isfinite(cast)
    if overflowed.any():
        index = [int(i) for i in overflowed.nonzero()[0]]
        name = str(cast.dtype).removeprefix("torch.")
        raise ValueError(
            f"NF4Tensor.copy_: argument 'src' must hold values within {name}'s range (the weight's dtype; largest "
            f"finite {torch.finfo(cast.dtype).max:g}); got {src[tuple(index)].item():g} at index {index}, which is inf in {name}"
        )


def _is_same_size(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape


def _empty_like(nf4: NF4Tensor, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None) -> NF4Tensor:
    # nn.Module.to_empty (materializing a model built on the meta device): uninitialized storage
    # of the same layout, to be filled by a checkpoint load.
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"torch.empty_like of an NF4Tensor: argument 'dtype' must be float32, bfloat16 or float16; got {dtype}")
    components = (torch.empty_like(t, device=device or t.device, pin_memory=bool(pin_memory)) for t in nf4.components())
    return NF4Tensor(*components, nf4.shape, dtype or nf4.dtype)


def _is_pinned(nf4: NF4Tensor, device=None) -> bool:
    # Asked of every parameter by CPU-offload and DataLoader-style code: pinned when all the storage is.
    return all(t.is_pinned(device) if device is not None else t.is_pinned() for t in nf4.components())


def _pin_memory(nf4: NF4Tensor, device=None) -> NF4Tensor:
    pinned = (t.pin_memory(device) if device is not None else t.pin_memory() for t in nf4.components())
    return NF4Tensor(*pinned, nf4.shape, nf4.dtype)


_ATEN_OPS: dict[Callable, Callable] = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten.is_same_size.default: _is_same_size,
    aten.empty_like.default: _empty_like,
    aten.to.dtype: _to_dtype,
    aten._has_compatible_shallow_copy_type.default: _has_compatible_shallow_copy_type,
    aten.is_pinned.default: _is_pinned,
    aten._pin_memory.default: _pin_memory,
}
