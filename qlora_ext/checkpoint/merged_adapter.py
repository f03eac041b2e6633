"""Whether a checkpoint folder's model has an adapter merged into it already, so that loading that
adapter on top would count it twice: a training checkpoint of this package (the merged model, its
adapter in ``adapter/`` and the run's ``training_config.yaml``), or a torchtune output folder (the
merged model with the adapter beside it, and torchtune's own ``adapter_model.pt`` or, before 0.5,
``adapter_N.pt``)."""

from __future__ import annotations

import os
import re

ADAPTER_SUBDIR = "adapter"  # the PEFT adapter's folder inside a training checkpoint folder
TRAINING_CONFIG_FILE = "training_config.yaml"  # the run's resolved config, in each training checkpoint folder
_TORCHTUNE_ADAPTER = re.compile(r"adapter_(model|\d+)\.pt")  # torchtune's own adapter state dicts (0.5+ / before)
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")


def torchtune_adapter_files(folder: str | os.PathLike) -> list[str]:
    """The names of torchtune's own adapter files in ``folder`` (``adapter_model.pt``, ``adapter_0.pt``)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if _TORCHTUNE_ADAPTER.fullmatch(n) and os.path.isfile(os.path.join(folder, n)))


def refuse_adapter_merged_into(checkpoint_dir: str | os.PathLike, adapter_dir: str | os.PathLike, caller: str) -> None:
    """Raises ValueError where ``checkpoint_dir``'s model has the adapter in ``adapter_dir`` merged
    already (see the module's text); a base model and its adapter in one folder, as
    ``save_hf_checkpoint(merge_adapters=False)`` and ``save_peft_adapter`` write them (and
    transformers loads them), is no such case."""
    checkpoint, adapter = os.fspath(checkpoint_dir), os.fspath(adapter_dir)
    if not (os.path.isdir(checkpoint) and os.path.isdir(adapter)):
        return
    inner = os.path.join(checkpoint, ADAPTER_SUBDIR)
    if os.path.isfile(os.path.join(checkpoint, TRAINING_CONFIG_FILE)) and os.path.isdir(inner) and os.path.samefile(adapter, inner):
        raise ValueError(f"{caller}: '{adapter}' is the adapter of the training checkpoint '{checkpoint}', whose model has it "
                         "merged already; load the checkpoint alone, or the base model's folder with this adapter")
    torchtune = torchtune_adapter_files(checkpoint)
    has_model = any(n.endswith(_WEIGHTS) and not n.startswith("adapter_") for n in os.listdir(checkpoint))
    if torchtune and has_model and os.path.samefile(adapter, checkpoint):
        raise ValueError(f"{caller}: '{adapter}' is the checkpoint folder itself, a torchtune output folder (it holds {torchtune[0]}): "
                         "torchtune writes the model there with that adapter merged already; load the folder alone, or the "
                         "base model's folder with this adapter")
