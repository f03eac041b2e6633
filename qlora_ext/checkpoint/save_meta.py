"""Saving a Llama-2 model as a Meta checkpoint: ``consolidated.00.pth`` (one model-parallel shard:
Meta's key names, and Meta's rotary layout of the q / k projections, which ours hold in HF's) and
``params.json``, as Meta's llama repository and torchtune's ``FullModelMetaCheckpointer`` read
them; with LoRA adapters merged in, or the base weights alone.

The file is one pickled state dict, so saving holds the whole dense model in memory (13 GB for 7B
in bf16), unlike ``save_hf_checkpoint``, which streams. Both files are staged under temporary
names and renamed into place together (``qlora_ext.checkpoint.atomic``).
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from qlora_ext._dtypes import FLOAT_DTYPES
from qlora_ext.checkpoint.atomic import StagedFiles
from qlora_ext.checkpoint.config import Llama2Config, write_json
from qlora_ext.checkpoint.convert import hf_to_meta_rotary, is_rotary_projection, ours_to_meta, unwrap_parallel
from qlora_ext.checkpoint.save import merged_weights, refuse_meta_parameters, written_parameters

_META_FILE = re.compile(r"params\.json|consolidated\.\d+\.pth")
WEIGHTS_FILE = "consolidated.00.pth"
PARAMS_FILE = "params.json"


def save_meta_checkpoint(
    model: nn.Module, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None, merge_adapters: bool = True
) -> list[str]:
    """Writes ``model`` to ``out_dir`` as a Meta checkpoint that ``load_checkpoint`` (and Meta's
    and torchtune's loaders) read back.

    Args:
        model: a Llama-2 ``TransformerDecoder`` (dense, LoRA or QLoRA; or the DistributedDataParallel wrapping it).
        out_dir: the folder (created if needed). An earlier Meta checkpoint there is replaced,
            the shards this save does not write again (``consolidated.01.pth`` ...) deleted.
        dtype: dtype of the saved weights (default: each weight's own, NF4 ones their original).
        merge_adapters: fold LoRA updates into the weights (True) or save the base model
            (False; a merged adapter is taken back out, as ``save_hf_checkpoint`` does).

    Returns:
        The paths written: ``consolidated.00.pth`` and ``params.json``.

    Raises:
        ValueError: a parameter without Meta counterpart, a ``dtype`` other than float32,
            bfloat16, float16 and float64, an ``out_dir`` holding a HF checkpoint (which
            loaders would read instead), or a model with parameters on the meta device.
        TypeError: ``model`` is not a Llama-2 ``TransformerDecoder``.
    """
    model = unwrap_parallel(model)
    allowed = [*FLOAT_DTYPES, torch.float64]
    if dtype is not None and dtype not in allowed:
        raise ValueError(f"save_meta_checkpoint: argument 'dtype' must be None (each weight's own) or one of {allowed}; got {dtype!r}")
    hf_files = sorted(n for n in os.listdir(out_dir) if n == "config.json" or n.endswith(".safetensors")) if os.path.isdir(out_dir) else []
    if hf_files:  # loaders take a folder with config.json as HF: they would read those weights, not these
        raise ValueError(
            f"save_meta_checkpoint: argument 'out_dir' holds a HF checkpoint ({', '.join(hf_files[:5])}), which loaders would "
            f"read instead of the Meta one; got '{os.fspath(out_dir)}': choose another folder, or delete those files"
        )
    refuse_meta_parameters(written_parameters(model, merge_adapters), "save_meta_checkpoint")
    config = Llama2Config.from_model(model)
    weights = merged_weights(model, dtype=dtype, merge_adapters=merge_adapters)
    unnamed = [name for name, *_ in weights if ours_to_meta(name) is None]
    if unnamed:
        raise ValueError(f"save_meta_checkpoint: parameter '{unnamed[0]}' has no Meta Llama counterpart")
    state = {}
    with torch.no_grad():
        for name, _, _, producer, _ in weights:
            value = producer().cpu()
            if is_rotary_projection(name):
                value = hf_to_meta_rotary(value, config.num_heads if name.endswith("q_proj.weight") else config.num_kv_heads)
            state[ours_to_meta(name)] = value.contiguous()
    # params.json goes last: a folder cut short in the commit has no params.json, which loaders refuse.
    with StagedFiles(out_dir, owns=_META_FILE.fullmatch, finders=(WEIGHTS_FILE, PARAMS_FILE)) as staged:
        staged.write(WEIGHTS_FILE, lambda path: torch.save(state, path))
        staged.write(PARAMS_FILE, lambda path: write_json(path, config.to_meta()))
    return [os.path.join(os.fspath(out_dir), WEIGHTS_FILE), os.path.join(os.fspath(out_dir), PARAMS_FILE)]
