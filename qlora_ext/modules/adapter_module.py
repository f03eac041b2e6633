"""torchtune's ``AdapterModule``: the interface of a module that holds adapter weights, for code
that subclasses it or checks ``isinstance(m, AdapterModule)`` (true for any object with an
``adapter_params`` method, as with torchtune's). ``get_adapter_params`` only needs the method."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class AdapterModule(Protocol):
    """A module with adapter weights: ``adapter_params()`` names them, relative to the module
    (``["lora_a.weight", "lora_b.weight"]`` for ``LoRALinear``)."""

    def adapter_params(self) -> list[str]:
        """Names of the module's adapter parameters."""
        ...
