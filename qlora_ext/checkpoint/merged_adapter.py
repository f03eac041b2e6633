"""Whether a checkpoint folder's model has an adapter merged into it already, so that loading that
adapter on top would count it twice: a training checkpoint of this package (the merged model, its
adapter in ``adapter/`` and the run's ``training_config.yaml``), or a torchtune output folder (the
merged model with the adapter beside it, and torchtune's own ``adapter_model.pt``; before 0.5,
``adapter_N.pt`` beside a merged ``hf_model_0001_N.pt``, ``model-00001-of-00002_N.safetensors`` (0.3-0.4's
``safe_serialization=True``) or ``meta_model_N.pt``, in a folder that
may also hold the unmerged base's standard files, torchtune 0.1-0.2's configs writing into the
base model's own folder)."""

from __future__ import annotations

import os
import re

ADAPTER_SUBDIR = "adapter"  # the PEFT adapter's folder inside a training checkpoint folder
TRAINING_CONFIG_FILE = "training_config.yaml"  # the run's resolved config, in each training checkpoint folder
_TORCHTUNE_ADAPTER = re.compile(r"adapter_(model|\d+)\.pt")  # torchtune's own adapter state dicts (0.5+ / before)
# merged model files beside adapter_N.pt (before 0.5: hf_model_0001_0.pt, or model-00001-of-00002_0.safetensors with
# safe_serialization=True; meta_model_0.pt) and beside adapter_model.pt (0.5+: the HF shard names, which in a base
# folder that torchtune 0.1-0.2 wrote into are the unmerged base's own)
_TORCHTUNE_MERGED_BEFORE_0_5 = re.compile(r"hf_model_\d+_\d+\.pt|model-\d+-of-\d+_\d+\.safetensors|meta_model_\d+\.pt")
_TORCHTUNE_MERGED_0_5 = re.compile(r"model-\d+-of-\d+\.(safetensors|bin|pt)")
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")


def _names(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:  # (an unreadable folder: the loaders name it)
        return []


def torchtune_adapter_files(folder: str | os.PathLike) -> list[str]:
    """The names of torchtune's own adapter files in ``folder`` (``adapter_model.pt``, ``adapter_0.pt``)."""
    folder = os.fspath(folder)
    return sorted(n for n in _names(folder) if _TORCHTUNE_ADAPTER.fullmatch(n) and os.path.isfile(os.path.join(folder, n)))


def refuse_adapter_merged_into(
    checkpoint_dir: str | os.PathLike, adapter_dir: str | os.PathLike, caller: str, checkpoint_files: list[str] | None = None
) -> None:
    """Raises ValueError where the model read from ``checkpoint_dir`` (its standard files, or
    ``checkpoint_files``) has the adapter in ``adapter_dir`` merged already (see the module's
    text); a base model and its adapter in one folder, as ``save_hf_checkpoint(merge_adapters=False)``
    and ``save_peft_adapter`` write them (and transformers loads them), is no such case."""
    checkpoint, adapter = os.fspath(checkpoint_dir), os.fspath(adapter_dir)
    if not (os.path.isdir(checkpoint) and os.path.isdir(adapter)):
        return
    inner = os.path.join(checkpoint, ADAPTER_SUBDIR)
    if os.path.isfile(os.path.join(checkpoint, TRAINING_CONFIG_FILE)) and os.path.isdir(inner) and os.path.samefile(adapter, inner):
        raise ValueError(f"{caller}: '{adapter}' is the adapter of the training checkpoint '{checkpoint}', whose model has it "
                         "merged already; load the checkpoint alone, or the base model's folder with this adapter")
    torchtune = torchtune_adapter_files(checkpoint)
    if checkpoint_files:  # torchtune's merged files, named
        names = [os.path.basename(f) for f in checkpoint_files]
        merged = any(_TORCHTUNE_MERGED_BEFORE_0_5.fullmatch(n) for n in names) or (
            "adapter_model.pt" in torchtune and any(_TORCHTUNE_MERGED_0_5.fullmatch(n) for n in names))
    else:  # the standard files: torchtune 0.5+'s epoch folder holds the merged model under those names
        merged = "adapter_model.pt" in torchtune and any(n.endswith(_WEIGHTS) and not n.startswith("adapter_") for n in _names(checkpoint))
    if torchtune and merged and os.path.samefile(adapter, checkpoint):
        raise ValueError(f"{caller}: '{adapter}' is the checkpoint folder itself, a torchtune output folder (it holds {torchtune[0]}): "
                         "torchtune writes the model there with that adapter merged already; load the folder alone, or the "
                         "base model's folder with this adapter")
