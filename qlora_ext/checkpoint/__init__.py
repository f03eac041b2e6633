"""Checkpoint I/O for Llama-2 models: HF, Meta and bitsandbytes-4-bit checkpoints in; merged HF
checkpoints, bitsandbytes-4-bit ones (``save_hf_checkpoint(..., bnb_4bit=True)``), Meta ones
(``save_meta_checkpoint``) and PEFT LoRA adapters out; every write atomic.

    from qlora_ext.checkpoint import load_checkpoint, save_hf_checkpoint, save_peft_adapter
"""

from qlora_ext.checkpoint.atomic import StagedFiles, atomic_path, atomic_write_bytes, atomic_write_text
from qlora_ext.checkpoint.config import Llama2Config
from qlora_ext.checkpoint.hf_tokenizer import save_hf_tokenizer
from qlora_ext.checkpoint.load import checkpoint_format, load_checkpoint, read_checkpoint_config
from qlora_ext.checkpoint.peft_adapter import load_peft_adapter, read_adapter_config, save_peft_adapter
from qlora_ext.checkpoint.save import save_hf_checkpoint
from qlora_ext.checkpoint.save_meta import save_meta_checkpoint

__all__ = [
    "Llama2Config",
    "StagedFiles",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "checkpoint_format",
    "load_checkpoint",
    "load_peft_adapter",
    "read_adapter_config",
    "read_checkpoint_config",
    "save_hf_checkpoint",
    "save_hf_tokenizer",
    "save_meta_checkpoint",
    "save_peft_adapter",
]
