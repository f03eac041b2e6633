"""A checkpoint folder and an adapter folder given together: loaded once (a base and its adapter in
one folder, as transformers loads them) or refused where the model has that adapter merged already
(a training checkpoint's own adapter/, a torchtune output folder); torchtune's own adapter files named."""

from __future__ import annotations

import shutil

import pytest
import torch
from llama_helpers import hf_llama, lora_llama_with_adapter, rel_error
from safetensors.torch import load_file, save_file

from qlora_ext.checkpoint import save_hf_checkpoint, save_peft_adapter
from qlora_ext.models.llama2 import llama2_from_checkpoint

TOKENS = torch.arange(3, 20)[None]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    hf_llama().save_pretrained(folder)
    return folder


def test_an_unmerged_base_and_its_adapter_in_one_folder_load_as_transformers_loads_them(base, tmp_path):
    # save_hf_checkpoint(merge_adapters=False) + save_peft_adapter into one folder: the adapter applies once, as
    # LlamaForCausalLM.from_pretrained(folder) applies it (no torchtune file says the model is merged)
    model = lora_llama_with_adapter(base)
    save_hf_checkpoint(model, tmp_path, merge_adapters=False)
    save_peft_adapter(model, tmp_path)
    with torch.no_grad():
        assert rel_error(llama2_from_checkpoint(tmp_path, adapter_dir=tmp_path)(TOKENS), model(TOKENS)) < 1e-6


@pytest.mark.parametrize("layout", ["model_only", "adapter_only"])
def test_a_folder_given_as_both_is_not_said_to_hold_a_model_and_its_adapter_when_it_does_not(base, tmp_path, layout):
    # a folder without an adapter, or without a model, is not said to hold a model merged with its adapter
    shutil.copy(base / "config.json", tmp_path)
    if layout == "model_only":
        shutil.copy(base / "model.safetensors", tmp_path)
    else:
        save_peft_adapter(lora_llama_with_adapter(base), tmp_path)
    with pytest.raises((ValueError, OSError)) as e:
        llama2_from_checkpoint(tmp_path, adapter_dir=tmp_path)
    assert "holds the model with that adapter merged already" not in str(e.value), str(e.value)


def test_the_api_refuses_a_trainer_checkpoint_with_its_own_adapter_subfolder_as_the_cli_does(base, tmp_path):
    # epoch_N/ (merged) + epoch_N/adapter/: the CLI refused, the API applied the adapter twice
    model = lora_llama_with_adapter(base)
    ep = tmp_path / "epoch_0"
    save_hf_checkpoint(model, ep)
    save_peft_adapter(model, ep / "adapter", base_model_name_or_path=str(base))
    (ep / "training_config.yaml").write_text("{}\n")
    with pytest.raises(ValueError, match="merged already"):
        llama2_from_checkpoint(ep, adapter_dir=ep / "adapter")


def test_torchtune_0_4s_adapter_epoch_pt_is_named_too(base, tmp_path):
    # torchtune 0.2-0.4 write adapter_{epoch}.pt (0.5+ adapter_model.pt)
    torch.save({"layers.0.attn.q_proj.lora_a.weight": torch.zeros(8, 256)}, tmp_path / "adapter_0.pt")
    with pytest.raises(FileNotFoundError, match="torchtune's own adapter format"):
        llama2_from_checkpoint(base, adapter_dir=tmp_path)


def test_a_torchtune_epoch_folder_as_both_is_still_refused(base, tmp_path):
    # merged model + adapter side by side, with torchtune's own adapter file
    model = lora_llama_with_adapter(base)
    save_hf_checkpoint(model, tmp_path)
    save_peft_adapter(model, tmp_path)
    torch.save({}, tmp_path / "adapter_model.pt")  # torchtune writes its own adapter file beside the PEFT one
    with pytest.raises(ValueError, match="merged already"):
        llama2_from_checkpoint(tmp_path, adapter_dir=tmp_path)


def test_a_torchtune_0_4_output_dir_inside_the_base_folder_loads_base_plus_adapter(tmp_path):
    # torchtune 0.1-0.2's configs wrote output into the base model's own folder: its standard files stay the
    # unmerged base, beside adapter_0.pt and the merged hf_model_0001_0.pt; only the merged file named is refused
    base, alone = tmp_path / "Llama-2-7b-hf", tmp_path / "alone"
    hf_llama().save_pretrained(base)
    model = lora_llama_with_adapter(base)
    save_peft_adapter(model, base)
    save_peft_adapter(model, alone)
    torch.save({}, base / "adapter_0.pt")  # torchtune's own adapter file
    save_hf_checkpoint(model, tmp_path / "merged")
    (tmp_path / "merged" / "model.safetensors").rename(base / "hf_model_0001_0.pt")
    with torch.no_grad():
        want = llama2_from_checkpoint(base, adapter_dir=alone)(TOKENS)
        assert rel_error(llama2_from_checkpoint(base, adapter_dir=base)(TOKENS), want) < 1e-6
    with pytest.raises(ValueError, match="merged already"):
        llama2_from_checkpoint(base, adapter_dir=base, checkpoint_files=["hf_model_0001_0.pt"])


def test_an_adapter_folder_that_cannot_be_listed_is_left_to_the_adapter_checks(base, tmp_path, monkeypatch, capsys):
    # os.listdir's PermissionError (simulated: root ignores modes) ended the CLI's argument check in a traceback
    import os

    from qlora_ext import generate as cli
    from qlora_ext.training.config import ASSETS_DIR

    (tmp_path / "adapter").mkdir()
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(p)))
                        if os.fspath(p) == str(tmp_path / "adapter") else listdir(p))
    with pytest.raises(SystemExit) as exited:
        cli.main(["--checkpoint-dir", str(base), "--adapter-dir", str(tmp_path / "adapter"), "--prompt", "x",
                  "--tokenizer", str(ASSETS_DIR / "tokenizer.model")])
    assert exited.value.code == 2 and "argument --adapter-dir must be a PEFT adapter folder" in capsys.readouterr().err


# torchtune's own file names, with the base sharded as the Hub's is
@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("Llama-2-7b-hf")
    hf_llama().save_pretrained(folder, max_shard_size="1MB")  # model-0000i-of-0000n.safetensors + index, as the Hub's
    return folder


def test_the_base_shards_of_a_folder_torchtune_0_2_wrote_into_load_with_its_adapter(sharded_base, tmp_path):
    # torchtune 0.1-0.2 configs: output_dir == checkpoint_dir, so the base folder gains hf_model_0001_0.pt (merged),
    # adapter_0.pt and the PEFT adapter; the base's own shards are still the unmerged base.
    folder = tmp_path / "Llama-2-7b-hf"
    shutil.copytree(sharded_base, folder)
    save_peft_adapter(lora_llama_with_adapter(folder), folder)
    torch.save({}, folder / "adapter_0.pt")
    torch.save({}, folder / "hf_model_0001_0.pt")
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    want = llama2_from_checkpoint(folder, adapter_dir=folder)  # (the standard files: accepted today)
    got = llama2_from_checkpoint(folder, adapter_dir=folder, checkpoint_files=shards)  # refused today
    tokens = torch.randint(0, 320, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(got(tokens), want(tokens))


def test_a_torchtune_0_4_safetensors_output_folder_with_its_adapter_is_refused(sharded_base, tmp_path):
    # FullModelHFCheckpointer(safe_serialization=True), torchtune 0.3-0.4: model-0{i}-of-0{n}_{epoch}.safetensors
    # (merged) beside adapter_{epoch}.pt, adapter_model.bin and adapter_config.json
    out = tmp_path / "out"
    save_peft_adapter(lora_llama_with_adapter(sharded_base), out)
    torch.save(load_file(out / "adapter_model.safetensors"), out / "adapter_model.bin")
    (out / "adapter_model.safetensors").unlink()
    torch.save({}, out / "adapter_0.pt")
    shutil.copy(sharded_base / "config.json", out)
    state = {}
    for shard in sorted(sharded_base.glob("model-*.safetensors")):
        state.update(load_file(shard))
    keys = sorted(state)
    names = ["model-00001-of-00002_0.safetensors", "model-00002-of-00002_0.safetensors"]
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, out / names[0], metadata={"format": "pt"})
    save_file({k: state[k] for k in keys[len(keys) // 2 :]}, out / names[1], metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"argument 'adapter_dir'.*torchtune output folder \(it holds adapter_0.pt\)"):
        llama2_from_checkpoint(out, adapter_dir=out, checkpoint_files=names)
