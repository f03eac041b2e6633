"""torchtune's state-dict helpers: a LoRA / QLoRA model's state dict, its adapter folded into the
base weights, loads into the model built without LoRA and gives the same outputs."""

from __future__ import annotations

import math
import re

import pytest
import torch

from qlora_ext.models.llama2 import llama2, lora_llama2
from qlora_ext.modules.peft import get_adapter_state_dict, get_merged_lora_ckpt

ARCH = dict(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=32, intermediate_dim=128)


@pytest.mark.parametrize("quantize_base", [False, True], ids=["lora", "qlora"])
def test_merged_state_dict_loads_into_the_plain_model_with_the_same_outputs(quantize_base):
    model = lora_llama2(["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, apply_lora_to_output=True,
                        lora_rank=4, lora_alpha=8.0, quantize_base=quantize_base, **ARCH).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.05)
    tokens = torch.randint(0, ARCH["vocab_size"], (2, 9))
    with torch.no_grad():
        want = model(tokens)
    state = model.state_dict()
    adapter = get_adapter_state_dict(state)
    assert adapter and all(".lora_a." in k or ".lora_b." in k for k in adapter)
    assert len(adapter) == 2 * sum(1 for k in state if k.endswith(".lora_a.weight"))
    merged = get_merged_lora_ckpt(state, rank=4, alpha=8.0)
    assert merged is state and not get_adapter_state_dict(merged)
    plain = llama2(**ARCH).eval()
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        got = plain(tokens)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        # the adapter matters: the base alone is far off
        base = llama2(**ARCH).eval()
        base.load_state_dict({k: v for k, v in model.state_dict().items() if k not in adapter}, strict=True)
        assert (base(tokens) - want).abs().max() > 1e-2 * want.abs().max()


def test_merge_keeps_the_weight_dtype_and_sums_in_float32():
    weight = torch.randn(8, 16, dtype=torch.bfloat16)
    a, b = torch.randn(2, 16), torch.randn(8, 2)
    merged = get_merged_lora_ckpt({"m.weight": weight.clone(), "m.lora_a.weight": a, "m.lora_b.weight": b}, rank=2, alpha=3.0)
    assert list(merged) == ["m.weight"] and merged["m.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["m.weight"], (weight.float() + 1.5 * (b @ a)).to(torch.bfloat16))


@pytest.mark.parametrize(
    "state, rank, alpha, message",
    [
        ({}, 0, 1.0, "argument 'rank' must be an integer > 0; got 0"),
        ({}, True, 1.0, "argument 'rank' must be an integer > 0; got True"),
        ({}, 2, math.nan, "argument 'alpha' must be a finite number; got nan"),
        ({"m.lora_a.weight": torch.zeros(2, 4), "m.lora_b.weight": torch.zeros(3, 2)}, 2, 1.0, "has m.lora_a.weight but no m.weight"),
        ({"m.weight": torch.zeros(3, 4), "m.lora_a.weight": torch.zeros(2, 4)}, 2, 1.0, "has m.lora_a.weight but no m.lora_b.weight"),
        ({"m.weight": torch.zeros(3, 4), "m.lora_a.weight": torch.zeros(2, 4), "m.lora_b.weight": torch.zeros(3, 2)}, 4, 1.0,
         "m: lora_b [3, 2] @ lora_a [2, 4] must be a [3, 4] update of rank 4"),
        ({"m.weight": torch.zeros(3, 4), "m.magnitude": torch.zeros(3)}, 2, 1.0, "holds DoRA magnitudes"),
        ({"m.weight": torch.zeros(3, 4), "m.lora_b.weight": torch.zeros(3, 2)}, 2, 1.0, "has m.lora_b.weight but no m.lora_a.weight"),
        ({"m.weight": torch.zeros(3, 4, dtype=torch.int64), "m.lora_a.weight": torch.ones(2, 4), "m.lora_b.weight": torch.ones(3, 2)},
         2, 1.0, "m.weight must be floating point; got torch.int64"),
    ],
)
def test_bad_input_is_named(state, rank, alpha, message):
    with pytest.raises(ValueError, match=r"get_merged_lora_ckpt: .*" + re.escape(message)):
        get_merged_lora_ckpt(state, rank, alpha)


def test_a_refused_dict_is_left_unmerged():
    # module b's pair is of another rank: nothing is merged, module a's pair included
    state = {"a.weight": torch.zeros(4, 6), "a.lora_a.weight": torch.ones(2, 6), "a.lora_b.weight": torch.ones(4, 2),
             "b.weight": torch.zeros(4, 6), "b.lora_a.weight": torch.ones(3, 6), "b.lora_b.weight": torch.ones(4, 3)}
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(ValueError, match=r"b: lora_b \[4, 3\] @ lora_a \[3, 6\] must be a \[4, 6\] update of rank 2"):
        get_merged_lora_ckpt(state, rank=2, alpha=2.0)
    assert list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in state)


def test_adapter_state_dict_takes_torchtunes_device_argument():
    lora_a, base = torch.randn(2, 4), torch.randn(3, 4)
    state = {"m.weight": base, "m.lora_a.weight": lora_a, "m.lora_b.weight": torch.zeros(3, 2), "n.magnitude": torch.ones(3)}
    adapter = get_adapter_state_dict(state)  # device="cpu", as torchtune's
    assert sorted(adapter) == ["m.lora_a.weight", "m.lora_b.weight", "n.magnitude"]
    assert adapter["m.lora_a.weight"] is lora_a  # already there: not copied, as Tensor.to does
    assert get_adapter_state_dict(state, device=None)["m.lora_a.weight"] is lora_a
    moved = get_adapter_state_dict(state, device="meta")
    assert all(t.device.type == "meta" for t in moved.values())


def test_a_lora_linears_own_state_dict_and_custom_adapter_keys():
    # torchtune's rule: a key holding "lora" is the adapter's, top-level keys included (a bare
    # LoRALinear's state dict has lora_a.weight, merged into its "weight").
    from qlora_ext import LoRALinear

    lin = LoRALinear(8, 6, rank=2, alpha=2.0)
    with torch.no_grad():
        lin.lora_b.weight.normal_()
    state = lin.state_dict()
    assert sorted(get_adapter_state_dict(state)) == ["lora_a.weight", "lora_b.weight"]
    want = lin.weight.detach() + lin.lora_b.weight.detach() @ lin.lora_a.weight.detach()
    merged = get_merged_lora_ckpt(dict(state), rank=2, alpha=2.0)
    assert sorted(merged) == ["weight"] and torch.allclose(merged["weight"], want, atol=1e-6)
    # A custom adapter on torchtune's AdapterModule interface: its parameters and its state-dict
    # entries are the same ones.
    from qlora_ext.modules.peft import AdapterModule, get_adapter_params

    class Adapter(torch.nn.Module, AdapterModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2, 2))
            self.lora_up = torch.nn.Linear(2, 2, bias=False)

        def adapter_params(self):
            return ["lora_up.weight"]

    model = torch.nn.Sequential(Adapter())
    assert list(get_adapter_params(model)) == list(get_adapter_state_dict(model.state_dict())) == ["0.lora_up.weight"]
    assert AdapterModule in type(lin).__mro__ and isinstance(lin, AdapterModule) and isinstance(model[0], AdapterModule)
    assert not isinstance(torch.nn.Linear(2, 2), AdapterModule)


def test_validate_missing_and_unexpected_for_lora():
    # torchtune's recipes load the base and the adapter with strict=False and check the key lists.
    from qlora_ext.modules.peft import get_lora_module_names, validate_missing_and_unexpected_for_lora

    attn = ["q_proj", "v_proj"]
    assert get_lora_module_names(attn, True, True) == ["q_proj", "v_proj", "w1", "w2", "w3", "output"] and attn == ["q_proj", "v_proj"]
    model = lora_llama2(attn, apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0, **ARCH)
    base_missing, base_unexpected = model.load_state_dict(llama2(**ARCH).state_dict(), strict=False)
    adapter = get_adapter_state_dict(model.state_dict())
    lora_missing, lora_unexpected = model.load_state_dict(adapter, strict=False)
    assert base_missing and lora_missing and not base_unexpected and not lora_unexpected
    validate_missing_and_unexpected_for_lora(attn, True, False, base_missing, base_unexpected, lora_missing, lora_unexpected)
    with pytest.raises(AssertionError, match=r"Missing non-LoRA key layers.0.attn.k_proj.weight from base model dict \(the LoRA modules are"):
        validate_missing_and_unexpected_for_lora(attn, True, False, base_missing + ["layers.0.attn.k_proj.weight"])
    with pytest.raises(AssertionError, match=r"Missing LoRA key layers.1.mlp.w2.lora_a.weight from adapter state dict"):
        validate_missing_and_unexpected_for_lora(attn, True, False, lora_missing=lora_missing + ["layers.1.mlp.w2.lora_a.weight"])
    with pytest.raises(AssertionError, match=r"Missing LoRA key layers.0.attn.q_proj.magnitude from adapter state dict"):
        validate_missing_and_unexpected_for_lora(attn, True, False, lora_missing=["layers.0.attn.q_proj.magnitude"])  # DoRA's
    with pytest.raises(AssertionError, match=r"Unexpected key loading adapter: \['extra'\] are not the model's"):
        validate_missing_and_unexpected_for_lora(attn, True, False, lora_unexpected=["extra"])
    with pytest.raises(AssertionError, match=r"Unexpected key loading base model: \['extra'\] are not the model's"):
        validate_missing_and_unexpected_for_lora(attn, True, False, base_unexpected=["extra"])
