"""NF4Tensor: construction, storage attributes, dense round trips, device moves, copies,
serialization, and use as a module parameter."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from conftest import FLOAT_DTYPES, devices, dtype_id, needs_cuda

from qlora_ext import LoRALinear, NF4Tensor, linear_nf4, to_nf4
from qlora_ext import _reference as ref


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_to_nf4_storage_attributes(device, dtype):
    w = torch.randn(300, 128, dtype=dtype, device=device)
    nf4 = to_nf4(w)
    assert isinstance(nf4, NF4Tensor)
    assert nf4.shape == w.shape and nf4.dtype == dtype and nf4.device == w.device
    assert not nf4.requires_grad
    assert nf4.packed.dtype == torch.uint8 and nf4.packed.shape == (300 * 128 // 2,)
    assert nf4.absmax_codes.dtype == torch.uint8 and nf4.absmax_codes.shape == (600,)
    assert nf4.absmax_scales.dtype == torch.float32 and nf4.absmax_scales.shape == (3,)
    assert nf4.absmax_offset.dtype == torch.float32 and nf4.absmax_offset.shape == ()
    want = ref.quantize_nf4(w.cpu())
    for got, exp in zip(nf4.components(), want):
        assert torch.equal(got.cpu(), exp)
    # 4 + 8/64 + 32/(64*256) bits per weight, plus the float32 offset.
    assert nf4.quantized_nbytes == 300 * 128 // 2 + 600 + 3 * 4 + 4


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_dense_round_trip(device, dtype):
    w = torch.randn(64, 192, dtype=dtype, device=device)
    nf4 = to_nf4(w)
    want = ref.dequantize_nf4(*(c.cpu() for c in nf4.components()), w.shape, dtype)
    assert torch.equal(nf4.dequantize().cpu(), want)
    assert torch.equal(nf4.to(dtype).cpu(), want)  # .to(dtype) gives the dense tensor back
    assert type(nf4.to(dtype)) is torch.Tensor
    as_fp32 = nf4.dequantize(torch.float32)
    assert as_fp32.dtype == torch.float32
    assert torch.equal(nf4.to(torch.float32), as_fp32)
    # NF4 keeps the weight within half a code step of the block absmax.
    err = (as_fp32.cpu() - w.float().cpu()).abs().max()
    assert err <= 0.2 * w.float().abs().max()


def test_from_components_round_trip_and_checks():
    w = torch.randn(300, 64)
    nf4 = to_nf4(w)
    again = NF4Tensor.from_components(*nf4.components(), w.shape, w.dtype)
    assert torch.equal(again.dequantize(), nf4.dequantize())
    # bitsandbytes-shaped inputs ([n, 1] packed, offset of shape [1]) are accepted and flattened.
    again = NF4Tensor.from_components(nf4.packed.view(-1, 1), nf4.absmax_codes, nf4.absmax_scales, nf4.absmax_offset.view(1), (300, 64), torch.float32)
    assert again.packed.shape == (9600,) and again.absmax_offset.shape == ()
    p, c, s, o = nf4.components()
    with pytest.raises(ValueError, match=r"'absmax_codes' must have 300 elements for shape \[300, 64\]; got 299"):
        NF4Tensor.from_components(p, c[:299], s, o, (300, 64), torch.float32)
    with pytest.raises(ValueError, match=r"'packed' must have 9600 elements for shape \[300, 64\]; got 9599"):
        NF4Tensor.from_components(p[:-1], c, s, o, (300, 64), torch.float32)
    with pytest.raises(ValueError, match=r"'shape' must have a positive number of elements divisible by 64; got \[10, 10\]"):
        NF4Tensor.from_components(p, c, s, o, (10, 10), torch.float32)
    with pytest.raises(TypeError, match=r"'absmax_scales' must have dtype torch.float32; got torch.float64"):
        NF4Tensor.from_components(p, c, s.double(), o, (300, 64), torch.float32)
    with pytest.raises(TypeError, match=r"'dtype' must be float32, bfloat16 or float16; got torch.int8"):
        NF4Tensor.from_components(p, c, s, o, (300, 64), torch.int8)
    with pytest.raises(TypeError, match=r"'packed' must be a plain tensor; got list"):
        NF4Tensor.from_components([1, 2], c, s, o, (300, 64), torch.float32)
    with pytest.raises(ValueError, match=rf"'shape' must have fewer than 2\*\*63 elements; got \[{2**58 + 300}, 64\]"):
        NF4Tensor.from_components(p, c, s, o, (2**58 + 300, 64), torch.float32)  # its torch.Size().numel() wraps to 19200


def test_from_components_rejects_mixed_devices_without_a_gpu():
    # The device rule, checked in CI without a GPU: meta stands in for the other device.
    p, c, s, o = to_nf4(torch.randn(4, 64)).components()
    with pytest.raises(ValueError, match=r"'absmax_scales' must be on the device of 'packed' \(cpu\); got meta"):
        NF4Tensor.from_components(p, c, s.to("meta"), o, (4, 64), torch.float32)


@needs_cuda
def test_from_components_rejects_cpu_and_cuda_mixed():
    p, c, s, o = to_nf4(torch.randn(4, 64)).components()
    with pytest.raises(ValueError, match=r"'absmax_codes' must be on the device of 'packed' \(cuda:0\); got cpu"):
        NF4Tensor.from_components(p.cuda(), c, s.cuda(), o.cuda(), (4, 64), torch.float32)


def test_to_nf4_takes_torchaos_keyword_names():
    # torchao's to_nf4(tensor, block_size, scaler_block_size): a keyword call was a TypeError
    weight = torch.randn(4, 64)
    by_keyword = to_nf4(tensor=weight, block_size=64, scaler_block_size=256)
    assert torch.equal(by_keyword.dequantize(), to_nf4(weight).dequantize())


def test_to_nf4_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"'block_size' and 'scaler_block_size' must be 64 and 256.*got 128 and 256"):
        to_nf4(torch.randn(4, 128), block_size=128)
    with pytest.raises(TypeError, match=r"got an NF4Tensor"):
        to_nf4(to_nf4(torch.randn(4, 64)))
    with pytest.raises(ValueError, match=r"finite"):
        to_nf4(torch.full((64,), float("nan")))
    with pytest.raises(TypeError, match=r"^to_nf4: argument 'tensor' must have dtype float32, bfloat16 or float16; got torch.float64$"):
        to_nf4(torch.randn(64, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"to_nf4: argument 'tensor' must be a torch.Tensor; got list"):
        to_nf4([[0.5] * 64])
    with pytest.raises(ValueError, match=r"must be 64 and 256.*got 64.0 and 256"):
        to_nf4(torch.randn(64), block_size=64.0)
    # a string that prints like the number is quoted (the message read "must be 64 ...; got 64")
    with pytest.raises(ValueError, match=r"must be 64 and 256.*got '64' and 256$"):
        to_nf4(torch.randn(64), block_size="64")
    with pytest.raises(TypeError, match=r"argument 'dtype' must be float32, bfloat16 or float16; got 'float32'$"):
        NF4Tensor.from_components(*to_nf4(torch.randn(64)).components(), (64,), "float32")
    nf4 = to_nf4(torch.randn(8, 64))
    for shape in [(-8, -64), 512, None]:
        with pytest.raises(ValueError, match=rf"argument 'shape' must be a list or tuple of sizes that are ints >= 0; got {re.escape(repr(shape))}"):
            NF4Tensor.from_components(*nf4.components(), shape, torch.float32)


def test_a_trainable_nf4_weight_is_refused_in_training():
    # an NF4 weight gets no gradient: training one (requires_grad=True) would leave it silently as it is
    weight = torch.nn.Parameter(to_nf4(torch.randn(32, 64)), requires_grad=True)
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"linear_nf4: argument 'weight' must be frozen \(requires_grad=False\)"):
        linear_nf4(x, weight)
    with torch.no_grad():  # inference is fine
        torch.testing.assert_close(linear_nf4(x, weight), x @ weight.dequantize().t())
    lin = LoRALinear(64, 32, rank=4, alpha=8.0, quantize_base=True)
    lin.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"must be frozen"):
        lin(x)


@needs_cuda
def test_cuda_device_moves_keep_nf4():
    nf4 = to_nf4(torch.randn(128, 64, dtype=torch.bfloat16))
    on_gpu = nf4.cuda()
    assert isinstance(on_gpu, NF4Tensor) and on_gpu.device.type == "cuda"
    assert all(t.device.type == "cuda" for t in on_gpu.components())
    assert torch.equal(on_gpu.dequantize().cpu(), nf4.dequantize())
    back = on_gpu.to("cpu")
    assert isinstance(back, NF4Tensor) and torch.equal(back.packed, nf4.packed)
    assert isinstance(on_gpu.cpu(), NF4Tensor)
    dense_gpu = nf4.to("cuda", torch.float32)  # device and dtype: dense on the device
    assert type(dense_gpu) is torch.Tensor and dense_gpu.device.type == "cuda"


def test_cpu_moves_and_clone_keep_nf4():
    nf4 = to_nf4(torch.randn(128, 64))
    assert nf4.cpu() is nf4 or isinstance(nf4.cpu(), NF4Tensor)
    assert isinstance(nf4.to("cpu"), NF4Tensor)
    twin = nf4.clone()
    assert isinstance(twin, NF4Tensor) and twin.packed.data_ptr() != nf4.packed.data_ptr()
    assert torch.equal(twin.dequantize(), nf4.dequantize())
    assert isinstance(nf4.detach(), NF4Tensor)


def test_is_pinned_and_pin_memory_follow_the_storage():
    # CPU-offload code asks every parameter is_pinned(); torchao's NF4Tensor answers, so must ours.
    nf4 = to_nf4(torch.randn(128, 64))
    assert nf4.is_pinned() is False
    assert torch.nn.Parameter(nf4, requires_grad=False).is_pinned() is False
    try:
        dense_pinned = torch.randn(4).pin_memory()  # needs a GPU driver, as ours does
    except RuntimeError as e:
        with pytest.raises(RuntimeError, match=re.escape(str(e)[:40])):
            nf4.pin_memory()
        return
    assert dense_pinned.is_pinned()
    pinned = nf4.pin_memory()
    assert isinstance(pinned, NF4Tensor) and pinned.is_pinned()
    assert all(t.is_pinned() for t in pinned.components())
    assert torch.equal(pinned.dequantize(), nf4.dequantize()) and not nf4.is_pinned()


@pytest.mark.parametrize("device", devices())
def test_deepcopy(device):
    nf4 = to_nf4(torch.randn(256, 64, device=device))
    twin = copy.deepcopy(nf4)
    assert isinstance(twin, NF4Tensor)
    assert twin.packed.data_ptr() != nf4.packed.data_ptr()
    assert torch.equal(twin.dequantize(), nf4.dequantize())
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(nf4, requires_grad=False)
    module_twin = copy.deepcopy(module)
    assert type(module_twin.weight) is NF4Tensor
    assert torch.equal(module_twin.weight.dequantize(), nf4.dequantize())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_torch_save_and_load(device, dtype, tmp_path):
    nf4 = to_nf4(torch.randn(256, 64, dtype=dtype, device=device))
    path = tmp_path / "w.pt"
    torch.save({"w": nf4}, path)
    loaded = torch.load(path)  # weights_only=True, the default
    assert isinstance(loaded["w"], NF4Tensor)
    assert loaded["w"].shape == nf4.shape and loaded["w"].dtype == dtype and loaded["w"].device == nf4.device
    assert torch.equal(loaded["w"].dequantize(), nf4.dequantize())
    buffer = io.BytesIO()
    torch.save(nf4, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False).packed, nf4.packed)


def test_a_saved_nf4tensor_whose_components_disagree_is_refused_on_loading(tmp_path):
    # A damaged or hand-edited file: refused by torch.load, naming the component, not at first use.
    nf4 = to_nf4(torch.randn(128, 320))
    damaged = NF4Tensor(*nf4.components(), torch.Size([128, 160]), torch.float32)  # the private constructor checks nothing
    torch.save({"w": damaged}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"NF4Tensor.from_components: argument 'packed' must have 10240 elements for shape \[128, 160\]; got 20480"):
        torch.load(tmp_path / "w.pt")
    # Copied into an NF4 weight of its shape (a state dict load), it is named too.
    short = NF4Tensor(nf4.packed, nf4.absmax_codes[:-1], nf4.absmax_scales, nf4.absmax_offset, nf4.shape, nf4.dtype)
    with pytest.raises(ValueError, match=r"NF4Tensor.copy_: argument 'src' must have 640 absmax_codes for shape \[128, 320\]; got 639"):
        with torch.no_grad():
            to_nf4(torch.zeros(128, 320)).copy_(short)


def test_parameter_keeps_the_nf4_type():
    param = torch.nn.Parameter(to_nf4(torch.randn(64, 64)), requires_grad=False)
    assert type(param) is NF4Tensor
    assert isinstance(param, torch.nn.Parameter)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_torch_save_keeps_parameter_and_requires_grad(requires_grad):
    def save_load(obj, weights_only):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=weights_only)

    nf4 = to_nf4(torch.randn(64, 64))
    param = torch.nn.Parameter(nf4, requires_grad=requires_grad)
    loaded = save_load(param, weights_only=True)
    assert type(loaded) is NF4Tensor and isinstance(loaded, torch.nn.Parameter)
    assert loaded.requires_grad == requires_grad
    assert torch.equal(loaded.packed, nf4.packed)
    plain = save_load(nf4, weights_only=True)
    assert not isinstance(plain, torch.nn.Parameter) and not plain.requires_grad
    module = torch.nn.Module()
    module.weight = param
    reloaded = save_load(module, weights_only=False)
    assert isinstance(reloaded.weight, torch.nn.Parameter) and type(reloaded.weight) is NF4Tensor
    assert dict(reloaded.named_parameters()).keys() == {"weight"}


def test_setting_data_to_a_dense_tensor_is_refused():
    # Only a dense tensor converted from the NF4 storage itself, unchanged since, may come back
    # (nn.Module.to(dtype) does `param.data = param.to(dtype)`); any other would hide a dense copy
    # inside the NF4 parameter.
    module = torch.nn.Module()
    nf4 = to_nf4(torch.randn(128, 64))
    module.weight = torch.nn.Parameter(nf4, requires_grad=False)
    with pytest.raises(TypeError, match=r"'.data' must be set to an NF4Tensor; got Tensor of shape \[128, 64\]\. A module's NF4"):
        module.weight.data = torch.randn(128, 64)
    changed = module.weight.to(torch.bfloat16)
    changed.mul_(2)
    with pytest.raises(TypeError, match=r"got Tensor of shape \[128, 64\] \(a conversion of an NF4Tensor, changed since\)"):
        module.weight.data = changed
    # changes no version counter sees (through .data, through numpy), and a conversion kept while
    # the storage itself changed (a backup restored): the values decide (all were taken back as
    # the NF4 storage, silently other values than those assigned)
    for edit in (lambda d: d.data.mul_(2), lambda d: d.numpy().fill(0)):
        changed = module.weight.to(torch.float32)
        edit(changed)
        with pytest.raises(TypeError, match=r"\(a conversion of an NF4Tensor, changed since\)"):
            module.weight.data = changed
    backup = module.weight.to(torch.float32)
    with torch.no_grad():
        module.weight.copy_(torch.randn(128, 64))
    with pytest.raises(TypeError, match=r"\(a conversion of an NF4Tensor, changed since\)"):
        module.weight.data = backup
    module.weight.copy_(nf4)
    with pytest.raises(TypeError, match=r"\(a conversion of an NF4Tensor to torch.float64, which NF4 cannot hold\)"):
        module.to(torch.float64)
    assert type(module.weight) is NF4Tensor and module.weight.dtype == torch.float32
    assert torch.equal(module.weight.packed, nf4.packed)
    with pytest.raises(RuntimeError):  # a wrapper holds no dense storage
        module.weight.untyped_storage().data_ptr()
    other = to_nf4(torch.randn(256, 64, dtype=torch.bfloat16))
    module.weight.data = other  # an NF4Tensor may replace the data
    assert module.weight.shape == (256, 64) and module.weight.dtype == torch.bfloat16
    assert torch.equal(module.weight.dequantize(), other.dequantize())


def test_share_memory_shares_the_storage():
    # Tensor.share_memory_ on an NF4Tensor crashed the interpreter, and LoRALinear.share_memory()
    # shared nothing of its NF4 weight
    nf4 = to_nf4(torch.randn(128, 64))
    assert not nf4.is_shared()
    assert nf4.share_memory_() is nf4 and nf4.is_shared() and all(t.is_shared() for t in nf4.components())
    linear = torch.nn.Linear(64, 128, bias=False)
    linear.weight = torch.nn.Parameter(to_nf4(torch.randn(128, 64)), requires_grad=False)
    linear.share_memory()
    assert type(linear.weight) is NF4Tensor and all(t.is_shared() for t in linear.weight.components())
    lora = LoRALinear(64, 128, rank=4, alpha=8.0, quantize_base=True).share_memory()
    assert all(t.is_shared() for t in lora.weight.components()) and lora.lora_a.weight.is_shared()


@pytest.mark.parametrize("convert", ["to", "half", "to_device_and_dtype"])
def test_a_module_holding_an_nf4_weight_changes_dtype_keeping_it(convert):
    # A module other than LoRALinear (torchtune's FrozenNF4Linear, say): .to(dtype) keeps the NF4
    # bytes and changes the dtype it dequantizes to, as LoRALinear's and torchao's do.
    linear = torch.nn.Linear(64, 128, bias=False)
    nf4 = to_nf4(torch.randn(128, 64))
    linear.weight = torch.nn.Parameter(nf4, requires_grad=False)
    {"to": lambda: linear.to(torch.bfloat16), "half": linear.half, "to_device_and_dtype": lambda: linear.to("cpu", torch.float16)}[convert]()
    want = torch.float16 if convert != "to" else torch.bfloat16
    assert type(linear.weight) is NF4Tensor and isinstance(linear.weight, torch.nn.Parameter)
    assert linear.weight.dtype == want and not linear.weight.requires_grad
    assert all(a is b for a, b in zip(linear.weight.components(), nf4.components()))
    x = torch.randn(3, 64, dtype=want)
    assert torch.equal(linear(x), linear_nf4(x, NF4Tensor.from_components(*nf4.components(), nf4.shape, want)))


def test_dtype_changes_under_inference_mode_and_between_modules():
    # Under inference_mode (no version counters) .half() and .to(dtype) take other aten paths; and
    # one module's weight converted into another's .data gets a copy of the storage, not a share.
    def holding_nf4():
        linear = torch.nn.Linear(64, 128, bias=False)
        linear.weight = torch.nn.Parameter(to_nf4(torch.randn(128, 64)), requires_grad=False)
        return linear

    with torch.inference_mode():
        for convert, want in ((lambda m: m.half(), torch.float16), (lambda m: m.to(torch.bfloat16), torch.bfloat16)):
            linear = holding_nf4()
            packed = linear.weight.packed
            convert(linear)
            assert type(linear.weight) is NF4Tensor and linear.weight.dtype == want and linear.weight.packed is packed
    a, b = holding_nf4(), holding_nf4()
    b.weight.data = a.weight.to(torch.float16)
    assert torch.equal(b.weight.packed, a.weight.packed) and b.weight.packed.data_ptr() != a.weight.packed.data_ptr()
    with torch.no_grad():
        a.weight.copy_(torch.zeros(128, 64))
    assert not torch.equal(b.weight.packed, a.weight.packed)


def test_a_dense_conversion_carries_nothing_of_the_nf4_storage():
    # What lets .data take a conversion back is kept beside the dense tensor, not in it: saving
    # or copying the dense weight writes the dense values alone.
    nf4 = to_nf4(torch.randn(256, 256))
    dense = nf4.to(torch.bfloat16)
    assert dense.__dict__ == {} and copy.deepcopy(dense).__dict__ == {}
    saved, plain = io.BytesIO(), io.BytesIO()
    torch.save(dense, saved)
    torch.save(dense.clone(), plain)
    assert len(saved.getvalue()) == len(plain.getvalue())
    assert torch.load(io.BytesIO(saved.getvalue()), weights_only=True).__dict__ == {}


def test_to_empty_and_empty_like_keep_the_layout():
    # nn.Module.to_empty materializes a module built on meta with uninitialized NF4 storage,
    # which a state-dict load then fills.
    with torch.device("meta"):
        linear = torch.nn.Linear(64, 128, bias=False)
        linear.weight = torch.nn.Parameter(to_nf4(torch.randn(128, 64)), requires_grad=False)
    linear.to_empty(device="cpu")
    assert type(linear.weight) is NF4Tensor and linear.weight.packed.device.type == "cpu"
    assert [t.shape for t in linear.weight.components()] == [(4096,), (128,), (1,), ()]
    source = to_nf4(torch.randn(128, 64))
    linear.load_state_dict({"weight": source})
    assert torch.equal(linear.weight.packed, source.packed)
    # on the meta device too (torch does not set .data there, and the weight became a dense
    # parameter: the model materialized from it held the full-size weight)
    with torch.device("meta"):
        linear = torch.nn.Linear(64, 128, bias=False)
        linear.weight = torch.nn.Parameter(to_nf4(torch.randn(128, 64)), requires_grad=False)
    linear.bfloat16()
    assert type(linear.weight) is NF4Tensor and linear.weight.dtype == torch.bfloat16 and linear.weight.packed.is_meta
    linear.to_empty(device="cpu")
    assert type(linear.weight) is NF4Tensor and linear.weight.packed.device.type == "cpu"
    empty = torch.empty_like(source, dtype=torch.bfloat16)
    assert type(empty) is NF4Tensor and empty.dtype == torch.bfloat16 and empty.packed.data_ptr() != source.packed.data_ptr()
    with pytest.raises(TypeError, match=r"torch.empty_like of an NF4Tensor: argument 'dtype' must be float32, bfloat16 or float16; got torch.int8"):
        torch.empty_like(source, dtype=torch.int8)


def test_torchao_names():
    # torchao's NF4Tensor spells dequantize() get_original_weight(), and has the block sizes.
    nf4 = to_nf4(torch.randn(128, 64, dtype=torch.bfloat16))
    assert torch.equal(nf4.get_original_weight(), nf4.dequantize()) and nf4.get_original_weight().dtype == torch.bfloat16
    assert (nf4.block_size, nf4.scaler_block_size) == (64, 256)


def test_linear_nf4_takes_torchaos_argument_names_and_follows_autocast():
    # torchtune calls linear_nf4(input=..., weight=...); under autocast the result is in
    # autocast's dtype, as F.linear's and torchao's are (it was float32 for float32 input).
    nf4 = to_nf4(torch.randn(128, 64))
    x, bias = torch.randn(3, 64), torch.randn(128)
    assert torch.equal(linear_nf4(input=x, weight=nf4, bias=bias), linear_nf4(x, nf4, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for got in (linear_nf4(x, nf4, bias), torch.nn.functional.linear(x, nf4, bias)):
            assert got.dtype == torch.bfloat16 == torch.nn.functional.linear(x, nf4.dequantize(), bias).dtype
            assert torch.equal(got, linear_nf4(x.bfloat16(), nf4, bias.bfloat16()))
        lin = LoRALinear(64, 128, rank=4, alpha=8.0, quantize_base=True)
        assert lin(x).dtype == torch.bfloat16 == LoRALinear(64, 128, rank=4, alpha=8.0)(x).dtype
        # float64 stays float64 under autocast, as for F.linear (and is refused, as outside it)
        with pytest.raises(TypeError, match=r"^qlora::linear_nf4: argument 'x' must have dtype float32, bfloat16 or float16; got torch.float64$"):
            linear_nf4(x.double(), nf4)


def test_to_with_copy_and_other_dtypes():
    nf4 = to_nf4(torch.randn(128, 64))
    copied = nf4.to("cpu", copy=True)
    assert type(copied) is NF4Tensor and copied.packed.data_ptr() != nf4.packed.data_ptr()
    assert torch.equal(copied.packed, nf4.packed)
    assert nf4.to("cpu", copy=False) is nf4
    dense = nf4.to(torch.bfloat16, copy=True)
    assert type(dense) is torch.Tensor and torch.equal(dense, nf4.dequantize(torch.bfloat16))
    exact = nf4.dequantize(torch.float32)  # NF4 values are exact in float32
    for got in (nf4.to(torch.float64), nf4.double()):
        assert got.dtype == torch.float64 and torch.equal(got, exact.double())
    assert torch.equal(nf4.to(torch.int32), exact.to(torch.int32))
    assert torch.equal(nf4.dequantize(torch.float64), exact.double())
    # to(dtype, non_blocking, copy) with copy positional, as Tensor.to takes it
    assert torch.equal(nf4.to(torch.bfloat16, False, True), nf4.dequantize(torch.bfloat16))
    # a dense tensor converted to an NF4 weight's device and dtype (it failed inside the handler)
    x = torch.randn(3, 64)
    assert x.to(to_nf4(torch.randn(128, 64, dtype=torch.bfloat16))).dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"^NF4Tensor.dequantize: argument 'dtype' must be a torch.dtype or None; got 'bfloat16'$"):
        nf4.dequantize("bfloat16")


def test_f_linear_names_the_argument_that_is_nf4():
    nf4, dense = to_nf4(torch.randn(128, 64)), torch.randn(128, 64)
    with pytest.raises(TypeError, match=r"only 'weight' may be one; got bias NF4Tensor of shape \[128, 64\]"):
        torch.nn.functional.linear(torch.randn(2, 64), dense, nf4)
    with pytest.raises(TypeError, match=r"only 'weight' may be one; got input NF4Tensor of shape \[128, 64\]"):
        torch.nn.functional.linear(nf4, dense)


def test_dense_destination_copies_from_nf4():
    nf4 = to_nf4(torch.randn(128, 64))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        dst = torch.zeros(128, 64, dtype=dtype)
        with torch.no_grad():
            dst.copy_(nf4)
        assert type(dst) is torch.Tensor
        assert torch.equal(dst, nf4.dequantize(torch.float32).to(dtype))
    linear = torch.nn.Linear(64, 128, bias=False)
    linear.load_state_dict({"weight": nf4})
    assert type(linear.weight) is torch.nn.Parameter
    assert torch.equal(linear.weight, nf4.dequantize())


def test_copy_from_dense_quantizes_and_from_nf4_copies():
    target = to_nf4(torch.zeros(128, 64, dtype=torch.bfloat16))
    source = torch.randn(128, 64)
    with torch.no_grad():
        target.copy_(source)
    want = ref.quantize_nf4(source.to(torch.bfloat16))  # cast to the parameter's dtype first
    for got, exp in zip(target.components(), want):
        assert torch.equal(got, exp)
    other = to_nf4(torch.randn(128, 64))
    with torch.no_grad():
        target.copy_(other)
    assert torch.equal(target.packed, other.packed)
    with pytest.raises(ValueError, match=r"'src' must have shape \[128, 64\]; got \[64, 128\]"):
        target.copy_(torch.randn(64, 128))


def test_unsupported_op_says_how_to_get_a_dense_tensor():
    nf4 = to_nf4(torch.randn(64, 64))
    with pytest.raises(NotImplementedError, match=r"^NF4Tensor does not support aten.add.Tensor; make it dense first with "
                                                  r"\.dequantize\(\) or \.to\(dtype\)$"):
        nf4 + 1
    # DistributedDataParallel's parameter broadcast views every parameter: how to leave NF4 ones out
    with pytest.raises(NotImplementedError, match=r"does not support aten.view.default; .*leave the frozen NF4 weights out, with "
                                                  r"DistributedDataParallel._set_params_and_buffers_to_ignore_for_model or "
                                                  r"fully_shard\(ignored_params=...\)"):
        torch.ops.aten.view.default(nf4, [-1])


def test_repr_shows_metadata_not_values():
    assert repr(to_nf4(torch.randn(2, 64))) == "NF4Tensor(shape=[2, 64], dtype=torch.float32, device=cpu)"


def test_to_nf4_errors_name_its_own_argument():
    # the empty / size / NaN errors named the op's argument ("qlora::quantize_nf4: argument 'weight'"),
    # which a caller of to_nf4 never passed
    nan = torch.randn(4, 64)
    nan[2, 7] = float("nan")
    for bad, message in ((torch.ones(10, 10), r"divisible by 64"), (torch.ones(0, 64), r"must not be empty"),
                         (nan, r"must hold only finite values.*the first nan at index \[2, 7\]")):
        with pytest.raises(ValueError, match=rf"^to_nf4: argument 'tensor' .*{message}"):
            to_nf4(tensor=bad)
