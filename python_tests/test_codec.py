"""quantize_nf4 / dequantize_nf4 kernels against the pure-PyTorch reference, bitsandbytes and
torchao, on fresh random weights of several shapes, every dtype and every device."""

from __future__ import annotations

import pytest
import torch
from conftest import FLOAT_DTYPES, at_odd_address, devices, dtype_id, needs_cuda, torchao_nf4

from qlora_ext import _reference as ref
from qlora_ext import ops

# Shapes: Llama-like, odd (rows not a multiple of 64, partial last scale group), 1-D, 3-D, tiny.
SHAPES = [(512, 768), (300, 64), (3, 5, 128), (64,), (1, 4096 * 64 + 64), (11008 // 8, 4096 // 8)]


def random_weight(shape, dtype, device="cpu"):
    # Normal weights with a few heavy rows, as in trained models.
    w = torch.randn(shape, device=device) * 0.02
    w.view(-1)[:: 97] *= 20
    return w.to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_quantize_matches_reference_bit_for_bit_cpu(shape, dtype, cpu_isa):
    w = random_weight(shape, dtype)
    got = ops.quantize_nf4(w)
    want = ref.quantize_nf4(w)
    for name, g, r in zip(("packed", "absmax_codes", "absmax_scales", "absmax_offset"), got, want):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert torch.equal(g, r), name


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_dequantize_matches_reference_bit_for_bit_cpu(shape, dtype, cpu_isa):
    components = ref.quantize_nf4(random_weight(shape, torch.float32))
    got = ops.dequantize_nf4(*components, shape, dtype)
    want = ref.dequantize_nf4(*components, shape, dtype)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    assert torch.equal(got, want)


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES + [(4096, 4096), (11008, 4096)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_cuda_codec_identical_to_cpu(shape, dtype):
    w = random_weight(shape, dtype)
    cpu = ops.quantize_nf4(w)
    cuda = ops.quantize_nf4(w.cuda())
    for c, g in zip(cpu, cuda):
        assert g.device.type == "cuda"
        assert torch.equal(c, g.cpu())
    for out_dtype in FLOAT_DTYPES:
        d_cpu = ops.dequantize_nf4(*cpu, shape, out_dtype)
        d_cuda = ops.dequantize_nf4(*cuda, shape, out_dtype)
        assert torch.equal(d_cpu, d_cuda.cpu())


def _check_the_last_groups(n: int, device: str) -> None:
    """Quantizes and dequantizes n bf16 weights on device; checks the last two scale groups (the
    end of the tensor) against the CPU kernels run on that slice: the packed codes are the CPU's
    (they depend on their block alone), and the dequantized weights are what the CPU makes of the
    same components. The offset is the mean of every absmax."""
    w = torch.randn(n, device=device, dtype=torch.bfloat16)
    packed, codes, scales, offset = ops.quantize_nf4(w)
    nblocks = n // 64
    first = ((nblocks - 1) // 256 - 1) * 256  # the first block of the last two groups
    tail = w[first * 64:].cpu()
    assert torch.equal(packed[first * 32:].cpu(), ops.quantize_nf4(tail)[0])
    absmax = w.view(-1, 64).abs().amax(1).float()
    torch.testing.assert_close(offset.cpu().double(), absmax.double().mean().cpu(), rtol=1e-6, atol=0)
    parts = (packed[first * 32:].cpu(), codes[first:].cpu(), scales[first // 256:].cpu(), offset.cpu())
    dense = ops.dequantize_nf4(packed, codes, scales, offset, [n], torch.bfloat16)
    assert torch.equal(dense[first * 64:].cpu(), ops.dequantize_nf4(*parts, [tail.numel()], torch.bfloat16))


def test_the_last_groups_of_a_weight_check():
    # (the check of the next test, on a size the CPU runs in a moment)
    _check_the_last_groups(256 * 64 * 3 + 64, "cpu")


@needs_cuda
def test_cuda_codec_past_2_31_elements():
    # 4 GiB of bf16: element and byte offsets past 2**31 (index math in 64 bits)
    _check_the_last_groups(2**31 + 64, "cuda")


def test_quantize_outputs_are_not_differentiable():
    w = torch.randn(64, 64, requires_grad=True)
    assert not any(t.requires_grad for t in ops.quantize_nf4(w))


@pytest.mark.parametrize("device", devices())
def test_zero_blocks_dequantize_to_exact_zeros(device):
    w = torch.randn(8, 256, device=device)
    w[2] = 0.0  # four whole blocks of zeros
    w[5, 64:128] = 0.0
    components = ops.quantize_nf4(w)
    out = ops.dequantize_nf4(*components, w.shape, torch.float32)
    assert torch.equal(out[2], torch.zeros(256, device=device))
    assert torch.equal(out[5, 64:128], torch.zeros(64, device=device))
    packed = components[0].view(8, 128)
    assert (packed[2] == 0x77).all()  # code 7 is exactly 0.0


def test_zero_blocks_and_equal_absmax_with_flush_to_zero(cpu_isa):
    # With torch.set_flush_denormal(True) the reference divided by the subnormal floor 1e-38 at run
    # time (inf, then NaN codes: a zero block dequantized to nonzero values); the kernels owed their
    # right answer to the compiler folding that division. Both now use the floor's inverse as a constant.
    w = torch.randn(4, 64)
    w[1] = 0.0
    equal = torch.ones(4, 64)  # every block's absmax equal: the offset is all of it, each scale 0
    try:
        torch.set_flush_denormal(True)
        for weight in (w, equal):
            got, want = ops.quantize_nf4(weight), ref.quantize_nf4(weight)
            assert all(torch.equal(g, r) for g, r in zip(got, want))
            assert torch.equal(ops.dequantize_nf4(*got, [4, 64], torch.float32), ref.dequantize_nf4(*want, [4, 64], torch.float32))
        assert torch.equal(ops.dequantize_nf4(*ops.quantize_nf4(w), [4, 64], torch.float32)[1], torch.zeros(64))
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_non_contiguous_input_same_as_contiguous(device, dtype):
    base = random_weight((256, 384), dtype, device)
    w = base.t()  # [384, 256], not contiguous
    assert not w.is_contiguous()
    for a, b in zip(ops.quantize_nf4(w), ops.quantize_nf4(w.contiguous())):
        assert torch.equal(a, b)
    components = [c.clone() for c in ops.quantize_nf4(w.contiguous())]
    strided_packed = torch.stack([components[0], components[0]], dim=1)[:, 0]  # stride 2
    assert not strided_packed.is_contiguous()
    got = ops.dequantize_nf4(strided_packed, *components[1:], w.shape, dtype)
    assert torch.equal(got, ops.dequantize_nf4(*components, w.shape, dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_misaligned_arguments_same_as_aligned(device, dtype, cpu_isa):
    # A weight, absmax_scales or absmax_offset whose data is not aligned for its type was read
    # through typed pointers on the CPU (undefined behaviour: UBSan stopped there) and, for the
    # scales and offset, on CUDA (a misaligned-address fault): each is copied aligned first.
    w = random_weight((128, 320), dtype, device)
    components = ops.quantize_nf4(w)
    for offset in (1, 2):
        for a, b in zip(ops.quantize_nf4(at_odd_address(w, offset)), components):
            assert torch.equal(a, b)
    expected = ops.dequantize_nf4(*components, w.shape, dtype)
    packed, codes, scales, offset_ = components
    for args in ((packed, codes, at_odd_address(scales, 1), offset_), (packed, codes, scales, at_odd_address(offset_, 2)),
                 (at_odd_address(packed, 1), at_odd_address(codes, 3), at_odd_address(scales, 3), at_odd_address(offset_, 1))):
        assert torch.equal(ops.dequantize_nf4(*args, w.shape, dtype), expected)


@pytest.mark.parametrize("device", devices())
def test_partial_last_scale_group(device):
    # 300 blocks: one full group of 256 and a partial one of 44.
    w = random_weight((300, 64), torch.float32, device)
    packed, codes, scales, offset = ops.quantize_nf4(w)
    assert codes.numel() == 300 and scales.numel() == 2
    absmax = w.abs().amax(dim=1).float()
    assert scales[1] == (absmax[256:] - offset).abs().max()
    assert torch.equal(ops.dequantize_nf4(packed, codes, scales, offset, w.shape, torch.float32).cpu(),
                       ref.dequantize_nf4(*(c.cpu() for c in (packed, codes, scales, offset)), w.shape, torch.float32))


def test_offset_is_the_mean_absmax():
    w = random_weight((1024, 1024), torch.float32)
    *_, offset = ops.quantize_nf4(w)
    mean = w.view(-1, 64).abs().amax(dim=1).double().mean()
    assert abs(offset.item() - mean.item()) <= 2**-23 * mean.item()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_opcheck(device, dtype):
    w = random_weight((128, 192), dtype, device)
    torch.library.opcheck(torch.ops.qlora.quantize_nf4.default, (w,))
    torch.library.opcheck(torch.ops.qlora.quantize_nf4.default, (w.clone().requires_grad_(True),))
    components = ops.quantize_nf4(w)
    torch.library.opcheck(torch.ops.qlora.dequantize_nf4.default, (*components, [128, 192], dtype))


# -- bitsandbytes and torchao parity -------------------------------------------------------------



def bnb_functional():
    # Imported per test, so a missing bitsandbytes skips these tests only, not the whole file.
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency")


def bnb_quantize(w):
    packed, state = bnb_functional().quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return packed, state


@pytest.mark.parametrize("shape", [(512, 768), (300, 64), (3, 5, 128), (1024, 1024)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_packed_bytes_identical_to_bitsandbytes(shape, dtype):
    w = random_weight(shape, dtype)
    bnb_packed, state = bnb_quantize(w)
    packed, codes, scales, offset = ops.quantize_nf4(w)
    assert torch.equal(packed, bnb_packed.view(-1))
    # The 8-bit absmax codes follow the nearest-code rule (docs/nf4_format.md, step 5); bitsandbytes' CPU kernel
    # picks the other neighbour in rare near-ties, so compare the decoded absmax errors instead.
    absmax = w.reshape(-1, 64).float().abs().amax(dim=1)
    ours = ref.dequantize_absmax(codes, scales, offset)
    theirs = ref.dequantize_absmax(state.absmax, state.state2.absmax, state.offset)
    assert (ours - absmax).abs().mean() <= (theirs - absmax).abs().mean() * 1.0001
    assert (codes != state.absmax).float().mean() < 0.01


@pytest.mark.parametrize("shape", [(512, 768), (300, 64), (1024, 1024)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_dequantize_bitsandbytes_state_bit_identical(shape, dtype):
    w = random_weight(shape, dtype)
    bnb_packed, state = bnb_quantize(w)
    ours = ops.dequantize_nf4(bnb_packed.view(-1), state.absmax, state.state2.absmax, state.offset, shape, dtype)
    theirs = bnb_functional().dequantize_4bit(bnb_packed, state)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_reconstruction_error_no_worse_than_torchao(dtype):
    w = torch.randn(1024, 1024, dtype=dtype)
    ours = ops.dequantize_nf4(*ops.quantize_nf4(w), w.shape, torch.float32)
    theirs = torchao_nf4().to_nf4(w, 64, 256).get_original_weight().float()
    err_ours = (ours - w.float()).pow(2).mean()
    err_theirs = (theirs - w.float()).pow(2).mean()
    assert err_ours <= err_theirs * 1.001, (err_ours, err_theirs)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_quantize_rejects_bad_weights(device):
    with pytest.raises(TypeError, match=r"argument 'weight' must have dtype float32, bfloat16 or float16; got torch.int64"):
        ops.quantize_nf4(torch.ones(64, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"'weight' must have a number of elements divisible by 64.*got 100 elements \(shape \[10, 10\]\)"):
        ops.quantize_nf4(torch.ones(10, 10, device=device))
    with pytest.raises(ValueError, match=r"'weight' must not be empty; got shape \[0, 64\]"):
        ops.quantize_nf4(torch.ones(0, 64, device=device))
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(4, 64, device=device)
        w[2, 7] = bad
        with pytest.raises(ValueError, match=r"'weight' must hold only finite values.*got 1 non-finite value\(s\), the first .* at index \[2, 7\]"):
            ops.quantize_nf4(w)


@pytest.mark.parametrize("device", devices())
def test_dequantize_rejects_mismatched_components(device):
    packed, codes, scales, offset = ops.quantize_nf4(torch.randn(300, 64, device=device))
    shape, dt = [300, 64], torch.float32
    with pytest.raises(ValueError, match=r"'absmax_codes' must hold one code per 64-element block, 300 .*got 299"):
        ops.dequantize_nf4(packed, codes[:299], scales, offset, shape, dt)
    with pytest.raises(ValueError, match=r"'absmax_scales' must hold one scale per 256 blocks, 2 for 300 blocks; got 1"):
        ops.dequantize_nf4(packed, codes, scales[:1], offset, shape, dt)
    with pytest.raises(ValueError, match=r"'absmax_offset' must hold exactly one value; got 2"):
        ops.dequantize_nf4(packed, codes, scales, offset.repeat(2), shape, dt)
    with pytest.raises(ValueError, match=r"'packed' must hold a positive multiple of 32 bytes.*got 9599"):
        ops.dequantize_nf4(packed[:-1], codes, scales, offset, shape, dt)
    with pytest.raises(TypeError, match=r"'absmax_scales' must have dtype float32; got torch.float64"):
        ops.dequantize_nf4(packed, codes, scales.double(), offset, shape, dt)
    with pytest.raises(TypeError, match=r"'packed' must have dtype uint8; got torch.int8"):
        ops.dequantize_nf4(packed.to(torch.int8), codes, scales, offset, shape, dt)
    with pytest.raises(ValueError, match=r"'shape' must have 19200 elements .*got \[300, 65\]"):
        ops.dequantize_nf4(packed, codes, scales, offset, [300, 65], dt)
    # sizes whose product wraps around 2**64 to the components' count ((2**58 + 300) * 64): named as a mismatch
    with pytest.raises(ValueError, match=rf"'shape' must have 19200 elements .*got \[{2**58 + 300}, 64\]"):
        ops.dequantize_nf4(packed, codes, scales, offset, [2**58 + 300, 64], dt)
    with pytest.raises(TypeError, match=r"'dtype' must be float32, bfloat16 or float16; got torch.int32"):
        ops.dequantize_nf4(packed, codes, scales, offset, shape, torch.int32)
    # a shape that is no sequence: a TypeError naming nothing, or torch's internal assert for a tensor
    for bad in (19200, None, torch.tensor([300, 64])):
        with pytest.raises(TypeError, match=rf"^qlora::dequantize_nf4: argument 'shape' must be a list or tuple of ints; got {type(bad).__name__}$"):
            ops.dequantize_nf4(packed, codes, scales, offset, bad, dt)


@needs_cuda
def test_dequantize_rejects_components_on_cpu_and_cuda():
    packed, codes, scales, offset = ops.quantize_nf4(torch.randn(4, 64, device="cuda"))
    with pytest.raises(ValueError, match=r"'absmax_scales' must be on the same device as 'packed' \(cuda:0\); got cpu"):
        ops.dequantize_nf4(packed, codes, scales.cpu(), offset, [4, 64], torch.float32)


@needs_cuda
def test_quantize_refuses_cuda_graph_capture():
    # The NaN/Inf check reads the offset on the host, which a capture cannot do: a clear error,
    # raised before anything is allocated or queued, and the stream works normally afterwards.
    w = torch.randn(4, 64, device="cuda")
    with pytest.raises(RuntimeError, match=r"quantize_nf4 cannot run while a CUDA graph is being captured"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            ops.quantize_nf4(w)
    for c, g in zip(ops.quantize_nf4(w.cpu()), ops.quantize_nf4(w)):
        assert torch.equal(c, g.cpu())


# the NaN/Inf check merges each thread's largest |w| into one atomic: a non-finite value in any thread's share of the
# groups is found, not only in the share of the thread that finishes last (helper-151's surviving C++ mutant)
@pytest.mark.parametrize("threads", [2, 3, 4])
def test_non_finite_found_in_every_threads_share_of_groups(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        groups = 4 * threads  # several groups of 256 blocks per thread
        base = torch.randn(groups * 256 * 64) * 0.02
        for trial in range(12):
            for bad in (float("nan"), float("inf")):
                # a non-finite value in the first group, the last group, or one in between:
                # each lies in one thread's share, the other threads see only finite values
                group = (0, groups - 1, trial % groups)[trial % 3]
                w = base.clone()
                index = group * 256 * 64 + 17
                w[index] = bad
                with pytest.raises(ValueError, match=r"'weight' must hold only finite values"):
                    ops.quantize_nf4(w)
    finally:
        torch.set_num_threads(before)
