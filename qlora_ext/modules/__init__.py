"""Building blocks with torchtune's module and parameter names."""

from qlora_ext.modules.lora_linear import LoRALinear
from qlora_ext.modules.peft import disable_adapter, get_adapter_params, set_trainable_params

__all__ = ["LoRALinear", "disable_adapter", "get_adapter_params", "set_trainable_params"]
