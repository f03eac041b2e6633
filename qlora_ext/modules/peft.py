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
from qlora_ext._eager import is_compile_wrapper
from qlora_ext.modules.adapter_module import AdapterModule
from qlora_ext.modules.lora_linear import LoRALinear

# torchtune's names for the attention projections LoRA can go on (a Literal there, a tuple here).
LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")

__all__ = [
    "AdapterModule", "LORA_ATTN_MODULES", "LoRALinear", "disable_adapter", "get_adapter_params", "get_adapter_state_dict", "get_lora_module_names", "get_merged_lora_ckpt",
    "set_trainable_params", "validate_missing_and_unexpected_for_lora",
]


def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Fully-qualified name -> parameter, for every module that has ``adapter_params()``.

    Raises:
        AssertionError: (torchtune's) a module lists a name in ``adapter_params()`` that is not one of its parameters.
    """
    params = {}
    for module_name, module in model.named_modules():
        if is_compile_wrapper(module):
            continue  # torch.compile's wrapper forwards adapter_params() to the module it wraps, visited next as _orig_mod
        if hasattr(module, "adapter_params") and callable(module.adapter_params):
            wanted = list(module.adapter_params())
            for name, param in module.named_parameters(recurse=True):
                if name in wanted:
                    params[f"{module_name}.{name}" if module_name else name] = param
                    wanted.remove(name)
            if wanted:  # torchtune asserts the same: a name not found would stay frozen, silently
                raise AssertionError(
                    f"Adapter params {wanted} not converted: {module_name or 'the model'} ({type(module).__name__}) lists them in "
                    "adapter_params() but has no parameter of that name (a typo, or a parametrization that renamed it)"
                )
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
    """The adapter entries of a model's state dict, those whose key holds "lora" or "magnitude"
    (torchtune's rule: ``lora_a``, ``lora_b``, a custom adapter's ``lora_up``, DoRA's
    ``magnitude``), moved to ``device`` as torchtune's function does (None: left where they
    are). Tensors already on ``device`` are the state dict's own, not copies."""
    keep = {k: v for k, v in state_dict.items() if "lora" in k or "magnitude" in k}
    return keep if device is None else {k: v.to(device) for k, v in keep.items()}


def get_lora_module_names(lora_attn_modules: list[str], apply_lora_to_mlp: bool, apply_lora_to_output: bool) -> list[str]:
    """The local names of the modules that get LoRA, as torchtune lists them: the attention
    projections given, then ``w1``, ``w2``, ``w3`` with ``apply_lora_to_mlp``, then ``output``.
    (A new list; ``lora_attn_modules`` is left as it is.)"""
    return [*lora_attn_modules, *(["w1", "w2", "w3"] if apply_lora_to_mlp else []), *(["output"] if apply_lora_to_output else [])]


def validate_missing_and_unexpected_for_lora(
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool,
    apply_lora_to_output: bool,
    base_missing: list[str] | None = None,
    base_unexpected: list[str] | None = None,
    lora_missing: list[str] | None = None,
    lora_unexpected: list[str] | None = None,
) -> None:
    """Checks the missing and unexpected keys of two ``load_state_dict(..., strict=False)`` calls
    on a LoRA model, as torchtune's recipes do: the base weights may lack only LoRA parameters,
    the adapter only non-LoRA ones, and neither may hold keys the model does not.

    A key is a LoRA parameter when it has ``{module}.lora`` (or DoRA's ``{module}.magnitude``) in
    it for a module named by ``get_lora_module_names`` (``layers.0.attn.q_proj.lora_a.weight``).

    Raises:
        AssertionError: in torchtune's words, naming the first offending key, or the unexpected keys.
    """
    modules = get_lora_module_names(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output)

    def is_lora(key: str) -> bool:
        return any(f"{module}.lora" in key or f"{module}.magnitude" in key for module in modules)

    for key in base_missing or []:
        if not is_lora(key):
            raise AssertionError(f"Missing non-LoRA key {key} from base model dict (the LoRA modules are {modules})")
    if base_unexpected:
        raise AssertionError(f"Unexpected key loading base model: {sorted(base_unexpected)[:10]} are not the model's")
    for key in lora_missing or []:
        if is_lora(key):
            raise AssertionError(f"Missing LoRA key {key} from adapter state dict")
    if lora_unexpected:
        raise AssertionError(f"Unexpected key loading adapter: {sorted(lora_unexpected)[:10]} are not the model's")


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
    if any(k == "magnitude" or k.endswith(".magnitude") for k in state_dict):
        raise ValueError("get_merged_lora_ckpt: argument 'state_dict' holds DoRA magnitudes; only LoRA is supported")
    # Each module's key prefix ("layers.0.attn.q_proj.", or "" for a LoRALinear's own state dict).
    prefixes = sorted(_prefix(k, "lora_a.weight") for k in state_dict if _prefix(k, "lora_a.weight") is not None)
    orphans = sorted(k for k in state_dict if _prefix(k, "lora_b.weight") not in (None, *prefixes))
    if orphans:
        raise ValueError(f"get_merged_lora_ckpt: argument 'state_dict' has {orphans[0]} but no {_prefix(orphans[0], 'lora_b.weight')}lora_a.weight")
    for prefix in prefixes:  # every pair is checked before any is merged: a refused dict is left as it was
        a, b = state_dict.get(f"{prefix}lora_a.weight"), state_dict.get(f"{prefix}lora_b.weight")
        weight = state_dict.get(f"{prefix}weight")
        if b is None or weight is None:
            missing = f"{prefix}lora_b.weight" if b is None else f"{prefix}weight"
            raise ValueError(f"get_merged_lora_ckpt: argument 'state_dict' has {prefix}lora_a.weight but no {missing}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise ValueError(
                f"get_merged_lora_ckpt: {prefix.rstrip('.') or 'the LoRA module'}: lora_b {list(b.shape)} @ lora_a {list(a.shape)} must be a "
                f"{list(weight.shape)} update of rank {rank}"
            )
        for name, t in (("weight", weight), ("lora_a.weight", a), ("lora_b.weight", b)):
            if not t.dtype.is_floating_point:
                raise ValueError(f"get_merged_lora_ckpt: {prefix}{name} must be floating point; got {t.dtype}")
    for prefix in prefixes:
        a, b = state_dict[f"{prefix}lora_a.weight"], state_dict[f"{prefix}lora_b.weight"]
        weight = state_dict[f"{prefix}weight"]
        delta = (alpha / rank) * (b.to(torch.float32) @ a.to(torch.float32))  # [out, in]
        state_dict[f"{prefix}weight"] = (weight.to(torch.float32) + delta.to(weight.device)).to(weight.dtype)
        del state_dict[f"{prefix}lora_a.weight"], state_dict[f"{prefix}lora_b.weight"]
    return state_dict


def _prefix(key: str, suffix: str) -> str | None:
    """The module prefix of ``key`` if it is ``{prefix}{suffix}`` ("" or ending in a dot), else None."""
    if key == suffix:
        return ""
    return key[: -len(suffix)] if key.endswith(f".{suffix}") else None
