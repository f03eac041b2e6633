"""From config to a trainable model: the tokenizer, the builder, the base weights from the
checkpoint folder (built on the meta device and filled tensor by tensor, NF4 weights quantized
as they arrive), and full-precision adapters that alone require grad."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from qlora_ext._dtypes import default_dtype
from qlora_ext.checkpoint import load_checkpoint, read_checkpoint_config
from qlora_ext.checkpoint.hf_tokenizer import source_tokenizer_files
from qlora_ext.models import llama2 as llama2_models
from qlora_ext.modules.lora_linear import LoRALinear
from qlora_ext.modules.peft import get_adapter_params, set_trainable_params
from qlora_ext.training.config_schema import ARCH_KEYS, GENERIC_BUILDERS


class ModelSetupError(ValueError):
    """The tokenizer, checkpoint or model the config names cannot be used."""


def load_tokenizer(path: str):
    """The Llama-2 SentencePiece tokenizer at ``tokenizer.path``."""
    if not Path(path).is_file():
        raise ModelSetupError(f"tokenizer.path: '{path}' is not a file (the SentencePiece tokenizer.model of the model)")
    try:
        return llama2_models.llama2_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ModelSetupError(f"tokenizer.path: {e}") from None


def check_tokenizer_files(tokenizer_path: str, checkpoint_dir: str) -> None:
    """Reads the checkpoint's HF tokenizer files that each checkpoint save copies beside the
    tokenizer, so a damaged one (or a tokenizer.json of another tokenizer) stops the run at setup,
    not at its first save.

    Raises:
        ModelSetupError: naming the file.
    """
    try:
        source_tokenizer_files(tokenizer_path, checkpoint_dir)
    except (OSError, ValueError) as e:
        raise ModelSetupError(f"checkpointer.checkpoint_dir: {e}") from None


def _builder(name: str):
    if name == "qlora_llama2":
        return functools.partial(llama2_models.lora_llama2, quantize_base=True)
    return getattr(llama2_models, name)


def build_model(cfg, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The LoRA/QLoRA model of ``cfg.model`` with ``cfg.checkpointer.checkpoint_dir``'s weights.

    Frozen dense weights are in ``dtype`` and NF4 ones dequantize to it; the adapters are float32.

    Raises:
        ModelSetupError: no checkpoint there, or its architecture differs from the builder's.
    """
    m = cfg.model
    ckpt_dir = cfg.checkpointer.checkpoint_dir
    if not Path(ckpt_dir).is_dir():
        raise ModelSetupError(
            f"checkpointer.checkpoint_dir: '{ckpt_dir}' is not a folder (a HF checkpoint: config.json + "
            "*.safetensors or pytorch_model*.bin, or a Meta one: params.json + consolidated.*.pth)"
        )
    lora = dict(
        lora_attn_modules=list(m.lora_attn_modules), apply_lora_to_mlp=m.apply_lora_to_mlp,
        apply_lora_to_output=m.apply_lora_to_output, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
    )
    try:
        arch = {}
        if m.builder in GENERIC_BUILDERS:
            arch = read_checkpoint_config(ckpt_dir, cfg.checkpointer.checkpoint_files).builder_kwargs()
            arch.update({k: getattr(m, k) for k in ARCH_KEYS if getattr(m, k) is not None})
        with torch.device("meta"), default_dtype(dtype):
            model = _builder(m.builder)(**lora, **arch)
        _check_rank(model, m.lora_rank)  # before the adapters are allocated
        load_checkpoint(model, ckpt_dir, device=device, checkpoint_files=cfg.checkpointer.checkpoint_files)
    except FileNotFoundError as e:
        raise ModelSetupError(f"checkpointer.checkpoint_dir: {e}") from None
    except ModelSetupError:
        raise
    except ValueError as e:
        raise ModelSetupError(f"model.builder={m.builder} with checkpointer.checkpoint_dir={ckpt_dir}: {e}") from None
    adapter = get_adapter_params(model)
    if not adapter:
        raise ModelSetupError(
            f"model.builder={m.builder}: the model has no LoRA adapters; set model.lora_attn_modules, "
            "model.apply_lora_to_mlp or model.apply_lora_to_output"
        )
    for p in adapter.values():
        p.data = p.data.float()
    set_trainable_params(model, adapter)
    return model


def _check_rank(model: nn.Module, rank: int) -> None:
    """Raises ModelSetupError where the rank exceeds an adapted linear's smaller side: such a rank
    adds nothing a full-rank update would not, and a mistyped one (a billion) would allocate before
    anything else fails."""
    limits = {name: min(module.in_dim, module.out_dim) for name, module in model.named_modules() if isinstance(module, LoRALinear)}
    if limits and rank > min(limits.values()):
        name = min(limits, key=limits.get)
        raise ModelSetupError(f"model.lora_rank must be at most the smaller side of every adapted linear ({limits[name]}, "
                              f"of {name}); got {rank}")


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Fully-qualified name -> trainable adapter parameter."""
    return get_adapter_params(model)


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies saved adapter tensors (from the training state) into the model's adapters.

    Raises:
        ModelSetupError: the saved adapter names do not match the model's.
    """
    params = get_adapter_params(model)
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ModelSetupError(f"resume_from_checkpoint: saved adapter does not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def check_vocab(model: nn.Module, tokenizer, cfg) -> None:
    """The tokenizer's ids must fit the model's embedding table."""
    vocab = model.tok_embeddings.num_embeddings
    if tokenizer.vocab_size > vocab:
        raise ModelSetupError(
            f"tokenizer.path={cfg.tokenizer.path} has {tokenizer.vocab_size} pieces but the model's vocabulary "
            f"(from {cfg.checkpointer.checkpoint_dir}) has {vocab}; use the tokenizer of that checkpoint"
        )


def check_max_seq_len(model: nn.Module, cfg) -> int:
    """Examples are cut to ``tokenizer.max_seq_len``, or to the model's max_seq_len when null.

    Raises:
        ModelSetupError: ``tokenizer.max_seq_len`` is longer than the model takes.
    """
    limit = model.max_seq_len
    wanted = cfg.tokenizer.max_seq_len
    if wanted is not None and wanted > limit:
        raise ModelSetupError(
            f"tokenizer.max_seq_len={wanted} is longer than the model's max_seq_len {limit} "
            f"(from {cfg.checkpointer.checkpoint_dir}); use at most {limit}"
        )
    return limit if wanted is None else wanted
