"""LoRA adapters in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``
with keys like ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, which
``peft.PeftModel.from_pretrained(LlamaForCausalLM, dir)`` loads. Our ``lora_a`` / ``lora_b`` are
PEFT's ``lora_A`` / ``lora_B`` as they are (same shapes, same alpha / r scaling), and our q/k
rows are in HF's rotary layout, so nothing is permuted.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_ext._arguments import is_finite_real, is_int
from qlora_ext.checkpoint.atomic import StagedFiles
from qlora_ext.checkpoint.config import read_json, write_json
from qlora_ext.checkpoint.convert import hf_module_name, hf_to_ours, strip_wrappers, unwrap_parallel
from qlora_ext.checkpoint.load import _assign, _home_device, _targets, refuse_beyond_range, refuse_merged
from qlora_ext.checkpoint.merged_adapter import torchtune_adapter_files
from qlora_ext.checkpoint.readers import python_objects_refused, refused_pickle_global
from qlora_ext.checkpoint.safetensors_io import SafetensorsReader, write_safetensors
from qlora_ext.checkpoint.save import refuse_meta_parameters
from qlora_ext.modules.lora_linear import LoRALinear
from qlora_ext.modules.peft import get_adapter_params

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN_NAME = "adapter_model.bin"  # what PEFT writes with safe_serialization=False (read, never written)
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_EMBEDDING, _OUTPUT = "tok_embeddings.weight", "output.weight"  # (our names of the weights a vocabulary sizes)
_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
_MLP = ("gate_proj", "up_proj", "down_proj")
# The LoRA-able linears of a LlamaForCausalLM decoder layer, as paths inside the layer.
# adapter_config.json settings that do not change what the saved matrices compute (bookkeeping,
# or options of features whose own keys are then empty); any other one must be empty or absent.
_INERT_KEYS = frozenset({
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode", "r", "lora_alpha",
    "lora_dropout", "target_modules", "layers_pattern", "megatron_core", "qalora_group_size", "eva_config", "runtime_config",
    "ensure_weight_tying",
})
# init_lora_weights values after which the adapter is plain LoRA on the unchanged base: PEFT's
# default (True, or "gaussian"), zeros for both (False), EVA's and the orthogonal initialization.
_PLAIN_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal")
_LAYER_LINEARS = tuple(f"self_attn.{name}" for name in _ATTN) + tuple(f"mlp.{name}" for name in _MLP)
_ONE_LAYER = re.compile(r"(?:(?:model\.)?layers\.)?\d+\.(?P<rest>.+)")
# The other modules of a LlamaForCausalLM (layer 0 standing for every layer): an entry matching
# one of them asks for LoRA the builders cannot express (an embedding) or that PEFT refuses (a
# norm, a block). An entry matching no module at all (another architecture's name) is skipped,
# as PEFT skips it.
_OTHER_MODULES = (
    "model", "model.embed_tokens", "model.layers", "model.layers.0", "model.layers.0.self_attn", "model.layers.0.mlp",
    "model.layers.0.mlp.act_fn", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
    "model.norm", "model.rotary_emb",
)


def _listed(names: list[str], most: int) -> str:
    """The first ``most`` names, and how many more there are."""
    return str(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _describe_mapping(value: Any) -> str:
    """What a loaded adapter file holds, where it is not a dict of str -> tensor (for messages)."""
    if not isinstance(value, dict):
        return type(value).__name__
    for key, item in value.items():
        if not isinstance(key, str):
            return f"a dict with the key {key!r} ({type(key).__name__})"
        if not isinstance(item, torch.Tensor):
            return f"a dict whose {key!r} is a {type(item).__name__}"
    return "a dict"


def _matched_targets(entry: str) -> set[str]:
    """The module types (q_proj, ..., lm_head) a ``target_modules`` entry matches in
    LlamaForCausalLM by PEFT's rule: a module whose path equals the entry or ends with "." + it."""
    if entry == "lm_head":
        return {"lm_head"}
    one_layer = _ONE_LAYER.fullmatch(entry)  # model.layers.3.self_attn.q_proj: from the index on, all of it
    if one_layer:
        return {path.rsplit(".", 1)[1] for path in _LAYER_LINEARS if path == one_layer["rest"]}
    return {path.rsplit(".", 1)[1] for path in _LAYER_LINEARS if path == entry or path.endswith("." + entry)}


def _names_other_module(entry: str) -> bool:
    """Whether a ``target_modules`` entry matches a Llama module that is not a LoRA-able linear."""
    entry = re.sub(r"(^|\.)\d+(?=\.|$)", r"\g<1>0", entry)  # any layer index stands for layer 0
    return any(path == entry or path.endswith("." + entry) for path in _OTHER_MODULES)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """HF module path -> LoRALinear, for every LoRA linear of a Llama-2 model.

    Raises:
        ValueError: a LoRA linear that has no HF Llama counterpart.
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            hf_name = hf_module_name(name)
            if hf_name is None:
                raise ValueError(f"LoRA module '{strip_wrappers(name)}' has no HF Llama counterpart")
            out[hf_name] = module
    return out


def _dropout_p(module: LoRALinear) -> float:
    return module.dropout.p if isinstance(module.dropout, nn.Dropout) else 0.0


def save_peft_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> list[str]:
    """Writes the model's LoRA adapters as a PEFT LoRA adapter for ``LlamaForCausalLM``.

    Args:
        model: a LoRA / QLoRA Llama-2 ``TransformerDecoder`` (or the DistributedDataParallel wrapping it).
        out_dir: the folder (created if needed); both files are replaced together (a crash
            midway leaves no adapter_config.json, never a mix), temporaries of a killed save removed.
        base_model_name_or_path: recorded in the config (the HF checkpoint it adapts); a str or path.

    Returns:
        The two paths written.

    Raises:
        ValueError: the model has no LoRA modules, or their rank / alpha / dropout differ
            between modules, or they cover some layers and not others; or adapter parameters
            on the meta device.
    """
    model = unwrap_parallel(model)
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise ValueError("save_peft_adapter: argument 'base_model_name_or_path' must be a str, a path or None; "
                         f"got {type(base_model_name_or_path).__name__}")
    modules = lora_modules(model)
    refuse_meta_parameters(get_adapter_params(model).items(), "save_peft_adapter")
    if not modules:
        raise ValueError("save_peft_adapter: argument 'model' has no LoRALinear modules")
    settings = {(m.rank, m.alpha, _dropout_p(m)) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"save_peft_adapter: all LoRA modules must share (rank, alpha, dropout); got {sorted(settings)}")
    rank, alpha, dropout = settings.pop()
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    num_layers = len(getattr(model, "layers", []))
    for target in targets:
        covered = sum(name.endswith("." + target) or name == target for name in modules)
        if target != "lm_head" and covered != num_layers:
            raise ValueError(f"save_peft_adapter: '{target}' has LoRA in {covered} of {num_layers} layers; PEFT's target_modules needs all")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    tensors = {}
    for name, module in modules.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = module.lora_a.weight.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = module.lora_b.weight.detach().cpu().contiguous()

    specs = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    owned = (ADAPTER_WEIGHTS_NAME, ADAPTER_WEIGHTS_BIN_NAME, ADAPTER_CONFIG_NAME)  # an older .bin would be stale
    with StagedFiles(out_dir, owns=lambda name: name in owned) as staged:
        staged.write(ADAPTER_WEIGHTS_NAME, lambda path: write_safetensors(path, specs, tensors.__getitem__, {"format": "pt"}))
        staged.write(ADAPTER_CONFIG_NAME, lambda path: write_json(path, config))
    return [os.path.join(os.fspath(out_dir), n) for n in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME)]


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The LoRA builder arguments that reproduce a PEFT adapter's layout.

    Returns:
        ``{"lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank",
        "lora_alpha", "lora_dropout"}`` for ``lora_llama2`` and the model builders.

    Raises:
        FileNotFoundError: no adapter_config.json in ``adapter_dir``.
        ValueError: an adapter_config.json that is no JSON object (the file is named), or an
            adapter these builders cannot express (not LoRA, DoRA, rsLoRA, LoRA biases,
            per-module ranks or alphas other than its own, a partial MLP, other target modules).

    ``target_modules`` is read as PEFT matches it: an entry names every module whose path equals
    it or ends with "." + it (``q_proj``, ``self_attn.q_proj``, ``model.layers.0.self_attn.q_proj``
    as PEFT writes for ``"all-linear"``), and ``"all-linear"`` means every linear but ``lm_head``.
    Entries that match no Llama module (``query_key_value``) are skipped, as PEFT skips them.
    The builders put LoRA on a module type in every layer: an adapter that has it in some layers
    only (``layers_to_transform``, or layer paths in ``target_modules``) is refused by
    ``load_peft_adapter``, which sees the layers; one that lists every layer is plain LoRA.
    ``bias`` "all" or "lora_only" trains the base's biases, and Llama has none: PEFT saves none,
    and a bias in the weights would be refused there as an unexpected key.
    """
    path = os.path.join(os.fspath(adapter_dir), ADAPTER_CONFIG_NAME)
    if not os.path.exists(path):
        inner = adapter_in_subfolder(adapter_dir)
        raise FileNotFoundError(f"argument 'adapter_dir' must hold {ADAPTER_CONFIG_NAME}; not found in {os.fspath(adapter_dir)!r}"
                                + (f"; {inner}" if inner else torchtune_adapter_hint(adapter_dir)))
    config = read_json(path)
    expected = {"peft_type": "LORA", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "lora_bias": False}
    problems = [f"'{k}' must be {v!r}, got {config.get(k, v)!r}" for k, v in expected.items() if config.get(k, v) != v]
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        problems.append(f"'bias' must be one of ['none', 'all', 'lora_only'], got {config['bias']!r}")
    layers = config.get("layers_to_transform")
    if not (layers is None or is_int(layers) or (isinstance(layers, list) and all(is_int(i) for i in layers))):
        problems.append(f"'layers_to_transform' must be a layer index or a list of them, got {layers!r}")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_LORA_INITS:
        problems.append(
            f"'init_lora_weights' must be one of {list(_PLAIN_LORA_INITS)}, got {init!r} (an initialization that changes "
            "the base weights, or a LoRA variant: PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) "
            "converts such an adapter to plain LoRA)"
        )
    # Every other setting (those of LoRA variants and of PEFT versions to come) must be empty; a per-module rank or
    # alpha equal to the adapter's own changes nothing.
    for key, value in config.items():
        if key in ("rank_pattern", "alpha_pattern") and isinstance(value, dict):
            value = {k: v for k, v in value.items() if v != config.get("r" if key == "rank_pattern" else "lora_alpha")}
        if key not in expected and key not in _INERT_KEYS and key not in ("init_lora_weights", "bias", "layers_to_transform") \
                and value not in (None, False, {}, [], ""):
            problems.append(f"'{key}' must be empty, got {value!r} (a setting this loader does not implement)")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)  # PEFT's defaults
    if not is_int(rank) or rank <= 0:
        problems.append(f"'r' must be a positive integer, got {rank!r}")
    if not is_finite_real(alpha):
        problems.append(f"'lora_alpha' must be a finite number, got {alpha!r}")
    dropout = config.get("lora_dropout", 0.0)  # PEFT's default
    if not is_finite_real(dropout) or not 0.0 <= dropout < 1.0:
        problems.append(f"'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    targets = config.get("target_modules") or []
    targets_refused = False  # already named in problems: no second message about what they match
    if isinstance(targets, str):
        if targets.lower() == "all-linear":  # PEFT's shorthand: every linear but the output head
            targets = [linear.rsplit(".", 1)[1] for linear in _LAYER_LINEARS]
        else:
            problems.append(f"'target_modules' must be a list of module names or 'all-linear', got the pattern {targets!r}")
            targets, targets_refused = [], True
    elif not isinstance(targets, list) or not all(isinstance(entry, str) for entry in targets):
        problems.append(f"'target_modules' must be a list of module names (strings) or 'all-linear', got {targets!r}")
        targets, targets_refused = [], True
    matched = {entry: _matched_targets(entry) for entry in targets}
    unsupported = sorted(entry for entry, names in matched.items() if not names and _names_other_module(entry))
    if unsupported:
        problems.append(
            f"'target_modules' may only hold {sorted(_ATTN) + list(_MLP) + ['lm_head']} or their paths "
            f"(self_attn.q_proj, model.layers.0.self_attn.q_proj), got {unsupported}"
        )
    targets = set().union(*matched.values())
    if not targets and not unsupported and not targets_refused:
        problems.append(f"'target_modules' must match a linear of a Llama model, got {config.get('target_modules')!r}")
    mlp = [t for t in _MLP if t in targets]
    if mlp and len(mlp) != len(_MLP):
        problems.append(f"'target_modules' must name all of {list(_MLP)} or none, got {mlp}")
    if problems:
        raise ValueError(f"read_adapter_config: unsupported adapter {path}: " + "; ".join(problems))
    return {
        "lora_attn_modules": [_ATTN[t] for t in _ATTN if t in targets],
        "apply_lora_to_mlp": bool(mlp),
        "apply_lora_to_output": "lm_head" in targets,
        "lora_rank": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
    }


def adapter_in_subfolder(folder: str | os.PathLike) -> str:
    """Where a folder without adapter_config.json has an adapter in a subfolder, a hint saying so
    (a training checkpoint keeps its adapter in ``adapter/``); else ""."""
    inner = sorted(p.parent for p in Path(folder).glob(f"*/{ADAPTER_CONFIG_NAME}")) if os.path.isdir(folder) else []
    if not inner:
        return ""
    return (f"its subfolder '{inner[0]}' holds one (a training checkpoint keeps its adapter there, and PEFT saves "
            f"an adapter with a name other than 'default' in a subfolder of that name)")


def adapter_weights_path(adapter_dir: str | os.PathLike) -> str:
    """The adapter's weights file: ``adapter_model.safetensors``, else PEFT's ``adapter_model.bin``.

    Raises:
        FileNotFoundError: neither is in ``adapter_dir``.
    """
    for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_WEIGHTS_BIN_NAME):
        path = os.path.join(os.fspath(adapter_dir), name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"argument 'adapter_dir' must hold {ADAPTER_WEIGHTS_NAME} (or {ADAPTER_WEIGHTS_BIN_NAME}); not found in "
        f"{os.fspath(adapter_dir)!r}{torchtune_adapter_hint(adapter_dir)}"
    )


def torchtune_adapter_hint(folder: str | os.PathLike) -> str:
    """For a folder holding torchtune's own adapter file, what it is and what to use instead; else ""."""
    torchtune = torchtune_adapter_files(folder)
    if not torchtune:
        return ""
    return (f"; its {torchtune[0]} is torchtune's own adapter format (its parameter names, q/k rows in Meta's rotary "
            "layout), which is not read: use the PEFT-format adapter_model.safetensors and adapter_config.json that "
            "torchtune's FullModelHFCheckpointer writes beside it")


def check_adapter_rank(adapter_dir: str | os.PathLike, rank: int) -> None:
    """Checks, from the header of ``adapter_model.safetensors`` alone (an ``adapter_model.bin`` is
    read whole), that its lora_A weights have the rank adapter_config.json gives: a model is built
    with that rank before the weights are loaded, and a damaged ``r`` (a million) would otherwise
    size it.

    Raises:
        FileNotFoundError: as ``adapter_weights_path``.
        ValueError: a lora_A weight of another rank, named; an unreadable ``adapter_model.bin``.
    """
    path = adapter_weights_path(adapter_dir)
    if path.endswith(".safetensors"):
        reader = SafetensorsReader(path)
        try:
            shapes = {key: reader.shape(key) for key in reader.keys()}
        finally:
            reader.close()
    else:  # a pickle has no header to read: the file (small, as adapters are) is read whole
        shapes = {key: tuple(value.shape) for key, value in _read_bin(path, "check_adapter_rank").items()}
    other = _other_rank(shapes, rank)
    if other:
        raise ValueError(f"check_adapter_rank: {path}: {other}")


def _other_rank(shapes: dict[str, tuple[int, ...]], rank: int) -> str | None:
    """Why the lora_A weights among ``shapes`` do not have adapter_config.json's rank, or None."""
    other = [f"{key}: {list(shape)}" for key, shape in shapes.items()
             if (match := _KEY.match(key)) and match["which"] == "A" and (len(shape) != 2 or shape[0] != rank)]
    if not other:
        return None
    return f"adapter_config.json gives 'r' {rank}, but {len(other)} lora_A weights (of shape [r, in]) have another rank: {_listed(other, 5)}"


def _read_bin(path: str, who: str) -> dict[str, torch.Tensor]:
    """The tensors of an ``adapter_model.bin`` (a torch state dict, read without running code)."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = refused_pickle_global(e)
        if refused is None:
            raise ValueError(f"{who}: {path} cannot be read as a torch state dict: {e}") from None
        raise ValueError(python_objects_refused(f"{who}: {path}", refused)) from None
    except Exception as e:  # noqa: BLE001  (any unreadable file is the same user-facing problem)
        why = str(e) or ("it is empty" if os.path.getsize(path) == 0 else type(e).__name__)  # (an EOFError says nothing)
        raise ValueError(f"{who}: {path} cannot be read as a torch state dict: {why}") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in tensors.items()):
        raise ValueError(f"{who}: {path} must hold a dict of names (str) to tensors; got {_describe_mapping(tensors)}")
    return tensors


@torch.no_grad()
def load_peft_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Loads a PEFT LoRA adapter into the model's LoRALinear modules, and the base weights PEFT
    saves next to it (``lm_head.base_layer.weight`` when lm_head is targeted) into the model.

    Raises:
        FileNotFoundError: the adapter files are missing.
        ValueError: rank or alpha differ from the model's, or keys are missing, unexpected or of
            the wrong shape (all listed), or a LoRA module has its adapter merged into its base
            weight (call ``unmerge_()`` first); nothing is loaded then.
    """
    model = unwrap_parallel(model)
    builder_args = read_adapter_config(adapter_dir)
    weights_path = adapter_weights_path(adapter_dir)
    refuse_merged(model, "load_peft_adapter")
    modules = lora_modules(model)
    problems = [
        f"{name}: adapter (r={builder_args['lora_rank']}, alpha={builder_args['lora_alpha']}) vs model (r={m.rank}, alpha={m.alpha})"
        for name, m in modules.items()
        if (m.rank, m.alpha) != (builder_args["lora_rank"], builder_args["lora_alpha"])
    ]
    if problems:
        raise ValueError(f"load_peft_adapter: {adapter_dir} does not fit the model: rank/alpha differ: {problems[:10]}")
    if weights_path.endswith(".safetensors"):
        reader = SafetensorsReader(weights_path)
        try:
            tensors = {name: reader.get(name) for name in reader.keys()}
        finally:
            reader.close()
    else:
        tensors = _read_bin(weights_path, "load_peft_adapter")
    targets = _targets(model)
    unexpected, mismatched, base_weights = [], [], []
    seen: dict[tuple[str, str], str] = {}  # (module, A or B) -> its key
    twice, other_models, other_vocab, beyond = [], False, [], []
    # Adapter weights are small: each is checked whole before any is loaded.
    not_float = [f"{key}: {value.dtype}" for key, value in tensors.items() if not value.is_floating_point()]
    not_finite = [key for key, value in tensors.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            # PEFT also saves the base weight of a targeted lm_head / embedding
            # (``lm_head.base_layer.weight``) and of resized embeddings, and loads them back.
            ours = hf_to_ours(key[len(_PREFIX) :].replace(".base_layer.", ".")) if key.startswith(_PREFIX) else None
            if not ours or ours not in targets:
                unexpected.append(key)
                continue
            have = tuple(getattr(*targets[ours]).shape)
            if tuple(value.shape) != have:
                mismatched.append(f"{key}: adapter {list(value.shape)} vs model {list(have)}")
                if ours in (_EMBEDDING, _OUTPUT) and value.dim() == 2 and value.shape[1] == have[1]:
                    other_vocab.append((value.shape[0], have[0]))  # PEFT saves the embeddings of a resized vocabulary
                else:
                    other_models = True
                continue
            _check_range(key, value, getattr(*targets[ours]).dtype, beyond)
            base_weights.append((ours, value))
            continue
        module = modules.get(match["module"])
        if module is None:
            unexpected.append(key)
            continue
        target = module.lora_a if match["which"] == "A" else module.lora_b
        _check_range(key, value, target.weight.dtype, beyond)
        first = seen.setdefault((match["module"], match["which"]), key)  # (a weight of the wrong shape is not also missing)
        if first != key:  # lora_A.weight and lora_A.<adapter name>.weight: which one is meant is not known
            twice.append(f"{first} and {key}")
        if tuple(value.shape) != tuple(target.weight.shape):
            mismatched.append(f"{key}: adapter {list(value.shape)} vs model {list(target.weight.shape)}")
            features = 1 if match["which"] == "A" else 0  # the dim of lora_A [r, in] / lora_B [out, r] that is not the rank
            if value.dim() != 2 or value.shape[features] != target.weight.shape[features]:
                if match["module"] == "lm_head" and features == 0 and value.dim() == 2:  # lm_head's out: the vocabulary
                    other_vocab.append((value.shape[0], target.weight.shape[0]))
                else:
                    other_models = True
    missing = [f"{_PREFIX}{name}.lora_{w}.weight" for name in modules for w in "AB" if (name, w) not in seen]
    problems = [f"{what}: {_listed(names, 20)}" for what, names in (
        ("missing", missing), ("unexpected", unexpected), ("wrong shapes", mismatched), ("not floating point", not_float),
        ("holding NaN or Inf", not_finite), ("two tensors for one weight (one adapter per file)", twice),
        ("beyond the model's dtype", beyond)) if names]
    partial = _some_layers_only(modules, set(seen))
    if partial:
        problems.insert(0, partial)
    other_rank = _other_rank({key: tuple(value.shape) for key, value in tensors.items()}, builder_args["lora_rank"])
    if other_rank:
        problems.insert(0, other_rank)
    if other_vocab:
        problems.insert(0, f"it holds embeddings of a vocabulary resized to {other_vocab[0][0]} tokens (tokens added to the tokenizer), "
                           f"and the model has {other_vocab[0][1]}: qlora_ext's builders do not resize a vocabulary")
    if other_models:
        problems.insert(0, "its weights have the shapes of another base model (an adapter fits the model it was trained on; "
                           "its adapter_config.json's base_model_name_or_path may name it)")
    if any("lora_magnitude_vector" in key for key in unexpected):  # (torchtune's DoRA runs write no use_dora)
        problems.insert(0, "the adapter holds DoRA magnitudes (lora_magnitude_vector): it is a DoRA adapter, which qlora_ext "
                           "does not support")
    if any(key.endswith(".bias") for key in unexpected):
        problems.insert(0, "the adapter holds biases of the base model (PEFT's bias='all' or 'lora_only' on a model with "
                           "attention or MLP biases), and Llama-2 has none")
    if problems:
        raise ValueError(f"load_peft_adapter: {adapter_dir} does not fit the model: " + "; ".join(problems))
    device = _home_device(model)
    for ours, value in base_weights:
        _assign(*targets[ours], value, device)
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            continue
        module = modules[match["module"]]
        target = module.lora_a if match["which"] == "A" else module.lora_b
        if target.weight.is_meta:
            target.weight = nn.Parameter(value.to(target.weight.dtype), requires_grad=True)
        else:
            target.weight.copy_(value)


def _check_range(key: str, value: torch.Tensor, dtype: torch.dtype, beyond: list[str]) -> None:
    """Adds ``key`` to ``beyond`` where a finite value of it would be inf in ``dtype`` (the model's)."""
    try:
        refuse_beyond_range(value, dtype)
    except ValueError as e:
        beyond.append(f"{key}: {e}")


def _some_layers_only(modules: dict[str, LoRALinear], seen: set[tuple[str, str]]) -> str | None:
    """Why an adapter lacks whole modules: it has LoRA on a module type in some layers only
    (``layers_to_transform``, or layer paths in ``target_modules``); None if it does not."""
    layers: dict[str, tuple[list[int], list[int]]] = {}  # module type -> (layers with it, layers without)
    for name in modules:
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match:
            has = (name, "A") in seen or (name, "B") in seen
            layers.setdefault(match[2], ([], []))[0 if has else 1].append(int(match[1]))
    some = {kind: present for kind, (present, absent) in layers.items() if present and absent}
    if not some:
        return None
    where = "; ".join(f"{kind} in layers {present}" for kind, present in some.items())
    return (f"the adapter has LoRA in some layers only ({where}), and qlora_ext's builders put it on a module "
            "in every layer")
