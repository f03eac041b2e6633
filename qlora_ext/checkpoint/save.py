"""Saving a Llama-2 model as a HF checkpoint (``config.json`` + safetensors shards + index) that
transformers' ``LlamaForCausalLM.from_pretrained`` loads: dense with LoRA adapters merged in, or
with the decoder's linear weights in bitsandbytes' 4-bit layout (what transformers saves for a
model loaded with ``load_in_4bit``; our NF4 weights are written as stored).

Weights are produced one at a time (an NF4 weight is dequantized, and its adapter added, just
before its bytes are written) and streamed to disk, so saving needs memory for one dense tensor,
not for a shard or the model. All files are staged under temporary names and renamed into place
only once every one of them is complete (``qlora_ext.checkpoint.atomic``).
"""

from __future__ import annotations

import os
import re
from functools import partial

import torch
from torch import Tensor, nn

from qlora_ext._arguments import is_int
from qlora_ext._dtypes import FLOAT_DTYPES
from qlora_ext.checkpoint.atomic import StagedFiles
from qlora_ext.checkpoint.bnb4bit import bnb4bit_entries, bnb4bit_quantization_config
from qlora_ext.checkpoint.config import Llama2Config, write_json
from qlora_ext.checkpoint.convert import is_decoder_linear_weight, ours_to_hf, strip_wrappers, unwrap_parallel
from qlora_ext.checkpoint.safetensors_io import tensor_nbytes, write_safetensors
from qlora_ext.modules.lora_linear import LoRALinear

_HF_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def _parse_size(size: int | str) -> int:
    """Bytes in ``size``, read as transformers' ``save_pretrained`` reads it: units in any case
    (KB/MB/GB are powers of 10, KiB/MiB/GiB of 2), and a decimal unit ending in a lowercase 'b'
    ('5Gb', '500mb') counts bits."""
    if not (is_int(size) or isinstance(size, str)):
        raise ValueError(f"save_hf_checkpoint: argument 'max_shard_size' must be an int or a str like '5GB'; got {size!r}")
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", size, flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"save_hf_checkpoint: argument 'max_shard_size' must be bytes or like '5GB'; got {size!r}")
        unit = (match[2] or "b").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
        bits = len(unit) == 2 and match[2].endswith("b")
        size = int(float(match[1]) * scale) // (8 if bits else 1)
    if size < 1:
        raise ValueError(f"save_hf_checkpoint: argument 'max_shard_size' must be at least 1 byte; got {size}")
    return size


def refuse_meta_parameters(named_parameters, caller: str) -> None:
    """Raises ValueError naming one of ``(name, parameter)`` on the meta device (shapes without
    data: a model built under ``torch.device("meta")`` whose weights were never loaded), before
    anything is written."""
    on_meta = next((strip_wrappers(name) for name, p in named_parameters if p.is_meta), None)
    if on_meta is not None:
        raise ValueError(
            f"{caller}: argument 'model' has parameters on the meta device, which hold no data (e.g. '{on_meta}'); "
            "load its weights first (load_checkpoint), or build it on a real device"
        )


def written_parameters(model: nn.Module, merge_adapters: bool) -> list[tuple[str, Tensor]]:
    """(name, parameter) of what a merged save reads: all of them, but the adapters of unmerged
    LoRA linears when ``merge_adapters`` is False."""
    skipped = set() if merge_adapters else {
        f"{name}.{p}" if name else p for name, m in model.named_modules() if isinstance(m, LoRALinear) and not m.merged for p in m.adapter_params()
    }
    return [(name, p) for name, p in model.named_parameters() if name not in skipped]


def merged_weights(model: nn.Module, *, dtype: torch.dtype | None = None, merge_adapters: bool = True):
    """(our name, shape, dtype, producer, stored) for every weight of a merged model, in module
    order; ``stored`` is the tensor as the model holds it (an ``NF4Tensor`` for a quantized base).

    LoRA linears give their base weight plus the adapter update (unless ``merge_adapters`` is
    False); adapter parameters themselves are left out; other tensors are cast to ``dtype``.
    """
    out = []
    lora_prefixes: list[str] = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if any(prefix.startswith(p) for p in lora_prefixes):
            continue  # lora_a / lora_b inside a LoRALinear: folded into its weight
        if isinstance(module, LoRALinear):
            lora_prefixes.append(prefix)
            name = strip_wrappers(prefix + "weight")
            want = dtype or module.weight.dtype
            producer = partial(module.merged_weight if merge_adapters else module.base_weight, want)
            out.append((name, tuple(module.weight.shape), want, producer, module.weight))
            if module.bias is not None:
                bias_dtype = dtype or module.bias.dtype
                out.append((strip_wrappers(prefix + "bias"), tuple(module.bias.shape), bias_dtype, partial(_cast, module.bias, bias_dtype), module.bias))
            continue
        for attr, tensor in module._parameters.items():
            if tensor is not None:
                want = dtype or tensor.dtype
                out.append((strip_wrappers(prefix + attr), tuple(tensor.shape), want, partial(_cast, tensor, want), tensor))
    return out


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.detach().to(dtype)


def save_hf_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    merge_adapters: bool = True,
    base_config: dict | None = None,
    bnb_4bit: bool = False,
) -> list[str]:
    """Writes ``model`` as a HF Llama checkpoint: ``config.json``, ``model.safetensors`` or
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``.

    Args:
        model: a Llama-2 ``TransformerDecoder`` (dense, LoRA or QLoRA; or the DistributedDataParallel wrapping it).
        out_dir: the folder (created if needed). Weight files of an earlier save there are
            replaced, and the ones this save does not write again (shards of a larger save, a
            single ``model.safetensors``) are deleted, as are temporaries a killed save left. A
            crash while the new files are moved into place leaves the folder without its weight
            index or single weight file (loaders, transformers' too, refuse it), never old and new
            weights together.
        dtype: dtype of the saved weights (default: each weight's own, NF4 ones their original).
        max_shard_size: bytes per shard, as an int or a string like "5GB" / "500MB" / "2GiB",
            read as ``save_pretrained`` reads it (any case; "5Gb" with a lowercase b is bits).
        merge_adapters: fold LoRA updates into the weights (True) or save the base model
            (False); a module whose adapter is merged (``merge_()``) then has it taken back out
            of the saved weight, so the base plus ``save_peft_adapter``'s adapter is the model.
        base_config: an original config.json dict to keep unrelated fields of.
        bnb_4bit: write the attention and MLP linear weights in bitsandbytes' 4-bit layout (NF4,
            double quantization, blocksize 64) and its ``quantization_config``, as transformers
            saves a model loaded with ``load_in_4bit``: it loads back in 4 bits, and so does
            ``load_checkpoint``. NF4 weights are written as stored, dense ones quantized (the
            4-bit codes bitsandbytes would give; an absmax code may take the other neighbour in
            a near-tie, see docs/nf4_format.md, and the offset differ in its last bits);
            embeddings, norms and the output layer stay dense.
            So a model read from a bitsandbytes checkpoint writes its LoRA linears' bytes back
            unchanged, and its linears without LoRA (dense since the load) quantized again.
            A model with LoRA adapters needs ``merge_adapters=False`` (save the adapters with
            ``save_peft_adapter``): merging would quantize the weights a second time.

    Returns:
        The paths written.

    Raises:
        ValueError: a parameter without HF counterpart, a bad ``max_shard_size``, or ``bnb_4bit``
            with ``merge_adapters`` on a model that has adapters, with merged adapters (the 4-bit
            base would have to be quantized again without them; call ``unmerge_()`` first), or
            with a ``dtype`` (given, or a weight's own with ``dtype=None``) other than float32,
            bfloat16 and float16; a model with parameters on the meta device; or an ``out_dir``
            that is a file.
        TypeError: a ``base_config`` that is not a dict.
    """
    model = unwrap_parallel(model)
    out_dir = os.fspath(out_dir)
    refuse_meta_parameters(written_parameters(model, merge_adapters), "save_hf_checkpoint")
    limit = _parse_size(max_shard_size)
    # float64 too (a float64 base saves as it was read), but not for bitsandbytes, whose quant state names only these
    allowed = list(FLOAT_DTYPES) + ([] if bnb_4bit else [torch.float64])
    if dtype is not None and dtype not in allowed:
        raise ValueError(
            f"save_hf_checkpoint: argument 'dtype' must be None (each weight's own) or one of {allowed}"
            f"{' with bnb_4bit=True' if bnb_4bit else ''}; got {dtype!r}"
        )
    if base_config is not None and not isinstance(base_config, dict):
        raise TypeError(f"save_hf_checkpoint: argument 'base_config' must be None or a config.json dict; got {type(base_config).__name__}")
    if bnb_4bit and merge_adapters and any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(
            "save_hf_checkpoint: bnb_4bit=True needs merge_adapters=False for a model with LoRA adapters "
            "(merging into a 4-bit weight would quantize it again); save the adapters with save_peft_adapter"
        )
    merged = [name for name, m in model.named_modules() if isinstance(m, LoRALinear) and m.merged]
    if bnb_4bit and merged:
        raise ValueError(
            "save_hf_checkpoint: bnb_4bit=True writes each 4-bit base weight as stored, so the model must have no merged "
            f"adapters; LoRA modules {[strip_wrappers(n) for n in merged][:20]} have theirs merged (merged=True): "
            "call unmerge_() on them first"
        )
    if bnb_4bit and dtype is None and model.tok_embeddings.weight.dtype not in FLOAT_DTYPES:  # the quant state's dtype
        raise ValueError(
            f"save_hf_checkpoint: bnb_4bit=True records the model's dtype, that of tok_embeddings.weight, in its quantization "
            f"config, which names only {list(FLOAT_DTYPES)}; it is {model.tok_embeddings.weight.dtype}: pass dtype=torch.float32 "
            "(or bfloat16, float16)"
        )
    specs = []
    producers = {}
    for name, shape, want, producer, stored in merged_weights(model, dtype=dtype, merge_adapters=merge_adapters):
        hf_name = ours_to_hf(name)
        if hf_name is None:
            raise ValueError(f"save_hf_checkpoint: parameter '{name}' has no HF Llama counterpart")
        if bnb_4bit and is_decoder_linear_weight(name) and want not in FLOAT_DTYPES:
            raise ValueError(
                f"save_hf_checkpoint: bnb_4bit=True writes 4-bit weights that dequantize to one of {list(FLOAT_DTYPES)} (the "
                f"dtypes bitsandbytes' quant state names); parameter '{name}' is {want}: pass dtype=torch.float32 (or bfloat16, float16)"
            )
        entries = bnb4bit_entries(hf_name, stored, want) if bnb_4bit and is_decoder_linear_weight(name) else [(hf_name, shape, want, producer)]
        for key, key_shape, key_dtype, key_producer in entries:
            specs.append((key, key_shape, key_dtype))
            producers[key] = key_producer

    shards: list[list[tuple]] = [[]]
    shard_bytes = 0
    for spec in specs:
        size = tensor_nbytes(spec[1], spec[2])
        if shards[-1] and shard_bytes + size > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(spec)
        shard_bytes += size
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    config_dtype = dtype or model.tok_embeddings.weight.dtype
    config = Llama2Config.from_model(model).to_hf(dtype=config_dtype, base=base_config)
    if bnb_4bit:
        config["quantization_config"] = bnb4bit_quantization_config(config_dtype)

    # The commit takes the old config.json and weight index (or single file) away first and puts
    # the new ones back last, the index last of all, with stale shards deleted in between
    # (atomic.StagedFiles): a folder cut short there has no index, which our loader and
    # transformers' from_pretrained refuse (without config.json alone, transformers would build a
    # default LlamaConfig and load the shards named by an old index).
    finders = ("config.json", "model.safetensors.index.json", "model.safetensors")
    with torch.no_grad(), StagedFiles(out_dir, owns=_is_hf_checkpoint_file, finders=finders) as staged:
        for file_name, shard in zip(names, shards):
            staged.write(file_name, lambda path, shard=shard: write_safetensors(path, shard, lambda n: producers[n](), {"format": "pt"}))
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(tensor_nbytes(s[1], s[2]) for s in specs)},
                "weight_map": {spec[0]: file_name for file_name, shard in zip(names, shards) for spec in shard},
            }
            staged.write("model.safetensors.index.json", lambda path: write_json(path, index))
        staged.write("config.json", lambda path: write_json(path, config))
    kept = set(names) | ({"model.safetensors.index.json"} if len(shards) > 1 else set())
    return [os.path.join(out_dir, n) for n in sorted(kept | {"config.json"})]


def _is_hf_checkpoint_file(name: str) -> bool:
    return name == "config.json" or bool(_HF_WEIGHT_FILE.fullmatch(name))
