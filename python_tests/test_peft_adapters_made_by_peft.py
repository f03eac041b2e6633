"""PEFT LoRA adapters as users make them (LoraConfig variants, MHA and GQA): our loaders give PEFT's
logits or refuse naming the setting; and adapters we save give our logits in PEFT."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from llama_helpers import hf_llama, rel_error, transformers

from qlora_ext.checkpoint import load_peft_adapter, read_adapter_config, save_hf_checkpoint, save_peft_adapter
from qlora_ext.models.llama2 import llama2_from_checkpoint, lora_llama2

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QV = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
# LoraConfig -> None (loads with PEFT's logits) or a regex the refusal must match (the setting, named).
VARIANTS = {
    "list_r16_a32": (dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]), None),
    "alpha_float_k_o": (dict(r=4, lora_alpha=7.5, target_modules=["k_proj", "o_proj"]), None),
    "all_linear": (dict(r=4, lora_alpha=16, target_modules="all-linear"), None),
    "module_paths": (dict(r=4, lora_alpha=8, target_modules=["self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]), None),
    "lm_head": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]), None),
    "regex": (dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj)"), r"'target_modules' must be a list .* got the pattern"),
    "rank_pattern": (dict(QV, rank_pattern={"q_proj": 8}), r"'rank_pattern' must be empty, got \{'q_proj': 8\}"),
    "alpha_pattern": (dict(QV, alpha_pattern={"v_proj": 32}), r"'alpha_pattern' must be empty, got \{'v_proj': 32\}"),
    "rank_and_alpha_patterns_equal_to_their_defaults": (dict(QV, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 8}), None),
    "rank_pattern_one_differs": (dict(QV, rank_pattern={"q_proj": 4, "v_proj": 8}), r"'rank_pattern' must be empty, got \{'v_proj': 8\}"),
    "rslora": (dict(QV, use_rslora=True), r"'use_rslora' must be False, got True"),
    "dora": (dict(QV, use_dora=True), r"'use_dora' must be False, got True"),
    "lora_bias": (dict(QV, lora_bias=True), r"'lora_bias' must be False, got True"),
    "bias_all": (dict(QV, bias="all"), None),
    "bias_lora_only": (dict(QV, bias="lora_only"), None),
    "modules_to_save_lm_head": (dict(QV, modules_to_save=["lm_head"]), r"'modules_to_save' must be empty, got \['lm_head'\]"),
    "modules_to_save_embed": (dict(QV, modules_to_save=["embed_tokens"]), r"'modules_to_save' must be empty, got \['embed_tokens'\]"),
    "embed_target": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]), r"'target_modules' may only hold .* got \['embed_tokens'\]"),
    "fan_in_fan_out": (dict(QV, fan_in_fan_out=True), None),  # PEFT turns it off for nn.Linear and saves False
    "layers_some": (dict(QV, layers_to_transform=[0]), r"LoRA in some layers only"),
    "layers_all": (dict(QV, layers_to_transform=[0, 1], layers_pattern="layers"), None),
    "dropout": (dict(QV, lora_dropout=0.3), None),
    "init_gaussian": (dict(QV, init_lora_weights="gaussian"), None),
    "init_false": (dict(QV, init_lora_weights=False), None),
    "init_orthogonal": (dict(QV, init_lora_weights="orthogonal"), None),
    "init_pissa": (dict(QV, init_lora_weights="pissa"), r"'init_lora_weights' must be one of .* got 'pissa'"),
    "init_olora": (dict(QV, init_lora_weights="olora"), r"got 'olora'"),
    "task_none": (dict(QV, task_type=None), None),
    "task_feature_extraction": (dict(QV, task_type="FEATURE_EXTRACTION"), None),
    "exclude_modules": (dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["down_proj"]), r"'exclude_modules' must be empty"),
    "trainable_tokens": (dict(QV, trainable_token_indices=[3, 5]), r"'trainable_token_indices' must be empty, got \[3, 5\]"),
}


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def base_dir(request, tmp_path_factory):
    transformers()
    folder = tmp_path_factory.mktemp(f"base_kv{request.param}")
    hf_llama(num_kv_heads=request.param, seed=21).save_pretrained(folder)
    return str(folder)


def _peft_adapter(base_dir, folder, config_kwargs, **save_kwargs):
    """A PEFT adapter made with ``LoraConfig(**config_kwargs)``, every adapter tensor moved off its
    initialization (so that each one matters), saved; returns the PeftModel (eval)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(transformers().LlamaForCausalLM.from_pretrained(base_dir), peft.LoraConfig(**config_kwargs))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:  # lora_A / lora_B, DoRA magnitudes, modules_to_save copies, trainable tokens
                    p.add_(0.05 * torch.randn_like(p))
        model.eval().save_pretrained(folder, **save_kwargs)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_made_adapters_give_peft_logits_or_are_refused_by_name(base_dir, tmp_path, variant):
    config_kwargs, refusal = VARIANTS[variant]
    peft_model = _peft_adapter(base_dir, tmp_path, config_kwargs)
    tokens = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        want = peft_model(tokens).logits
        with peft_model.disable_adapter():
            assert rel_error(peft_model(tokens).logits, want) > 1e-2  # the adapter matters

    def built_then_loaded():  # the other public path: a model built from read_adapter_config, then load_peft_adapter
        from qlora_ext.checkpoint import load_checkpoint, read_checkpoint_config

        with torch.device("meta"):
            model = lora_llama2(**read_adapter_config(tmp_path), **read_checkpoint_config(base_dir).builder_kwargs())
        load_checkpoint(model, base_dir)
        load_peft_adapter(model, tmp_path)
        return model.eval()

    for load in (lambda: llama2_from_checkpoint(base_dir, adapter_dir=tmp_path), built_then_loaded):
        if refusal is None:
            with torch.no_grad():
                assert rel_error(load()(tokens), want) <= 1e-5
        else:
            with pytest.raises(ValueError, match=refusal):
                load()


@pytest.mark.parametrize("attn, mlp, output, rank, alpha", [
    (["q_proj"], False, False, 1, 1.0),
    (["k_proj"], False, False, 4, 8.0),
    (["v_proj"], False, False, 8, 3.0),
    (["output_proj"], False, False, 2, 64.0),
    ([], True, False, 4, 7.5),
    ([], False, True, 4, 16.0),
    (["q_proj", "k_proj", "v_proj", "output_proj"], True, True, 16, 32.0),
])
@pytest.mark.parametrize("quantize_base", [False, True], ids=["lora", "qlora"])
def test_our_adapters_give_our_logits_in_peft(base_dir, tmp_path, attn, mlp, output, rank, alpha, quantize_base):
    peft = pytest.importorskip("peft")
    model = llama2_from_checkpoint(base_dir, attn, mlp, output, lora_rank=rank, lora_alpha=alpha, quantize_base=quantize_base).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    tokens = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        ours = model(tokens)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=base_dir)
    hf_base = base_dir
    if quantize_base:  # PEFT on the base our model computes with (its NF4 weights dequantized)
        save_hf_checkpoint(model, tmp_path / "base", merge_adapters=False)
        hf_base = tmp_path / "base"
    peft_model = peft.PeftModel.from_pretrained(transformers().LlamaForCausalLM.from_pretrained(hf_base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert rel_error(ours, peft_model(tokens).logits) <= 1e-5


# -- files PEFT reads otherwise, or not at all ------------------------------------------------------


def test_two_tensors_for_one_lora_weight_are_refused(base_dir, tmp_path):
    # a file holding a second adapter's tensors beside the first's (keys lora_A.weight and
    # lora_A.<name>.weight, as a PeftModel's own state_dict names them) must not load either silently.
    from safetensors.torch import load_file, save_file

    _peft_adapter(base_dir, tmp_path, dict(r=4, target_modules=["q_proj"]))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors.update({k.replace(".weight", ".zz.weight"): torch.zeros_like(v) for k, v in list(tensors.items())})
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"lora_A\.weight.*lora_A\.zz\.weight|lora_A\.zz\.weight.*lora_A\.weight"):
        llama2_from_checkpoint(base_dir, adapter_dir=tmp_path)


def test_a_bin_adapter_of_another_rank_is_named_before_the_model_is_built(base_dir, tmp_path):
    # as for adapter_model.safetensors (check_adapter_rank), an adapter_model.bin whose lora_A
    # weights are not of adapter_config.json's 'r' is named as such, before a model of that rank is built.
    import qlora_ext.models.llama2._from_checkpoint as from_checkpoint

    _peft_adapter(base_dir, tmp_path, dict(r=4, target_modules=["q_proj"]), safe_serialization=False)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 64}))

    def no_build(*args, **kwargs):
        raise AssertionError("a model of the config's rank was built before the weights' rank was checked")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(from_checkpoint, "lora_llama2", no_build)
        with pytest.raises(ValueError, match=r"adapter_config.json gives 'r' 64, but .* lora_A weights .* have another rank"):
            llama2_from_checkpoint(base_dir, adapter_dir=tmp_path)


@pytest.mark.parametrize("targets", [["q_proj"], ["q_proj", "lm_head"]], ids=["q", "q_lm_head"])
def test_an_adapter_with_resized_embeddings_says_so(base_dir, tmp_path, targets):
    # PEFT saves the embeddings of a model whose vocabulary was extended (added pad/chat tokens);
    # the refusal should say that, not that the adapter belongs to another base model (with lm_head
    # targeted, its lora_B is [322, r] too).
    peft = pytest.importorskip("peft")
    hf = transformers().LlamaForCausalLM.from_pretrained(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.resize_token_embeddings(322)
        peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=targets)).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        llama2_from_checkpoint(base_dir, adapter_dir=tmp_path)
    message = str(err.value)
    assert "weight: adapter [322, 256] vs model [320, 256]" in message  # (embed_tokens' or, targeted, lm_head's base_layer)
    assert "another base model" not in message and re.search(r"vocabulary|resized|added tokens", message), message


def test_an_empty_adapter_bin_says_why_it_cannot_be_read(base_dir, tmp_path):
    # (an EOFError has no text: the message ended in "cannot be read as a torch state dict: ")
    _peft_adapter(base_dir, tmp_path, dict(r=4, target_modules=["q_proj"]), safe_serialization=False)
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"adapter_model.bin cannot be read as a torch state dict: it is empty$"):
        llama2_from_checkpoint(base_dir, adapter_dir=tmp_path)
