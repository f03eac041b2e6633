"""What torchtune's LoRA/QLoRA recipes (lora_finetune_single_device) leave in output_dir, as its
checkpointers write it (torchtune 0.5/0.6: epoch_N/ folders; 0.2-0.4: a flat output_dir), and
every qlora_ext entry point a torchtune user points at it: the files are written here without
torchtune, with its file names and keys (as a real torchtune 0.6.1 run writes them).
Each must load the right weights (logits against a LlamaForCausalLM holding the same weights) or
be refused with the file and what to do."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from llama_helpers import _hf_rows_to_meta, hf_llama, hf_logits, hf_to_meta_state, meta_params, rel_error, train_tokenizer

from qlora_ext.models.llama2 import llama2_from_checkpoint
from qlora_ext.training.checkpointing import ResumeError, load_training_state
from qlora_ext.training.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK, ALPHA = 8, 16
# torchtune's LoRA names (its adapter_model.pt) -> HF's (PEFT's adapter_model.safetensors)
_TT_TO_HF = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
             "attn.output_proj": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.down_proj", "mlp.w3": "mlp.up_proj"}
TOKENS = torch.randint(3, 320, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A HF base (as Llama-2-7b-hf: two safetensors shards and their index) and a torchtune 0.6
    output_dir of a LoRA run on it: epoch_0/ with the merged model in torchtune's shard names,
    adapter_model.pt (torchtune keys, q/k rows in Meta's rotary layout), adapter_model.safetensors
    and adapter_config.json (PEFT, as torchtune's tune_to_peft_adapter_* write them), config.json
    and tokenizer.model copied from the base; recipe_state/recipe_state.pt."""
    root = tmp_path_factory.mktemp("tt")
    tok = train_tokenizer(str(tmp_path_factory.mktemp("tok")))
    base = hf_llama(num_kv_heads=2, seed=1)
    base.save_pretrained(root / "base", max_shard_size="4MB")
    shutil.copy(tok, root / "base" / "tokenizer.model")
    cfg = base.config
    gen = torch.Generator().manual_seed(2)
    merged = hf_llama(num_kv_heads=2, seed=1)
    peft_sd, tt_sd = {}, {}
    params = dict(merged.named_parameters())
    for i in range(cfg.num_hidden_layers):
        for tt, hf in _TT_TO_HF.items():
            w = params[f"model.layers.{i}.{hf}.weight"]
            a = torch.randn(RANK, w.shape[1], generator=gen) * 0.05
            b = torch.randn(w.shape[0], RANK, generator=gen) * 0.05
            with torch.no_grad():
                w += ALPHA / RANK * b @ a
            peft_sd[f"base_model.model.model.layers.{i}.{hf}.lora_A.weight"] = a
            peft_sd[f"base_model.model.model.layers.{i}.{hf}.lora_B.weight"] = b
            heads = {"attn.q_proj": cfg.num_attention_heads, "attn.k_proj": cfg.num_key_value_heads}.get(tt)
            tt_sd[f"layers.{i}.{tt}.lora_a.weight"] = a
            tt_sd[f"layers.{i}.{tt}.lora_b.weight"] = b if heads is None else _hf_rows_to_meta(b, heads)
    ep = root / "out" / "epoch_0"
    merged.save_pretrained(ep, max_shard_size="4MB")  # model-0000X-of-0000Y.safetensors + model.safetensors.index.json
    shutil.copy(tok, ep / "tokenizer.model")
    torch.save(tt_sd, ep / "adapter_model.pt")
    from safetensors.torch import save_file

    save_file(peft_sd, ep / "adapter_model.safetensors", metadata={"format": "pt"})
    (ep / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA",
                                                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]}))
    (root / "out" / "recipe_state").mkdir()
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "seed": 0, "epochs_run": 1, "total_epochs": 2,
                "max_steps_per_epoch": 5, "dataloader": {}}, root / "out" / "recipe_state" / "recipe_state.pt")
    return root, base, merged, tt_sd


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qlora_ext.generate", *args, "--prompt", "the", "--max-new-tokens", "2",
                           "--temperature", "0"], capture_output=True, text=True, env=env, timeout=240)


def test_epoch_folder_merged_model_and_base_plus_adapter_load_right(run):
    # passes: the merged shards by their index, and torchtune's minimal adapter_config.json over the base
    root, _, merged, _ = run
    want = hf_logits(merged, TOKENS)
    with torch.no_grad():
        assert rel_error(llama2_from_checkpoint(root / "out" / "epoch_0")(TOKENS), want) < 1e-5
        assert rel_error(llama2_from_checkpoint(root / "base", adapter_dir=root / "out" / "epoch_0")(TOKENS), want) < 1e-5


def test_flat_and_meta_layouts_load_when_their_files_are_named(run, tmp_path):
    # passes: torchtune 0.2-0.4's hf_model_0001_0.pt beside config.json; FullModelMetaCheckpointer's
    # model-00001-of-00001.bin (Meta keys) beside params.json
    _, _, merged, _ = run
    want = hf_logits(merged, TOKENS)
    flat = tmp_path / "flat"
    flat.mkdir()
    merged.config.save_pretrained(flat)
    torch.save(dict(merged.state_dict()), flat / "hf_model_0001_0.pt")
    meta = tmp_path / "meta"
    meta.mkdir()
    torch.save(hf_to_meta_state(merged), meta / "model-00001-of-00001.bin")
    (meta / "params.json").write_text(json.dumps(meta_params(merged)))
    with torch.no_grad():
        assert rel_error(llama2_from_checkpoint(flat, checkpoint_files=["hf_model_0001_0.pt"])(TOKENS), want) < 1e-5
        assert rel_error(llama2_from_checkpoint(meta, checkpoint_files=["model-00001-of-00001.bin"])(TOKENS), want) < 1e-5


def test_epoch_folder_as_its_own_adapter_dir_is_refused(run):
    # torchtune's epoch_N holds the merged model and its adapter side by side; naming it as both
    # checkpoint and adapter applied the adapter twice, silently (API and CLI)
    root = run[0]
    ep = root / "out" / "epoch_0"
    message = (r"is the checkpoint folder itself, a torchtune output folder \(it holds adapter_model.pt\): torchtune writes the "
               r"model there with that adapter merged already")
    with pytest.raises(ValueError, match=rf"llama2_from_checkpoint: argument 'adapter_dir': '.*' {message}"):
        llama2_from_checkpoint(ep, adapter_dir=ep)
    result = _cli("--checkpoint-dir", str(ep), "--adapter-dir", str(ep))
    assert result.returncode == 2 and re.search(rf"argument --adapter-dir: '.*' {message}", result.stderr), result.stderr


def test_torchtune_adapter_pt_is_named(run, tmp_path_factory):
    # FullModelMetaCheckpointer / FullModelTorchTuneCheckpointer save only adapter_model.pt; the
    # refusal said the folder has "no adapter weights", with the file sitting there
    root = run[0]
    folder = tmp_path_factory.mktemp("meta_epoch")  # (a tmp_path would hold the test's name, "torchtune")
    torch.save(run[3], folder / "adapter_model.pt")
    hint = (r"its adapter_model.pt is torchtune's own adapter format \(its parameter names, q/k rows in Meta's rotary layout\), "
            r"which is not read: use the PEFT-format adapter_model.safetensors and adapter_config.json")
    with pytest.raises(FileNotFoundError, match=rf"must hold adapter_config.json; not found in .*; {hint}"):
        llama2_from_checkpoint(root / "base", adapter_dir=folder)
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA", "target_modules": ["q_proj"]}))
    with pytest.raises(FileNotFoundError, match=rf"must hold adapter_model.safetensors \(or adapter_model.bin\); not found in .*; {hint}"):
        llama2_from_checkpoint(root / "base", adapter_dir=folder)
    (folder / "adapter_config.json").unlink()
    result = _cli("--checkpoint-dir", str(root / "base"), "--adapter-dir", str(folder))
    assert result.returncode == 2 and "its adapter_model.pt is torchtune's own adapter format" in result.stderr, result.stderr


def test_torchtune_native_model_file_loads_right_or_is_named(run, tmp_path_factory):
    # FullModelTorchTuneCheckpointer's model-00001-of-00001.bin (torchtune keys, Meta rotary layout)
    # was refused with 19 missing + 19 unexpected keys and no word of its format
    _, _, merged, _ = run
    folder = tmp_path_factory.mktemp("tune_epoch")
    meta = hf_to_meta_state(merged)
    names = {"attention.wq": "attn.q_proj", "attention.wk": "attn.k_proj", "attention.wv": "attn.v_proj",
             "attention.wo": "attn.output_proj", "feed_forward.w1": "mlp.w1", "feed_forward.w2": "mlp.w2",
             "feed_forward.w3": "mlp.w3", "attention_norm.weight": "sa_norm.scale", "ffn_norm.weight": "mlp_norm.scale"}
    tune = {}
    for key, value in meta.items():
        new = key.replace("norm.weight", "norm.scale") if key == "norm.weight" else key
        for a, b in names.items():
            new = new.replace(a, b)
        tune[new] = value
    torch.save(tune, folder / "model-00001-of-00001.bin")
    (folder / "params.json").write_text(json.dumps(meta_params(merged)))
    with pytest.raises(ValueError, match=r"does not fit the model: its keys are this package's parameter names \(a qlora_ext model's "
                                         r"state_dict\(\), or torchtune's FullModelTorchTuneCheckpointer output"):
        llama2_from_checkpoint(folder, checkpoint_files=["model-00001-of-00001.bin"])


def test_torchtune_training_state_is_named_on_resume(run, tmp_path_factory):
    # resume_from_checkpoint=True in a torchtune output_dir said "there is no
    # recipe_state.pt ... set output_dir to the interrupted run's folder" (0.5/0.6 layout) or
    # "state version None, expected 1" (0.2-0.4 layout)
    out = run[0] / "out"
    with pytest.raises(ResumeError) as e:
        load_training_state(out, {})
    assert "is a torchtune run" in str(e.value) and "torchtune's training state, which this trainer cannot continue" in str(e.value)
    flat = tmp_path_factory.mktemp("flat")
    shutil.copy(out / "recipe_state" / "recipe_state.pt", flat / "recipe_state.pt")
    with pytest.raises(ResumeError) as e:
        load_training_state(flat, {})
    assert "recipe_state.pt is torchtune's training state, which this trainer cannot continue" in str(e.value), str(e.value)


def test_torchtune_resume_paths_get_no_circular_advice(tmp_path):
    # adapter_checkpoint / recipe_checkpoint with resume_from_checkpoint=True already set
    # were refused with "set resume_from_checkpoint=True"
    raw = {
        "output_dir": str(tmp_path / "out"),
        "model": {"_component_": "torchtune.models.llama2.qlora_llama2_7b"},
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer", "path": "t.model"},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": str(tmp_path),
                         "checkpoint_files": ["a.safetensors"], "adapter_checkpoint": "epoch_0/adapter_model.pt",
                         "recipe_checkpoint": "recipe_state/recipe_state.pt", "model_type": "LLAMA2"},
        "resume_from_checkpoint": True,
        "dataset": {"_component_": "torchtune.datasets.alpaca_dataset", "data_files": "a.json"},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-4},
    }
    path = tmp_path / "tt.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "set resume_from_checkpoint=True" not in str(e.value) and "a torchtune run's state cannot be continued" in str(e.value)


def test_tutorial_download_without_safetensors_loads_the_bin_shards(run, tmp_path_factory):
    # torchtune 0.1-0.4's `tune download meta-llama/Llama-2-7b-hf` skipped '*.safetensors'
    # but kept model.safetensors.index.json (a .json); the .bin shards and their index are there.
    # The folder (the bundled 7B config's /tmp/Llama-2-7b-hf) was refused naming only the missing shards.
    from safetensors.torch import load_file

    root, base, _, _ = run
    folder = tmp_path_factory.mktemp("Llama-2-7b-hf")
    for name in ("config.json", "model.safetensors.index.json"):
        shutil.copy(root / "base" / name, folder / name)
    index = json.loads((root / "base" / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(root / "base" / shard)
        name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.warns(UserWarning, match=r"model.safetensors.index.json names shards that do not exist .* \(torchtune's tune "
                                          r"download skips \*.safetensors files\); reading pytorch_model.bin.index.json and its shards instead"):
        model = llama2_from_checkpoint(folder)
    with torch.no_grad():
        assert rel_error(model(TOKENS), hf_logits(base, TOKENS)) < 1e-5
    (folder / "pytorch_model-00002-of-00002.bin").unlink()  # a .bin shard missing too: named
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin.index.json names shards that do not exist .*\['pytorch_model-00002-of-00002.bin'\]"):
        llama2_from_checkpoint(folder)


def test_torchtune_dora_adapter_is_named_as_dora(run, tmp_path_factory):
    # torchtune's DoRA run writes adapter_config.json without use_dora (peft_type
    # LORA) and adapter_model.safetensors with lora_magnitude_vector keys: refused as "unexpected"
    # keys, without saying DoRA
    from safetensors.torch import load_file, save_file

    root = run[0]
    folder = tmp_path_factory.mktemp("dora")
    shutil.copy(root / "out" / "epoch_0" / "adapter_config.json", folder)
    tensors = load_file(root / "out" / "epoch_0" / "adapter_model.safetensors")
    for key in list(tensors):
        if key.endswith("lora_B.weight"):
            tensors[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.ones(tensors[key].shape[0])
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError) as e:
        llama2_from_checkpoint(root / "base", adapter_dir=folder)
    assert "the adapter holds DoRA magnitudes (lora_magnitude_vector): it is a DoRA adapter" in str(e.value), str(e.value)


def test_an_adapter_only_epoch_folder_as_the_checkpoint_says_what_to_pass(run, tmp_path_factory):
    # save_adapter_weights_only=True: config.json copied beside the adapter, no model; the hint was to name
    # weight files with checkpoint_files, which led to another refusal
    root = run[0]
    folder = tmp_path_factory.mktemp("adapter_only")
    for name in ("config.json", "adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(root / "out" / "epoch_0" / name, folder)
    with pytest.raises(FileNotFoundError, match=r"no HF weights in .*; it holds an adapter without its model: load the base "
                                                r"model's folder, with this one as the adapter \(adapter_dir, --adapter-dir\)$"):
        llama2_from_checkpoint(folder)


@pytest.mark.parametrize("what", ["bare_llama_model", "qlora_ext_state_dict"])
def test_the_torchtune_keys_hint_is_for_such_keys_only(run, tmp_path, what):
    # "self_attn.q_proj.weight" ended with "attn.q_proj.weight": a bare LlamaModel's keys were called torchtune's
    root, base, _, _ = run
    shutil.copy(root / "base" / "config.json", tmp_path)
    state = dict(base.model.state_dict()) if what == "bare_llama_model" else llama2_from_checkpoint(root / "base").state_dict()
    torch.save(state, tmp_path / "weights.pt")
    with pytest.raises(ValueError) as e:
        llama2_from_checkpoint(tmp_path, checkpoint_files=["weights.pt"])
    assert ("its keys are this package's parameter names" in str(e.value)) == (what == "qlora_ext_state_dict"), str(e.value)[:300]
