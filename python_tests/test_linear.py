"""linear_nf4 and its backward op against the reference (x @ dequantized W), opcheck, errors,
and the memory a call needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_DTYPES, at_odd_address, devices, dtype_id, needs_cuda, unit_roundoff

from qlora_ext import _reference as ref
from qlora_ext import linear_nf4, ops, to_nf4

# (out, in): Llama-like, not multiples of 128, rows not whole blocks (in % 64 != 0), in % 8 != 0.
WEIGHT_SHAPES = [(320, 192), (96, 448), (64, 100), (128, 36)]
# Rows per batch of 2 x 3, so M = 6 x rows: both sides of the fused forward (M <= 16) and of the
# fused AVX-512 backward (M <= 128).
ROWS = [1, 5, 16, 17, 40]


def assert_close_to_exact(got: torch.Tensor, exact: torch.Tensor, torch_same_precision: torch.Tensor, factor: float = 2.0):
    """Our error vs the float64 result is at most ``factor`` times PyTorch's own error in the same
    precision, plus one rounding of the output."""
    assert got.dtype == torch_same_precision.dtype and got.shape == exact.shape
    err = (got.double() - exact).abs().max().item()
    torch_err = (torch_same_precision.double() - exact).abs().max().item()
    tol = factor * torch_err + unit_roundoff(got.dtype) * exact.abs().max().item()
    assert err <= tol, f"error {err:.3g} > tolerance {tol:.3g} (PyTorch's own error {torch_err:.3g})"


def case(shape, rows, dtype, device, batch=(2, 3)):
    w = (torch.randn(shape, device=device) * 0.05).to(dtype)
    nf4 = to_nf4(w)
    dense = nf4.dequantize(torch.float32)  # the weight the op must multiply by
    x = torch.randn(*batch, rows, shape[1], device=device).to(dtype)
    return nf4, dense, x


@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", devices())
def test_forward_and_backward_match_reference(shape, rows, dtype, device, cpu_isa):
    if device == "cuda" and cpu_isa != "portable":  # the portable table exists on every CPU
        pytest.skip("the CPU kernel table does not matter on CUDA: the CUDA cases run once, with 'portable'")
    nf4, dense, x = case(shape, rows, dtype, device, batch=(2, 3))  # [2, 3, rows, in]: 3 leading dims
    bias = torch.randn(shape[0], device=device).to(dtype)
    x.requires_grad_(True)
    bias.requires_grad_(True)
    y = linear_nf4(x, nf4, bias)
    exact = ref.linear_nf4(x.detach(), *nf4.components(), shape[0], bias.detach())
    assert_close_to_exact(y, exact, F.linear(x.detach(), dense.to(dtype), bias.detach()))

    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    exact_gx = ref.linear_nf4_grad_input(grad_y, *nf4.components(), shape[1])
    assert_close_to_exact(x.grad, exact_gx, grad_y @ dense.to(dtype))
    assert torch.allclose(bias.grad.double(), grad_y.double().sum(dim=(0, 1, 2)), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                          atol=1e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", devices())
def test_strided_input_and_gradient_give_the_contiguous_result(rows, dtype, device):
    # Made on the device and sliced there: .to(device) of a view would arrive contiguous.
    nf4, _, _ = case((320, 192), rows, dtype, device)
    wide = torch.randn(2, rows, 3, 2 * 192, device=device).to(dtype)
    x = wide.transpose(1, 2)[..., ::2]  # [2, 3, rows, 192], strided in every dim
    grad_y = torch.randn(320, 2, 3, rows, device=device).to(dtype).permute(1, 2, 3, 0)
    assert not x.is_contiguous() and not grad_y.is_contiguous()
    x.requires_grad_(True)
    y = linear_nf4(x, nf4)
    y.backward(grad_y)
    x_c = x.detach().contiguous().requires_grad_(True)
    y_c = linear_nf4(x_c, nf4)
    y_c.backward(grad_y.contiguous())
    assert torch.equal(y, y_c) and torch.equal(x.grad, x_c.grad)


@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", devices())
def test_misaligned_arguments_give_the_aligned_result(rows, dtype, device, cpu_isa):
    # x, grad_y, the bias and the float NF4 components at addresses not aligned for their type were
    # read through typed pointers (UBSan's misaligned loads on the CPU; on CUDA, grad_y, the bias
    # and the scales were only made contiguous): each is copied aligned first.
    nf4, _, x = case((320, 192), rows, dtype, device, batch=())  # 1 row: the fused kernels; 17: the tiles
    bias = torch.randn(320, device=device).to(dtype)
    grad_y = torch.randn(rows, 320, device=device).to(dtype)
    packed, codes, scales, offset = nf4.components()
    expected_y = ops.linear_nf4(x, packed, codes, scales, offset, 320, bias)
    expected_gx = ops.linear_nf4_grad_input(grad_y, packed, codes, scales, offset, 192)
    odd = (at_odd_address(packed, 1), at_odd_address(codes, 3), at_odd_address(scales, 1), at_odd_address(offset, 2))
    for shift in (1, 2):
        assert torch.equal(ops.linear_nf4(at_odd_address(x, shift), *odd, 320, at_odd_address(bias, shift)), expected_y)
        assert torch.equal(ops.linear_nf4_grad_input(at_odd_address(grad_y, shift), *odd, 192), expected_gx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_autograd_through_many_tiles_on_all_threads(dtype):
    # Enough rows and columns for several tiles per thread: the kernel's worker threads run BLAS
    # on tensors derived from an input that requires grad (they must run below autograd too).
    nf4, dense, x = case((2048, 768), 40, dtype, "cpu", batch=(2,))
    x.requires_grad_(True)
    y = linear_nf4(x, nf4)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert_close_to_exact(y, x.detach().double() @ dense.double().t(), F.linear(x.detach(), dense.to(dtype)))
    assert_close_to_exact(x.grad, grad_y.double() @ dense.double(), grad_y @ dense.to(dtype))


@pytest.mark.parametrize("shape", [(3000, 2112), (3000, 2080)], ids=str)
def test_reduction_in_several_tiles(shape, cpu_isa):
    # Bands of W wider than one 4 MB tile: forward walks K (2112, or 2080 = not whole blocks per
    # row) in two chunks per band, backward walks N = 3000 in two; partial sums accumulate.
    nf4, dense, x = case(shape, 24, torch.float32, "cpu", batch=(2,))
    x.requires_grad_(True)
    y = linear_nf4(x, nf4)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert_close_to_exact(y, x.detach().double() @ dense.double().t(), F.linear(x.detach(), dense))
    assert_close_to_exact(x.grad, grad_y.double() @ dense.double(), grad_y @ dense)


@pytest.mark.parametrize("cpu_isa", ["portable"], indirect=True)
def test_portable_backward_over_many_rows_errs_less_than_torch(cpu_isa):
    # The portable backward (no FMA) sums 32 rows of W at a time in float and those partials in
    # double (csrc/cpu/kernels_portable.cpp): over 4096 rows its error stays under torch's own
    # float32 product; one float chain of 4096 steps erred 1.2x torch's at the median.
    for _ in range(3):
        nf4, dense, _ = case((4096, 256), 4, torch.float32, "cpu", batch=())
        grad_y = torch.randn(4, 4096)
        exact = grad_y.double() @ dense.double()
        err = (ops.linear_nf4_grad_input(grad_y, *nf4.components(), 256).double() - exact).abs().max().item()
        torch_err = ((grad_y @ dense).double() - exact).abs().max().item()
        assert err < torch_err, f"error {err:.3g} >= torch's {torch_err:.3g}"


def test_tile_path_never_gives_blas_a_narrow_band():
    # 41 rows of W went in bands of 32 and 9, and torch's float32 matmul with fewer than about
    # 12 output columns erred 2.2x as much as the whole product (csrc/cpu/linear_ops.cpp,
    # kMinBand): a remainder under 16 rows now joins the band before it.
    for _ in range(3):
        nf4, dense, x = case((41, 4160), 129, torch.float32, "cpu", batch=())
        exact = x.double() @ dense.double().t()
        err = (linear_nf4(x, nf4).double() - exact).abs().max().item()
        torch_err = (F.linear(x, dense).double() - exact).abs().max().item()
        assert err <= 1.5 * torch_err, f"error {err:.3g} > 1.5 x torch's {torch_err:.3g}"


@pytest.mark.parametrize("bf16_gemm", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_tile_path_takes_the_bias_into_its_blas_call(dtype, bf16_gemm, monkeypatch):
    # More than 16 rows: the bias goes into each band's first BLAS call, as F.linear's addmm takes
    # it; added afterwards, bf16 outputs were rounded twice and erred 1.3-2x as much as torch.
    monkeypatch.setenv("QLORA_CPU_BF16_GEMM", bf16_gemm)
    for shape, rows in [((96, 448), 129), ((320, 192), 40), ((41, 4160), 129)]:
        nf4, dense, x = case(shape, rows, dtype, "cpu", batch=())
        bias = torch.randn(shape[0]).to(dtype)
        exact = x.double() @ dense.double().t() + bias.double()
        err = (linear_nf4(x, nf4, bias).double() - exact).abs().max().item()
        torch_err = (F.linear(x, dense.to(dtype), bias).double() - exact).abs().max().item()
        assert err <= 1.25 * torch_err, f"{shape} x {rows}: error {err:.3g} > 1.25 x torch's {torch_err:.3g}"


@pytest.mark.parametrize("bf16_gemm", ["0", "1"])
@pytest.mark.parametrize("shape", [(3000, 2112), (200, 448), (96, 100)], ids=str)
def test_bf16_activations_with_and_without_bf16_blas_tiles(shape, bf16_gemm, cpu_isa, monkeypatch):
    # QLORA_CPU_BF16_GEMM forces either way of the tile path for bf16 activations (by default bf16
    # BLAS tiles where the CPU has AVX512-BF16): each band's whole reduction in one bf16 tile
    # (3000 x 2112: several bands per thread), or float32 tiles; in % 64 != 0 always float32.
    monkeypatch.setenv("QLORA_CPU_BF16_GEMM", bf16_gemm)
    assert ops.cpu_bf16_gemm() is (bf16_gemm == "1")
    nf4, dense, x = case(shape, 150, torch.bfloat16, "cpu", batch=(2,))  # M = 300: past every fused path
    x.requires_grad_(True)
    y = linear_nf4(x, nf4)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert_close_to_exact(y, x.detach().double() @ dense.double().t(), F.linear(x.detach(), dense.to(torch.bfloat16)))
    assert_close_to_exact(x.grad, grad_y.double() @ dense.double(), grad_y @ dense.to(torch.bfloat16))


@pytest.mark.parametrize("rows", [33, 64, 128, 129, 300])
def test_bf16_backward_past_32_rows_takes_bf16_tiles(rows, cpu_isa, monkeypatch):
    # With bf16 tiles on, the backward gives more than 32 rows to them: the fused kernel, tuned
    # against float32 tiles up to 128 rows, took up to 2.5x as long as bf16 tiles from 33 rows on
    # (2 threads on an AMX Xeon; 2.8x at 1 thread). Two nonzeros per row of grad_y make each output one rounding of a sum of two
    # exact products: bf16 tiles multiply W rounded to bf16, which the float32 fused kernel does not.
    monkeypatch.setenv("QLORA_CPU_BF16_GEMM", "1")
    n, k = 320, 256
    nf4 = to_nf4(torch.randn(n, k) * 0.05)
    grad_y = torch.zeros(rows, n, dtype=torch.bfloat16)
    for row in range(rows):
        grad_y[row, torch.randperm(n)[:2]] = torch.randn(2).bfloat16()
    tiles = (grad_y.float() @ nf4.dequantize(torch.bfloat16).float()).bfloat16()
    assert torch.equal(ops.linear_nf4_grad_input(grad_y, *nf4.components(), k), tiles)


def test_bf16_blas_variable_is_checked(monkeypatch):
    nf4, _, x = case((64, 128), 40, torch.bfloat16, "cpu", batch=())
    monkeypatch.setenv("QLORA_CPU_BF16_GEMM", "yes")
    with pytest.raises(ValueError, match=r"QLORA_CPU_BF16_GEMM must be 'auto', '0' or '1'; got 'yes'"):
        linear_nf4(x, nf4)
    monkeypatch.setenv("QLORA_CPU_BF16_GEMM", "auto")
    if os.path.exists("/proc/cpuinfo"):  # auto: the CPU's AVX512-BF16 flag decides
        assert ops.cpu_bf16_gemm() is ("avx512_bf16" in open("/proc/cpuinfo").read())


@pytest.mark.parametrize("rows", [8, 13, 16])
def test_small_m_forward_in_column_chunks(rows, cpu_isa):
    # The fused small-M forward reads x in chunks of about 32 KB: K = 2112 takes several at 8, 13
    # and 16 rows, whose partial sums accumulate; 13 and 16 rows run in two passes (7 + 6, 8 + 8).
    nf4, dense, x = case((40, 2112), rows, torch.float32, "cpu", batch=())
    y = linear_nf4(x, nf4)
    assert_close_to_exact(y, x.double() @ dense.double().t(), F.linear(x, dense))


@pytest.mark.parametrize("device", devices())
def test_double_backward(device):
    nf4, dense, x = case((64, 128), 3, torch.float32, device, batch=())
    x.requires_grad_(True)
    y = linear_nf4(x, nf4)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    # d/dx sum(2 (x W^T) W) = 2 * 1 @ (W W^T)^T ... computed densely:
    x2 = x.detach().clone().requires_grad_(True)
    (gd,) = torch.autograd.grad((x2 @ dense.t()).pow(2).sum(), x2, create_graph=True)
    (ggd,) = torch.autograd.grad(gd.sum(), x2)
    assert torch.allclose(ggx, ggd, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", devices())
def test_forward_mode_ad_matches_the_dense_linear(device, no_vmap_fallback):
    # torch.func.jvp through the op alone gave a zero tangent, and a dual level none at all
    # (register_autograd has no forward rule); jacfwd gave zeros, hessian and jacrev raised.
    nf4, dense, x = case((64, 128), 3, torch.float32, device, batch=(2,))
    bias, x_t, bias_t = torch.randn(64, device=device), torch.randn_like(x), torch.randn(64, device=device)

    def ours(x, b):
        return linear_nf4(x, nf4, b)

    def theirs(x, b):
        return F.linear(x, dense, b)

    close = dict(rtol=1e-5, atol=1e-4)
    for tangents in [(x_t, bias_t), (x_t, torch.zeros_like(bias_t)), (torch.zeros_like(x_t), bias_t)]:
        got, want = (torch.func.jvp(f, (x, bias), tangents) for f in (ours, theirs))
        torch.testing.assert_close(got, want, **close)
    with torch.autograd.forward_ad.dual_level():
        y = ours(torch.autograd.forward_ad.make_dual(x, x_t), None)
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(y).tangent, theirs(x_t, None), **close)
    x0 = x[0, 0]
    for transform in (torch.func.jacfwd, torch.func.jacrev):
        torch.testing.assert_close(transform(ours)(x0, bias), transform(theirs)(x0, bias), **close)
    # forward over reverse: the tangent goes through the backward op too
    got, want = (torch.func.hessian(lambda x: f(x, bias).pow(2).sum())(x0) for f in (ours, theirs))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    got, want = (torch.func.jvp(torch.func.vmap(lambda x: f(x, bias)), (x,), (x_t,)) for f in (ours, theirs))
    torch.testing.assert_close(got, want, **close)
    got, want = (torch.func.vmap(torch.func.grad(lambda x: f(x, bias).pow(2).sum()))(x[0]) for f in (ours, theirs))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_vmap_gives_each_sample_its_own_result(device, dtype, no_vmap_fallback):
    # torch ran both ops once per sample ("a performance drop", it warned); now they have rules
    nf4, _, x = case((64, 128), 3, dtype, device, batch=(5,))  # x [5, 3, 128]
    other = to_nf4(torch.randn(64, 128, device=device).to(dtype))
    bias, grad_y = torch.randn(5, 64, device=device).to(dtype), torch.randn(5, 3, 64, device=device).to(dtype)
    both = [torch.stack(pair) for pair in zip(nf4.components(), other.components())]  # a weight per sample

    def lin(x, *weight, bias=None):
        return ops.linear_nf4(x, *weight, 64, bias)

    def grad_input(g, *weight):
        return ops.linear_nf4_grad_input(g, *weight, 128)

    cases = [  # (vmapped call, in_dims, its arguments, the sample-by-sample result)
        (lin, 1, (x.transpose(0, 1).contiguous(), *nf4.components()), [lin(x[i], *nf4.components()) for i in range(5)]),
        (lambda x, b: lin(x, *nf4.components(), bias=b), 0, (x, bias), [lin(x[i], *nf4.components(), bias=bias[i]) for i in range(5)]),
        (lambda b: lin(x[0], *nf4.components(), bias=b), 0, (bias,), [lin(x[0], *nf4.components(), bias=bias[i]) for i in range(5)]),
        (lin, 0, (x[:2], *both), [lin(x[0], *nf4.components()), lin(x[1], *other.components())]),
        (grad_input, (0, None, None, None, None), (grad_y, *nf4.components()), [grad_input(grad_y[i], *nf4.components()) for i in range(5)]),
        (grad_input, 0, (grad_y[:2], *both), [grad_input(grad_y[0], *nf4.components()), grad_input(grad_y[1], *other.components())]),
    ]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for f, in_dims, args, want in cases:
        if in_dims == 1:
            in_dims = (1, None, None, None, None)
        got = torch.func.vmap(f, in_dims=in_dims)(*args)
        torch.testing.assert_close(got, torch.stack(want), **tol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows", [3, 24])
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=str)
def test_opcheck(shape, device, dtype, rows):
    n, k = shape
    nf4, _, x = case(shape, rows, dtype, device, batch=(2, 3))  # [2, 3, rows, in]: 3 leading dims
    bias = torch.randn(n, device=device).to(dtype)
    op = torch.ops.qlora.linear_nf4.default
    for requires_grad in (False, True):
        xi = x.clone().requires_grad_(requires_grad)
        torch.library.opcheck(op, (xi, *nf4.components(), n))
        torch.library.opcheck(op, (xi, *nf4.components(), n, bias.clone().requires_grad_(requires_grad)))
        grad_y = torch.randn(2, 3, rows, n, device=device).to(dtype).requires_grad_(requires_grad)
        torch.library.opcheck(torch.ops.qlora.linear_nf4_grad_input.default, (grad_y, *nf4.components(), k))


@pytest.mark.parametrize("shape", [(320, 192), (96, 448)], ids=str)
def test_opcheck_with_bf16_blas_tiles(shape, monkeypatch):
    # The bf16 tile path (bf16 tiles of W, bf16 BLAS) forced on whatever CPU this is: 2 x 3 x 24
    # rows are past both fused paths.
    monkeypatch.setenv("QLORA_CPU_BF16_GEMM", "1")
    test_opcheck(shape, "cpu", torch.bfloat16, 24)


def test_backward_saves_only_the_nf4_storage():
    nf4, _, x = case((256, 128), 4, torch.float32, "cpu", batch=())
    x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_nf4(x, nf4)
    assert {id(t) for t in saved} <= {id(t) for t in nf4.components()}
    assert sum(t.numel() * t.element_size() for t in saved) == nf4.quantized_nbytes


@pytest.mark.parametrize("device", devices())
def test_bad_input_is_rejected(device):
    nf4 = to_nf4(torch.randn(96, 192, device=device))
    comps = nf4.components()
    with pytest.raises(ValueError, match=r"argument 'x' must have last dimension 192 \(18432 weight elements / out_features 96\); got shape \[4, 191\]"):
        linear_nf4(torch.randn(4, 191, device=device), nf4)
    with pytest.raises(TypeError, match=r"argument 'x' must have dtype float32, bfloat16 or float16; got torch.int64"):
        linear_nf4(torch.ones(4, 192, dtype=torch.long, device=device), nf4)
    with pytest.raises(ValueError, match=r"argument 'out_features' must be a positive divisor of the weight's 18432 elements; got 100"):
        ops.linear_nf4(torch.randn(4, 192, device=device), *comps, 100)
    with pytest.raises(ValueError, match=r"argument 'bias' must have shape \[96\]; got shape \[95\]"):
        linear_nf4(torch.randn(4, 192, device=device), nf4, torch.randn(95, device=device))
    with pytest.raises(TypeError, match=r"argument 'bias' must have the dtype of 'x' \(torch.float32\); got torch.float16"):
        linear_nf4(torch.randn(4, 192, device=device), nf4, torch.randn(96, device=device).half())
    with pytest.raises(ValueError, match=r"argument 'grad_y' must have last dimension 96"):
        ops.linear_nf4_grad_input(torch.randn(4, 97, device=device), *comps, 192)
    with pytest.raises(TypeError, match=r"argument 'weight' must be a 2-D NF4Tensor; got Tensor of shape \[96, 192\]"):
        linear_nf4(torch.randn(4, 192, device=device), torch.randn(96, 192, device=device))


def test_meta_tensor_among_cpu_arguments_is_rejected():
    # A meta argument sends the call to the fake kernel, which must apply the kernels' device
    # rule instead of returning uninitialised memory.
    nf4 = to_nf4(torch.randn(96, 192))
    packed, codes, scales, offset = nf4.components()
    x = torch.randn(4, 192)
    with pytest.raises(ValueError, match=r"qlora::linear_nf4: argument 'absmax_codes' must be on the same device as 'packed' \(meta\); got cpu"):
        ops.linear_nf4(x, packed.to("meta"), codes, scales, offset, 96)
    with pytest.raises(ValueError, match=r"argument 'absmax_offset' must be on the same device as 'packed' \(cpu\); got meta"):
        ops.linear_nf4(x, packed, codes, scales, offset.to("meta"), 96)
    with pytest.raises(ValueError, match=r"argument 'bias' must be on the same device as 'x' \(cpu\); got meta"):
        ops.linear_nf4(x, packed, codes, scales, offset, 96, torch.zeros(96, device="meta"))
    with pytest.raises(ValueError, match=r"argument 'x' must be on the same device as 'packed' \(meta\); got cpu"):
        ops.linear_nf4(x, *(t.to("meta") for t in nf4.components()), 96)
    with pytest.raises(ValueError, match=r"qlora::dequantize_nf4: argument 'absmax_scales' must be on the same device as 'packed' \(cpu\); got meta"):
        ops.dequantize_nf4(packed, codes, scales.to("meta"), offset, [96, 192], torch.float32)
    with pytest.raises(ValueError, match=r"qlora::linear_nf4_grad_input: argument 'grad_y' must be on the same device as 'packed' \(meta\); got cpu"):
        ops.linear_nf4_grad_input(torch.randn(4, 96), *(t.to("meta") for t in nf4.components()), 192)
    # all on meta: shapes only, as torch.compile and meta-device initialisation need
    y = ops.linear_nf4(x.to("meta"), *(t.to("meta") for t in nf4.components()), 96)
    assert y.is_meta and y.shape == (4, 96)


def _bad_calls():
    """(name, call) pairs of op calls the kernels refuse; each call takes a function that puts a
    tensor on the device under test."""
    nf4 = to_nf4(torch.randn(96, 192))
    p, c, s, o = nf4.components()
    x = torch.randn(4, 192)
    return [
        ("quantize 100 elements", lambda on: ops.quantize_nf4(on(torch.randn(100)))),
        ("quantize empty", lambda on: ops.quantize_nf4(on(torch.randn(0, 64)))),
        ("quantize int", lambda on: ops.quantize_nf4(on(torch.ones(64, dtype=torch.int32)))),
        ("quantize float8", lambda on: ops.quantize_nf4(on(torch.ones(64).to(torch.float8_e4m3fn)))),
        ("quantize uint16", lambda on: ops.quantize_nf4(on(torch.ones(64, dtype=torch.uint16)))),
        ("linear x None", lambda on: ops.linear_nf4(None, on(p), on(c), on(s), on(o), 96)),
        ("dequantize scales None", lambda on: ops.dequantize_nf4(on(p), on(c), None, on(o), [96, 192], torch.float32)),
        ("dequantize to int", lambda on: ops.dequantize_nf4(on(p), on(c), on(s), on(o), [96, 192], torch.int32)),
        ("dequantize to qint8", lambda on: ops.dequantize_nf4(on(p), on(c), on(s), on(o), [96, 192], torch.qint8)),
        ("dequantize to quint4x2", lambda on: ops.dequantize_nf4(on(p), on(c), on(s), on(o), [96, 192], torch.quint4x2)),
        ("dequantize wrong shape", lambda on: ops.dequantize_nf4(on(p), on(c), on(s), on(o), [7], torch.float32)),
        ("dequantize negative shape", lambda on: ops.dequantize_nf4(on(p), on(c), on(s), on(o), [-96, -192], torch.float32)),
        ("codes of another length", lambda on: ops.dequantize_nf4(on(p), on(c[:-1]), on(s), on(o), [96, 192], torch.float32)),
        ("scales of another length", lambda on: ops.dequantize_nf4(on(p), on(c), on(torch.ones(3)), on(o), [96, 192], torch.float32)),
        ("packed of odd length", lambda on: ops.dequantize_nf4(on(p[:-1]), on(c), on(s), on(o), [96, 192], torch.float32)),
        ("packed as int8", lambda on: ops.dequantize_nf4(on(p.to(torch.int8)), on(c), on(s), on(o), [96, 192], torch.float32)),
        ("two offsets", lambda on: ops.dequantize_nf4(on(p), on(c), on(s), on(torch.ones(2)), [96, 192], torch.float32)),
        ("linear x of another width", lambda on: ops.linear_nf4(on(torch.randn(4, 191)), on(p), on(c), on(s), on(o), 96)),
        ("linear out_features not a divisor", lambda on: ops.linear_nf4(on(x), on(p), on(c), on(s), on(o), 100)),
        ("linear int x", lambda on: ops.linear_nf4(on(x.long()), on(p), on(c), on(s), on(o), 96)),
        ("linear bias shape", lambda on: ops.linear_nf4(on(x), on(p), on(c), on(s), on(o), 96, on(torch.randn(95)))),
        ("linear bias dtype", lambda on: ops.linear_nf4(on(x), on(p), on(c), on(s), on(o), 96, on(torch.randn(96).half()))),
        ("grad_input grad_y width", lambda on: ops.linear_nf4_grad_input(on(torch.randn(4, 97)), on(p), on(c), on(s), on(o), 192)),
        ("grad_input in_features", lambda on: ops.linear_nf4_grad_input(on(torch.randn(4, 96)), on(p), on(c), on(s), on(o), -192)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_meta_calls_are_refused_as_cpu_calls_are(index):
    # Meta tensors (and torch.compile's tracing) run the fake kernels: they apply the kernels'
    # checks with the same messages, instead of returning a tensor of the asked-for shape (a
    # meta-built LoRALinear of dims the kernels refuse then failed later with another message).
    name, call = _bad_calls()[index]
    with pytest.raises((ValueError, TypeError)) as on_cpu:
        call(lambda t: t)
    with pytest.raises((ValueError, TypeError)) as on_meta:
        call(lambda t: t.to("meta"))
    assert (type(on_meta.value), str(on_meta.value)) == (type(on_cpu.value), str(on_cpu.value).split("\n")[0]), name


def test_meta_weight_of_bad_size_is_refused_by_to_nf4():
    with pytest.raises(ValueError, match="^to_nf4: argument 'tensor' must have a number of elements divisible by 64"):
        to_nf4(torch.empty(10, 10, device="meta"))


def test_none_for_a_tensor_is_named():
    nf4 = to_nf4(torch.randn(96, 192))
    p, c, s, o = nf4.components()
    with pytest.raises(ValueError, match=r"qlora::linear_nf4: argument 'x' must be a tensor; got None"):
        ops.linear_nf4(None, p, c, s, o, 96)
    with pytest.raises(ValueError, match=r"qlora::dequantize_nf4: argument 'absmax_scales' must be a tensor; got None"):
        ops.dequantize_nf4(p, c, None, o, [96, 192], torch.float32)


@needs_cuda
def test_x_on_cpu_and_weight_on_cuda_is_rejected():
    nf4 = to_nf4(torch.randn(96, 192, device="cuda"))
    with pytest.raises(ValueError, match=r"argument 'x' must be on the same device as 'packed' \(cuda:0\); got cpu"):
        linear_nf4(torch.randn(4, 192), nf4)


@needs_cuda
@pytest.mark.parametrize("rows", [1, 7, 16, 64])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_cuda_close_to_cpu_on_llama_shapes(rows, dtype):
    for shape in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        w = (torch.randn(shape) * 0.02).to(dtype)
        nf4 = to_nf4(w)
        x = torch.randn(rows, shape[1]).to(dtype)
        exact = x.double() @ nf4.dequantize(torch.float32).double().t()
        torch_cuda = F.linear(x.cuda(), nf4.dequantize(dtype).cuda()).cpu()
        assert_close_to_exact(linear_nf4(x.cuda(), nf4.cuda()).cpu(), exact, torch_cuda)
        gy = torch.randn(rows, shape[0]).to(dtype)
        exact_gx = gy.double() @ nf4.dequantize(torch.float32).double()
        got = ops.linear_nf4_grad_input(gy.cuda(), *nf4.cuda().components(), shape[1]).cpu()
        assert_close_to_exact(got, exact_gx, (gy.cuda() @ nf4.dequantize(dtype).cuda()).cpu())


@needs_cuda
@pytest.mark.parametrize("rows", [1, 9])
def test_cuda_small_m_backward_over_a_vocabulary_sized_out(rows):
    # out = 40000 rows: past 256 slices of 128 rows, so each slice of the fused backward walks
    # ceil(40000 / 256) = 157 rows (csrc/cuda/linear_kernels.cuh, kMaxSlices), the last one fewer.
    nf4, dense, _ = case((40000, 192), rows, torch.float32, "cuda", batch=())
    gy = torch.randn(rows, 40000, device="cuda")
    got = ops.linear_nf4_grad_input(gy, *nf4.components(), 192)
    exact = gy.double() @ dense.double()
    # Each output is a float32 chain of 157 products (one slice) plus the slices' double sum;
    # cuBLAS sums in short blocks, whose error grows more slowly: a simulation put ours above twice
    # its error for some seeds. 4x still catches a slice lost or added twice (an error thousands of times larger).
    assert_close_to_exact(got, exact, gy @ dense, factor=4.0)


@needs_cuda
@pytest.mark.parametrize("shape", [(40, 64), (72, 192), (4096, 4096), (100, 11008)], ids=str)
@pytest.mark.parametrize("rows", [4, 5, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_cuda_small_m_forward_on_tensor_cores(shape, rows, dtype):
    # bf16/fp16 with 5 to 16 rows and in % 64 == 0 run on tensor cores (csrc/cuda/linear.cu):
    # rows of W past a 32-row tile, one or two m tiles, with and without bias; 4 rows: CUDA cores
    nf4, _, x = case(shape, rows, dtype, "cuda", batch=())
    bias = torch.randn(shape[0], device="cuda").to(dtype)
    exact = x.double() @ nf4.dequantize(torch.float32).double().t()
    for b in (None, bias):
        want = exact + (b.double() if b is not None else 0)
        torch_same = F.linear(x, nf4.dequantize(dtype), b)
        assert_close_to_exact(linear_nf4(x, nf4, b), want, torch_same)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_packed_codes_four_bytes_past_alignment_and_in_not_a_multiple_of_32(device, rows):
    # On CUDA, packed codes 4 bytes past a 16-byte boundary take the 4-byte code loads (not the
    # 16-byte ones, nor the aligned copy an odd address gets), as does in % 32 != 0 (4104): the
    # same products, bit for bit, as from aligned codes, and close to the exact product.
    for dtype in (torch.float32, torch.bfloat16):
        nf4, dense, x = case((136, 4104), rows, dtype, device, batch=())
        packed, codes, scales, offset = nf4.components()
        grad_y = torch.randn(rows, 136, device=device).to(dtype)
        y = ops.linear_nf4(x, packed, codes, scales, offset, 136)
        gx = ops.linear_nf4_grad_input(grad_y, packed, codes, scales, offset, 4104)
        assert_close_to_exact(y, x.double() @ dense.double().t(), F.linear(x, dense.to(dtype)))
        assert_close_to_exact(gx, grad_y.double() @ dense.double(), grad_y @ dense.to(dtype))
        for shift in (4, 8):
            shifted = at_odd_address(packed, shift)
            assert torch.equal(ops.linear_nf4(x, shifted, codes, scales, offset, 136), y)
            assert torch.equal(ops.linear_nf4_grad_input(grad_y, shifted, codes, scales, offset, 4104), gx)


@needs_cuda
def test_cuda_ops_run_on_the_current_stream():
    # Each op called on a side stream whose inputs are written there after a delay: an op that
    # ran on another stream (the default one) would read them before they exist.
    dtype = torch.bfloat16
    nf4, _, x = case((4096, 4096), 64, dtype, "cuda", batch=())
    w = torch.randn(4096, 4096, device="cuda").to(dtype)
    gy = torch.randn(64, 4096, device="cuda").to(dtype)
    calls = {  # rows 1: the fused kernels; 8: tensor cores; 64: the tiles and cuBLAS
        **{f"linear_{m}": (lambda a, m=m: linear_nf4(a[:m], nf4), x) for m in (1, 8, 64)},
        **{f"grad_input_{m}": (lambda a, m=m: ops.linear_nf4_grad_input(a[:m], *nf4.components(), 4096), gy) for m in (1, 64)},
        "quantize": (lambda a: ops.quantize_nf4(a), w),
        "dequantize": (lambda a: ops.dequantize_nf4(*ops.quantize_nf4(a), [4096, 4096], dtype), w),
    }
    for name, (call, source) in calls.items():
        want = call(source)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # (GPU clock cycles: a tenth of a second or so)
            fresh = source * 1  # written on the side stream, after the sleep
            got = call(fresh)
        torch.cuda.current_stream().wait_stream(side)
        for g, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            if g.is_floating_point():  # (cuBLAS need not choose the same algorithm on each stream)
                torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-2, msg=name)
            else:
                assert torch.equal(g, e), name


@needs_cuda
@pytest.mark.parametrize("variable, good, rule, rows", [
    ("QLORA_CUDA_MMA_MIN_ROWS", "17", "must be a whole number >= 1", 8),  # 17: 8 bf16 rows on CUDA cores
    ("QLORA_CUDA_LARGE_M_TILES", "4", "must be a whole number from 2 to 4", 64),  # 4 tiles at 64 rows
])
def test_cuda_tuning_variables_are_checked(variable, good, rule, rows):
    # The variables that override a CUDA path choice for a measurement (read once per process):
    # a good value gives the right product; one that is not a whole number in range is an error
    # naming the variable, not silently 0
    code = ("import torch; from qlora_ext import linear_nf4, to_nf4; w = to_nf4(torch.randn(512, 128, device='cuda'));"
            f"x = torch.randn({rows}, 128, device='cuda', dtype=torch.bfloat16);"
            "torch.testing.assert_close(linear_nf4(x, w).float(), x.float() @ w.dequantize(torch.float32).t(), atol=0.1, rtol=0.02)")
    for value, error in ((good, None), ("abc", f"{variable} {rule}")):
        proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, variable: value},
                              capture_output=True, text=True, timeout=300)
        if error is None:
            assert proc.returncode == 0, proc.stderr[-2000:]
        else:
            assert proc.returncode != 0 and error in proc.stderr and "'abc'" in proc.stderr, proc.stderr[-2000:]


def _memory(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def _peak_extra_bytes(fn) -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM) to the current one
    before = _memory("VmRSS")
    fn()
    return _memory("VmHWM") - before


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("rows, dtype", [(1, torch.float32), (64, torch.float32), (256, torch.bfloat16)])
def test_cpu_call_never_holds_a_dense_weight(rows, dtype, monkeypatch):
    # 11008 x 4096: a dense bf16 copy would be 90 MB, float32 180 MB; tiles are 4 MB (bf16 rows
    # through bf16 BLAS tiles, forced here).
    monkeypatch.setenv("QLORA_CPU_BF16_GEMM", "1")
    nf4 = to_nf4(torch.randn(11008, 4096) * 0.02)
    x, gy = torch.randn(rows, 4096, dtype=dtype), torch.randn(rows, 11008, dtype=dtype)
    forward = lambda: linear_nf4(x, nf4)  # noqa: E731
    backward = lambda: ops.linear_nf4_grad_input(gy, *nf4.components(), 4096)  # noqa: E731
    for fn in (forward, backward):
        fn()  # first call: thread pools, BLAS buffers
        assert _peak_extra_bytes(fn) < 16e6
