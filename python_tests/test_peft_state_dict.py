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
