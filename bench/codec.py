"""Codec benchmark (issue 2): NF4 quantize (with double quantization) of bf16 weights, and
dequantize back to bf16, side by side with bitsandbytes, torchao and ``clone()``.

    python -m bench codec [--device cuda] [--quick]

``clone()`` of the bf16 weight is the memory floor a codec can be compared with: it reads and
writes the dense weight once, and allocates its output as the codecs do. The implementations of
each op are timed in turns (``harness.time_in_turns``).

On a GPU the quick run measures both shapes (a few seconds each), and each quantize group gets a
row ``.item() (host round trip)``: a 4-byte copy back and the host's return, timed as the ops are.
Our quantize waits for one such copy (of the absmax mean, to reject NaN and Inf weights), which
bitsandbytes and torchao do not check: the row shows what that wait costs at least.
"""

from __future__ import annotations

import copy
import math

import torch

from bench.alternatives import BNB, TORCHAO, attempt, copy_subclass, load_nf4_alternatives
from bench.context import Context
from bench.harness import ratio
from bench.report import Report, Target
from qlora_ext import ops

SHAPES = {
    "full": [(4096, 4096), (11008, 4096)],
    "quick": [(4096, 4096)],
    "smoke": [(256, 512)],
}
DTYPE = torch.bfloat16
TARGET_SHAPE = (4096, 4096)


def nf4_nbytes(numel: int) -> int:
    """Bytes of the NF4 storage (docs/nf4_format.md): codes, absmax codes, scales, offset."""
    blocks = numel // 64
    return numel // 2 + blocks + 4 * math.ceil(blocks / 256) + 4


def shapes(ctx: Context) -> list[tuple[int, int]]:
    return SHAPES["full"] if ctx.device == "cuda" and ctx.mode == "quick" else SHAPES[ctx.mode]


def group_names(shape: tuple[int, int]) -> tuple[str, str]:
    n, k = shape
    return f"quantize {n}x{k} bf16", f"dequantize {n}x{k} -> bf16"


def run(ctx: Context) -> Report:
    ctx.bandwidth()  # first, on a quiet machine state: every row's floor uses it
    report = Report()
    bnb, ao = load_nf4_alternatives(report)
    for shape in shapes(ctx):
        _measure_shape(ctx, report, shape, bnb, ao)
    report.targets = targets(ctx, report)
    if ctx.device == "cpu":
        report.notes.append("the CPU targets (ms) were set for the 2-core AVX-512 development VM")
    return report


def _measure_shape(ctx: Context, report: Report, shape, bnb, ao) -> None:
    q_group, dq_group = group_names(shape)
    numel = shape[0] * shape[1]
    dense_bytes = numel * DTYPE.itemsize
    packed_bytes = nf4_nbytes(numel)
    q_bytes = dense_bytes + packed_bytes  # read the weight, write its NF4 storage
    params = {"shape": list(shape)}
    master = torch.randn(shape, dtype=DTYPE, device=ctx.device)
    weights = ctx.ring(lambda i: master.clone(), dense_bytes)

    # (name, quantize fn over the weights ring, (dequantize fn, its ring)) per implementation;
    # each op's implementations are then timed in turns.
    components = ops.quantize_nf4(master)
    impls = [("ours", ops.quantize_nf4, (lambda c: ops.dequantize_nf4(*c, shape, DTYPE),
                                         ctx.ring(lambda i: tuple(t.clone() for t in components), packed_bytes)))]
    if bnb is not None:
        attempt(report, BNB, lambda: impls.append((BNB, *_bitsandbytes(ctx, bnb, master))), ctx.log)
    if ao is not None:
        attempt(report, TORCHAO, lambda: impls.append((TORCHAO, *_torchao(ctx, ao, master))), ctx.log)
    ctx.log(f"codec {shape}: {', '.join(name for name, _, _ in impls)} and clone() (ring of {len(weights)} weights)")

    quantizers = [(lambda w: w.clone(), weights)] + [(quantize, weights) for _, quantize, _ in impls]
    clone, *quants = ctx.time_in_turns(quantizers)
    dequants = ctx.time_in_turns([dequantize for _, _, dequantize in impls])
    for group, op, per_impl in ((q_group, "quantize", quants), (dq_group, "dequantize", dequants)):
        for (name, _, _), stats in zip(impls, per_impl):
            report.rows.append(ctx.row(group, name, DTYPE, stats, bytes_moved=q_bytes, op=op, **params))
        report.rows.append(ctx.row(group, "clone()", DTYPE, clone, bytes_moved=2 * dense_bytes, op="clone", **params))
    if ctx.device == "cuda":
        scalars = ctx.ring(lambda i: torch.zeros((), device=ctx.device), 4, max_items=8)
        round_trip = ctx.time(lambda t: t.item(), scalars)
        report.rows.append(ctx.row(q_group, ROUND_TRIP, torch.float32, round_trip, op="item", **params))
    _order_rows(report)


def _bitsandbytes(ctx, bnb, master):
    """bitsandbytes' quantize, and its dequantize with a ring of its NF4 states."""
    F = bnb.functional

    def quantize(w):
        return F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)

    packed, state = quantize(master)
    F.dequantize_4bit(packed, state)  # fails here, not in the middle of the turns
    ring = ctx.ring(lambda i: (packed.clone(), copy.deepcopy(state)), nf4_nbytes(master.numel()))
    return quantize, (lambda item: F.dequantize_4bit(item[0], item[1]), ring)


def _torchao(ctx, ao, master):
    """torchao's to_nf4, and its dequantize with a ring of NF4Tensors."""
    nf4 = ao.to_nf4(master, 64, 256)
    nf4.get_original_weight()  # fails here, not in the middle of the turns
    ring = ctx.ring(lambda i: copy_subclass(nf4), nf4_nbytes(master.numel()))
    return (lambda w: ao.to_nf4(w, 64, 256)), (lambda t: t.get_original_weight(), ring)


ROUND_TRIP = ".item() (host round trip)"
_IMPL_ORDER = ("ours", BNB, TORCHAO, "clone()", ROUND_TRIP)


def _order_rows(report: Report) -> None:
    groups = list(dict.fromkeys(r.group for r in report.rows))
    report.rows.sort(key=lambda r: (groups.index(r.group), _IMPL_ORDER.index(r.impl)))


def targets(ctx: Context, report: Report) -> list[Target]:
    """Issue 2's targets: on a CPU in ms and as speed-ups; on a GPU as a share of copy bandwidth."""
    out = []
    if ctx.device == "cpu":
        q_group, dq_group = group_names(TARGET_SHAPE)
        out.append(Target.check(f"{q_group}: ours", report.median_ms(q_group, "ours"), "<=", 30, " ms"))
        out.append(Target.check(f"{dq_group}: ours", report.median_ms(dq_group, "ours"), "<=", 8, " ms"))
        for impl, factor in ((TORCHAO, 20), (BNB, 4)):
            for group in (q_group, dq_group):
                speedup = ratio(report.median_ms(group, impl), report.median_ms(group, "ours"))
                out.append(Target.check(f"{group}: speed-up over {impl}", speedup, ">=", factor, "x", report.missing_reason(impl)))
        return out
    bandwidth = ctx.bandwidth()[0]
    for shape in shapes(ctx):
        for group, limit in zip(group_names(shape), (60, 85)):
            row = report.find(group, "ours")
            share = 100 * row.bytes_moved / (row.median_ms * 1e-3) / bandwidth if row else None
            out.append(Target.check(f"{group}: ours, share of the device copy bandwidth", share, ">=", limit, "%"))
    return out
