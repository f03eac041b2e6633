"""Adapter bookkeeping over a whole model, with torchtune's names: which parameters are the
adapter, freezing everything else, and running the base model alone. ``LoRALinear`` is importable
from here as from ``torchtune.modules.peft``, so the seed tutorial's import line carries over."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from qlora_ext.modules.lora_linear import LoRALinear

__all__ = ["LoRALinear", "disable_adapter", "get_adapter_params", "set_trainable_params"]


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
