"""Building a Llama-2 model straight from a checkpoint folder, memory-lean.

The model is built on the meta device (no memory), then each weight is created from the
checkpoint as it is read (NF4 ones quantized on arrival), so peak memory is the finished model
plus one tensor.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from qlora_ext._dtypes import FLOAT_DTYPES, default_dtype
from qlora_ext.checkpoint.load import load_checkpoint, read_checkpoint_config
from qlora_ext.checkpoint.merged_adapter import refuse_adapter_merged_into
from qlora_ext.checkpoint.peft_adapter import check_adapter_rank, load_peft_adapter, read_adapter_config
from qlora_ext.models.llama2._component_builders import lora_llama2
from qlora_ext.modules.transformer import TransformerDecoder


def llama2_from_checkpoint(
    checkpoint_dir: str | os.PathLike,
    lora_attn_modules: Sequence[str] = (),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    adapter_dir: str | os.PathLike | None = None,
    checkpoint_files: Sequence[str] | None = None,
    max_seq_len: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> TransformerDecoder:
    """A Llama-2 model with the architecture and weights of a HF or Meta checkpoint folder.

    Args:
        checkpoint_dir: the checkpoint (see ``qlora_ext.checkpoint.load_checkpoint``).
        lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
            lora_dropout, quantize_base: as for ``lora_llama2``; with no LoRA modules and
            ``quantize_base=True`` nothing is quantized (only LoRA linears are).
        adapter_dir: a PEFT adapter to load; its adapter_config.json then decides the LoRA
            layout and the LoRA arguments above are ignored.
        checkpoint_files: the weight files, names inside ``checkpoint_dir``, where they are not
            HF's or Meta's usual names (torchtune's checkpointers write ``model-00001-of-00001.bin``
            beside params.json, or ``hf_model_0001_0.pt``); default: found by those names.
        max_seq_len: overrides the checkpoint's (RoPE table and KV-cache length).
        device: where the weights go.
        dtype: dtype of the dense weights and adapters (default: torch's default dtype); NF4
            weights dequantize to it.

    Returns:
        The loaded ``TransformerDecoder``, in eval mode as transformers' and PEFT's
        ``from_pretrained`` return theirs (an adapter's ``lora_dropout`` off); call ``.train()``
        to fine-tune it further.

    Raises:
        FileNotFoundError / ValueError: as ``load_checkpoint`` and ``load_peft_adapter``.
        TypeError: ``dtype`` is not one a model can be built in (float32, bfloat16, float16,
            float64), or, with LoRA linears whose base is quantized, not one NF4 dequantizes to.
    """
    if dtype is not None and dtype not in (*FLOAT_DTYPES, torch.float64):
        raise TypeError(f"llama2_from_checkpoint: argument 'dtype' must be float32, bfloat16, float16, float64 or None; got {dtype!r}")
    config = read_checkpoint_config(checkpoint_dir, checkpoint_files)
    kwargs = config.builder_kwargs()
    if max_seq_len is not None:
        kwargs["max_seq_len"] = max_seq_len
    lora = dict(
        lora_attn_modules=lora_attn_modules if isinstance(lora_attn_modules, str) else list(lora_attn_modules),  # (a str is refused by name)
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
    )
    if adapter_dir is not None:
        refuse_adapter_merged_into(checkpoint_dir, adapter_dir, "llama2_from_checkpoint: argument 'adapter_dir'", checkpoint_files)
        lora = read_adapter_config(adapter_dir)
        check_adapter_rank(adapter_dir, lora["lora_rank"])  # a missing file or a wrong rank is named before anything is built
    has_lora = lora["lora_attn_modules"] or lora["apply_lora_to_mlp"] or lora["apply_lora_to_output"]
    if quantize_base and has_lora and dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"llama2_from_checkpoint: argument 'dtype' must be float32, bfloat16 or float16 with quantize_base=True "
                        f"(what NF4 weights dequantize to); got {dtype}")
    with torch.device("meta"), default_dtype(dtype):
        model = lora_llama2(**lora, **kwargs, quantize_base=quantize_base)
    load_checkpoint(model, checkpoint_dir, device=device, checkpoint_files=checkpoint_files)
    if adapter_dir is not None:
        load_peft_adapter(model, adapter_dir)
    return model.eval()
