"""Checkpoint values beyond the model's dtype (1e6 in float32 loaded as float16) are refused by name,
whatever carries them (dense entries, bitsandbytes NF4 storage, PEFT adapters); NaN and Inf are named as such."""

from __future__ import annotations

import pytest
import torch
from llama_helpers import hf_llama, lora_llama_with_adapter

from qlora_ext.checkpoint import save_hf_checkpoint, save_peft_adapter
from qlora_ext.checkpoint.load import refuse_beyond_range
from qlora_ext.models.llama2 import llama2_from_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    hf_llama().save_pretrained(folder)
    return folder


def test_inf_into_an_nf4_base_is_named_as_inf_not_as_a_range(tmp_path):
    # an inf is no value beyond a dtype's range: "load the model in a wider dtype" would not help
    model = hf_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"to_nf4: argument 'tensor' must hold only finite values .*the first inf at index \[0, 0\]"):
        llama2_from_checkpoint(tmp_path, ["q_proj"], quantize_base=True, dtype=torch.bfloat16)


def test_an_adapter_value_beyond_float16_is_refused_as_a_checkpoint_value_is(base, tmp_path):
    # a PEFT adapter's 1e5 loaded into float16 as inf
    from safetensors.torch import load_file, save_file

    save_peft_adapter(lora_llama_with_adapter(base), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = 1e5
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="beyond the range of float16"):
        llama2_from_checkpoint(base, adapter_dir=tmp_path, dtype=torch.float16)


def test_a_bitsandbytes_weight_beyond_float16_is_refused_for_a_dense_float16_model(tmp_path):
    # NF4 storage whose block absmax is beyond float16, dequantized into a dense float16 weight, was inf
    model = hf_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 1e5
    model.save_pretrained(tmp_path / "src")
    save_hf_checkpoint(llama2_from_checkpoint(tmp_path / "src"), tmp_path / "bnb", bnb_4bit=True, merge_adapters=False,
                       dtype=torch.float32)
    with pytest.raises(ValueError, match="beyond the range of float16"):
        llama2_from_checkpoint(tmp_path / "bnb", dtype=torch.float16)


def test_a_negative_value_beyond_the_dtype_is_named_with_its_sign():
    # -65520 is -inf in float16; the message said "it holds 65520"
    with pytest.raises(ValueError, match=r"it holds -65520\b"):
        refuse_beyond_range(torch.tensor([1.0, -65520.0, 3.0]), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_finiteness_check_sees_a_bad_value_in_any_slice(dtype, bad):
    from qlora_ext.checkpoint.load import _all_finite

    for where in (0, 99, 100, 250, 1023):  # the first and last element of a slice, and the last slice's end
        tensor = torch.randn(1024, dtype=dtype)
        assert _all_finite(tensor, chunk=100)
        tensor[where] = bad
        assert not _all_finite(tensor, chunk=100), where
        assert not _all_finite(tensor.view(32, 32).t(), chunk=100), where  # (a strided view)
