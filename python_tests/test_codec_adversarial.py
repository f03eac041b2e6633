"""Adversarial codec parity: the CPU kernels (every ISA) against the reference, an independent numpy
statement of docs/nf4_format.md steps 1-5, and bitsandbytes, on constructed inputs: every 16-bit
value, exact NF4 and 8-bit-map midpoints, special blocks, every partial last scale group, strided
layouts; and NF4Tensor round trips."""

from __future__ import annotations

import copy
import io
import math
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from conftest import FLOAT_DTYPES, dtype_id

from qlora_ext import _reference as ref
from qlora_ext import ops
from qlora_ext._tables import ABSMAX_CODE_MAP, NF4_VALUES
from qlora_ext.nf4 import NF4Tensor, to_nf4

NF4 = np.array(NF4_VALUES, dtype=np.float32)
NF4_MID = ((NF4[:-1] + NF4[1:]) / np.float32(2)).astype(np.float32)
MAP = np.array(ABSMAX_CODE_MAP, dtype=np.float32)
MAP_MID = ((MAP[:-1] + MAP[1:]) / np.float32(2)).astype(np.float32)
COMPONENTS = ("packed", "absmax_codes", "absmax_scales", "absmax_offset")


def rule_packed(w: torch.Tensor) -> np.ndarray:
    """Steps 1-4 in numpy float32: codes = number of midpoints strictly below the scaled value."""
    x = w.detach().resolve_neg().reshape(-1, 64).float().numpy()
    absmax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(absmax > np.float32(1e-38), np.float32(1) / absmax, np.float32(1) / np.float32(1e-38)).astype(np.float32)
    scaled = np.clip((x * inv[:, None]).astype(np.float32), -1, 1)
    codes = np.searchsorted(NF4_MID, scaled, side="left").astype(np.uint8).reshape(-1, 2)
    return (codes[:, 0] << 4) | codes[:, 1]


def rule_absmax_codes(absmax: np.ndarray, offset: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Step 5 in numpy float32 for a given offset: (codes, scales)."""
    n = absmax.size
    groups = -(-n // 256)
    centered = np.zeros(groups * 256, dtype=np.float32)
    centered[:n] = (absmax.astype(np.float32) - offset).astype(np.float32)
    centered = centered.reshape(groups, 256)
    scales = np.abs(centered).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(scales > np.float32(1e-38), np.float32(1) / scales, np.float32(1) / np.float32(1e-38)).astype(np.float32)
    scaled = np.clip((centered * inv[:, None]).astype(np.float32), -1, 1)
    return np.searchsorted(MAP_MID, scaled, side="left").reshape(-1)[:n].astype(np.uint8), scales


def bnb():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency")


def check_codec(w: torch.Tensor, *, with_bnb: bool = True):
    """Every ISA == reference; packed == the numpy rule (and bitsandbytes); absmax codes/scales ==
    the numpy rule for our offset; our dequantize == the reference in every dtype, and == bitsandbytes'
    own dequantize of its state (flat shape: its CPU kernel blocks by row, see the note below)."""
    want = ref.quantize_nf4(w)
    before = ops.cpu_kernel_isa()
    try:
        for isa in ops.available_cpu_kernel_isas():
            ops.set_cpu_kernel_isa(isa)
            got = ops.quantize_nf4(w)
            for name, g, r in zip(COMPONENTS, got, want):
                assert g.shape == r.shape and torch.equal(g, r), (isa, name)
            for dt in FLOAT_DTYPES:
                assert torch.equal(ops.dequantize_nf4(*got, list(w.shape), dt), ref.dequantize_nf4(*want, list(w.shape), dt)), (isa, dt)
    finally:
        ops.set_cpu_kernel_isa(before)
    packed, codes, scales, offset = want
    assert np.array_equal(packed.numpy(), rule_packed(w))
    absmax = w.detach().reshape(-1, 64).float().abs().amax(1).numpy()
    rule_codes, rule_scales = rule_absmax_codes(absmax, np.float32(offset.item()))
    assert np.array_equal(codes.numpy(), rule_codes) and np.array_equal(scales.numpy(), rule_scales)
    mean = absmax.astype(np.float64).mean()
    assert abs(offset.item() - mean) <= 2**-23 * mean  # the float64 mean, rounded once
    if not with_bnb:
        return want
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bp, state = bnb().quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, bp.view(-1))
    if not torch.isfinite(state.offset):  # its float32 mean of absmax near the float max overflows: a NaN state
        return want
    for dt in FLOAT_DTYPES:
        s2 = copy.copy(state)
        # bitsandbytes 0.50's CPU dequantize_4bit blocks each row on its own (wrong where the last dim is not
        # a multiple of 64) and returns [1, n] for 1-D; a flat shape gives its block-correct result.
        s2.dtype, s2.shape = dt, torch.Size([w.numel()])
        theirs = bnb().dequantize_4bit(bp, s2).reshape(w.shape)
        ours = ops.dequantize_nf4(bp.view(-1), state.absmax, state.state2.absmax, state.offset, list(w.shape), dt)
        if dt == torch.bfloat16:  # bitsandbytes' CPU kernel flushes bfloat16 subnormal outputs to zero; torch rounds them
            keep = theirs.float().abs() >= torch.finfo(torch.bfloat16).tiny
            ours, theirs = ours[keep], theirs[keep]
        assert torch.equal(ours, theirs), dt
    return want


def blocks_after_marker(values: torch.Tensor, marker: float, dtype) -> torch.Tensor:
    """63 values per block after a first element `marker` (the block's absmax)."""
    values = values.reshape(-1)
    n = math.ceil(values.numel() / 63)
    out = torch.zeros(n, 64)
    out[:, 0] = marker
    body = torch.zeros(n * 63)
    body[: values.numel()] = values
    out[:, 1:] = body.view(n, 63)
    return out.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("absmax", [1.0, 0.75, 3.0, 1e-3, "max", "min_normal"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_every_16bit_value_in_a_block(dtype, absmax, sign):
    info = torch.finfo(dtype)
    a = {"max": info.max, "min_normal": info.smallest_normal}.get(absmax, absmax)
    a = torch.tensor(a).to(dtype).float().item()
    every = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(dtype).float()
    values = every[torch.isfinite(every) & (every.abs() <= a)]
    check_codec(blocks_after_marker(values, sign * a, dtype))


def _ulps(t: torch.Tensor, k: int) -> torch.Tensor:
    for _ in range(abs(k)):
        t = torch.nextafter(t, torch.full_like(t, math.copysign(math.inf, k)))
    return t


@pytest.mark.parametrize("absmax", [1.0, 2.0**-100, 2.0**100, 3.0, 0.1, 7.3, 1e-20, 3.4028234663852886e38, 1.1754944e-38, 5e-39])
def test_fp32_values_on_and_next_to_the_nf4_midpoints(absmax):
    a = torch.tensor(absmax)
    mids = torch.tensor(NF4_MID)
    base = torch.cat([mids, torch.tensor([-1.0, 0.0, 1.0])]) * a
    values = torch.cat([_ulps(base, k) for k in range(-3, 4)])
    values = values[values.abs() <= a]
    w = torch.cat([blocks_after_marker(values, absmax, torch.float32), blocks_after_marker(-values, -absmax, torch.float32)])
    check_codec(w)
    if math.log2(absmax).is_integer():  # 1/absmax exact: the midpoints themselves are hit; ties go to the lower code
        packed = ops.quantize_nf4(blocks_after_marker(mids * a, absmax, torch.float32))[0]
        codes = torch.stack([packed >> 4, packed & 15], 1).view(-1)[1:16]
        assert codes.tolist() == list(range(15))


def test_double_quant_exact_map_midpoints_go_to_the_lower_code():
    # one group: offset exactly 1 (pairs 1 +- c), scale exactly 0.5, so (absmax - 1) * 2 lands on the
    # 8-bit map's midpoints themselves (those with few enough bits), and one ulp either side
    mids = torch.tensor(MAP_MID)
    exact = [m.item() for m in mids.abs().unique() if (m.item() * 2**22).is_integer() and 0 < m < 1]
    for shift in (-1, 0, 1):
        cs = torch.tensor([m / 2 for m in exact])
        upper, lower = 1 + cs, 1 - cs
        if shift:  # off the midpoints, keeping the pairs' sums (ulp 2**-23 above 1, 2**-24 below)
            upper = _ulps(upper, shift)
            lower = _ulps(_ulps(lower, -shift), -shift)
        absmax = torch.cat([torch.tensor([1.5, 0.5]), upper, lower])
        absmax = torch.cat([absmax, torch.ones(256 - absmax.numel())])
        w = torch.zeros(256, 64)
        w[:, 5] = absmax
        _, codes, scales, offset = check_codec(w)
        assert offset.item() == 1.0 and scales.tolist() == [0.5]
        scaled = (absmax - 1) * 2
        tie = torch.isin(scaled, mids)
        assert (tie.sum() > 0) == (shift == 0)
        # at a tie the code is the index of the midpoint (the lower neighbour)
        idx = torch.searchsorted(mids, scaled[tie])
        assert torch.equal(codes[tie].long(), idx)


def _special_rows(dtype):
    info = torch.finfo(dtype)
    rows = [torch.zeros(64), -torch.zeros(64), torch.tensor([-0.0, 0.0] * 32), torch.full((64,), info.max), torch.full((64,), -info.max),
            torch.tensor([info.max, -info.max] * 32), torch.tensor([info.max] + [info.tiny] * 63), torch.full((64,), info.tiny),
            torch.full((64,), info.smallest_normal / 4), torch.tensor([-1.0] + [0.5] * 63), torch.tensor([1.0] + [-1.0] * 63)]
    rng = random.Random(135)
    span = (-7, 4) if dtype == torch.float16 else (-30, 30)
    for j in range(64):  # one nonzero per block, every position
        r = torch.zeros(64)
        r[j] = (-1) ** j * 10.0 ** rng.uniform(*span)
        rows.append(r)
    rows.append(torch.arange(64) * (6e-8 if dtype == torch.float16 else 1e-45))  # subnormal ramp
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_special_blocks(dtype):
    w = _special_rows(dtype)
    check_codec(w)
    for i in range(w.shape[0]):  # each alone: a single block is its own group, offset == absmax, scale 0
        _, codes, scales, _ = check_codec(w[i:i + 1], with_bnb=False)
        assert codes.item() == 127 and scales.item() == 0.0
        if w[i].abs().max() == 0:
            assert torch.equal(ops.dequantize_nf4(*ops.quantize_nf4(w[i:i + 1]), [1, 64], torch.float32), torch.zeros(1, 64))


@pytest.mark.parametrize("remainder", list(range(1, 256, 7)) + [255])
def test_every_partial_last_scale_group(remainder):
    dtype = FLOAT_DTYPES[remainder % 3]
    w = torch.randn(256 + remainder, 64)
    w[-1] *= 1 + remainder / 10
    w = w.to(dtype)
    _, _, scales, offset = check_codec(w, with_bnb=remainder % 3 == 0)
    absmax = w.float().abs().amax(1)
    assert scales.numel() == 2 and scales[1] == (absmax[256:] - offset).abs().max()


@pytest.mark.parametrize("seed", range(24))
def test_random_shapes_1d_to_4d(seed):
    rng = random.Random(seed)
    k = rng.choice([rng.randint(1, 600), rng.randint(1, 40), 256 * rng.randint(1, 3) + rng.randint(-2, 2)])
    n = 64 * k
    dims = []
    rest = n
    for _ in range(seed % 4):
        d = rng.choice([x for x in range(1, min(rest, 64) + 1) if rest % x == 0])
        dims.append(d)
        rest //= d
    shape = (*dims, rest)
    dtype = FLOAT_DTYPES[seed % 3]
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)).pow(3 if seed % 2 else 1) * 0.05).to(dtype)
    check_codec(w)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_to_nf4_of_strided_views_quantizes_the_logical_order(dtype):
    base = torch.randn(256, 384).to(dtype)
    views = [base.t(), base[:, ::2], base[1:65], base.view(-1)[3:3 + 64 * 50], torch.randn(1, 128).to(dtype).expand(40, 128),
             torch.randn(4, 8, 16, 6).to(dtype).permute(3, 0, 2, 1), torch.randn(2, 8, 8, 4).to(dtype).contiguous(memory_format=torch.channels_last),
             torch.randn(1000).to(dtype).as_strided((64, 64), (7, 1)), torch.flip(base, [0]), torch._neg_view(base)]
    for v in views:
        nf4 = to_nf4(v)
        assert nf4.shape == v.shape and nf4.dtype == dtype
        for g, r in zip(nf4.components(), ops.quantize_nf4(v.contiguous().resolve_neg())):
            assert torch.equal(g, r)
        assert np.array_equal(nf4.packed.numpy(), rule_packed(v))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(64,), (300, 64), (3, 5, 128), (2, 3, 4, 64)], ids=str)
def test_nf4tensor_round_trips(dtype, shape, tmp_path):
    nf4 = to_nf4((torch.randn(shape) * 0.05).to(dtype))

    def same(t):
        assert type(t) is NF4Tensor and t.shape == nf4.shape and t.dtype == nf4.dtype
        assert all(torch.equal(a, b) for a, b in zip(t.components(), nf4.components()))

    same(copy.deepcopy(nf4))
    assert copy.deepcopy(nf4).packed.data_ptr() != nf4.packed.data_ptr()
    same(pickle.loads(pickle.dumps(nf4)))
    buf = io.BytesIO()
    torch.save(nf4, buf)
    buf.seek(0)
    same(torch.load(buf))  # weights_only=True
    torch.save({"w": nf4}, tmp_path / "w.pt")
    same(torch.load(tmp_path / "w.pt", mmap=True)["w"])
    exact = ops.dequantize_nf4(*nf4.components(), list(shape), torch.float32)
    for out in (*FLOAT_DTYPES, torch.float64):
        dense = nf4.to(out)
        assert type(dense) is torch.Tensor and dense.dtype == out
        assert torch.equal(dense, exact.to(out))  # the exact float32 values, rounded once
    assert torch.equal(nf4.to(torch.float32).to(dtype), nf4.dequantize())


def test_codec_deterministic_across_thread_counts():
    w = (torch.randn(256 * 37 + 5, 64) * torch.rand(256 * 37 + 5, 1)).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            q = ops.quantize_nf4(w)
            results.append((*q, ops.dequantize_nf4(*q, list(w.shape), torch.bfloat16)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
