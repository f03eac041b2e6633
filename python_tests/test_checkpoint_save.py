"""Checkpoints out: PEFT adapters that HF PEFT loads onto LlamaForCausalLM with our logits, merged
HF checkpoints (single and sharded) that transformers loads with our logits, and atomic writes
(a crash mid-save leaves the previous checkpoint byte-for-byte intact, no temporaries)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings

import pytest
import torch
from llama_helpers import TouchesWhenUnpickled, hf_llama, rel_error, transformers

from qlora_ext import LoRALinear, NF4Tensor, to_nf4
from qlora_ext.checkpoint import (
    StagedFiles,
    atomic_path,
    load_checkpoint,
    load_peft_adapter,
    read_adapter_config,
    save_hf_checkpoint,
    save_meta_checkpoint,
    save_peft_adapter,
)
from qlora_ext.checkpoint.config import Llama2Config
from qlora_ext.models.llama2 import llama2, llama2_from_checkpoint

ALL_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    transformers()
    folder = tmp_path_factory.mktemp("base")
    hf_llama(num_kv_heads=2, seed=21).save_pretrained(folder)
    return str(folder)


def _trained(base_dir, quantize_base=False, attn=("q_proj", "v_proj", "output_proj"), mlp=True, output=True):
    model = llama2_from_checkpoint(base_dir, list(attn), mlp, output, lora_rank=4, lora_alpha=8, quantize_base=quantize_base).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.05)  # as if trained: the adapter changes the output
    return model


def _hf(folder):
    return transformers().LlamaForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("quantize_base", [False, True], ids=["lora", "qlora"])
def test_peft_loads_our_adapter_with_our_logits(base_dir, tmp_path, quantize_base):
    peft = pytest.importorskip("peft")
    model = _trained(base_dir, quantize_base=quantize_base)
    paths = save_peft_adapter(model, tmp_path, base_model_name_or_path=base_dir)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert paths == [str(tmp_path / "adapter_model.safetensors"), str(tmp_path / "adapter_config.json")]
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight" in keys
    assert "base_model.model.lm_head.lora_A.weight" in keys
    hf_base = base_dir
    if quantize_base:
        # HF's base must hold the same weights as ours: the NF4 weights, dequantized.
        hf_base = str(tmp_path / "dequantized_base")
        save_hf_checkpoint(model, hf_base, merge_adapters=False)
    peft_model = peft.PeftModel.from_pretrained(_hf(hf_base), str(tmp_path)).eval()
    tokens = torch.randint(0, 320, (2, 13))
    with torch.no_grad():
        want = peft_model(tokens).logits
        assert rel_error(model(tokens), want) <= 1e-5
        # The adapter matters: the base model alone is far from it.
        with peft_model.disable_adapter():
            assert rel_error(peft_model(tokens).logits, want) > 1e-2


def test_adapter_round_trip_and_config(base_dir, tmp_path):
    model = _trained(base_dir, quantize_base=True)
    save_peft_adapter(model, tmp_path)
    config = read_adapter_config(tmp_path)
    assert config == dict(
        lora_attn_modules=["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, apply_lora_to_output=True,
        lora_rank=4, lora_alpha=8, lora_dropout=0.0,
    )
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["target_modules"] == ["down_proj", "gate_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert raw["peft_type"] == "LORA" and raw["r"] == 4 and raw["lora_alpha"] == 8
    again = llama2_from_checkpoint(base_dir, adapter_dir=tmp_path, quantize_base=True).eval()
    tokens = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))
    # Wrong rank: named.
    other = _trained(base_dir, attn=("q_proj", "v_proj", "output_proj"))
    for m in other.modules():
        if hasattr(m, "lora_a"):
            m.alpha = 4
    with pytest.raises(ValueError, match=r"rank/alpha differ: \['model.layers.0.self_attn.q_proj: adapter \(r=4, alpha=8\) vs model \(r=4, alpha=4\)'"):
        load_peft_adapter(other, tmp_path)
    # Missing modules: listed.
    fewer = _trained(base_dir, attn=("q_proj", "k_proj", "v_proj", "output_proj"))
    with pytest.raises(ValueError, match=r"missing: \['base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight'"):
        load_peft_adapter(fewer, tmp_path)
    # An adapter of a base model of another size: said so; its weights are listed as of the wrong
    # shape, not also as missing.
    narrower = tmp_path / "narrower"
    hf_llama(num_kv_heads=2, seed=21, hidden_size=128).save_pretrained(narrower)
    with pytest.raises(ValueError) as refused:
        llama2_from_checkpoint(str(narrower), adapter_dir=tmp_path)
    message = str(refused.value)
    assert re.search(r"does not fit the model: its weights have the shapes of another base model \(an adapter fits the model it "
                     r"was trained on; its adapter_config.json's base_model_name_or_path may name it\); wrong shapes: \[.*\]$", message), message
    assert "missing" not in message and "self_attn.q_proj.lora_A.weight: adapter [4, 256] vs model [4, 128]" in message
    # Weights that are integers or hold NaN are named, before any is loaded (an int32 one was copied in).
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "adapter_model.safetensors")
    a_key, b_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    bad = {**weights, a_key: weights[a_key].to(torch.int32), b_key: weights[b_key].clone().fill_(float("nan"))}
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    shutil.copy(tmp_path / "adapter_config.json", damaged / "adapter_config.json")
    save_file(bad, damaged / "adapter_model.safetensors")
    before = {k: v.clone() for k, v in again.state_dict().items()}
    with pytest.raises(ValueError, match=rf"not floating point: \['{a_key}: torch.int32'\]; holding NaN or Inf: \['{b_key}'\]$"):
        load_peft_adapter(again, damaged)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in before.items())
    # A damaged rank in adapter_config.json is named from the weights' shapes before a model of that rank is built.
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (damaged / "adapter_config.json").write_text(json.dumps({**config, "r": 1_000_000}))
    save_file(weights, damaged / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: adapter_config.json gives 'r' 1000000, but 13 lora_A weights "
                                         r"\(of shape \[r, in\]\) have another rank: \['base_model.model.*: \[4, 256\]'.*\] and 8 more$"):
        llama2_from_checkpoint(base_dir, adapter_dir=damaged, quantize_base=True)


def test_adapter_round_trip_needs_no_numpy(tmp_path):
    """numpy is no dependency of ours: an adapter is written and read back in a process where it
    cannot be imported (safetensors' own save_file imports it; ours streams the bytes)."""
    script = f"""
import sys
sys.modules["numpy"] = None  # import numpy raises ImportError
import torch
from qlora_ext.checkpoint import load_peft_adapter, save_peft_adapter
from qlora_ext.models.llama2 import qlora_llama2_tiny
torch.manual_seed(0)
model = qlora_llama2_tiny(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True)
for name, p in model.named_parameters():
    if "lora_b" in name:
        torch.nn.init.normal_(p)
save_peft_adapter(model, {str(tmp_path)!r})
again = qlora_llama2_tiny(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True)
load_peft_adapter(again, {str(tmp_path)!r})
ours, theirs = dict(model.named_parameters()), dict(again.named_parameters())
assert all(torch.equal(p, theirs[n]) for n, p in ours.items() if "lora_" in n)
print("ok", sum("lora_" in n for n in ours))
"""
    import qlora_ext

    home = os.path.dirname(os.path.dirname(qlora_ext.__file__))  # the child imports the qlora_ext this test does
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (home, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.startswith("ok "), done.stdout + done.stderr


def test_adapter_config_records_dropout_task_and_base(base_dir, tmp_path):
    model = llama2_from_checkpoint(base_dir, ["q_proj", "v_proj"], lora_rank=2, lora_alpha=4, lora_dropout=0.1)
    save_peft_adapter(model, tmp_path, base_model_name_or_path=base_dir)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["lora_dropout"] == 0.1 and raw["r"] == 2 and raw["lora_alpha"] == 4
    assert raw["task_type"] == "CAUSAL_LM" and raw["base_model_name_or_path"] == base_dir
    assert raw["target_modules"] == ["q_proj", "v_proj"] and raw["bias"] == "none"
    assert read_adapter_config(tmp_path)["lora_dropout"] == 0.1
    # A path is recorded as its string; anything else is refused before a folder is made.
    from pathlib import Path

    save_peft_adapter(model, tmp_path / "as_path", base_model_name_or_path=Path(base_dir))
    assert json.loads((tmp_path / "as_path" / "adapter_config.json").read_text())["base_model_name_or_path"] == base_dir
    with pytest.raises(ValueError, match=r"argument 'base_model_name_or_path' must be a str, a path or None; got int"):
        save_peft_adapter(model, tmp_path / "refused", base_model_name_or_path=7)
    assert not (tmp_path / "refused").exists()


def test_unsupported_adapter_configs(tmp_path):
    def write(**fields):
        base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
        (tmp_path / "adapter_config.json").write_text(json.dumps({**base, **fields}))

    write(target_modules=["q_proj", "gate_proj"])
    with pytest.raises(ValueError, match=r"'target_modules' must name all of \['gate_proj', 'up_proj', 'down_proj'\] or none, got \['gate_proj'\]"):
        read_adapter_config(tmp_path)
    write(use_dora=True, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ValueError) as err:
        read_adapter_config(tmp_path)
    assert "'use_dora' must be False, got True" in str(err.value) and "got ['embed_tokens']" in str(err.value)
    # Initializations that change the base weights, LoRA variants and settings unknown here are refused by name;
    # PEFT's defaults for r and lora_alpha (8) apply where the keys are absent.
    for fields, needle in [
        ({"init_lora_weights": "pissa"}, "'init_lora_weights' must be one of [True, False, 'gaussian', 'eva', 'orthogonal'], got 'pissa'"),
        ({"init_lora_weights": "olora"}, "got 'olora'"),
        ({"alora_invocation_tokens": [5, 6]}, "'alora_invocation_tokens' must be empty, got [5, 6]"),
        ({"kasa_config": {"beta": 1e-4}}, "'kasa_config' must be empty, got {'beta': 0.0001}"),
        ({"a_future_variant": True}, "'a_future_variant' must be empty, got True (a setting this loader does not implement)"),
        ({"r": None}, "'r' must be a positive integer, got None"),
        ({"lora_alpha": "16"}, "'lora_alpha' must be a finite number, got '16'"),
        ({"lora_dropout": None}, "'lora_dropout' must be a number in [0, 1), got None"),
        ({"lora_dropout": 1.5}, "'lora_dropout' must be a number in [0, 1), got 1.5"),
        ({"bias": "some"}, "'bias' must be one of ['none', 'all', 'lora_only'], got 'some'"),
        ({"layers_to_transform": "0"}, "'layers_to_transform' must be a layer index or a list of them, got '0'"),
    ]:
        write(**fields)
        with pytest.raises(ValueError) as err:
            read_adapter_config(tmp_path)
        assert needle in str(err.value)
    for init in (True, False, "gaussian", "eva", "orthogonal"):
        write(init_lora_weights=init, loftq_config={}, kasa_config=None, megatron_core="megatron.core", qalora_group_size=16)
        assert read_adapter_config(tmp_path)["lora_rank"] == 8
    # Llama has no biases (PEFT saves none for bias "all" / "lora_only"); the layers an adapter covers
    # are checked by load_peft_adapter, which sees the model's
    for fields in ({"bias": "all"}, {"bias": "lora_only"}, {"layers_to_transform": [0, 1], "layers_pattern": "layers"}, {"layers_to_transform": 0}):
        write(**fields)
        assert read_adapter_config(tmp_path)["lora_attn_modules"] == ["q_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    assert (read_adapter_config(tmp_path)["lora_rank"], read_adapter_config(tmp_path)["lora_alpha"]) == (8, 8)
    with pytest.raises(FileNotFoundError, match=r"argument 'adapter_dir' must hold adapter_config.json"):
        read_adapter_config(tmp_path / "nowhere")
    # A trainer checkpoint folder, whose adapter is in its adapter/ subfolder: the error points there.
    (tmp_path / "epoch_0" / "adapter").mkdir(parents=True)
    (tmp_path / "adapter_config.json").rename(tmp_path / "epoch_0" / "adapter" / "adapter_config.json")
    with pytest.raises(FileNotFoundError) as err:
        read_adapter_config(tmp_path / "epoch_0")
    assert (f"its subfolder '{tmp_path / 'epoch_0' / 'adapter'}' holds one (a training checkpoint keeps its adapter there, and "
            "PEFT saves an adapter with a name other than 'default' in a subfolder of that name)") in str(err.value)


def _rewrite_adapter(folder, config_changes=None, edit=None):
    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if edit is not None:
        tensors = load_file(folder / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def test_adapters_in_the_forms_peft_writes(base_dir, tmp_path):
    # Written as PEFT writes them (keys base_model.model.<path>.lora_A.weight, adapter_config.json):
    # target_modules "all-linear", or full module paths (what PEFT saves for "all-linear"), and the
    # lm_head base weight PEFT saves when lm_head is targeted.
    tokens = torch.randint(0, 320, (2, 9))
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    paths = [f"model.layers.{i}.{'mlp' if t in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{t}" for i in range(2) for t in linears]
    model = _trained(base_dir, attn=ALL_ATTN, output=False)
    with torch.no_grad():
        want = model(tokens)
    for i, targets in enumerate(["all-linear", "ALL-LINEAR", paths, [f"self_attn.{t}" for t in linears[:4]] + [f"mlp.{t}" for t in linears[4:]]]):
        folder = tmp_path / f"linear{i}"
        save_peft_adapter(model, folder)
        _rewrite_adapter(folder, {"target_modules": targets})
        assert read_adapter_config(folder) == dict(
            lora_attn_modules=ALL_ATTN, apply_lora_to_mlp=True, apply_lora_to_output=False, lora_rank=4, lora_alpha=8, lora_dropout=0.0,
        ), targets
        again = llama2_from_checkpoint(base_dir, adapter_dir=folder).eval()
        with torch.no_grad():
            assert torch.equal(again(tokens), want), targets

    # lm_head targeted: PEFT also writes lm_head.base_layer.weight (the full output weight) and
    # loads it into the model; so do we.
    model = _trained(base_dir, attn=("q_proj",), mlp=False, output=True)
    folder = tmp_path / "lm_head"
    save_peft_adapter(model, folder)
    new_head = model.output.weight.detach() * 2

    def add_base_layer(tensors):
        tensors["base_model.model.lm_head.base_layer.weight"] = new_head.clone()

    _rewrite_adapter(folder, {"target_modules": ["q_proj", "lm_head"]}, add_base_layer)
    for quantize_base in (False, True):
        again = llama2_from_checkpoint(base_dir, adapter_dir=folder, quantize_base=quantize_base)
        head = again.output.weight
        if quantize_base:  # quantized on arrival, as a base checkpoint's weight is
            assert isinstance(head, NF4Tensor) and all(torch.equal(a, b) for a, b in zip(head.components(), to_nf4(new_head).components()))
        else:
            assert torch.equal(head, new_head)
        assert torch.equal(again.output.lora_b.weight, model.output.lora_b.weight)

    # Refused: a regex pattern, a path that names no linear, LoRA on some layers only, and a
    # base weight of the wrong shape.
    folder = tmp_path / "refused"
    save_peft_adapter(_trained(base_dir, attn=("q_proj",), mlp=False, output=False), folder)
    _rewrite_adapter(folder, {"target_modules": r".*\.q_proj"})
    with pytest.raises(ValueError, match=r"'target_modules' must be a list of module names or 'all-linear', got the pattern '\.\*\\\\.q_proj'"):
        read_adapter_config(folder)
    _rewrite_adapter(folder, {"target_modules": "lm_head"})
    with pytest.raises(ValueError, match=r"got the pattern 'lm_head'$"):  # one problem, said once
        read_adapter_config(folder)
    for wrong in ([1, "q_proj"], ["q_proj", None], 5, [["q_proj"]], True):
        _rewrite_adapter(folder, {"target_modules": wrong})
        with pytest.raises(ValueError, match=r"'target_modules' must be a list of module names \(strings\) or 'all-linear', "
                                             rf"got {re.escape(repr(wrong))}$"):
            read_adapter_config(folder)
    _rewrite_adapter(folder, {"target_modules": ["q_proj", "model.layers.3.self_attn", "layers.0.input_layernorm", "model.embed_tokens", "5.self_attn", "12.mlp"]})
    with pytest.raises(ValueError, match=r"got \['12.mlp', '5.self_attn', 'layers.0.input_layernorm', 'model.embed_tokens', 'model.layers.3.self_attn'\]"):
        read_adapter_config(folder)
    # Names no Llama module has (another architecture's, or a path that is not Llama's) are
    # skipped as PEFT skips them, unless nothing else matches.
    _rewrite_adapter(folder, {"target_modules": ["q_proj", "query_key_value", "c_attn", "model.layers.0.q_proj"]})
    assert read_adapter_config(folder)["lora_attn_modules"] == ["q_proj"]
    _rewrite_adapter(folder, {"target_modules": ["query_key_value", "model.layers.0.q_proj"]})
    with pytest.raises(ValueError, match=r"'target_modules' must match a linear of a Llama model, got \['query_key_value', 'model.layers.0.q_proj'\]"):
        read_adapter_config(folder)
    _rewrite_adapter(folder, {"target_modules": ["model.layers.0.self_attn.q_proj"]}, lambda t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"))
    assert read_adapter_config(folder)["lora_attn_modules"] == ["q_proj"]
    with pytest.raises(ValueError, match=r"missing: \['base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight'\]"):
        llama2_from_checkpoint(base_dir, adapter_dir=folder)
    # LoRA in some layers only (layers_to_transform, or layer paths as target_modules): said so;
    # layers_to_transform naming every layer is plain LoRA
    save_peft_adapter(_trained(base_dir, attn=("q_proj", "v_proj"), mlp=False, output=False), folder)
    model_1 = llama2_from_checkpoint(base_dir, adapter_dir=folder)
    _rewrite_adapter(folder, {"layers_to_transform": [1, 0]})
    again = llama2_from_checkpoint(base_dir, adapter_dir=folder)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model_1.parameters()))

    def layer_0_only(tensors):
        for key in [k for k in tensors if ".layers.1." in k]:
            tensors.pop(key)

    _rewrite_adapter(folder, {"layers_to_transform": [0]}, layer_0_only)
    with pytest.raises(ValueError, match=r"does not fit the model: the adapter has LoRA in some layers only \(self_attn.q_proj in layers "
                                         r"\[0\]; self_attn.v_proj in layers \[0\]\), and qlora_ext's builders put it on a module in every layer; missing: "):
        llama2_from_checkpoint(base_dir, adapter_dir=folder)
    # the base's biases, as PEFT's bias="all" saves them for a model with attention_bias: refused, and why
    save_peft_adapter(_trained(base_dir, attn=("q_proj", "v_proj"), mlp=False, output=False), folder)
    _rewrite_adapter(folder, {"bias": "all"}, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias": torch.zeros(256)}))
    with pytest.raises(ValueError, match=r"does not fit the model: the adapter holds biases of the base model \(PEFT's bias='all' or "
                                         r"'lora_only' on a model with attention or MLP biases\), and Llama-2 has none; unexpected: "):
        llama2_from_checkpoint(base_dir, adapter_dir=folder)
    _rewrite_adapter(folder, {"target_modules": ["q_proj"]}, lambda t: t.update({
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.zeros(4, 256),
        "base_model.model.lm_head.base_layer.weight": torch.zeros(3, 3),
    }))
    with pytest.raises(ValueError, match=r"wrong shapes: \['base_model.model.lm_head.base_layer.weight: adapter \[3, 3\] vs model \[320, 256\]'\]"):
        llama2_from_checkpoint(base_dir, adapter_dir=folder)


@pytest.mark.parametrize("targets", ["all-linear", "with_lm_head"])
def test_adapters_made_by_peft_load_with_peft_logits(base_dir, tmp_path, targets):
    peft = pytest.importorskip("peft")
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear" if targets == "all-linear" else linears + ["lm_head"],
        init_lora_weights=False, task_type="CAUSAL_LM", lora_dropout=0.1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Setting save_embedding_layers to True" for lm_head
        peft_model = peft.get_peft_model(_hf(base_dir), config).eval()
        peft_model.save_pretrained(tmp_path)
    ours = llama2_from_checkpoint(base_dir, adapter_dir=tmp_path)  # in eval mode, as PEFT's: its dropout is off
    assert (ours.output.__class__ is LoRALinear) == (targets == "with_lm_head")
    tokens = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        want = peft_model(tokens).logits
        assert rel_error(ours(tokens), want) <= 1e-5
        with peft_model.disable_adapter():
            assert rel_error(peft_model(tokens).logits, want) > 1e-2  # the adapter matters
    # As PEFT writes it with safe_serialization=False (many 2023 QLoRA adapters): adapter_model.bin.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file() and not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    with torch.no_grad():
        assert rel_error(llama2_from_checkpoint(base_dir, adapter_dir=tmp_path / "bin").eval()(tokens), want) <= 1e-5
    # One holding a Python object whose unpickling would run code is refused, not loaded.
    adapter_bin = tmp_path / "bin" / "adapter_model.bin"
    torch.save({**torch.load(adapter_bin, weights_only=True), "x": TouchesWhenUnpickled(tmp_path / "ran")}, adapter_bin)
    with pytest.raises(ValueError, match=r"check_adapter_rank: .*adapter_model.bin holds Python objects besides tensors, and loading "
                                         r"them could run code \(torch.load\(weights_only=True\) refuses to unpickle posix.system\)"):
        llama2_from_checkpoint(base_dir, adapter_dir=tmp_path / "bin")
    assert not (tmp_path / "ran").exists()
    # Names that are not strings: said so (they failed in the name matching, with a TypeError).
    torch.save({0: torch.zeros(2)}, adapter_bin)
    with pytest.raises(ValueError, match=r"adapter_model.bin must hold a dict of names \(str\) to tensors; got a dict with the key 0 \(int\)"):
        llama2_from_checkpoint(base_dir, adapter_dir=tmp_path / "bin")
    # Without weights, the folder is named before the base is loaded.
    (tmp_path / "bin" / "adapter_model.bin").unlink()
    import qlora_ext.models.llama2._from_checkpoint as from_checkpoint

    def no_base_load(*args, **kwargs):
        raise AssertionError("the base was loaded before the adapter's files were checked")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(from_checkpoint, "load_checkpoint", no_base_load)
        with pytest.raises(FileNotFoundError, match=r"argument 'adapter_dir' must hold adapter_model.safetensors \(or adapter_model.bin\)"):
            llama2_from_checkpoint(base_dir, adapter_dir=tmp_path / "bin")


@pytest.mark.parametrize("quantize_base", [False, True], ids=["lora", "qlora"])
def test_merged_checkpoint_loads_in_transformers(base_dir, tmp_path, quantize_base):
    model = _trained(base_dir, quantize_base=quantize_base)
    save_hf_checkpoint(model, tmp_path, max_shard_size="300KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "model.layers.0.self_attn.q_proj.weight" in index["weight_map"]
    assert not any("lora" in k for k in index["weight_map"])
    hf = _hf(tmp_path)
    tokens = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        assert rel_error(hf(tokens).logits, model(tokens)) <= 1e-5
    # And back in through our loader, single-file this time.
    save_hf_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    assert not os.path.exists(tmp_path / "model.safetensors.index.json")  # stale index and shards removed
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = llama2_from_checkpoint(tmp_path).eval()
    assert reloaded.tok_embeddings.weight.dtype == torch.float32  # loaded in the default dtype
    with torch.no_grad():
        assert rel_error(reloaded(tokens), model(tokens)) <= 2e-2  # bf16 weights


def _merge_all(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merging into an NF4 base rounds; the warning says so
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.merge_()


@pytest.mark.parametrize("quantize_base", [False, True], ids=["lora", "qlora"])
def test_base_of_a_merged_model_is_saved_without_its_adapter(base_dir, tmp_path, quantize_base):
    # merge_adapters=False saves the base: for a module whose adapter is merged into its weight,
    # the adapter is taken back out, so PEFT's base + adapter is our model (not base + 2 adapters).
    peft = pytest.importorskip("peft")
    model = _trained(base_dir, quantize_base=quantize_base)
    tokens = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        unmerged = model(tokens)
    _merge_all(model)
    with torch.no_grad():
        want = model(tokens)  # an NF4 merge rounds: compare with the merged model itself
    if not quantize_base:
        assert rel_error(want, unmerged) <= 1e-5
    save_hf_checkpoint(model, tmp_path / "base", merge_adapters=False)
    save_peft_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "base" / "model.safetensors")
    source = load_file(os.path.join(base_dir, "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    if not quantize_base:
        torch.testing.assert_close(saved[key], source[key], rtol=0, atol=1e-6)
    peft_model = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert rel_error(peft_model(tokens).logits, want) <= 1e-5
    # Merged weights are written as they are with merge_adapters=True (the adapter not added twice).
    save_hf_checkpoint(model, tmp_path / "merged")
    with torch.no_grad():
        assert rel_error(_hf(tmp_path / "merged")(tokens).logits, want) <= 1e-5
    if quantize_base:
        with pytest.raises(ValueError, match=r"bnb_4bit=True writes each 4-bit base weight as stored, so the model must have no merged adapters; "
                           r"LoRA modules \['layers.0.attn.q_proj', .* call unmerge_\(\) on them first"):
            save_hf_checkpoint(model, tmp_path / "bnb", merge_adapters=False, bnb_4bit=True)
        assert not os.path.exists(tmp_path / "bnb")


def test_loading_into_a_merged_model_is_refused(base_dir, tmp_path):
    # A merged module's forward skips the adapter: new base weights or a new adapter loaded into it
    # would be silently wrong, so loading names the modules and asks for unmerge_() first.
    trained = _trained(base_dir)
    save_peft_adapter(trained, tmp_path / "adapter")
    tokens = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        want = trained(tokens)
    model = llama2_from_checkpoint(base_dir, ["q_proj", "v_proj", "output_proj"], True, True, lora_rank=4, lora_alpha=8).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.05)  # another adapter
    _merge_all(model)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    message = (r"argument 'model' must have no merged adapters; LoRA modules \['layers.0.attn.q_proj', 'layers.0.attn.v_proj', .*\] "
               r"have theirs merged into the base weight \(merged=True\): call unmerge_\(\) on them before loading")
    with pytest.raises(ValueError, match="load_peft_adapter: " + message):
        load_peft_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="load_checkpoint: " + message):
        load_checkpoint(model, base_dir)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # nothing loaded
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unmerge_()
    load_checkpoint(model, base_dir)
    load_peft_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        assert rel_error(model(tokens), want) <= 1e-6


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_crash_mid_save_leaves_previous_checkpoint(base_dir, tmp_path, monkeypatch):
    model = _trained(base_dir)
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    save_hf_checkpoint(model, merged, max_shard_size="300KB")
    save_peft_adapter(model, adapter)
    before, before_adapter = _snapshot(merged), _snapshot(adapter)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the next save would write different bytes everywhere

    calls = {"n": 0}
    lora_module = model.layers[1].mlp.w2
    original = type(lora_module).merged_weight

    def crash_on_second_layer(self, dtype=None):
        if self is lora_module:
            raise RuntimeError("simulated crash while writing a shard")
        calls["n"] += 1
        return original(self, dtype)

    monkeypatch.setattr(type(lora_module), "merged_weight", crash_on_second_layer)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_hf_checkpoint(model, merged, max_shard_size="300KB")
    assert calls["n"] > 0  # the crash came after some shards were written
    assert _snapshot(merged) == before  # same names, same bytes: no temporaries, nothing replaced

    import qlora_ext.checkpoint.peft_adapter as peft_adapter

    def crash(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a header")  # a part written, then the disk fills
        raise OSError("disk full")

    monkeypatch.setattr(peft_adapter, "write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(model, adapter)
    assert _snapshot(adapter) == before_adapter


def _crash_at_step(monkeypatch, folder, step):
    """Makes the step-th os.replace / os.remove of a path in ``folder`` raise, as a crash there would."""
    calls = {"n": 0}

    def counted(real):
        def call(path, *args):
            if os.path.dirname(os.path.abspath(path)) == str(folder):
                calls["n"] += 1
                if calls["n"] == step:
                    raise OSError(f"simulated crash at step {step}")
            return real(path, *args)

        return call

    monkeypatch.setattr(os, "replace", counted(os.replace))
    monkeypatch.setattr(os, "remove", counted(os.remove))


@pytest.mark.parametrize(
    "before, after",
    [("5GB", "300KB"), ("300KB", "5GB"), ("300KB", "300KB")],
    ids=["single_to_sharded", "sharded_to_single", "sharded_to_same_shards"],
)
def test_a_crash_at_any_step_of_the_commit_never_loads_a_mix(base_dir, tmp_path, monkeypatch, before, after):
    # Each step of moving the new files into place (renames, deleting the old config.json, index and
    # the stale weight files) is made to fail in turn. The folder is then the old checkpoint as it
    # was (the first step failed), or has no weight index nor single weight file, which we refuse
    # and so does transformers' from_pretrained (without config.json alone it would take a default
    # LlamaConfig and load the shards an old index names); never new shards under the old config
    # or index, or a stale model.safetensors shadowing a new index.
    model = _trained(base_dir)
    old_dir, folder = tmp_path / "old", tmp_path / "out"
    save_hf_checkpoint(model, old_dir, max_shard_size=before)
    tokens = torch.randint(0, 320, (2, 7))
    with torch.no_grad():
        old = model(tokens)
        model.tok_embeddings.weight.mul_(2.0)
        model.layers[1].mlp.w2.weight.mul_(0.5)
        new = model(tokens)
    assert rel_error(new, old) > 1e-2
    refused, config_without_index = 0, False
    for step in range(1, 100):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(old_dir, folder)
        _crash_at_step(monkeypatch, folder, step)
        try:
            save_hf_checkpoint(model, folder, max_shard_size=after)
            crashed = False
        except OSError as e:
            assert str(e) == f"simulated crash at step {step}"
            crashed = True
        monkeypatch.undo()
        names = set(os.listdir(folder))
        assert not [n for n in names if n.startswith(".tmp-")], step  # temporaries discarded
        if not crashed:
            break
        if _snapshot(folder) == _snapshot(old_dir):  # it failed before changing anything
            continue
        assert not names & {"model.safetensors", "model.safetensors.index.json"}, step
        with pytest.raises(FileNotFoundError):
            llama2_from_checkpoint(folder)
        with pytest.raises(OSError, match=r"no file named model.safetensors"):
            _hf(folder)
        refused += 1
        config_without_index |= "config.json" in names
    assert not crashed and refused >= 2
    assert config_without_index  # the window the ordering has to cover was hit: config.json in place, no index yet
    with torch.no_grad():
        assert rel_error(llama2_from_checkpoint(folder).eval()(tokens), new) <= 1e-6
        assert rel_error(_hf(folder)(tokens).logits, new) <= 1e-5
    assert ("model.safetensors" in os.listdir(folder)) == (after == "5GB")


def test_failed_commit_discards_its_temporaries_and_hides_the_group(tmp_path, monkeypatch):
    for name in ("a.bin", "b.bin", "index.json"):
        (tmp_path / name).write_text("old")
    staged = StagedFiles(tmp_path)
    for name in ("a.bin", "b.bin", "c.bin", "index.json"):
        staged.write(name, lambda path: open(path, "w").write("new"))
    real_replace, renamed = os.replace, []

    def replace(src, dst):
        renamed.append(os.path.basename(dst))
        if len(renamed) == 2:
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        staged.commit()
    monkeypatch.undo()
    assert renamed == ["a.bin", "b.bin"]
    # The index that named the old files is gone, so nothing reads a.bin (new) with b.bin (old);
    # c.bin's and the index's temporaries were deleted.
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin"]
    assert (tmp_path / "a.bin").read_text() == "new" and (tmp_path / "b.bin").read_text() == "old"
    assert staged.commit() == []  # nothing left staged


def test_temporaries_of_killed_saves_are_swept(base_dir, tmp_path):
    model = _trained(base_dir)
    adapter = tmp_path / "adapter"
    save_hf_checkpoint(model, tmp_path, max_shard_size="300KB")
    save_peft_adapter(model, adapter)
    # A killed save leaves what it staged: neither committed nor discarded.
    killed = StagedFiles(tmp_path)
    killed.write("model-00001-of-00009.safetensors", lambda path: open(path, "wb").write(b"partial"))
    killed.write("model.safetensors.index.json", lambda path: open(path, "wb").write(b"{"))
    killed.write("config.json", lambda path: None)
    StagedFiles(adapter).write("adapter_model.safetensors", lambda path: open(path, "wb").write(b"partial"))
    del killed  # (as a killed process's, its lock of the folder goes with it)
    # Not ours to delete: other names, other patterns.
    foreign = [".tmp-notes.txt.abcd1234", ".tmp-model.safetensors", ".tmp-config.json.TOOLONG12", "notes.txt"]
    for name in foreign:
        (tmp_path / name).write_text("keep")
    assert sum(n.startswith(".tmp-") for n in os.listdir(tmp_path)) == 3 + 3
    assert sum(n.startswith(".tmp-") for n in os.listdir(adapter)) == 1
    save_hf_checkpoint(model, tmp_path, max_shard_size="300KB")
    save_peft_adapter(model, adapter)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".tmp-") or n == "notes.txt") == sorted(foreign)
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_saves_into_one_folder_at_once_take_turns(base_dir, tmp_path):
    # Every rank of a distributed job saving into one folder: each swept the other's temporaries
    # (FileNotFoundError on its rename) and the folder was left without its config, unloadable.
    import threading

    model = _trained(base_dir)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    save_peft_adapter(model, adapter)
    errors = []

    def save_repeatedly():
        try:
            for _ in range(8):
                save_peft_adapter(model, adapter)
                save_hf_checkpoint(model, merged, max_shard_size="300KB")
        except Exception as e:  # noqa: BLE001  (collected for the assertion)
            errors.append(e)

    savers = [threading.Thread(target=save_repeatedly) for _ in range(3)]
    for saver in savers:
        saver.start()
    for saver in savers:
        saver.join()
    assert errors == []
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not any(name.startswith(".tmp-") for name in os.listdir(merged))
    reloaded = llama2_from_checkpoint(merged)
    torch.testing.assert_close(reloaded.tok_embeddings.weight, model.tok_embeddings.weight)


def test_a_save_that_fails_in_its_sweep_leaves_the_folder_unlocked(base_dir, tmp_path):
    # The folder's lock was kept by the half-built StagedFiles (alive in the traceback): a retry
    # from the except block waited forever.
    import threading

    model = _trained(base_dir)
    adapter = tmp_path / "adapter"
    (adapter / ".tmp-adapter_config.json.abcd1234").mkdir(parents=True)  # a "temporary" the sweep cannot delete
    retried = []
    try:
        save_peft_adapter(model, adapter)
    except IsADirectoryError:
        (adapter / ".tmp-adapter_config.json.abcd1234").rmdir()
        retry = threading.Thread(target=lambda: retried.append(save_peft_adapter(model, adapter)))
        retry.start()
        retry.join(timeout=120)
        assert not retry.is_alive(), "the retry waits on the failed save's lock"
    assert retried and sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_failed_write_discards_the_group_and_its_lock(tmp_path):
    # Used without a with block, a StagedFiles whose writer failed kept the folder locked: the
    # retry in the same process waited forever.
    import threading

    def full(path):
        raise OSError(28, "No space left on device")

    staged = StagedFiles(tmp_path)
    staged.write("a.json", lambda path: open(path, "w").close())
    with pytest.raises(OSError, match="No space left"):
        staged.write("b.json", full)
    assert os.listdir(tmp_path) == []  # both temporaries gone
    done = []

    def retry():
        again = StagedFiles(tmp_path)
        again.write("a.json", lambda path: open(path, "w").close())
        done.append(again.commit())

    thread = threading.Thread(target=retry)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and done and os.listdir(tmp_path) == ["a.json"]


def test_checkpoint_functions_take_a_data_parallel_wrapper_as_its_model(base_dir, tmp_path):
    # A DistributedDataParallel (here DataParallel, the same .module) wrapper's names start with
    # "module.": "LoRA module 'module.layers.0...' has no HF Llama counterpart" (AttributeError
    # for bnb_4bit=True); accelerate's unwrap_model is what users of PEFT expect.
    model = _trained(base_dir)
    wrapped = torch.nn.DataParallel(model)
    save_peft_adapter(torch.compile(wrapped), tmp_path / "adapter")  # (PyTorch's DDP guide compiles the wrapper)
    save_hf_checkpoint(wrapped, tmp_path / "merged")
    save_meta_checkpoint(wrapped, tmp_path / "meta")
    reloaded = llama2_from_checkpoint(tmp_path / "merged")
    torch.testing.assert_close(reloaded.tok_embeddings.weight, model.tok_embeddings.weight)
    again = llama2_from_checkpoint(tmp_path / "merged")
    with torch.no_grad():
        again.tok_embeddings.weight.zero_()
    load_checkpoint(torch.nn.DataParallel(again), tmp_path / "merged")
    torch.testing.assert_close(again.tok_embeddings.weight, model.tok_embeddings.weight)
    other = _trained(base_dir)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.zero_()
    load_peft_adapter(torch.nn.DataParallel(other), tmp_path / "adapter")
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        if "lora" in name:
            torch.testing.assert_close(q, p)


def test_atomic_helpers(tmp_path):
    target = tmp_path / "state.pt"
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not os.path.exists(target)
        torch.save({"a": 1}, tmp)
    assert torch.load(target) == {"a": 1}
    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("interrupted")
    assert torch.load(target) == {"a": 1} and os.listdir(tmp_path) == ["state.pt"]
    # A killed writer's temporary of the same file is deleted by the next write; others stay.
    (tmp_path / ".tmp-state.pt.k1lled_x").write_bytes(b"partial")
    (tmp_path / ".tmp-other.pt.abcdefgh").write_bytes(b"someone else's")
    with atomic_path(target) as tmp:
        torch.save({"a": 2}, tmp)
    assert sorted(os.listdir(tmp_path)) == [".tmp-other.pt.abcdefgh", "state.pt"] and torch.load(target) == {"a": 2}
    with pytest.raises(ValueError, match=r"argument 'name' must be a plain file name; got '../x'"):
        StagedFiles(tmp_path).write("../x", lambda p: None)
    # A name near the file system's limit of 255 bytes: its temporary's name is shortened (it
    # failed with "File name too long" for a name a plain open() takes).
    for long_name in ("x" * 251 + ".png", "é" * 125 + ".png"):
        with atomic_path(tmp_path / long_name) as tmp:
            assert len(os.fsencode(os.path.basename(tmp))) <= 255
            with open(tmp, "wb") as f:
                f.write(b"png")
        assert (tmp_path / long_name).read_bytes() == b"png"


def test_streamed_safetensors_agree_with_the_safetensors_package(tmp_path):
    from safetensors.torch import load_file, save_file

    from qlora_ext.checkpoint.safetensors_io import SafetensorsReader, write_safetensors

    tensors = {
        "a.bf16": torch.randn(3, 5).bfloat16(),
        "b.fp16": torch.randn(7).half(),
        "c.fp32": torch.randn(2, 2, 2),
        "d.i64": torch.arange(5),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.empty(0, 4),
    }
    ours = str(tmp_path / "ours.safetensors")
    write_safetensors(ours, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], tensors.__getitem__, {"format": "pt"})
    theirs = load_file(ours)
    assert theirs.keys() == tensors.keys() and all(torch.equal(theirs[k], v) for k, v in tensors.items())
    save_file(tensors, tmp_path / "theirs.safetensors")
    reader = SafetensorsReader(str(tmp_path / "theirs.safetensors"))
    try:
        assert set(reader.keys()) == set(tensors)
        for k, v in tensors.items():
            got = reader.get(k)
            assert got.dtype == v.dtype and torch.equal(got, v) and reader.shape(k) == tuple(v.shape)
    finally:
        reader.close()
    with pytest.raises(ValueError, match=r"tensor 'x' must be torch.float32 of shape \[2\]; got torch.float32 of shape \[3\]"):
        write_safetensors(str(tmp_path / "bad"), [("x", (2,), torch.float32)], lambda n: torch.zeros(3))


def test_wrapped_models_save_under_plain_names(base_dir, tmp_path):
    # torch.compile and activation checkpointing insert "_orig_mod." / "_checkpoint_wrapped_module."
    # into module names; checkpoints must not see them.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = _trained(base_dir)
    save_peft_adapter(model, tmp_path / "plain")
    for i, layer in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(layer)
    wrapped = torch.compile(model)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_modules())
    save_peft_adapter(wrapped, tmp_path / "wrapped")
    save_hf_checkpoint(wrapped, tmp_path / "merged")
    from safetensors.torch import load_file

    plain, again = load_file(tmp_path / "plain" / "adapter_model.safetensors"), load_file(tmp_path / "wrapped" / "adapter_model.safetensors")
    assert plain.keys() == again.keys() and all(torch.equal(plain[k], again[k]) for k in plain)
    assert "model.layers.1.mlp.down_proj.weight" in load_file(tmp_path / "merged" / "model.safetensors")


def test_max_shard_size_reads_as_save_pretrained_reads_it():
    transformers()
    try:
        from transformers.utils.hub import convert_file_size_to_int
    except ImportError:  # older transformers
        from transformers.modeling_utils import convert_file_size_to_int
    from qlora_ext.checkpoint.save import _parse_size

    for size in ["5GB", "5gb", "5Gb", "500MB", "500mb", "300KB", "300kB", "2GiB", "2gib", "1MiB", "64KiB", 12345]:
        assert _parse_size(size) == convert_file_size_to_int(size), size
    assert _parse_size("1.5GB") == 1_500_000_000 and _parse_size("100") == 100
    for bad, rule in [("5TB", "bytes or like '5GB'"), ("", "bytes or like '5GB'"), (0, "at least 1 byte"), ("0MB", "at least 1 byte"), (True, "an int or a str")]:
        with pytest.raises(ValueError, match=rf"argument 'max_shard_size' must be {rule}"):
            _parse_size(bad)


def test_save_refuses_a_dtype_that_is_not_a_checkpoint_float(tmp_path):
    # an int or bool dtype would truncate every weight (int64: all zeros) and replace the good
    # checkpoint with it; it is refused before anything is written
    from qlora_ext.models.llama2 import qlora_llama2_tiny

    model = qlora_llama2_tiny(["q_proj", "v_proj"], vocab_size=128, max_seq_len=64)
    save_hf_checkpoint(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for dtype in [torch.int64, torch.bool, "bfloat16"]:
        with pytest.raises(ValueError, match=rf"argument 'dtype' must be None \(each weight's own\) or one of .*; got {dtype!r}"):
            save_hf_checkpoint(model, tmp_path, dtype=dtype)
    with pytest.raises(TypeError, match="argument 'base_config' must be None or a config.json dict; got list"):
        save_hf_checkpoint(model, tmp_path, base_config=[1, 2])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_model_on_the_meta_device_is_refused_by_name(tmp_path):
    # Built under torch.device("meta") and never loaded: no data to write (was torch's "Cannot
    # copy out of meta tensor", after an empty folder was made). An adapter materialized on its own
    # may be saved while the base stays on meta.
    from qlora_ext.checkpoint import save_meta_checkpoint
    from qlora_ext.models.llama2 import qlora_llama2_tiny

    with torch.device("meta"):
        model = qlora_llama2_tiny(["q_proj"])
    for save, first in ((save_hf_checkpoint, "tok_embeddings.weight"), (save_meta_checkpoint, "tok_embeddings.weight"),
                        (save_peft_adapter, "layers.0.attn.q_proj.lora_a.weight")):
        with pytest.raises(ValueError, match=rf"{save.__name__}: argument 'model' has parameters on the meta device, which hold no "
                                             rf"data \(e.g. '{first}'\); load its weights first"):
            save(model, tmp_path / save.__name__)
        assert not (tmp_path / save.__name__).exists()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_a.to_empty(device="cpu")
            module.lora_b.to_empty(device="cpu")
    assert len(save_peft_adapter(model, tmp_path / "adapter")) == 2
    # the other way round: a real base with adapters on meta saves unmerged, not merged
    model = qlora_llama2_tiny(["q_proj"])
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_a.to("meta")
    with pytest.raises(ValueError, match=r"save_hf_checkpoint: argument 'model' has parameters on the meta device, which hold no data "
                                         r"\(e.g. 'layers.0.attn.q_proj.lora_a.weight'\)"):
        save_hf_checkpoint(model, tmp_path / "merged")
    assert len(save_hf_checkpoint(model, tmp_path / "unmerged", merge_adapters=False)) == 2
    assert len(save_meta_checkpoint(model, tmp_path / "unmerged_meta", merge_adapters=False)) == 2


# (helper-148's surviving mutants: the base's context length, the 8-aligned safetensors data)
_ARCH = dict(vocab_size=64, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128)


def test_hf_config_keeps_the_base_context_length_unless_the_model_is_longer(tmp_path):
    # A run trained with a short max_seq_len (a training-time cap) keeps the base model's context
    # length in the merged config.json; a longer one is written.
    short = Llama2Config(**_ARCH, max_seq_len=32)
    assert short.to_hf(base={"max_position_embeddings": 4096})["max_position_embeddings"] == 4096
    assert short.to_hf(base={"max_position_embeddings": 16})["max_position_embeddings"] == 32
    assert short.to_hf()["max_position_embeddings"] == 32
    torch.manual_seed(0)
    save_hf_checkpoint(llama2(**_ARCH, max_seq_len=32), tmp_path, base_config={"max_position_embeddings": 4096, "bos_token_id": 1})
    assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == 4096


def test_saved_safetensors_data_starts_8_aligned(tmp_path):
    # The safetensors format pads its JSON header with spaces so that every tensor's data is
    # aligned (memory-mapped loaders then give aligned tensors); the writer's comment says it does.
    torch.manual_seed(0)
    # a vocabulary and names whose header length is not a multiple of 8 by chance: try a few sizes
    for vocab in (64, 65, 66, 67):
        out = tmp_path / str(vocab)
        save_hf_checkpoint(llama2(**{**_ARCH, "vocab_size": vocab}, max_seq_len=32), out)
        for path in out.glob("*.safetensors"):
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = f.read(length)
            assert (8 + length) % 8 == 0, (path, length)
            assert header.decode("utf-8").rstrip(" ").endswith("}")
