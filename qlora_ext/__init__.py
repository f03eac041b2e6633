"""qlora_ext: QLoRA fine-tuning on PyTorch with hand-written NF4 kernels.

    from qlora_ext import to_nf4, linear_nf4, NF4Tensor, LoRALinear
"""

from qlora_ext.modules.lora_linear import LoRALinear
from qlora_ext.nf4 import NF4Tensor, linear_nf4, to_nf4

__all__ = ["LoRALinear", "NF4Tensor", "linear_nf4", "to_nf4"]
__version__ = "0.1.0"
