"""Llama-2: component and model builders (torchtune's names), the SentencePiece tokenizer, and
building a model straight from a checkpoint directory."""

from qlora_ext.models.llama2._component_builders import LORA_ATTN_MODULES, llama2, lora_llama2, scale_hidden_dim_for_mlp
from qlora_ext.models.llama2._from_checkpoint import llama2_from_checkpoint
from qlora_ext.models.llama2._model_builders import (
    llama2_7b,
    llama2_13b,
    llama2_70b,
    llama2_tiny,
    lora_llama2_7b,
    lora_llama2_13b,
    lora_llama2_70b,
    lora_llama2_tiny,
    qlora_llama2_7b,
    qlora_llama2_13b,
    qlora_llama2_70b,
    qlora_llama2_tiny,
)
from qlora_ext.models.llama2._tokenizer import Llama2Tokenizer, llama2_tokenizer

__all__ = [
    "LORA_ATTN_MODULES",
    "Llama2Tokenizer",
    "llama2",
    "llama2_13b",
    "llama2_70b",
    "llama2_7b",
    "llama2_from_checkpoint",
    "llama2_tiny",
    "llama2_tokenizer",
    "lora_llama2",
    "lora_llama2_13b",
    "lora_llama2_70b",
    "lora_llama2_7b",
    "lora_llama2_tiny",
    "qlora_llama2_13b",
    "qlora_llama2_70b",
    "qlora_llama2_7b",
    "qlora_llama2_tiny",
    "scale_hidden_dim_for_mlp",
]
