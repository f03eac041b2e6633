"""torchtune 0.6.1 public API behaviour that torchtune users' code relies on: get_adapter_params refusing a
name it cannot find, lora_attn_modules as any sequence (omegaconf's ListConfig), the state-dict hook called and
imported as torchtune's, a torchao NF4Tensor entry loaded into an NF4 base (helper-152)."""

from __future__ import annotations

import collections.abc

import pytest
import torch
from conftest import torchao_nf4
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from qlora_ext.models.llama2 import lora_llama2
from qlora_ext.modules.peft import AdapterModule, LoRALinear, get_adapter_params
from qlora_ext.nf4 import reparametrize_as_dtype_state_dict_post_hook, to_nf4

TINY = dict(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=64, max_seq_len=16, intermediate_dim=128,
            lora_rank=4, lora_alpha=8.0)


# -- get_adapter_params: a name adapter_params() lists that the module lacks -------------------------

class _TypoAdapter(nn.Module, AdapterModule):
    def __init__(self):
        super().__init__()
        self.lora_up = nn.Linear(8, 2, bias=False)
        self.lora_down = nn.Linear(2, 8, bias=False)

    def adapter_params(self):
        return ["lora_up.weight", "lora_dwon.weight"]  # the second is never found


def test_get_adapter_params_refuses_a_listed_name_the_module_lacks():
    # torchtune: AssertionError "Adapter params ['lora_dwon.weight'] not converted"; silently
    # dropping it leaves lora_down frozen after set_trainable_params.
    with pytest.raises(AssertionError, match="lora_dwon.weight"):
        get_adapter_params(nn.Sequential(_TypoAdapter()))


def test_get_adapter_params_does_not_silently_drop_a_parametrized_lora_a():
    lin = LoRALinear(16, 16, rank=4, alpha=8)
    weight_norm(lin.lora_a)  # lora_a.weight is now lora_a.parametrizations.weight.original0/1
    with pytest.raises(AssertionError, match="lora_a.weight"):
        get_adapter_params(nn.Sequential(lin))


# -- lora_llama2: lora_attn_modules as any sequence of str (its annotation), as torchtune takes ----

class _Seq(collections.abc.Sequence):  # what omegaconf's ListConfig is: a Sequence, not a list
    def __init__(self, items):
        self._items = list(items)

    def __getitem__(self, i):
        return self._items[i]

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        return repr(self._items)


def test_lora_llama2_takes_a_non_list_sequence():
    m = lora_llama2(_Seq(["q_proj", "v_proj"]), **TINY)
    assert isinstance(m.layers[0].attn.q_proj, LoRALinear) and isinstance(m.layers[0].attn.v_proj, LoRALinear)
    assert not isinstance(m.layers[0].attn.k_proj, LoRALinear)


def test_lora_llama2_takes_an_omegaconf_listconfig():
    omegaconf = pytest.importorskip("omegaconf")
    modules = omegaconf.OmegaConf.create({"m": ["q_proj", "v_proj"]}).m
    m = lora_llama2(modules, **TINY)
    assert isinstance(m.layers[0].attn.v_proj, LoRALinear)


def test_lora_llama2_refusal_names_the_type():
    with pytest.raises(ValueError, match="lora_attn_modules.*dict"):
        lora_llama2({"q_proj": 1}, **TINY)


# -- reparametrize_as_dtype_state_dict_post_hook: torchtune's call -------------------------------

def test_reparametrize_hook_called_as_torchtune_documents():
    lin = nn.Linear(128, 128, bias=False)
    lin.weight = nn.Parameter(to_nf4(lin.weight.detach()), requires_grad=False)
    sd = lin.state_dict()
    # torchtune: reparametrize_as_dtype_state_dict_post_hook(model, state_dict, *args, dtype=, offload_to_cpu=)
    reparametrize_as_dtype_state_dict_post_hook(lin, sd, dtype=torch.bfloat16, offload_to_cpu=True)
    assert type(sd["weight"]) is torch.Tensor and sd["weight"].dtype == torch.bfloat16


def test_reparametrize_hook_exported_where_torchtune_has_it():
    import qlora_ext.modules as modules
    import qlora_ext.modules.peft as peft
    assert modules.reparametrize_as_dtype_state_dict_post_hook is reparametrize_as_dtype_state_dict_post_hook
    assert set(peft.LORA_ATTN_MODULES) == {"q_proj", "k_proj", "v_proj", "output_proj"}


# -- a torchao NF4Tensor entry loaded into an NF4 base --------------------------------------------

def test_load_torchao_nf4_entry_into_nf4_base():
    nf4tensor = torchao_nf4()  # (it moved: torchao 0.18 has no torchao.dtypes.nf4tensor)
    torch.manual_seed(0)
    w = torch.randn(128, 128)
    tao = nf4tensor.to_nf4(w)
    lin = LoRALinear(128, 128, rank=4, alpha=8, quantize_base=True)
    sd = {**lin.state_dict(), "weight": tao}  # what a torchtune LoRALinear(quantize_base=True).state_dict() holds
    lin.load_state_dict(sd)
    # quantized again from torchao's dequantized values, as a dense entry of them would be
    assert torch.equal(lin.weight.dequantize(), to_nf4(tao.get_original_weight()).dequantize())


def test_torchao_nf4_entry_loads_with_assign_too():
    ao = torchao_nf4()
    torch.manual_seed(0)
    tao = ao.to_nf4(torch.randn(128, 128))
    lin = LoRALinear(128, 128, rank=4, alpha=8, quantize_base=True)
    lin.load_state_dict({**lin.state_dict(), "weight": tao}, assign=True)  # NotImplementedError from torchao's dispatch
    assert torch.equal(lin.weight.dequantize(), to_nf4(tao.get_original_weight()).dequantize())


def test_get_adapter_params_of_a_compiled_lora_linear():
    lin = LoRALinear(8, 8, rank=2, alpha=4)
    model = torch.nn.Sequential(torch.compile(lin, backend="eager"), torch.nn.Linear(8, 8))
    # before 59f29fd: {'0._orig_mod.lora_a.weight', ...}; now an AssertionError blaming a typo
    params = get_adapter_params(model)
    assert sorted(params) == ["0._orig_mod.lora_a.weight", "0._orig_mod.lora_b.weight"]
    assert params["0._orig_mod.lora_a.weight"] is lin.lora_a.weight
    assert sorted(get_adapter_params(torch.compile(lin, backend="eager"))) == ["_orig_mod.lora_a.weight", "_orig_mod.lora_b.weight"]


