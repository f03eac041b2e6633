"""Cross entropy of a frozen output projection, computed in row chunks: the [tokens, vocab]
logits are never held whole.

Unfused, a training step writes the logits (batch 2 x 256 tokens x 32000 vocab in fp32 is 65 MB),
then a log-softmax of the same size, a zero-filled gradient of that size, the log-softmax
gradient, and only then the gradient of the hidden states; each of those fresh buffers is also
page-faulted in on a CPU. Here one chunk buffer is reused (on CPU, kept between calls): for each
chunk of rows the logits are computed, turned into the loss and (on CPU in place) into
``softmax - one_hot``, and multiplied by the weight right away, so the gradient of the hidden
states is ready at the end of the forward and backward only scales it. Same FLOPs as the unfused
path (the two matrix products); far fewer bytes. The weight gets no gradient: this is for a
frozen projection (QLoRA's ``model.output``), as in torchtune's ``LinearCrossEntropyLoss`` with
``skip_output_layer``.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from qlora_ext._transforms import transforms_reach, vmapped

# Bytes of fp32 logits per chunk: large enough that each chunk's matrix products stay compute-bound
# (on the 2-core AVX-512 CPU, [rows, d] x [d, 32000] runs about 8% faster at 384-512 rows than at
# 128-262), small enough to stay out of the way.
_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}

# The CPU chunk buffer, kept per thread between calls: a fresh 64 MB tensor is mapped anew by
# malloc on every call, and its 16k first-touch page faults cost as much as an eighth of the
# products. CUDA's caching allocator already reuses its blocks.
_cpu_workspace = threading.local()


def _chunk_rows(vocab: int, device: torch.device) -> int:
    return max(64, _CHUNK_BYTES.get(device.type, 32 << 20) // (4 * vocab))


def _chunk_buffer(rows: int, vocab: int, device: torch.device) -> Tensor:
    """An uninitialised fp32 [rows, vocab] buffer; on CPU a view of this thread's kept workspace."""
    if device.type != "cpu":
        return torch.empty(rows, vocab, dtype=torch.float32, device=device)
    size = rows * vocab
    if getattr(_cpu_workspace, "buffer", None) is None or _cpu_workspace.buffer.numel() < size:
        _cpu_workspace.buffer = None  # freed before the larger one is allocated
        _cpu_workspace.buffer = torch.empty(size, dtype=torch.float32)
    return _cpu_workspace.buffer[:size].view(rows, vocab)


def _softmax_rows(logits: Tensor) -> Tensor:
    """Softmax over dim 1 in one fused pass per row (max, exp and sum, scale), where ``amax``,
    ``sub_().exp_()``, ``sum`` and ``div_`` would each stream the whole chunk through memory. On CPU
    it is written over ``logits`` (row by row each element is read before it is written; a fresh
    64 MB output would be page-faulted in anew), elsewhere into a new tensor (the caching allocator
    reuses its blocks). Loss and gradient of 512 x 32000 fp32 on the 2-core AMD EPYC: 138 -> 122 ms
    median (ad hoc)."""
    if logits.device.type == "cpu" and not torch.compiler.is_compiling():  # (inductor cannot lower out= its input)
        return torch.ops.aten._softmax.out(logits, 1, False, out=logits)
    return torch.softmax(logits, dim=1)


def _target_nll(probs: Tensor, t: Tensor, h: Tensor, weight: Tensor) -> Tensor:
    """sum_i -log(probs[i, t[i]]): the chunk's loss from its softmax alone. Taking it as
    ``row_max - target_logit - log(max prob)`` instead costs two more passes over the [c, vocab]
    chunk (``amax`` of the logits, then of the probabilities), memory-bound on a CPU. A row whose
    target probability is below float32's smallest normal (loss above ~87, where the log of a
    subnormal loses digits, or of 0 is inf) gets its loss from its own logits, recomputed."""
    p_t = probs.gather(1, t[:, None])  # [c, 1], float32
    nll = p_t.log().neg_()
    low = p_t < torch.finfo(torch.float32).tiny
    if bool(low.any()):
        rows = low.squeeze(1).nonzero().squeeze(1)
        logits = torch.mm(h.index_select(0, rows), weight.t()).float()
        nll[rows] = torch.logsumexp(logits, 1, keepdim=True) - logits.gather(1, t.index_select(0, rows)[:, None])
    return nll.sum()


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T, targets[i]) over rows that all count (no ignore_index)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:  # noqa: ANN001
        n, vocab = hidden.shape[0], weight.shape[0]
        want_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        fp32 = hidden.dtype == torch.float32
        buffer = _chunk_buffer(min(chunk, n), vocab, hidden.device) if fp32 else None
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]  # [c, d], [c]
            if fp32:
                logits = torch.mm(h, weight.t(), out=buffer[: h.shape[0]])  # [c, vocab]
            else:  # bf16/fp16 matmul as the unfused path does, softmax in fp32
                logits = torch.mm(h, weight.t()).float()
            if logits.device.type == "cpu":  # (elsewhere the passes are cheap, and the check below would sync)
                probs = _softmax_rows(logits)
                total += _target_nll(probs, t, h, weight)
            else:
                row_max = logits.amax(dim=1, keepdim=True)  # [c, 1]
                target_logit = logits.gather(1, t[:, None])
                probs = _softmax_rows(logits)
                # The row's largest probability is exp(0) / row_sum, so log(row_sum) is exact from it
                # even where the target's own probability underflows.
                total += (row_max - target_logit - probs.amax(dim=1, keepdim=True).log()).sum()
            if want_grad:
                probs.scatter_add_(1, t[:, None], probs.new_full((h.shape[0], 1), -1.0))  # softmax - one_hot
                torch.mm(probs.to(weight.dtype), weight, out=grad_hidden[start : start + chunk])
        if want_grad:
            ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):  # noqa: ANN001, ANN206
        if torch.is_grad_enabled():  # (once_differentiable let this through when grad_total needed no grad)
            raise RuntimeError(
                "linear_cross_entropy_sum: second derivatives (backward with create_graph=True) are not supported: its "
                "gradient is computed in forward, with no history; use F.cross_entropy on hidden @ weight.T for them"
            )
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def _check_targets(targets: Tensor, vocab: int, ignore_index: int) -> None:
    bad = targets[(targets != ignore_index) & ((targets < 0) | (targets >= vocab))]
    if bad.numel():
        raise ValueError(
            f"linear_cross_entropy_sum: argument 'targets' must be in [0, {vocab}) or ignore_index={ignore_index}; "
            f"got {int(bad[0])}"
        )


def linear_cross_entropy_sum(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Summed cross entropy of ``hidden @ weight.T`` against ``targets``, skipping ``ignore_index``.

    Equal to ``F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=ignore_index,
    reduction="sum")``, computed in chunks of rows without the whole logits; rows whose target is
    ``ignore_index`` cost nothing (their logits are never computed).

    Args:
        hidden: [..., d] hidden states (float32, bfloat16 or float16); gets a gradient.
        weight: [vocab, d] frozen projection weight (requires_grad False), same device.
        targets: [...] int64 class ids in [0, vocab) or ``ignore_index``, the shape of hidden
            without its last dim.
        ignore_index: target value of rows that do not count.

    Returns:
        float32 scalar.

    Raises:
        TypeError: hidden or weight not floating point, targets not of an integer dtype.
        ValueError: mismatched shapes or devices, a weight that requires grad, or a target out of range.
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not t.is_floating_point():
            raise TypeError(f"linear_cross_entropy_sum: argument '{name}' must be floating point; got {t.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy_sum: argument 'targets' must hold integer class ids; got {targets.dtype}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy_sum: argument 'weight' must be [vocab, {hidden.shape[-1]}] (hidden's last dim); "
            f"got shape {list(weight.shape)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy_sum: argument 'targets' must have hidden's shape without its last dim "
            f"{list(hidden.shape[:-1])}; got {list(targets.shape)}"
        )
    if weight.requires_grad:
        raise ValueError(
            "linear_cross_entropy_sum: argument 'weight' must be frozen (requires_grad=False): the fused loss gives "
            "it no gradient; use F.linear + F.cross_entropy for a trainable output layer"
        )
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(
            f"linear_cross_entropy_sum: arguments 'hidden', 'weight', 'targets' must be on one device; got "
            f"{hidden.device}, {weight.device}, {targets.device}"
        )
    vocab = weight.shape[0]
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # [n, d], [n]
    if transforms_reach(hidden, weight):
        # torch.func and forward-mode AD take the formula: no rows picked by value (vmap cannot),
        # no autograd function without a jvp. Its product in the weight's dtype, as below, also
        # under autocast (which would round an fp32 one to bf16).
        if not vmapped(targets):  # (vmap cannot read the values either)
            _check_targets(targets, vocab, ignore_index)
        with torch.autocast(hidden.device.type, enabled=False):
            logits = torch.mm(hidden.to(weight.dtype), weight.t()).float()
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    counted = targets != ignore_index
    rows = counted.nonzero().squeeze(1)
    if rows.numel() != targets.numel():  # only the rows that count
        hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        _check_targets(targets, vocab, ignore_index)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return _LinearCrossEntropySum.apply(hidden.contiguous(), weight, targets, _chunk_rows(vocab, hidden.device))
