"""qlora_ext: QLoRA fine-tuning on PyTorch with hand-written NF4 kernels.

    from qlora_ext import to_nf4, linear_nf4, NF4Tensor, LoRALinear
"""

import warnings

with warnings.catch_warnings():
    # torch warns on import where NumPy is not installed; nothing here needs it (nor does the
    # default run, which would otherwise open with that warning)
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from qlora_ext.modules.lora_linear import LoRALinear  # noqa: E402
from qlora_ext.nf4 import NF4Tensor, linear_nf4, to_nf4  # noqa: E402

__all__ = ["LoRALinear", "NF4Tensor", "linear_nf4", "to_nf4"]
__version__ = "0.1.0"
