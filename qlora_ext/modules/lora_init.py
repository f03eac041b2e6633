"""Building a QLoRA ``LoRALinear`` fast on CPU.

``LoRALinear(..., quantize_base=True)`` creates its dense base weight with ``nn.Linear``'s
default init and quantizes it. On CPU that init is the bottleneck of building a large model:
torch's CPU generator fills a tensor from one thread (about 150 M values/s), so the 6.5 G frozen
weights of Llama-2 7B take some 45 s of random numbers against about 10 s of quantization on two
cores. Here the module is created on the meta device and its base weight is filled with the same
distribution (``U(-1/sqrt(in_dim), 1/sqrt(in_dim))``, nn.Linear's kaiming-uniform) from several
threads, each with its own generator seeded from torch's default one, so results stay
reproducible under ``torch.manual_seed`` for a given thread count. Only one dense weight exists
at a time, as with the plain constructor.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from qlora_ext.modules.lora_linear import LoRALinear
from qlora_ext.nf4 import to_nf4

_MIN_PARALLEL_NUMEL = 1 << 20  # below this, threads cost more than they save


def uniform_parallel_(tensor: Tensor, bound: float) -> Tensor:
    """Fills a contiguous CPU tensor with U(-bound, bound) using ``torch.get_num_threads()`` threads."""
    flat = tensor.view(-1)
    workers = max(1, min(torch.get_num_threads(), flat.numel() // _MIN_PARALLEL_NUMEL))
    seeds = torch.randint(0, 2**62, (workers,)).tolist()  # drawn from the default generator
    chunks = flat.chunk(workers)

    def fill(i: int) -> None:
        # ATen releases the GIL inside uniform_, so the threads run in parallel.
        chunks[i].uniform_(-bound, bound, generator=torch.Generator().manual_seed(seeds[i]))

    if workers == 1:
        fill(0)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, range(workers)))
    return tensor


def qlora_linear(
    in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0, *, scratch: Tensor | None = None
) -> LoRALinear:
    """``LoRALinear(in_dim, out_dim, rank, alpha, dropout, quantize_base=True)``, built faster on
    CPU (see the module docstring); on other default devices it is exactly that call.

    Args:
        in_dim, out_dim, rank, alpha, dropout: as for ``LoRALinear``.
        scratch: a CPU buffer of the default dtype with at least ``in_dim * out_dim`` elements
            to draw the dense weight in. Builders pass one buffer for all layers: a fresh 180 MB
            tensor per linear costs a page fault per 4 KB (a third of a 7B build's CPU time).
    """
    device = torch.get_default_device()
    if device.type != "cpu":
        return LoRALinear(in_dim, out_dim, rank, alpha, dropout=dropout, quantize_base=True)
    with torch.device("meta"):
        module = LoRALinear(in_dim, out_dim, rank, alpha, dropout=dropout, quantize_base=True)
    numel = in_dim * out_dim
    if scratch is not None and scratch.numel() >= numel and scratch.dtype == torch.get_default_dtype():
        weight = scratch.view(-1)[:numel].view(out_dim, in_dim)
    else:
        weight = torch.empty(out_dim, in_dim, device=device)
    uniform_parallel_(weight, 1.0 / math.sqrt(in_dim))
    module.weight = nn.Parameter(to_nf4(weight), requires_grad=False)
    del weight
    module.lora_a.to_empty(device=device)
    module.lora_b.to_empty(device=device)
    module.initialize_parameters()
    return module
