"""LoRALinear: torchtune semantics, NF4 base, adapters, merging, state dicts and memory."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import devices, needs_cuda
from torch import nn

from qlora_ext import LoRALinear, NF4Tensor, to_nf4
from qlora_ext.modules import disable_adapter, get_adapter_params, set_trainable_params


def storage_bytes(module: nn.Module) -> int:
    total = 0
    for p in module.parameters():
        total += p.quantized_nbytes if isinstance(p, NF4Tensor) else p.numel() * p.element_size()
    return total


@pytest.mark.parametrize("quantize_base", [False, True])
@pytest.mark.parametrize("device", devices())
def test_output_is_base_plus_scaled_adapter(quantize_base, device):
    lin = LoRALinear(192, 96, rank=4, alpha=8.0, quantize_base=quantize_base, use_bias=True).to(device)
    nn.init.normal_(lin.lora_b.weight)
    x = torch.randn(2, 3, 192, device=device)
    base_w = lin.weight.dequantize() if quantize_base else lin.weight
    want = F.linear(x, base_w, lin.bias) + 2.0 * (x @ lin.lora_a.weight.t() @ lin.lora_b.weight.t())
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
    assert isinstance(lin.weight, NF4Tensor) == quantize_base


def test_initialization_and_trainable_parameters():
    lin = LoRALinear(512, 256, rank=8, alpha=16, quantize_base=True)
    assert torch.count_nonzero(lin.lora_b.weight) == 0  # a new adapter changes nothing
    bound = 1 / math.sqrt(512)  # kaiming-uniform with a = sqrt(5), as nn.Linear
    assert lin.lora_a.weight.abs().max() <= bound and lin.lora_a.weight.std() > bound / 3
    assert lin.adapter_params() == ["lora_a.weight", "lora_b.weight"]
    assert not lin.weight.requires_grad
    x = torch.randn(4, 512, requires_grad=True)
    nn.init.normal_(lin.lora_b.weight)
    lin(x).sum().backward()
    assert lin.lora_a.weight.grad is not None and lin.lora_b.weight.grad is not None
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_adapter_parameter_helpers():
    model = nn.Sequential(LoRALinear(64, 64, 4, 8), nn.Linear(64, 64), LoRALinear(64, 64, 4, 8, quantize_base=True))
    params = get_adapter_params(model)
    assert sorted(params) == ["0.lora_a.weight", "0.lora_b.weight", "2.lora_a.weight", "2.lora_b.weight"]
    set_trainable_params(model, params)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(params)


@pytest.mark.parametrize("device", devices())
def test_disable_adapter(device):
    lin = LoRALinear(128, 64, rank=4, alpha=4, quantize_base=True).to(device)
    nn.init.normal_(lin.lora_b.weight)
    x = torch.randn(3, 128, device=device)
    base = F.linear(x, lin.weight.dequantize())
    with disable_adapter(lin):
        torch.testing.assert_close(lin(x), base, rtol=1e-5, atol=1e-5)
    assert not lin.disabled
    assert not torch.allclose(lin(x), base)
    lin.disabled = True
    torch.testing.assert_close(lin(x), base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize_base", [False, True])
def test_disabling_a_merged_adapter_unmerges_it(quantize_base):
    # As PEFT does: base-only output needs the adapter taken back out of the base.
    lin = LoRALinear(128, 64, rank=4, alpha=8, quantize_base=quantize_base)
    nn.init.normal_(lin.lora_b.weight, std=0.02)
    x = torch.randn(3, 128)
    with_adapter = lin(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NF4 re-quantization
        lin.merge_()
        with disable_adapter(lin):
            y = lin(x)
    assert not lin.merged
    base = F.linear(x, lin.weight.dequantize() if quantize_base else lin.weight)
    torch.testing.assert_close(y, base, rtol=1e-5, atol=1e-5)
    # Enabled again, the adapter runs beside the unmerged base (for NF4, rounded twice).
    torch.testing.assert_close(lin(x), base + x @ lin.adapter_delta(torch.float32).t(), rtol=1e-5, atol=1e-5)
    if not quantize_base:
        torch.testing.assert_close(lin(x), with_adapter)


@pytest.mark.parametrize("on_meta", [False, True])
def test_assign_load_quantizes_a_dense_weight(on_meta):
    source = LoRALinear(256, 128, rank=4, alpha=4, quantize_base=True)
    sd = source.state_dict()  # a dense 'weight'
    sd["weight"] = torch.randn(128, 256)
    with torch.device("meta" if on_meta else "cpu"):
        lin = LoRALinear(256, 128, rank=4, alpha=4, quantize_base=True)
    lin.load_state_dict(sd, assign=True)
    assert type(lin.weight) is NF4Tensor and isinstance(lin.weight, nn.Parameter) and not lin.weight.requires_grad
    assert _dense_bytes_inside(lin.weight) == 0
    assert torch.equal(lin.weight.packed, to_nf4(sd["weight"]).packed)
    assert type(sd["weight"]) is torch.Tensor  # the caller's dict is left alone
    x = torch.randn(2, 256)
    torch.testing.assert_close(lin(x), source.lora_b(source.lora_a(x)) + F.linear(x, to_nf4(sd["weight"]).dequantize()))
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        lin.load_state_dict({**sd, "weight": torch.randn(64, 256)}, assign=True)
    # an entry that cannot be quantized is named by its key; a float64 one is taken, as without assign
    bad = sd["weight"].clone()
    bad[3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"load_state_dict: entry 'weight' cannot be quantized for the NF4 base weight: "
                                         r"it must hold only finite values"):
        lin.load_state_dict({**sd, "weight": bad}, assign=True)
    lin.load_state_dict({**sd, "weight": sd["weight"].double()}, assign=True)
    assert torch.equal(lin.weight.packed, to_nf4(sd["weight"]).packed)


def test_merge_and_unmerge_dense_base_are_exact_inverses():
    lin = LoRALinear(128, 64, rank=4, alpha=4).double()
    nn.init.normal_(lin.lora_b.weight)
    x = torch.randn(3, 128, dtype=torch.float64)
    before, weight = lin(x), lin.weight.detach().clone()
    merged = lin.merged_weight()
    lin.merge_()
    assert lin.merged
    torch.testing.assert_close(lin.weight, merged)
    torch.testing.assert_close(lin(x), before)  # the adapter now lives in the weight
    lin.unmerge_()
    torch.testing.assert_close(lin.weight, weight)
    torch.testing.assert_close(lin(x), before)


def test_merge_into_nf4_base_requantizes_the_merged_weight():
    lin = LoRALinear(256, 128, rank=4, alpha=4, quantize_base=True)
    nn.init.normal_(lin.lora_b.weight, std=0.01)
    original = lin.weight.dequantize(torch.float32)
    merged = lin.merged_weight(torch.float32)
    torch.testing.assert_close(merged, lin.weight.dequantize() + lin.adapter_delta(torch.float32))
    with pytest.warns(UserWarning, match="quantizes it again"):
        lin.merge_()
    assert isinstance(lin.weight, NF4Tensor)
    assert torch.equal(lin.weight.packed, to_nf4(merged).packed)
    x = torch.randn(8, 256)
    torch.testing.assert_close(lin(x), F.linear(x, to_nf4(merged).dequantize()), rtol=1e-5, atol=1e-5)
    # ... and back out: the delta is subtracted from the (rounded) merged weight, quantized again.
    delta = lin.adapter_delta(torch.float32)
    rounded_merged = lin.weight.dequantize(torch.float32)
    with pytest.warns(UserWarning, match="quantizes it again"):
        lin.unmerge_()
    assert not lin.merged and isinstance(lin.weight, NF4Tensor)
    assert torch.equal(lin.weight.packed, to_nf4(rounded_merged - delta).packed)
    unmerged = lin.weight.dequantize(torch.float32)
    torch.testing.assert_close(lin(x), F.linear(x, unmerged) + x @ delta.t(), rtol=1e-5, atol=1e-5)
    assert (unmerged - original).norm() / original.norm() < 0.1  # two NF4 roundings away


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_is_dense_and_load_quantizes(dtype):
    lin = LoRALinear(256, 128, rank=4, alpha=4, quantize_base=True).to(dtype)
    sd = lin.state_dict()
    assert sorted(sd) == ["lora_a.weight", "lora_b.weight", "weight"]
    assert type(sd["weight"]) is torch.Tensor and sd["weight"].dtype == dtype and sd["weight"].device.type == "cpu"
    assert torch.equal(sd["weight"], lin.weight.dequantize())
    dense = torch.randn(128, 256, dtype=dtype)
    sd["weight"] = dense
    other = LoRALinear(256, 128, rank=4, alpha=4, quantize_base=True).to(dtype)
    other.load_state_dict(sd)
    assert isinstance(other.weight, NF4Tensor)
    assert torch.equal(other.weight.packed, to_nf4(dense).packed)
    assert torch.equal(other.lora_a.weight, lin.lora_a.weight)


def _dense_bytes_inside(t: torch.Tensor) -> int:
    storage = t.untyped_storage()
    try:
        storage.data_ptr()
    except RuntimeError:  # a wrapper subclass's storage holds no memory
        return 0
    return storage.nbytes()


@pytest.mark.parametrize("cast", ["to_bf16", "half", "float"])
def test_module_dtype_cast_keeps_the_base_nf4(cast):
    # nn.Module.to(dtype) must not leave a dense copy of the weight inside the NF4 parameter.
    lin = LoRALinear(256, 128, rank=4, alpha=4, quantize_base=True)
    packed, dense = lin.weight.packed.clone(), lin.weight.dequantize(torch.float32)
    want = {"to_bf16": torch.bfloat16, "half": torch.float16, "float": torch.float32}[cast]
    lin = lin.to(torch.bfloat16) if cast == "to_bf16" else getattr(lin, cast)()
    assert isinstance(lin.weight, NF4Tensor) and not lin.weight.requires_grad
    assert lin.weight.dtype == want and lin.lora_a.weight.dtype == want
    assert _dense_bytes_inside(lin.weight) == 0
    assert torch.equal(lin.weight.packed, packed)
    assert torch.equal(lin.weight.dequantize(torch.float32), dense)
    assert lin.weight.absmax_scales.dtype == torch.float32  # storage dtypes never change
    x = torch.randn(3, 256, dtype=want)
    torch.testing.assert_close(lin(x), F.linear(x, dense.to(want)), rtol=1e-2, atol=1e-2)
    assert lin.state_dict()["weight"].dtype == want


def test_module_to_meta_and_back_with_to_empty():
    lin = LoRALinear(256, 128, rank=4, alpha=4, quantize_base=True).to("meta")
    assert isinstance(lin.weight, NF4Tensor) and lin.weight.is_meta and lin.weight.packed.is_meta
    # its state dict is meta too (the state-dict hook moved the dense weight to the CPU: it raised)
    state = lin.state_dict()
    assert type(state["weight"]) is torch.Tensor and state["weight"].is_meta and state["weight"].shape == (128, 256)
    lin = lin.to_empty(device="cpu")
    assert isinstance(lin.weight, NF4Tensor) and lin.weight.packed.device.type == "cpu"
    assert lin.weight.packed.numel() == 256 * 128 // 2


def test_autocast_dtype_of_devices_without_autocast():
    # meta, lazy and other device types have no autocast state: asking torch raises, so they have
    # no autocast dtype (a lazy-tensor LoRALinear forward failed on it).
    from qlora_ext._dtypes import autocast_dtype

    assert autocast_dtype("meta") is None and autocast_dtype("lazy") is None and autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16 and autocast_dtype("meta") is None
        with torch.autocast("cpu", enabled=False):
            assert autocast_dtype("cpu") is None


@pytest.mark.parametrize("quantize_base", [False, True])
def test_forward_and_backward_on_the_meta_device(quantize_base):
    # Shapes without data (a model built on meta to plan memory, or traced): the forward asked
    # meta, a device without autocast, for its autocast state and failed.
    with torch.device("meta"):
        lin = LoRALinear(128, 64, rank=4, alpha=8, quantize_base=quantize_base)
        x = torch.randn(2, 3, 128, requires_grad=True)
    y = lin(x)
    y.sum().backward()
    assert y.shape == (2, 3, 64) and y.is_meta
    assert x.grad.shape == x.shape and lin.lora_a.weight.grad.shape == (4, 128) and lin.lora_b.weight.grad.is_meta


def test_torchtunes_quantization_kwargs():
    # torchtune's LoRALinear passes **quantization_kwargs to to_nf4: the format's own sizes are
    # accepted, others refused, and none without quantize_base.
    lin = LoRALinear(128, 64, rank=4, alpha=8, quantize_base=True, block_size=64, scaler_block_size=256)
    assert type(lin.weight) is NF4Tensor
    with pytest.raises(ValueError, match=r"quantization arguments must be \{'block_size': 64, 'scaler_block_size': 256\} .*; got \{'block_size': 32\}"):
        LoRALinear(128, 64, rank=4, alpha=8, quantize_base=True, block_size=32)
    with pytest.raises(ValueError, match=r"got \{'block_size': 64.0\}"):  # as to_nf4, sizes are ints
        LoRALinear(128, 64, rank=4, alpha=8, quantize_base=True, block_size=64.0)
    with pytest.raises(ValueError, match=r"quantize_base is False, but quantization arguments were given: \{'block_size': 64\}"):
        LoRALinear(128, 64, rank=4, alpha=8, block_size=64)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['blocksize'\]"):
        LoRALinear(128, 64, rank=4, alpha=8, quantize_base=True, blocksize=64)


def test_quantized_layer_takes_8x_less_storage():
    # The seed tutorial's example: 1,081,344 bytes dense (its CUDA number) vs 177,152 quantized.
    dense = LoRALinear(512, 512, rank=8, alpha=0.1, quantize_base=False)
    quantized = LoRALinear(512, 512, rank=8, alpha=0.1, quantize_base=True)
    assert storage_bytes(dense) == 1_081_344
    assert storage_bytes(quantized) <= 177_152
    assert storage_bytes(dense) / storage_bytes(quantized) > 6


@needs_cuda
def test_cuda_memory_of_the_seed_example():
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    with torch.device("cuda"):
        qlora_linear = LoRALinear(512, 512, rank=8, alpha=0.1, quantize_base=True)
    assert torch.cuda.memory_allocated() - base <= 177_152
    del qlora_linear


@needs_cuda
def test_state_dict_offloads_cuda_weights_one_at_a_time():
    model = nn.Sequential(*[LoRALinear(1024, 1024, 4, 4, quantize_base=True) for _ in range(6)]).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sd = model.state_dict()
    # The NF4 bases come out dense on the CPU; the adapters are the parameters themselves (the
    # hook offloads what it dequantizes, as torchtune's does), so they stay on the GPU.
    assert all(v.device.type == ("cuda" if ".lora_" in k else "cpu") for k, v in sd.items())
    one_dense = 1024 * 1024 * 4
    assert torch.cuda.max_memory_allocated() - base <= 1.5 * one_dense


def test_constructor_arguments_are_checked():
    for kwargs, needle in [
        (dict(rank=0), "argument 'rank' must be a positive int; got 0"),
        (dict(rank=2.5), "argument 'rank' must be a positive int; got 2.5"),
        (dict(rank=True), "argument 'rank' must be a positive int; got True"),
        (dict(in_dim=0), "argument 'in_dim' must be a positive int; got 0"),
        (dict(out_dim=-3), "argument 'out_dim' must be a positive int; got -3"),
        (dict(alpha=float("nan")), "argument 'alpha' must be a finite number; got nan"),
        (dict(alpha=float("inf")), "argument 'alpha' must be a finite number; got inf"),
        (dict(dropout=1.0), "argument 'dropout' must be a number in [0, 1); got 1.0"),
        (dict(dropout=None), "argument 'dropout' must be a number in [0, 1); got None"),
        (dict(dropout="0.1"), "argument 'dropout' must be a number in [0, 1); got '0.1'"),
        (dict(in_dim=10, out_dim=10, quantize_base=True),
         "quantize_base=True needs in_dim * out_dim divisible by 64 (the NF4 block size); got in_dim=10, out_dim=10"),
    ]:
        args = {"in_dim": 64, "out_dim": 32, "rank": 4, "alpha": 8.0, **kwargs}
        with pytest.raises(ValueError, match=re.escape(f"LoRALinear: {needle}")):
            LoRALinear(**args)
    assert LoRALinear(64, 32, rank=4, alpha=0).scaling == 0  # alpha 0 is allowed: an adapter that adds nothing
    import numpy as np  # numpy numbers (a config read by numpy) are taken, and kept as plain Python ones

    lin = LoRALinear(np.int64(64), 32, rank=np.int32(4), alpha=np.float32(8.0))
    assert (type(lin.rank), type(lin.in_dim), type(lin.alpha), lin.scaling) == (int, int, float, 2.0)


def test_seed_tutorial_import_lines_carry_over():
    # torchtune.modules.peft / torchtune.models.llama2 / torchao.dtypes.nf4tensor -> qlora_ext.*
    from qlora_ext.models.llama2 import qlora_llama2_7b
    from qlora_ext.modules.peft import LoRALinear as PeftLoRALinear
    from qlora_ext.nf4 import linear_nf4 as nf4_linear
    from qlora_ext.nf4 import to_nf4 as nf4_to

    assert PeftLoRALinear is LoRALinear and nf4_to is to_nf4 and callable(nf4_linear) and callable(qlora_llama2_7b)


@pytest.mark.parametrize("assign", [False, True])
def test_loading_a_value_beyond_the_weight_dtype_names_it(assign):
    # an fp32 entry holding 1e6 (finite) loaded into a float16 NF4 base is cast to float16 first: the error
    # named "the first inf at index [2, 3]", a value the checkpoint does not hold
    m = LoRALinear(64, 4, rank=2, alpha=4.0, quantize_base=True).half()
    sd = {k: v.float() for k, v in m.state_dict().items()}
    sd["weight"][2, 3] = 1e6
    if assign:  # the entry is quantized as given (float32): it is in range there
        m.load_state_dict(sd, assign=True)
        assert m.weight.dtype == torch.float32
        return
    with pytest.raises(RuntimeError, match=r"argument 'src' must hold values within float16's range \(the weight's dtype; largest "
                                           r"finite 65504\); got 1e\+06 at index \[2, 3\], which is inf in float16"):
        m.load_state_dict(sd)
    sd["weight"][2, 3] = float("nan")  # NaN in the entry itself: named as copy_'s argument, not the op's
    with pytest.raises(RuntimeError, match=r"NF4Tensor.copy_: argument 'src' must hold only finite values .*the first nan at index \[2, 3\]"):
        m.load_state_dict(sd)


# nn.Module operations torchtune users apply: hooks on the adapter's submodules, load pre-hooks with assign=True
def _composed_by_modules(m: LoRALinear, x):
    # torchtune's forward: base + (alpha / rank) * lora_b(lora_a(dropout(x))), module by module
    return m._base(x) + m.scaling * m.lora_b(m.lora_a(x))


@pytest.mark.parametrize("quantize_base", [True, False], ids=["nf4", "dense"])
def test_hooks_on_lora_a_and_lora_b_are_called_and_take_effect(quantize_base):
    torch.manual_seed(0)
    m = LoRALinear(64, 64, rank=4, alpha=8, quantize_base=quantize_base)
    nn.init.normal_(m.lora_b.weight)
    x = torch.randn(3, 64)
    calls = []
    m.lora_a.register_forward_pre_hook(lambda mod, i: calls.append("lora_a pre"))
    m.lora_a.register_forward_hook(lambda mod, i, o: calls.append("lora_a"))
    m.lora_b.register_full_backward_hook(lambda mod, gi, go: calls.append("lora_b backward"))
    m(x).sum().backward()
    assert sorted(calls) == ["lora_a", "lora_a pre", "lora_b backward"]

    base = m._base(x).detach()
    m.lora_b.register_forward_hook(lambda mod, i, o: o * 0)  # a hook that silences the adapter
    torch.testing.assert_close(m(x), base)


@pytest.mark.parametrize("quantize_base", [True, False], ids=["nf4", "dense"])
def test_legacy_weight_norm_on_lora_a_follows_optimizer_steps(quantize_base):
    torch.manual_seed(0)
    m = LoRALinear(64, 64, rank=4, alpha=8, quantize_base=quantize_base)
    nn.init.normal_(m.lora_b.weight)
    torch.nn.utils.weight_norm(m.lora_a, "weight")  # recomputes lora_a.weight in a forward pre-hook
    opt = torch.optim.SGD([m.lora_a.weight_g, m.lora_a.weight_v], lr=0.5)
    x = torch.randn(3, 64)
    for _ in range(2):
        m(x).sum().backward()
        opt.step()
        opt.zero_grad()
    w = torch._weight_norm(m.lora_a.weight_v, m.lora_a.weight_g, 0)
    expected = m._base(x) + m.scaling * (x @ w.T @ m.lora_b.weight.T)
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("quantize_base", [True, False], ids=["nf4", "dense"])
def test_adapter_modules_with_a_bias_or_own_forward_are_used_as_modules(quantize_base):
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    m = LoRALinear(64, 64, rank=4, alpha=8, quantize_base=quantize_base)
    m.lora_a = nn.Linear(64, 4, bias=True)
    nn.init.normal_(m.lora_a.bias)
    nn.init.normal_(m.lora_b.weight)
    torch.testing.assert_close(m(x), _composed_by_modules(m, x))

    class Tripled(nn.Linear):
        def forward(self, x):
            return 3 * super().forward(x)

    m = LoRALinear(64, 64, rank=4, alpha=8, quantize_base=quantize_base)
    m.lora_b = Tripled(4, 64, bias=False)
    nn.init.normal_(m.lora_b.weight)
    torch.testing.assert_close(m(x), _composed_by_modules(m, x))


def test_assign_load_through_a_later_renaming_pre_hook_keeps_the_base_nf4():
    torch.manual_seed(0)
    src = LoRALinear(128, 64, rank=8, alpha=16, quantize_base=True)
    state = src.state_dict()
    state["w"] = state.pop("weight")  # a checkpoint with another name for the base weight

    def rename(module, state_dict, prefix, *_):
        if prefix + "w" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "w")

    m = LoRALinear(128, 64, rank=8, alpha=16, quantize_base=True)
    m.register_load_state_dict_pre_hook(rename)  # runs after LoRALinear's own pre-hook
    m.load_state_dict(state, assign=True)
    assert isinstance(m.weight, NF4Tensor) and isinstance(m.weight, nn.Parameter)
    assert not m.weight.requires_grad
    torch.testing.assert_close(m.weight.dequantize(), src.weight.dequantize(), atol=1e-3, rtol=0)


def test_a_float64_input_to_an_nf4_base_names_the_module_and_what_to_do():
    m = LoRALinear(64, 64, rank=4, alpha=8, quantize_base=True).double()  # the NF4 base stays float32
    assert isinstance(m.weight, NF4Tensor) and m.lora_a.weight.dtype == torch.float64
    with pytest.raises(TypeError, match=r"LoRALinear: an NF4 base weight computes in float32, bfloat16 or float16; got input of dtype torch.float64"):
        m(torch.randn(2, 64, dtype=torch.float64))


def _rename_w_entry(module, state_dict, prefix, *_):
    if prefix + "w" in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(prefix + "w")


def test_a_float64_entry_through_a_later_renaming_pre_hook_loads_as_under_its_own_name():
    torch.manual_seed(0)
    state = LoRALinear(128, 64, rank=8, alpha=16, quantize_base=True).state_dict()
    state["weight"] = state["weight"].double()  # a float64 checkpoint

    direct = LoRALinear(128, 64, rank=8, alpha=16, quantize_base=True)
    direct.load_state_dict(state, assign=True)

    renamed = {**state}
    renamed["w"] = renamed.pop("weight")
    m = LoRALinear(128, 64, rank=8, alpha=16, quantize_base=True)
    m.register_load_state_dict_pre_hook(_rename_w_entry)
    m.load_state_dict(renamed, assign=True)  # TypeError now: "it must have dtype float32, bfloat16 or float16; got torch.float64"
    assert isinstance(m.weight, NF4Tensor) and m.weight.dtype == direct.weight.dtype == torch.float32
    torch.testing.assert_close(m.weight.dequantize(), direct.weight.dequantize())


def test_an_entry_that_cannot_be_quantized_leaves_the_nf4_base():
    m = LoRALinear(128, 64, rank=8, alpha=16, quantize_base=True)
    m.register_load_state_dict_pre_hook(_rename_w_entry)
    state = {k: v for k, v in m.state_dict().items() if k != "weight"}
    state["w"] = torch.full((64, 128), float("nan"))
    try:
        m.load_state_dict(state, assign=True)
    except ValueError:
        pass
    assert isinstance(m.weight, NF4Tensor)  # not the dense NaN entry
