"""LoRALinear: a frozen base linear (dense, or NF4 for QLoRA) plus a trainable low-rank adapter,
with torchtune's names and semantics."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlora_ext._arguments import is_finite_real, is_int
from qlora_ext._dtypes import FLOAT_DTYPES, autocast_dtype
from qlora_ext._tables import BLOCK_SIZE, SCALER_BLOCK_SIZE
from qlora_ext._transforms import forward_ad_reaches, functorch_active, unwrapped
from qlora_ext.modules.adapter_module import AdapterModule
from qlora_ext.modules.lora_fused import lora_linear
from qlora_ext.nf4 import NF4Tensor, foreign_nf4_values, linear_nf4, reparametrize_as_dtype_state_dict_post_hook, to_nf4


class LoRALinear(nn.Module, AdapterModule):
    """``base(x) + (alpha / rank) * lora_b(lora_a(dropout(x)))`` with the base weight frozen.

    Args:
        in_dim: input features.
        out_dim: output features.
        rank: rank of the adapter (lora_a: in_dim -> rank, lora_b: rank -> out_dim).
        alpha: scaling numerator of the adapter output.
        dropout: dropout on the adapter's input.
        use_bias: whether the (frozen) base linear has a bias.
        quantize_base: store the base weight as an ``NF4Tensor`` (QLoRA). Its ``state_dict()``
            entry is then the dense weight in its original dtype, on CPU, and loading a dense
            weight quantizes it.
        **quantization_kwargs: torchtune's ``block_size`` and ``scaler_block_size`` for
            ``to_nf4``; accepted as 64 and 256 (the only format here), refused otherwise.

    ``lora_a`` starts kaiming-uniform and ``lora_b`` at zero, so a new adapter changes nothing.
    With a frozen base and the adapter computing in the input's dtype (or autocast's), forward and
    backward run as one autograd function (``qlora_ext.modules.lora_fused``) that adds the adapter
    into the base output in place (out of place under torch.func transforms); otherwise (a
    trainable base weight, or a dense one with a forward-mode tangent) module by module.
    Set ``disabled = True`` (or use ``qlora_ext.modules.peft.disable_adapter``) for base-only
    output; a merged adapter is then taken back out of the base first (``unmerge_``, as PEFT does).
    ``load_state_dict(..., assign=True)`` quantizes a dense ``weight`` entry for an NF4 base.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_bias: bool = False,
        quantize_base: bool = False,
        **quantization_kwargs,
    ):
        super().__init__()
        # torchtune passes these to to_nf4: block_size and scaler_block_size, fixed here at 64 and 256.
        unknown = sorted(set(quantization_kwargs) - {"block_size", "scaler_block_size"})
        if unknown:
            raise TypeError(f"LoRALinear: unexpected keyword argument(s) {unknown}; the quantization ones are block_size and scaler_block_size")
        if not quantize_base and any(v is not None for v in quantization_kwargs.values()):
            raise ValueError(f"LoRALinear: quantize_base is False, but quantization arguments were given: {quantization_kwargs}")
        fixed = {"block_size": BLOCK_SIZE, "scaler_block_size": SCALER_BLOCK_SIZE}
        other = {k: v for k, v in quantization_kwargs.items() if v is not None and (not is_int(v) or v != fixed[k])}
        if other:
            raise ValueError(f"LoRALinear: quantization arguments must be {fixed} (the NF4 format of this package); got {other}")
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("rank", rank)):
            if not is_int(value) or value <= 0:
                raise ValueError(f"LoRALinear: argument '{name}' must be a positive int; got {value!r}")
        if not is_finite_real(alpha):
            raise ValueError(f"LoRALinear: argument 'alpha' must be a finite number; got {alpha!r}")
        if not is_finite_real(dropout) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear: argument 'dropout' must be a number in [0, 1); got {dropout!r}")
        if quantize_base and (in_dim * out_dim) % BLOCK_SIZE != 0:
            raise ValueError(
                f"LoRALinear: quantize_base=True needs in_dim * out_dim divisible by {BLOCK_SIZE} (the NF4 block size); "
                f"got in_dim={in_dim}, out_dim={out_dim}"
            )
        in_dim, out_dim, rank = int(in_dim), int(out_dim), int(rank)  # numpy ints too, as plain ints (JSON)
        alpha = alpha if isinstance(alpha, (int, float)) else float(alpha)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.rank = rank
        self.alpha = alpha
        self.use_bias = use_bias
        self._quantize_base = quantize_base
        self.disabled = False
        self.merged = False

        base = nn.Linear(in_dim, out_dim, bias=use_bias)
        weight = to_nf4(base.weight) if quantize_base else base.weight
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(base.bias, requires_grad=False) if use_bias else None
        del base
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.initialize_parameters()
        if quantize_base:
            self._register_state_dict_hook(reparametrize_as_dtype_state_dict_post_hook)
            self.register_load_state_dict_pre_hook(_quantize_assigned_weight)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .cuda() ... call fn on every parameter. On an NF4 base,
        # Tensor.to(dtype) dequantizes (as torchao's does), and nn.Module would then keep that
        # dense tensor hidden inside the NF4 parameter. Instead the NF4 storage follows fn's device
        # and the dtype it asks for becomes the weight's compute dtype (float32, bfloat16 or
        # float16, what NF4 dequantizes to; any other leaves it as it is); nothing is dequantized.
        weight = self._parameters.get("weight")
        if not isinstance(weight, NF4Tensor):
            return super()._apply(fn, recurse)
        self._parameters["weight"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        target = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        dtype = target.dtype if target.dtype in FLOAT_DTYPES else weight.dtype
        components = [
            torch.empty_like(t, device=target.device) if t.is_meta else t.to(target.device) for t in weight.components()
        ]
        if target.device.type == "cpu" and target.is_shared():  # Module.share_memory(): fn shares in place
            for t in components:
                t.share_memory_()
        self._parameters["weight"] = nn.Parameter(NF4Tensor(*components, weight.shape, dtype), requires_grad=False)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        before = self._parameters.get("weight")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        after = self._parameters.get("weight")
        if isinstance(before, NF4Tensor) and isinstance(after, Tensor) and not isinstance(after, NF4Tensor):
            # assign=True put a dense entry in place that our pre-hook did not see: a load pre-hook
            # registered after it (so run after it) renamed or made the entry. Quantize it now.
            # The NF4 base goes back first: the hook casts to its dtype, and an entry that cannot be
            # quantized (NaN, Inf) leaves it, as where the hook sees the entry under its own name.
            self._parameters["weight"] = before
            entries = {prefix + "weight": after.detach()}
            _quantize_assigned_weight(self, entries, prefix, {"assign_to_params_buffers": True})
            self._parameters["weight"] = nn.Parameter(entries[prefix + "weight"], requires_grad=before.requires_grad)

    def initialize_parameters(self) -> None:
        """Resets the adapter: lora_a kaiming-uniform (as nn.Linear), lora_b zeros."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def adapter_params(self) -> list[str]:
        """Names of the trainable adapter parameters, relative to this module."""
        return ["lora_a.weight", "lora_b.weight"]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        if functorch_active() and not isinstance(self.weight, NF4Tensor) and isinstance(unwrapped(self.weight), NF4Tensor):
            raise TypeError(
                "LoRALinear: a torch.func transform was given the frozen NF4 weight as an argument to differentiate (or "
                "map); pass the NF4 weights apart, e.g. torch.func.functional_call(model, (trainable, frozen), args) "
                "with the transform over trainable only"
            )
        if isinstance(self.weight, NF4Tensor) and isinstance(x, Tensor) and x.is_floating_point() and x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"LoRALinear: an NF4 base weight computes in float32, bfloat16 or float16; got input of dtype {x.dtype}. "
                "Module.double() / .to(torch.float64) keep NF4 weights in their dtype (NF4 dequantizes to those three): "
                "use .float() for the model and its inputs, or quantize_base=False for a float64 model"
            )
        if self.disabled and self.merged:
            self.unmerge_()  # base-only output needs the base without the adapter, as PEFT does
        if self.disabled or self.merged:
            return self._base(x)
        x_lora = None if isinstance(self.dropout, nn.Identity) or not self.training else self.dropout(x)
        # A tangent on a dense base (forward-mode AD over every parameter) leaves it requires_grad=False,
        # but the fused function would drop it: the composed path keeps it.
        dense_tangent = not isinstance(self.weight, NF4Tensor) and forward_ad_reaches(self.weight, self.bias)
        if self._adapter_dtype(x) == x.dtype and not self.weight.requires_grad and not dense_tangent and self._plain_adapter():
            return lora_linear(x, self.weight, self.bias, self.lora_a.weight, self.lora_b.weight, self.scaling, x_lora)
        lora_out = self.lora_b(self.lora_a(x if x_lora is None else x_lora))
        return self._base(x) + self.scaling * lora_out

    def _plain_adapter(self) -> bool:
        # The fused function computes x @ A.T @ B.T from the weights alone: only where lora_a and
        # lora_b are bias-free nn.Linear running nn.Linear.forward, with no module hooks (theirs or
        # global ones: torchtune's composition calls them, and the legacy weight_norm recomputes
        # the weight in one). A parametrization is read through .weight, so it may stay fused.
        for m in (self.lora_a, self.lora_b):
            if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward or m.bias is not None:
                return False
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return False
        g = torch.nn.modules.module
        return not (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks or g._global_backward_pre_hooks)

    def _base(self, x: Tensor) -> Tensor:
        if isinstance(self.weight, NF4Tensor):
            return linear_nf4(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _adapter_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the adapter computes in: autocast's when it is on, else its weights'."""
        return autocast_dtype(x.device.type) or torch.promote_types(self.lora_a.weight.dtype, self.lora_b.weight.dtype)

    # -- merging ---------------------------------------------------------------------------------

    def _compute_dtype(self) -> torch.dtype:
        # At least float32 for the merge arithmetic, float64 if the adapter is.
        return torch.promote_types(self.lora_b.weight.dtype, torch.float32)

    def adapter_delta(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense change the adapter makes to the weight: (alpha / rank) * B @ A."""
        compute = self._compute_dtype()
        delta = self.scaling * (self.lora_b.weight.to(compute) @ self.lora_a.weight.to(compute))
        return delta.to(dtype or self.weight.dtype)

    def _stored_weight(self, dtype: torch.dtype) -> Tensor:
        # The weight as stored (with the adapter in it after merge_), dense in dtype.
        if isinstance(self.weight, NF4Tensor):
            return self.weight.dequantize(torch.float32).to(dtype)
        return self.weight.detach().to(dtype)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight with the adapter folded in (what a merged checkpoint stores)."""
        compute = self._compute_dtype()
        base = self._stored_weight(compute)
        if not self.merged:
            base = base + self.adapter_delta(compute)
        return base.to(dtype or self.weight.dtype)

    @torch.no_grad()
    def base_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense base weight without the adapter (what a base checkpoint beside a PEFT adapter
        stores): as stored, or after ``merge_`` with the adapter taken back out, as ``unmerge_``
        would."""
        dtype = dtype or self.weight.dtype
        if not self.merged:
            return self.weight.dequantize(dtype) if isinstance(self.weight, NF4Tensor) else self.weight.detach().to(dtype)
        compute = self._compute_dtype()
        return (self._stored_weight(compute) - self.adapter_delta(compute)).to(dtype)

    @torch.no_grad()
    def merge_(self) -> None:
        """Folds the adapter into the base weight; forward then skips the adapter.

        An NF4 base is dequantized, updated and quantized again, which rounds (as HF PEFT does
        for 4-bit layers); a warning says so.
        """
        if self.merged:
            return
        self._add_to_base(self.adapter_delta(self._compute_dtype()))
        self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Takes a merged adapter back out of the base weight."""
        if not self.merged:
            return
        self._add_to_base(-self.adapter_delta(self._compute_dtype()))
        self.merged = False

    def _add_to_base(self, delta: Tensor) -> None:
        if isinstance(self.weight, NF4Tensor):
            if not torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn (fullgraph=True)
                warnings.warn("LoRALinear: merging into an NF4 base weight quantizes it again, which rounds", stacklevel=3)
            self.weight.copy_(self.weight.dequantize(delta.dtype) + delta)
        else:
            self.weight.add_(delta.to(self.weight.dtype))


def _quantize_assigned_weight(module: LoRALinear, state_dict: dict, prefix: str, local_metadata: dict, *_) -> None:
    # load_state_dict(assign=True) puts the entry itself in place of the parameter, so a dense
    # base weight (what state_dict() gives) would stay dense; quantize it first. Without assign,
    # copying into the NF4 parameter quantizes (NF4Tensor.copy_). A wrong shape is left for
    # load_state_dict's own size check.
    value = state_dict.get(prefix + "weight")
    if local_metadata.get("assign_to_params_buffers", False) and isinstance(value, Tensor):
        value = foreign_nf4_values(value)  # torchao's NF4Tensor: its values, quantized here as a dense entry is
    if (
        local_metadata.get("assign_to_params_buffers", False)
        and isinstance(value, Tensor)
        and not isinstance(value, NF4Tensor)
        and value.shape == module.weight.shape
    ):
        quantizable = value.dtype in FLOAT_DTYPES or not value.is_floating_point()
        source = value if quantizable else value.to(module.weight.dtype)  # float64, as the copy without assign casts it
        try:
            state_dict[prefix + "weight"] = to_nf4(source)
        except (TypeError, ValueError) as e:  # NaN or Inf, an int entry: name the entry, not to_nf4's argument
            why = str(e).replace("to_nf4: argument 'tensor' ", "it ", 1)
            raise type(e)(f"load_state_dict: entry '{prefix}weight' cannot be quantized for the NF4 base weight: {why}") from None
