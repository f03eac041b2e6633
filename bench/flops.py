"""FLOPs of a step, counted by torch's ``FlopCounterMode``, and the matrix rate they are set against.

``FlopCounterMode`` knows aten's matrix products but not qlora's custom linear ops, nor the
flash-attention op that ``scaled_dot_product_attention`` runs on the CPU; ``register()`` adds
formulas for those (once per process, only where torch has none):

- ``qlora.linear_nf4``: 2 * M * in * out (the product with the dequantized weight);
- ``qlora.linear_nf4_grad_input``: 2 * M * out * in;
- CPU flash attention, forward and backward: torch's own SDPA formulas; with ``is_causal`` half
  of that, since the kernel skips the blocks above the diagonal. (torch counts causal attention
  in full on the GPU ops; the floor here should be the least work a step needs, not the most.)

Grouped-query attention reaches SDPA with fewer key/value heads than query heads
(``enable_gqa``). torch 2.13 and later count each query head against its shared key/value head;
torch 2.11's SDPA formulas refuse those shapes, so there ``register()`` gives them the key/value
shapes with the query's head count, which is the same count.

The matrix rate is what the machine's own dense matrix product reaches: ``torch.mm`` of square
float32 matrices on the CPU (at the threads the step uses), bf16 ones on a GPU. A step's floor is
its FLOPs at that rate: no implementation of the same FLOPs beats it without faster matrix
products than torch's.
"""

from __future__ import annotations

import time

import torch

_REGISTERED = False


def register() -> None:
    """Adds the formulas above to torch's FLOP registry (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from torch.utils import flop_counter as fc

    import qlora_ext  # noqa: F401  (registers torch.ops.qlora)

    def linear_nf4_flop(x_shape, *args, out_shape=None, **kwargs) -> int:
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * x_shape[-1] * out_shape[-1]

    def grad_input_flop(grad_y_shape, *args, out_shape=None, **kwargs) -> int:
        return linear_nf4_flop(grad_y_shape, out_shape=out_shape)

    def cpu_flash_flop(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
        flops = fc.sdpa_flop_count(query_shape, key_shape, value_shape)
        return flops // 2 if is_causal else flops

    def cpu_flash_backward_flop(grad_shape, query_shape, key_shape, value_shape, out_shape_arg, lse_shape,
                                dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
        flops = fc.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)
        return flops // 2 if is_causal else flops

    formulas = {
        torch.ops.qlora.linear_nf4: linear_nf4_flop,
        torch.ops.qlora.linear_nf4_grad_input: grad_input_flop,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_flop,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_flash_backward_flop,
    }
    for op, formula in formulas.items():
        if op not in fc.flop_registry:
            fc.register_flop_formula(op)(formula)
    _count_gqa_as_query_heads(fc)
    _REGISTERED = True


def _count_gqa_as_query_heads(fc) -> None:
    """Makes torch's SDPA FLOP counts (which its own formulas and those above call) take key/value
    tensors with fewer heads than the query, as torch 2.13 and later do, where this torch refuses
    them (torch 2.11)."""
    try:
        fc.sdpa_flop_count((1, 2, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8))
        return  # GQA counted already
    except AssertionError:
        pass
    forward, backward = fc.sdpa_flop_count, fc.sdpa_backward_flop_count

    def as_query_heads(query_shape, shape):
        return (shape[0], query_shape[1], *shape[2:])

    def sdpa_flop_count(query_shape, key_shape, value_shape):
        return forward(query_shape, as_query_heads(query_shape, key_shape), as_query_heads(query_shape, value_shape))

    def sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape):
        return backward(grad_out_shape, query_shape, as_query_heads(query_shape, key_shape),
                        as_query_heads(query_shape, value_shape))

    fc.sdpa_flop_count, fc.sdpa_backward_flop_count = sdpa_flop_count, sdpa_backward_flop_count


def count(step) -> int:
    """FLOPs of one call of ``step()`` (it runs once, under ``FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    register()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matrix_rate(device: torch.device, size: int | None = None, reps: int = 5) -> dict:
    """FLOP/s of the device's dense matrix product: the fastest of ``reps`` ``torch.mm`` of two
    ``size`` x ``size`` matrices (float32, 2048 on the CPU; bf16, 8192 on a GPU)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    size = size or (2048 if device.type == "cpu" else 8192)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []  # the fastest rep: a floor should be what the machine can do, not its average
    for i in range(reps + 2):  # two warm-ups
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return {
        "flops_per_s": 2 * size**3 / min(times),
        "how": f"torch.mm {size}x{size} {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads"
        if device.type == "cpu"
        else f"torch.mm {size}x{size} {str(dtype).removeprefix('torch.')} on {torch.cuda.get_device_name(device)}",
    }
