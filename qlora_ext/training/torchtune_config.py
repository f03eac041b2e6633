"""torchtune recipe configs read as ours, so a user's ``7B_qlora_single_device.yaml`` (the file
behind the seed tutorial's ``tune run lora_finetune_single_device --config ...``) runs as it is:

    python -m qlora_ext.finetune --config my_7B_qlora_single_device.yaml dataset.data_files=alpaca.json

Each section's ``_component_`` names what torchtune would build; here it selects the matching
section of ``config_schema.SCHEMA`` (``torchtune.models.llama2.qlora_llama2_7b`` ->
``model.builder: qlora_llama2_7b``, ``torch.optim.AdamW`` -> the trainer's AdamW, ...).
``${dotted.key}`` interpolations (OmegaConf's syntax, as in ``log_dir: ${output_dir}``) are
resolved first. What torchtune sets that changes nothing here is dropped (a disabled profiler,
the loss class: the trainer's loss is always the chunked cross entropy), with a note where the
user could expect otherwise, as are the multi-GPU recipe's FSDP settings; a component or setting
this trainer does not have is refused with the reason and what it accepts. A file of torchtune
0.1/0.2 (components under ``torchtune.utils``) gets those versions' defaults where it is silent
(LoRA dropout 0.05, a 512-token cut), with a note. Keys left over go through the usual schema check.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable

from qlora_ext.training.config_schema import MODEL_BUILDERS

class TorchtuneConfigError(ValueError):
    """A torchtune config that names something this trainer cannot do (``ConfigError`` wraps it)."""


def is_torchtune_config(raw: dict) -> bool:
    """Whether a config (top level or any section) uses torchtune's ``_component_`` keys."""
    return "_component_" in raw or any(isinstance(v, dict) and "_component_" in v for v in raw.values())


# A comment of the file with its launch command:
# "#   tune run --nnodes 1 --nproc_per_node 2 lora_finetune_distributed --config llama2/7B_lora"
_LAUNCH_COMMENT = re.compile(r"^\s*#.*?\btune run\s+(.*)$", re.MULTILINE)


def launch_recipe(text: str) -> str | None:
    """The multi-GPU recipe the comments of a torchtune config's ``text`` launch it with, if any
    (its LoRA configs without ``_single_device``, as ``llama2/7B_lora``, have no FSDP key that says
    so): in the first ``tune run`` command, the word before ``--config`` (else the first word that
    is neither an option nor an option's value, ``--nproc_per_node gpu``), when it ends in
    ``_distributed``."""
    command = _LAUNCH_COMMENT.search(text)
    if command is None:
        return None
    words = command.group(1).split()
    if "--config" in words[1:]:
        recipe = words[words.index("--config", 1) - 1]
    else:
        options = {i + 1 for i, word in enumerate(words) if word.startswith("-") and "=" not in word}
        recipe = next((w for i, w in enumerate(words) if not w.startswith("-") and i not in options), "")
    return recipe if recipe.endswith("_distributed") else None


def translate(raw: dict, launched_by: str | None = None) -> tuple[dict, list[str]]:
    """torchtune's config (interpolations resolved) -> (a raw config in our schema, notes).
    ``launched_by``: the multi-GPU recipe its comments name (``launch_recipe``), for the note
    that its batch size is per GPU.

    Raises:
        TorchtuneConfigError: a component or a setting the trainer does not have.
    """
    raw = copy.deepcopy(raw)
    notes: list[str] = []
    if "_component_" in raw:
        raise TorchtuneConfigError(f"'_component_' at the top level ({raw['_component_']!r}) is not a recipe config")
    if "optimizer" not in raw:
        raise TorchtuneConfigError(
            "it has no 'optimizer' section: a config of a torchtune recipe that does not train (generation, evaluation, "
            "quantization); this trainer reads fine-tuning configs, as lora_finetune_single_device's"
        )
    if isinstance(raw.get("dataset"), list):
        raise TorchtuneConfigError(
            f"'dataset' lists {len(raw['dataset'])} datasets (torchtune concatenates them); this trainer reads one: "
            "a dataset section whose data_files names every file (dataset.data_files=[a.json,b.json]), when all hold "
            "Alpaca records"
        )
    before_0_3 = _is_before_0_3(raw)
    length_given = any("max_seq_len" in raw.get(key, {}) for key in ("dataset", "tokenizer") if isinstance(raw.get(key), dict))
    template_absent = isinstance(raw.get("tokenizer"), dict) and "prompt_template" not in raw["tokenizer"]
    for key in list(raw):
        if isinstance(raw[key], dict) and key in _SECTIONS:
            section = raw.pop(key)
            component = section.pop("_component_", None)
            translated = _SECTIONS[key](component, section, raw, notes)
            if translated is not None:
                raw[key] = translated
    for key, (allowed, why) in _TOP_LEVEL.items():
        _refuse_unless(raw, key, allowed, why, "")
    multi_gpu = [key for key in _MULTI_GPU_KEYS if key in raw]
    for key in multi_gpu:
        raw.pop(key)
    if multi_gpu:
        notes.append(f"{', '.join(multi_gpu)}: settings of torchtune's multi-GPU recipe ({launched_by or 'lora_finetune_distributed'}), "
                     "not used by this one-device trainer; that recipe's batch_size is per GPU, so a batch here is one GPU's share")
    elif launched_by:
        notes.append(f"the file's comments run it with torchtune's multi-GPU recipe ({launched_by}), whose batch_size is per GPU: "
                     "a batch here is one GPU's share")
    if raw.get("log_every_n_steps", 1) is None:
        raw["log_every_n_steps"] = 1  # torchtune's recipes read null as 1
    if before_0_3:
        _defaults_before_0_3(raw, length_given, notes)
    dataset = raw.get("dataset")
    if template_absent and isinstance(dataset, dict) and dataset.get("template") is None:
        # what the file's torchtune did: 0.3 and later's llama2_tokenizer wraps the prompt in
        # Llama2ChatTemplate by default; 0.1 and 0.2 had no template (the seed tutorial's Alpaca prompt alone)
        dataset["template"] = "alpaca" if before_0_3 else "llama2_chat"
        if not before_0_3:
            notes.append(
                "tokenizer: no prompt_template, so Llama2ChatTemplate ([INST] ... [/INST]), the default of torchtune 0.3 "
                "and later (this config's torchtune.training components); tokenizer.prompt_template=null gives the "
                "Alpaca prompt alone, as the seed tutorial's torchtune trained"
            )
    return raw, notes


def _is_before_0_3(raw: dict) -> bool:
    """torchtune before 0.3 kept its checkpointers and metric loggers in ``torchtune.utils`` (0.3
    moved them to ``torchtune.training``), and its builders and dataset had other defaults."""
    return any(isinstance(v, dict) and str(v.get("_component_", "")).startswith("torchtune.utils.") for v in raw.values())


def _defaults_before_0_3(raw: dict, length_given: bool, notes: list[str]) -> None:
    """What torchtune 0.1 and 0.2 did where their configs are silent: LoRA dropout 0.05 (their
    builders' default; ours and torchtune 0.3's is 0.0), and Alpaca examples cut at 512 tokens
    (their alpaca_dataset's max_seq_len)."""
    model = raw.get("model")
    if isinstance(model, dict) and "lora_dropout" not in model:
        model["lora_dropout"] = 0.05
        notes.append("model.lora_dropout: 0.05, as torchtune before 0.3 (this config's torchtune.utils components) "
                     "applied where its config was silent")
    tokenizer = raw.setdefault("tokenizer", {})
    if isinstance(tokenizer, dict) and not length_given:
        tokenizer["max_seq_len"] = 512
        notes.append("tokenizer.max_seq_len: 512, as torchtune before 0.3 cut Alpaca examples (its alpaca_dataset's "
                     "max_seq_len) where its config was silent")


def _name(component: Any, section: str, accepted: dict[str, Any]) -> Any:
    """What ``accepted`` maps the component's last dotted name to (the module path may be any
    torchtune/torch version's), or an error listing the accepted ones."""
    if component is None:
        raise TorchtuneConfigError(f"'{section}' needs a '_component_' in a torchtune config; accepted: {', '.join(accepted)}")
    name = str(component).rsplit(".", 1)[-1]
    if not str(component).startswith(("torchtune.", "torch.")) or name not in accepted:
        raise TorchtuneConfigError(f"'{section}._component_' is {component!r}; this trainer has: {', '.join(accepted)}")
    return accepted[name]


def _refuse_unless(section: dict, key: str, allowed: tuple, why: str, where: str) -> None:
    if key in section:
        value = section.pop(key)
        if value not in allowed:
            raise TorchtuneConfigError(f"'{where + '.' if where else ''}{key}: {value}' is not supported: {why}")


def _model(component: Any, section: dict, top: dict, notes: list[str]) -> dict | None:
    if str(component).startswith("torchtune.") and str(component).rsplit(".", 1)[-1] in ("llama2", "llama2_7b", "llama2_13b", "llama2_70b"):
        raise TorchtuneConfigError(
            f"'model._component_' is {component!r}, a full fine-tune; this trainer trains LoRA adapters: "
            f"use one of {', '.join(MODEL_BUILDERS)}"
        )
    name = _name(component, "model", {b: b for b in MODEL_BUILDERS})
    # torchtune's qlora_* builders are its lora_* ones with quantize_base=True, which the config's own
    # value overrides (null as false: torchtune's modules test its truth)
    given = "quantize_base" in section
    quantize = section.pop("quantize_base", None)
    if quantize is not None and type(quantize) is not bool:
        raise TorchtuneConfigError(f"'model.quantize_base: {quantize}' must be true or false")
    if quantize and not name.startswith("qlora_"):
        name = f"q{name}"
    elif given and not quantize and name.startswith("qlora_"):
        notes.append(f"model: quantize_base false on {name} keeps the base weights dense, as torchtune does: {name[1:]}")
        name = name[1:]
    _refuse_unless(section, "use_dora", (False, None), "DoRA adapters are not implemented", "model")
    _refuse_unless(section, "attn_dropout", (0, 0.0, None), "attention dropout is not implemented", "model")
    return {"builder": name, **section}


def _tokenizer(component: Any, section: dict, top: dict, notes: list[str]) -> dict | None:
    _name(component, "tokenizer", {"llama2_tokenizer": True})
    dataset = top.setdefault("dataset", {})
    explicit = dataset.get("template") if isinstance(dataset, dict) else None  # our own key, in the yaml or an override
    given = "prompt_template" in section  # (absent: translate applies the default of the file's torchtune version)
    template = section.pop("prompt_template", None)
    if template is not None and str(template).rsplit(".", 1)[-1] != "Llama2ChatTemplate":
        raise TorchtuneConfigError(
            f"'tokenizer.prompt_template: {template}' is not supported: null (the Alpaca prompt alone) or "
            "torchtune.models.llama2.Llama2ChatTemplate"
        )
    chosen = "alpaca" if template is None else "llama2_chat"
    if given and explicit is not None and explicit != chosen:
        raise TorchtuneConfigError(
            f"'dataset.template: {explicit}' contradicts 'tokenizer.prompt_template: {template}' (which means "
            f"dataset.template={chosen}); set one of them"
        )
    if isinstance(dataset, dict) and explicit is None and given:  # else the dataset section's own check names it
        dataset["template"] = chosen
    return section


MAX_SHARDS = 10_000  # far past any checkpoint's shard count; a damaged max_filename would list billions


def _checkpoint_files(value: Any) -> Any:
    """torchtune's ``{filename_format: model-{}-of-{}.safetensors, max_filename: "00002"}`` -> the names."""
    if not isinstance(value, dict):
        return value
    fmt, last = value.get("filename_format"), str(value.get("max_filename", ""))
    if not isinstance(fmt, str) or fmt.count("{}") != 2 or not last.isdecimal() or not 0 < int(last) <= MAX_SHARDS:
        raise TorchtuneConfigError(
            f"'checkpointer.checkpoint_files' as a mapping needs filename_format with two {{}} and a numeric "
            f"max_filename from 1 to {MAX_SHARDS}; got {value!r:.300}"
        )
    try:
        return [fmt.format(str(i).zfill(len(last)), last) for i in range(1, int(last) + 1)]
    except (IndexError, KeyError, ValueError) as e:  # other fields besides the two {}
        raise TorchtuneConfigError(f"'checkpointer.checkpoint_files': filename_format {fmt!r} cannot be filled with the shard "
                                   f"numbers alone ({type(e).__name__}: {e})") from None


def _checkpointer(component: Any, section: dict, top: dict, notes: list[str]) -> dict | None:
    if _name(component, "checkpointer", {"FullModelHFCheckpointer": "hf", "FullModelMetaCheckpointer": "meta"}) == "meta":
        notes.append("checkpointer: FullModelMetaCheckpointer reads the Meta checkpoint; the merged model is saved in HF format "
                     "(model.safetensors + config.json, as for a HF base); qlora_ext.checkpoint.save_meta_checkpoint writes a Meta one")
    if top.get("resume_from_checkpoint") is True:  # (the advice below is taken already)
        why = ("resume_from_checkpoint=True reads output_dir's last checkpoint of this trainer (adapter and training state); "
               "a torchtune run's state cannot be continued: start a new run from the model it saved (its epoch_N folder)")
    else:
        why = "to continue a run, set resume_from_checkpoint=True: it reads output_dir's last checkpoint (adapter and training state)"
    for key in ("adapter_checkpoint", "recipe_checkpoint"):
        _refuse_unless(section, key, (None,), why, "checkpointer")
    _refuse_unless(section, "safe_serialization", (True, None), "checkpoints are always written as safetensors", "checkpointer")
    ckpt_out = section.pop("output_dir", None)
    if ckpt_out is not None:
        if "output_dir" not in top:
            top["output_dir"] = ckpt_out
        elif str(ckpt_out).rstrip("/") != str(top["output_dir"]).rstrip("/"):
            notes.append(f"checkpoints go to output_dir ({top['output_dir']}), with the logs; "
                         f"checkpointer.output_dir ({ckpt_out}) is not used")
    if "checkpoint_files" in section:
        section["checkpoint_files"] = _checkpoint_files(section["checkpoint_files"])
    return section


_HUB_SOURCES = {"alpaca_dataset": "tatsu-lab/alpaca", "alpaca_cleaned_dataset": "yahma/alpaca-cleaned"}


def _dataset(component: Any, section: dict, top: dict, notes: list[str]) -> dict | None:
    if str(component).startswith("torchtune.") and str(section.get("template")).endswith("AlpacaInstructTemplate"):
        keep = ("" if "train_on_input" in section else  # (instruct_dataset's default is False, alpaca_dataset's True)
                ", and set dataset.train_on_input=False, instruct_dataset's default (alpaca_dataset's is True)")
        raise TorchtuneConfigError(
            f"'dataset._component_' is {component!r} with the Alpaca template, which is torchtune's alpaca_dataset: set "
            f"dataset._component_=torchtune.datasets.alpaca_dataset (the same records and prompt) and drop dataset.template{keep}"
        )
    if str(component).startswith("torchtune.") and str(component).rsplit(".", 1)[-1] in ("instruct_dataset", "chat_dataset"):
        raise TorchtuneConfigError(
            f"'dataset._component_' is {component!r}, which formats raw input -> output records or chat turns without the "
            "Alpaca prompt; this trainer trains on Alpaca records with the Alpaca prompt (alpaca_dataset): convert the "
            "records to instruction/input/output fields, knowing that the prompts then change"
        )
    name = _name(component, "dataset", {n: n for n in _HUB_SOURCES})
    source = section.pop("source", _HUB_SOURCES[name])
    if "data_files" not in section:
        where = ("source json reads the files dataset.data_files names" if source == "json" else
                 f"torchtune's {name} downloads {source} from the Hugging Face Hub; this trainer reads local files")
        raise TorchtuneConfigError(
            f"'dataset': {where}: set dataset.data_files=PATH (JSON or JSONL of instruction/input/output records)"
        )
    if source not in ("json", *_HUB_SOURCES.values()):  # (an Alpaca Hub name with local files: the files are that dataset)
        raise TorchtuneConfigError(f"'dataset.source: {source}' is not supported: this trainer reads the local files "
                                   "dataset.data_files names (JSON or JSONL); remove dataset.source, or set it to json")
    files = section.get("data_files")
    if isinstance(files, dict):  # HF datasets' {split: files}, of which dataset.split picks one (as load_dataset does)
        split = section.pop("split", None) or "train"
        name = re.split(r"[\[+]", str(split))[0]  # (train[:95%]: a slice, refused below with why)
        if name != split and name in files:
            section["split"] = split
            split = name
        if split not in files:
            raise TorchtuneConfigError(f"'dataset.data_files' maps the splits {sorted(files)} to files, and dataset.split "
                                       f"{split!r} is none of them")
        section["data_files"] = files[split]
    _refuse_unless(section, "packed", (False, None), "examples are padded per batch, not packed", "dataset")
    _refuse_unless(section, "split", ("train", None), "it picks part of the records: give a file holding just those "
                   "(dataset.validation_fraction holds out a random fraction of them for a validation loss)", "dataset")
    if section.get("column_map") is None:  # (null, or absent: the Alpaca names)
        section.pop("column_map", None)
    _refuse_unless(section, "field", (None,), "a file's records are its top-level JSON list or its lines", "dataset")
    if "max_seq_len" in section:  # older torchtune set it on the dataset
        value, tokenizer = section.pop("max_seq_len"), top.get("tokenizer")
        if tokenizer is None:
            tokenizer = top["tokenizer"] = {}
        elif not isinstance(tokenizer, dict):
            raise TorchtuneConfigError(f"'tokenizer' must be a section (its _component_, path and max_seq_len), where "
                                       f"'dataset.max_seq_len' moves to; got {tokenizer!r:.100}")
        if tokenizer.get("max_seq_len") is None:  # (torchtune 0.3 and later write tokenizer.max_seq_len: null)
            tokenizer["max_seq_len"] = value
        elif value is not None and value != tokenizer["max_seq_len"]:
            raise TorchtuneConfigError(f"'dataset.max_seq_len: {value}' contradicts 'tokenizer.max_seq_len: "
                                       f"{tokenizer['max_seq_len']}'; set one of them")
    section.setdefault("train_on_input", True)  # torchtune's Alpaca default; ours is False
    return section


def _optimizer(component: Any, section: dict, top: dict, notes: list[str]) -> dict | None:
    _name(component, "optimizer", {"AdamW": True})
    return section


def _lr_scheduler(component: Any, section: dict, top: dict, notes: list[str]) -> dict | None:
    name = _name(component, "lr_scheduler", {"get_cosine_schedule_with_warmup": "cosine_with_warmup"})
    return {"name": name, **section}


def _loss(component: Any, section: dict, top: dict, notes: list[str]) -> dict | None:
    _name(component, "loss", {"CrossEntropyLoss": True, "CEWithChunkedOutputLoss": True, "LinearCrossEntropyLoss": True})
    return None  # the trainer's loss is always cross entropy over chunks of the output projection


_LOGGER_TYPES = {"DiskLogger": "disk", "StdoutLogger": "disk", "TensorBoardLogger": "tensorboard", "WandBLogger": "wandb"}


def _metric_logger(component: Any, section: dict, top: dict, notes: list[str]) -> dict | None:
    kind = _name(component, "metric_logger", _LOGGER_TYPES)
    if component.endswith("StdoutLogger"):
        notes.append("metric_logger: the terminal shows the metrics anyway; they are also written to disk")
    return {"type": kind, **section}


def _profiler(component: Any, section: dict, top: dict, notes: list[str]) -> dict | None:
    if section.get("enabled", False):
        raise TorchtuneConfigError("'profiler.enabled: True' is not supported: profile a step with torch.profiler, "
                                   "or, in the source checkout, bench/model_train.py --profile")
    return None


_SECTIONS: dict[str, Callable] = {
    "model": _model, "tokenizer": _tokenizer, "checkpointer": _checkpointer, "dataset": _dataset,
    "optimizer": _optimizer, "lr_scheduler": _lr_scheduler, "loss": _loss, "metric_logger": _metric_logger,
    "profiler": _profiler,
}

# Top-level torchtune keys with no counterpart: (the values that change nothing here, why others are refused)
_TOP_LEVEL = {
    "enable_activation_offloading": ((False, None), "activations stay on the device (enable_activation_checkpointing saves memory)"),
    "optimizer_in_bwd": ((False, None), "the optimizer steps after each accumulated batch"),
    "low_cpu_ram": ((True, False, None), ""),  # the model is always loaded layer by layer
}
# Settings of torchtune's multi-GPU recipe: dropped, with a note.
_MULTI_GPU_KEYS = ("fsdp", "fsdp_cpu_offload", "fsdp_sharding_strategy", "fsdp_reshard_after_forward", "custom_sharded_layers")


def our_override_for(key: str, value: str) -> str | None:
    """For an override in torchtune's keys given on a config in this trainer's keys (the bundled
    ``llama2/7B_qlora_single_device``): what to give instead; None where the key is not torchtune's."""
    value, section = value.strip(), key.split(".")[0]
    ours = {"checkpointer.output_dir": "output_dir", "dataset.max_seq_len": "tokenizer.max_seq_len"}.get(key)
    if ours:
        return f"give {ours}={value}"
    if key == "model" and value.startswith("torchtune."):
        return f"give model.builder={value.rsplit('.', 1)[-1]}"
    if key == "metric_logger" and value.rsplit(".", 1)[-1] in _LOGGER_TYPES:
        return f"give metric_logger.type={_LOGGER_TYPES[value.rsplit('.', 1)[-1]]}"
    if key == "dataset.source":
        return "drop it: the files dataset.data_files names are read as JSON or JSON lines"
    if section in ("profiler", "loss"):
        return f"drop it: this trainer has no {section} setting" + (" (its loss is cross entropy)" if section == "loss" else "")
    return None
