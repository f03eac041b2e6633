"""Adapter bookkeeping over a whole model, with torchtune's names: which parameters are the
adapter, freezing everything else, running the base model alone, and folding the adapter of a
state dict into its base weights. ``LoRALinear`` is importable from here as from
``torchtune.modules.peft``, so the seed tutorial's import line carries over."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from qlora_ext._arguments import is_finite_real, is_int
from qlora_ext.modules.lora_linear import LoRALinear

__all__ = [
    "LoRALinear", "disable_adapter", "get_adapter_params", "get_adapter_state_dict", "get_merged_lora_ckpt", "set_trainable_params",
]


def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Fully-qualified name -> parameter, for every module that has ``adapter_params()``."""
    params = {}
    for module_name, module in model.named_modules():
        if hasattr(module, "adapter_params") and callable(module.adapter_params):
            for name, param in module.named_parameters(recurse=True):
                if name in module.adapter_params():
                    params[f"{module_name}.{name}" if module_name else name] = param
    return params


def set_trainable_params(model: nn.Module, adapter_params: dict[str, nn.Parameter]) -> None:
    """Only the given parameters require grad; everything else is frozen.

    Raises:
        ValueError: a name in ``adapter_params`` is not a parameter of ``model`` (names from
            ``get_adapter_params`` of another or a differently wrapped model): nothing changes.
    """
    unknown = sorted(set(adapter_params) - {name for name, _ in model.named_parameters()})
    if unknown:
        raise ValueError(
            f"set_trainable_params: argument 'adapter_params' must name parameters of the model; these are not: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''} (take the names from get_adapter_params of this model, as wrapped now)"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapter_params)


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Within the block, every adapter module returns its base output only."""
    modules = [m for m in model.modules() if hasattr(m, "disabled")]
    before = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield
    finally:
        for m, state in zip(modules, before):
            m.disabled = state


def get_adapter_state_dict(state_dict: dict[str, Tensor], device: torch.device | str | None = "cpu") -> dict[str, Tensor]:
    """The adapter entries (``*.lora_a.*``, ``*.lora_b.*``, DoRA's ``*.magnitude``) of a model's
    state dict, moved to ``device`` as torchtune's function does (None: left where they are).
    Tensors already on ``device`` are the state dict's own, not copies."""
    keep = {k: v for k, v in state_dict.items() if ".lora_a." in k or ".lora_b." in k or k.endswith(".magnitude")}
    return keep if device is None else {k: v.to(device) for k, v in keep.items()}


def get_merged_lora_ckpt(state_dict: dict[str, Tensor], rank: int, alpha: float) -> dict[str, Tensor]:
    """Folds each LoRA pair of a state dict into its base weight, as torchtune's function does:
    ``{m}.weight += (alpha / rank) * {m}.lora_b.weight @ {m}.lora_a.weight``, and the pair is removed.

    The sum is taken in float32 and stored in the weight's dtype. The dict is changed in place and
    returned; it then loads into the same model built without LoRA.

    Args:
        state_dict: a LoRA / QLoRA model's ``state_dict()`` (its NF4 bases come out dense).
        rank: the LoRA rank (> 0).
        alpha: the LoRA alpha (finite).

    Raises:
        ValueError: bad ``rank`` or ``alpha``; a LoRA matrix without its partner; a pair without its base weight or with shapes
            that do not make one; a weight that is not floating point; DoRA magnitudes (not supported). Every pair is
            checked before any is merged: a refused dict is left as it was.
    """
    if not is_int(rank) or rank <= 0:
        raise ValueError(f"get_merged_lora_ckpt: argument 'rank' must be an integer > 0; got {rank!r}")
    if not is_finite_real(alpha):
        raise ValueError(f"get_merged_lora_ckpt: argument 'alpha' must be a finite number; got {alpha!r}")
    if any(k.endswith(".magnitude") for k in state_dict):
        raise ValueError("get_merged_lora_ckpt: argument 'state_dict' holds DoRA magnitudes; only LoRA is supported")
    modules = sorted(k[: -len(".lora_a.weight")] for k in state_dict if k.endswith(".lora_a.weight"))
    orphans = sorted(k for k in state_dict if k.endswith(".lora_b.weight") and k[: -len(".lora_b.weight")] not in modules)
    if orphans:
        raise ValueError(f"get_merged_lora_ckpt: argument 'state_dict' has {orphans[0]} but no {orphans[0][: -len('.lora_b.weight')]}.lora_a.weight")
    for module in modules:  # every pair is checked before any is merged: a refused dict is left as it was
        a, b = state_dict.get(f"{module}.lora_a.weight"), state_dict.get(f"{module}.lora_b.weight")
        weight = state_dict.get(f"{module}.weight")
        if b is None or weight is None:
            missing = f"{module}.lora_b.weight" if b is None else f"{module}.weight"
            raise ValueError(f"get_merged_lora_ckpt: argument 'state_dict' has {module}.lora_a.weight but no {missing}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise ValueError(
                f"get_merged_lora_ckpt: {module}: lora_b {list(b.shape)} @ lora_a {list(a.shape)} must be a "
                f"{list(weight.shape)} update of rank {rank}"
            )
        for name, t in (("weight", weight), ("lora_a.weight", a), ("lora_b.weight", b)):
            if not t.dtype.is_floating_point:
                raise ValueError(f"get_merged_lora_ckpt: {module}.{name} must be floating point; got {t.dtype}")
    for module in modules:
        a, b = state_dict[f"{module}.lora_a.weight"], state_dict[f"{module}.lora_b.weight"]
        weight = state_dict[f"{module}.weight"]
        delta = (alpha / rank) * (b.to(torch.float32) @ a.to(torch.float32))  # [out, in]
        state_dict[f"{module}.weight"] = (weight.to(torch.float32) + delta.to(weight.device)).to(weight.dtype)
        del state_dict[f"{module}.lora_a.weight"], state_dict[f"{module}.lora_b.weight"]
    return state_dict
