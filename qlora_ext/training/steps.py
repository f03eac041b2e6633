"""The numeric pieces of a training step: the token loss, precision context, activation
checkpointing, and held-out loss.

Gradient accumulation normalizes by the unmasked tokens of the whole accumulation window (not per
micro-batch), so a step's gradient is that of the mean token loss over every token it saw,
however the tokens fall into micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from qlora_ext._eager import force_eager
from qlora_ext.modules.linear_cross_entropy import linear_cross_entropy_sum
from qlora_ext.training.config import ConfigError
from qlora_ext.training.data import IGNORE_INDEX

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """The loss, the adapters' gradients or weights, or the model's outputs became NaN or Inf;
    training stops before the step is applied or saved."""


@torch.no_grad()
def largest_magnitude(tensors: list[Tensor]) -> float:
    """The largest absolute value over ``tensors``: NaN if one holds a NaN (one host sync)."""
    return float(torch.stack([norm.float() for norm in torch._foreach_norm(tensors, float("inf"))]).max())


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu.

    Raises:
        ConfigError: ``cuda`` asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is cuda but no CUDA GPU is available; use device=cpu (or device=auto)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on a GPU that supports it, else fp32.

    Raises:
        ConfigError: bf16 asked for on a GPU without bf16.
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"config key 'dtype' is bf16 but {torch.cuda.get_device_name(device)} does not support bf16; use dtype=fp32")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast when computing in bf16 (the fp32 adapters then run in bf16 too); else nothing."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fused_output_weight(model: nn.Module) -> Tensor | None:
    """``model.output``'s weight when the loss can apply the output projection itself, else None.

    That is the case for a frozen, bias-free ``nn.Linear`` output (every QLoRA/LoRA config that
    does not put LoRA on the output): the loss then never materializes the [b, s, vocab] logits
    (``linear_cross_entropy_sum``). A trainable or LoRA output keeps the plain logits path.
    """
    output = getattr(model, "output", None)
    if not hasattr(model, "skip_output_layer") or type(output) is not nn.Linear:
        return None
    if output.bias is not None or output.weight.requires_grad or type(output.weight.detach()) is not Tensor:
        return None  # a bias, a trainable weight, or a tensor subclass (e.g. NF4): the plain path
    return output.weight


@contextlib.contextmanager
def hidden_state_outputs(model: nn.Module, enabled: bool):
    """Within: ``model(tokens)`` returns hidden states (``skip_output_layer``) when ``enabled``."""
    if not enabled:
        yield
        return
    previous = model.skip_output_layer
    model.skip_output_layer = True
    try:
        yield
    finally:
        model.skip_output_layer = previous


def token_loss_sum(outputs: Tensor, labels: Tensor, output_weight: Tensor | None = None) -> Tensor:
    """Summed next-token cross entropy over positions whose label is not IGNORE_INDEX.

    Args:
        outputs: [b, s, vocab] float32 logits, or with ``output_weight`` the hidden states [b, s, d]
            of a model run under ``hidden_state_outputs``.
        labels: [b, s]; position t's outputs predict labels[t + 1].
        output_weight: the frozen [vocab, d] output projection (``fused_output_weight``); the loss
            then computes the logits chunk by chunk, only for the positions that count.

    The labels are shifted (and the last position ignored) rather than the logits sliced: slicing
    [b, s, vocab] logits copies them, and its backward fills a zero tensor of their full size.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [b, s]
    if output_weight is not None:
        return linear_cross_entropy_sum(outputs, output_weight, targets, ignore_index=IGNORE_INDEX)
    vocab = outputs.shape[-1]
    return F.cross_entropy(outputs.reshape(-1, vocab).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def num_loss_tokens(labels: Tensor) -> int:
    """Positions that count in ``token_loss_sum``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recomputes each transformer layer in backward instead of keeping its activations.

    The layer's forward is wrapped in place, so module and parameter names (and therefore
    checkpoints) are unchanged.
    """
    for layer in model.layers:
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def compile_layers(model: nn.Module) -> None:
    """``torch.compile(fullgraph=True)`` of each transformer layer, in place (torchtune's
    ``compile_model``); a graph break is an error.

    The layers share their code, so one compiled graph serves them all (and a second one the
    first layer, whose input needs no gradient): compile time is that of a layer, whatever the
    depth, where one whole-model graph takes time in proportion to the layers. Call after
    ``enable_activation_checkpointing``.

    ``validation_loss`` and ``evaluation.answer`` run the layers eagerly
    (``torch.compiler.set_stance``): the compiled graphs are the training step's.

    Random ops (LoRA and attention dropout) draw as eager mode does (inductor's
    ``fallback_random``): with its own generator, a run resumed in a new process, its graphs
    compiled afresh, drew other dropout masks than the uninterrupted run (bf16, helper-47).
    """
    for layer in model.layers:
        layer.compile(fullgraph=True, options={"fallback_random": True})


@torch.no_grad()
@force_eager()  # layers compiled for training (compile_layers) run eagerly here
def validation_loss(model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device, dtype: torch.dtype) -> float:
    """Mean token loss over the batches (the same masking and loss path as training)."""
    was_training = model.training
    model.eval()
    output_weight = fused_output_weight(model)
    total, count = 0.0, 0
    try:
        with hidden_state_outputs(model, output_weight is not None):
            for batch in batches:
                tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
                with autocast(device, dtype):
                    outputs = model(tokens)
                total += float(token_loss_sum(outputs, labels, output_weight))
                count += num_loss_tokens(labels)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("validation_loss: the held-out batches have no unmasked tokens")
    return total / count
