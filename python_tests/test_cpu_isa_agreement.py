"""Every CPU kernel table (avx512, avx2) against the portable one, on inputs that end exactly where
their storage ends (some at odd offsets into it), over every numel 64k (k = 1..300), odd shapes
around the small-M switches, and 1-3 threads: the codec bit for bit, the tile paths bit for bit,
the fused small-M kernels within the float64 bound. Meant to be run under an ASan/UBSan build of
_C.so as well (helper-139), where an access past an input's end stops the test."""

from __future__ import annotations

import pytest
import torch
from conftest import FLOAT_DTYPES, dtype_id

from qlora_ext import ops

Q = torch.ops.qlora


TABLES = ops.available_cpu_kernel_isas()
SIMD = [t for t in TABLES if t != "portable"]


@pytest.fixture(autouse=True)
def _restore():
    isa, threads = ops.cpu_kernel_isa(), torch.get_num_threads()
    yield
    ops.set_cpu_kernel_isa(isa)
    torch.set_num_threads(threads)


def at_storage_end(t: torch.Tensor, pad: int) -> torch.Tensor:
    flat = torch.empty(t.numel() + pad, dtype=t.dtype)
    flat[pad:] = t.reshape(-1)
    return flat[pad:].view(t.shape)


def on(isa, fn):
    ops.set_cpu_kernel_isa(isa)
    return fn()


@pytest.mark.skipif(not SIMD, reason="no SIMD kernel table on this CPU/build")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_codec_every_numel_up_to_300_blocks_identical_to_portable(dtype, threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(threads)
    for k in list(range(1, 301)) + [511, 513, 4097]:
        w = at_storage_end((torch.randn(k * 64, generator=g) * 0.05).to(dtype), pad=k % 3)
        want = on("portable", lambda: Q.quantize_nf4(w))
        outs = [on("portable", lambda d=d: Q.dequantize_nf4(*want, [k * 64], d)) for d in FLOAT_DTYPES]
        for isa in SIMD:
            got = on(isa, lambda: Q.quantize_nf4(w))
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (isa, k)
            for d, o in zip(FLOAT_DTYPES, outs):
                assert torch.equal(on(isa, lambda d=d: Q.dequantize_nf4(*want, [k * 64], d)), o), (isa, k, d)


SHAPES = [(1, 64), (7, 64), (17, 64), (33, 192), (8, 4104), (3, 4160), (4097, 64), (16, 100)]
ROWS = [1, 2, 8, 15, 16, 17, 33, 129]


@pytest.mark.skipif(not SIMD, reason="no SIMD kernel table on this CPU/build")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bf16_gemm", ["0", "1"])
def test_linear_tables_agree(shape, dtype, bf16_gemm, monkeypatch):
    if bf16_gemm == "1" and dtype != torch.bfloat16:
        pytest.skip("bf16 tiles take bf16 activations only")
    monkeypatch.setenv("QLORA_CPU_BF16_GEMM", bf16_gemm)
    N, K = shape
    g = torch.Generator().manual_seed(N * K)
    comps = Q.quantize_nf4(torch.randn(N, K, generator=g) * 0.05)
    comps = [at_storage_end(c, pad=i + 1) if c.dim() else c for i, c in enumerate(comps)]
    dense = Q.dequantize_nf4(*comps, [N, K], torch.float32).double()
    for M in ROWS:
        torch.set_num_threads(1 + M % 3)
        x = at_storage_end(torch.randn(M, K, generator=g).to(dtype), pad=M % 3)
        gy = at_storage_end(torch.randn(M, N, generator=g).to(dtype), pad=(M + 1) % 3)
        want = [on("portable", lambda: Q.linear_nf4(x, *comps, N, None)),
                on("portable", lambda: Q.linear_nf4_grad_input(gy, *comps, K))]
        exact = [x.double() @ dense.t(), gy.double() @ dense]
        scale = [x.double().abs() @ dense.abs().t(), gy.double().abs() @ dense.abs()]
        u = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
        for isa in SIMD:
            got = [on(isa, lambda: Q.linear_nf4(x, *comps, N, None)),
                   on(isa, lambda: Q.linear_nf4_grad_input(gy, *comps, K))]
            if M > 16 or K % 64:  # forward tile path on every table: decode is exact, same BLAS
                assert torch.equal(got[0], want[0]), (isa, M, "forward")
            if K % 64:  # backward tile path on every table
                assert torch.equal(got[1], want[1]), (isa, M, "backward")
            if bf16_gemm == "0":
                for o, e, s in zip(got, exact, scale):
                    err = ((o.double() - e).abs() - u * e.abs() - 2.0**-25).clamp_min(0) / (s + 1e-30)
                    assert err.max().item() <= 1e-5, (isa, M)
