"""Building blocks with torchtune's module and parameter names."""

from qlora_ext.modules.attention import MultiHeadAttention
from qlora_ext.modules.feed_forward import FeedForward
from qlora_ext.modules.kv_cache import KVCache
from qlora_ext.modules.lora_linear import LoRALinear
from qlora_ext.modules.peft import disable_adapter, get_adapter_params, set_trainable_params
from qlora_ext.modules.position_embeddings import RotaryPositionalEmbeddings
from qlora_ext.modules.rms_norm import RMSNorm
from qlora_ext.modules.transformer import TransformerDecoder, TransformerSelfAttentionLayer
from qlora_ext.nf4 import reparametrize_as_dtype_state_dict_post_hook

__all__ = [
    "FeedForward",
    "KVCache",
    "LoRALinear",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryPositionalEmbeddings",
    "TransformerDecoder",
    "TransformerSelfAttentionLayer",
    "disable_adapter",
    "get_adapter_params",
    "reparametrize_as_dtype_state_dict_post_hook",
    "set_trainable_params",
]
