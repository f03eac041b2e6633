"""Linear benchmark (issue 3): ``linear_nf4`` forward (``y = x @ W.T``), its backward op
(``grad_x = grad_y @ W``) and both through autograd, on the Llama-2-7B projection shapes, side by
side with dense ``F.linear`` (fp32 and bf16), bitsandbytes ``matmul_4bit`` and torchao ``linear_nf4``.

    python -m bench linear [--device cuda] [--quick]

Shapes are W's ``out x in``; M is the number of activation rows (batch x sequence). Activations
are bf16 (the QLoRA case), and fp32 for ours and dense where a target names fp32. bitsandbytes
and torchao have no backward op of their own; they appear in "fwd" and in "fwd+bwd" (autograd).
The implementations of each case are timed in turns (three rounds), so that the drift of a
virtual machine's speed falls on all of them alike.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench.alternatives import BNB, TORCHAO, attempt, copy_subclass, load_nf4_alternatives
from bench.codec import nf4_nbytes
from bench.context import Context
from bench.harness import ratio, ring_length
from bench.report import Report, Target
from qlora_ext import ops

LLAMA2_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # q/k/v/o; w1, w3; w2
BF16, FP32 = torch.bfloat16, torch.float32
PASSES = ("fwd", "bwd", "fwd+bwd")


def plan(ctx: Context) -> list[tuple[tuple[int, int], list[int]]]:
    """[(shape, Ms)]. On a CPU, M=2048 takes seconds per call: the full run has it for one shape."""
    if ctx.smoke:
        return [((256, 512), [1, 16, 40])]
    if ctx.device == "cuda":
        return [(shape, [1, 16, 256, 2048]) for shape in LLAMA2_7B]
    if ctx.quick:
        return [(shape, [1, 256]) for shape in LLAMA2_7B]  # the Ms the CPU targets name
    return [(shape, [1, 16, 256, 2048] if shape == (4096, 4096) else [1, 16, 256]) for shape in LLAMA2_7B]


def group_name(pass_: str, shape: tuple[int, int], m: int, dtype: torch.dtype) -> str:
    return f"{pass_} {shape[0]}x{shape[1]} M={m} {str(dtype).removeprefix('torch.')}"


@dataclass
class Impl:
    """One implementation: how to build a distinct copy of W, and its forward / backward."""

    name: str
    weight_bytes: int
    make_weight: Callable[[int], Any]
    forward: Callable[[torch.Tensor, Any], torch.Tensor]
    backward: Callable[[torch.Tensor, Any], torch.Tensor] | None  # grad_y, W -> grad_x
    dtypes: tuple[torch.dtype, ...]  # activation dtypes it is measured with
    passes: tuple[str, ...]


def run(ctx: Context) -> Report:
    ctx.bandwidth()  # first, on a quiet machine state: every row's floor uses it
    report = Report()
    bnb, ao = load_nf4_alternatives(report)
    for shape, ms in plan(ctx):
        _measure_shape(ctx, report, shape, ms, bnb, ao)
    _order_rows(report)
    report.targets = targets(ctx, report)
    report.notes.append("'vs ours' compares with ours in the same pass, shape, M and activation dtype")
    if ctx.device == "cpu":
        report.notes.append("the CPU targets were set for the 2-core AVX-512 development VM")
    return report


def _measure_shape(ctx: Context, report: Report, shape, ms, bnb, ao) -> None:
    n, k = shape
    master = torch.randn(shape, device=ctx.device) * k**-0.5  # [out, in], unit-variance outputs
    master_bf16 = master.to(BF16)
    components = ops.quantize_nf4(master_bf16)
    nf4_bytes = nf4_nbytes(n * k)

    impls = [
        Impl("ours", nf4_bytes, lambda i: tuple(t.clone() for t in components),
             lambda x, w: ops.linear_nf4(x, *w, n), lambda gy, w: ops.linear_nf4_grad_input(gy, *w, k), (BF16, FP32), PASSES),
        Impl("dense", 2 * n * k, lambda i: master_bf16.clone(), F.linear, lambda gy, w: gy @ w, (BF16,), PASSES),
        Impl("dense", 4 * n * k, lambda i: master.clone(), F.linear, lambda gy, w: gy @ w, (FP32,), ("fwd", "bwd")),
    ]
    if bnb is not None:
        try:
            packed, state = bnb.functional.quantize_4bit(master_bf16, blocksize=64, quant_type="nf4", compress_statistics=True)
        except Exception as e:
            report.skip(BNB, f"failed here: quantize_4bit: {type(e).__name__}: {e}")
        else:
            impls.append(Impl(BNB, nf4_bytes, lambda i: (packed.clone(), copy.deepcopy(state)),
                              lambda x, w: bnb.matmul_4bit(x, w[0].t(), quant_state=w[1]), None, (BF16,), ("fwd", "fwd+bwd")))
    if ao is not None:
        try:
            ao_weight = ao.to_nf4(master_bf16, 64, 256)
        except Exception as e:
            report.skip(TORCHAO, f"failed here: to_nf4: {type(e).__name__}: {e}")
        else:
            impls.append(Impl(TORCHAO, nf4_bytes, lambda i: copy_subclass(ao_weight), ao.linear_nf4, None, (BF16,), ("fwd", "fwd+bwd")))

    # Every implementation's weights at once, so that each case can time them in turns.
    rings: list[tuple[Impl, list]] = []
    for impl in impls:
        def build(impl=impl):
            # The weights of one ring are shared by every M; a large M needs fewer of them, since
            # its activations fill the cache too.
            weights = ctx.ring(impl.make_weight, impl.weight_bytes + min(ms) * (n + k) * 2)
            ctx.log(f"linear {n}x{k} {impl.name} {'/'.join(str(d).removeprefix('torch.') for d in impl.dtypes)}: "
                    f"ring of {len(weights)} weights")
            rings.append((impl, weights))

        if impl.name == "ours":
            build()
        else:
            attempt(report, impl.name, build, ctx.log)
    for m in ms:
        for dtype in (BF16, FP32):
            for pass_ in PASSES:
                if pass_ == "fwd+bwd" and dtype != BF16:
                    continue  # training runs in bf16; fp32 is measured only where a target names it
                _measure_case(ctx, report, rings, shape, m, dtype, pass_)


def _measure_case(ctx: Context, report: Report, rings: list, shape, m: int, dtype: torch.dtype, pass_: str) -> None:
    """One pass, M and dtype: every implementation that has it, timed in turns. An alternative
    that fails is left out of this shape from then on."""
    n, k = shape
    act_bytes = m * (n + k) * dtype.itemsize  # x and y, or grad_y and grad_x
    cases = []
    for entry in list(rings):
        impl, weights = entry
        if dtype not in impl.dtypes or pass_ not in impl.passes:
            continue
        count = min(len(weights), ring_length(impl.weight_bytes + act_bytes, ctx.ring_bytes))
        fn, ring = _case(impl, pass_, weights[:count], m, shape, dtype, ctx.device)
        if impl.name != "ours" and not attempt(report, impl.name, lambda fn=fn, ring=ring: fn(ring[0]), ctx.log):
            rings[:] = [e for e in rings if e is not entry]
            continue
        cases.append((impl, fn, ring))
    w_reads = 2 if pass_ == "fwd+bwd" else 1
    for (impl, _, _), stats in zip(cases, ctx.time_in_turns([(fn, ring) for _, fn, ring in cases])):
        report.rows.append(ctx.row(
            group_name(pass_, shape, m, dtype), impl.name, dtype, stats,
            bytes_moved=w_reads * (impl.weight_bytes + act_bytes),
            flops=w_reads * 2 * m * n * k,
            op=pass_, shape=list(shape), M=m,
        ))


def _case(impl: Impl, pass_: str, weights: list, m: int, shape, dtype, device):
    """(fn(item), ring of items) for one measurement."""
    n, k = shape

    def randn(*size, grad=False):
        return torch.randn(*size, dtype=dtype, device=device).requires_grad_(grad)

    if pass_ == "fwd":
        return (lambda item: impl.forward(*item)), [(randn(m, k), w) for w in weights]
    if pass_ == "bwd":
        return (lambda item: impl.backward(*item)), [(randn(m, n), w) for w in weights]

    def forward_backward(item):
        x, grad_y, w = item
        return torch.autograd.grad(impl.forward(x, w), x, grad_y)

    return forward_backward, [(randn(m, k, grad=True), randn(m, n), w) for w in weights]


_IMPL_ORDER = ("ours", "dense", BNB, TORCHAO)


def _order_rows(report: Report) -> None:
    def key(row):
        p = row.params
        return (LLAMA2_7B.index(tuple(p["shape"])) if tuple(p["shape"]) in LLAMA2_7B else -1, p["M"],
                PASSES.index(p["op"]), row.dtype != "bfloat16", _IMPL_ORDER.index(row.impl))

    report.rows.sort(key=key)


def targets(ctx: Context, report: Report) -> list[Target]:
    """Issue 3's targets, per shape: ours' time as a multiple of dense in the same dtype."""
    if ctx.device == "cpu":
        wanted = [("fwd", 1, BF16, 0.4), ("fwd", 256, FP32, 1.15), ("bwd", 256, FP32, 1.25)]
    else:
        wanted = [("fwd", 1, BF16, 0.35), ("fwd", 16, BF16, 0.35), ("fwd+bwd", 2048, BF16, 1.10)]
    out = []
    for shape, _ in plan(ctx):
        for pass_, m, dtype, limit in wanted:
            group = group_name(pass_, shape, m, dtype)
            value = ratio(report.median_ms(group, "ours"), report.median_ms(group, "dense"))
            out.append(Target.check(f"{group}: ours / dense", value, "<=", limit, "x"))
    return out
