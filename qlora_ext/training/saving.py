"""Writing a training checkpoint: one folder with the merged HF model (unless
``save_adapter_weights_only``), the tokenizer and the configs, and the PEFT adapter in its
``adapter/`` subfolder, committed whole; then the training state that points at it (see
``checkpointing`` for why in that order).

The adapter has a folder of its own because transformers' ``from_pretrained`` treats a model
folder that also holds an ``adapter_config.json`` as base weights with an adapter to apply: beside
the merged weights, the adapter would be applied twice.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from qlora_ext._dtypes import HF_DTYPES
from qlora_ext.checkpoint import read_checkpoint_config, save_hf_checkpoint, save_hf_tokenizer, save_peft_adapter
from qlora_ext.checkpoint.merged_adapter import ADAPTER_SUBDIR, TRAINING_CONFIG_FILE
from qlora_ext.checkpoint.config import read_json
from qlora_ext.checkpoint.load import stored_dtype, weights_digest
from qlora_ext.training import checkpoint_folders, checkpointing

# Keys recorded with the training state. A resumed run must keep them, except those in
# ADJUSTABLE_ON_RESUME: the optimizer's hyperparameters, the schedule and clipping (what one changes
# after a NaN loss), which the resumed run puts on the loaded optimizer and schedule. The model,
# the data, its order and batching stay, or the resumed run would be a different run; keys not
# listed (logging, saving, output paths) may change freely.
_RESUME_KEYS = (
    "model", "dataset", "tokenizer.max_seq_len", "batch_size", "gradient_accumulation_steps", "shuffle",
    "max_steps_per_epoch", "optimizer", "lr_scheduler", "clip_grad_norm", "epochs",
)
# epochs may change (to train on); it is compared so that the change, which stretches the lr
# schedule over the new number of steps, is reported. The data files may be named otherwise (moved,
# or a relative path from another folder): what must stay is their number of records
# (RECORDS_KEY), which the data position and the held-out split depend on; a record may be fixed in place.
ADJUSTABLE_ON_RESUME = (
    "optimizer.lr", "optimizer.weight_decay", "optimizer.betas", "optimizer.eps", "lr_scheduler", "clip_grad_norm", "epochs",
    "dataset.data_files", "dtype",  # (the compute dtype as resolved: a resume on another device may change it)
)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost mount, permissions); the previous
    checkpoint is untouched (every write is staged and committed whole)."""


def is_write_failure(error: BaseException) -> bool:
    """Whether an exception raised while saving is the file system's: an OSError, or torch.save's
    RuntimeError from its stream writer (how it reports a full disk)."""
    if isinstance(error, OSError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text)


def resume_fingerprint(cfg) -> dict[str, Any]:
    """The config values a resumed run must share with the run it continues (dotted keys), and
    ``checkpointer.weights``: what the base checkpoint holds (``weights_digest``), so that
    resuming on another base of the same architecture is refused, while moving it is not. A base
    that cannot be read gets no entry: building the model names the problem."""
    full = cfg.to_dict()
    out: dict[str, Any] = {}

    def add(key: str, node: Any) -> None:  # (a section's keys one by one: a change names its key)
        if isinstance(node, dict):
            for k, v in node.items():
                add(f"{key}.{k}", v)
        else:
            out[key] = node

    for key in _RESUME_KEYS:
        node: Any = full
        for part in key.split("."):
            node = node[part]
        add(key, node)
    try:
        out["checkpointer.weights"] = weights_digest(cfg.checkpointer.checkpoint_dir, cfg.checkpointer.checkpoint_files)
    except (OSError, ValueError):
        pass
    return out  # the seed is checked apart (checkpointing.load_training_state): a null one takes the checkpoint's


RECORDS_KEY = "dataset.records"  # the number of records the data files held (a fingerprint entry)


def check_resumed_records(saved: dict[str, Any], records: int, output_dir: Path) -> None:
    """Raises ResumeError where the data files hold another number of records than the run the
    state was saved by trained on (a state without that entry, an earlier version's, passes)."""
    trained_on = saved.get(RECORDS_KEY)
    if trained_on is not None and trained_on != records:
        raise checkpointing.ResumeError(
            f"resume_from_checkpoint=true: dataset.data_files hold {records} records, but the checkpoint in {output_dir} was "
            f"trained on {trained_on}; the data position and the held-out split depend on them: resume with those files "
            "(they may have moved, and a record may be fixed in place), or start afresh"
        )


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key old -> new"`` for each fingerprint key whose value differs (on an accepted resume,
    only ADJUSTABLE_ON_RESUME keys can); keys only one side has are not compared, as
    ``checkpointing.load_training_state`` does not compare them."""
    return [
        f"{key} {checkpointing.as_config_text(saved[key])} -> {checkpointing.as_config_text(current[key])}"
        for key in sorted(set(saved) & set(current)) if saved[key] != current[key]
    ]


def resolved_yaml(cfg, seed: int) -> str:
    """The resolved config with the seed actually used (so the file reproduces the run), and a
    relative ``metric_logger.log_dir`` outside ``output_dir`` made absolute: ``python -m
    qlora_ext.plot``, run from another folder, finds the logs by it (one inside ``output_dir`` is
    found inside the run folder, wherever that is)."""
    values = cfg.to_dict()
    values["seed"] = seed
    log_dir = values["metric_logger"].get("log_dir")
    if log_dir and not os.path.isabs(log_dir):
        inside = os.path.relpath(log_dir, values["output_dir"])
        if inside == os.pardir or inside.startswith(os.pardir + os.sep):
            values["metric_logger"]["log_dir"] = os.path.abspath(log_dir)
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=None)


def save_checkpoint(
    output_dir: Path,
    name: str,
    model: nn.Module,
    cfg,
    seed: int,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler,
    adapter: dict[str, nn.Parameter],
    epoch: int,
    step_in_epoch: int,
    global_step: int,
    fingerprint: dict[str, Any],
    metrics_log: str | None = None,
) -> Path:
    """Writes ``output_dir/name`` and then ``output_dir/recipe_state.pt`` (with ``fingerprint``,
    the run's ``resume_fingerprint`` as taken at its start, and ``metrics_log``, its metrics log
    so far); returns the folder.

    Older ``step_*`` folders are removed once the new state is in place (epoch folders stay).
    """
    final = output_dir / name
    tmp = checkpoint_folders.staging_dir(final)
    try:
        ckpt_dir = cfg.checkpointer.checkpoint_dir
        # absolute, so that PEFT (AutoPeftModelForCausalLM) finds the base from any working directory
        save_peft_adapter(model, tmp / ADAPTER_SUBDIR, base_model_name_or_path=os.path.abspath(ckpt_dir))
        if not cfg.save_adapter_weights_only:
            config_json = Path(ckpt_dir) / "config.json"
            # A Meta base records no context length: its reading of one is kept over a shorter model.max_seq_len.
            base_config = (read_json(config_json) if config_json.is_file() else  # (UTF-8 whatever the locale, as HF reads it)
                           {"max_position_embeddings": read_checkpoint_config(ckpt_dir, cfg.checkpointer.checkpoint_files).max_seq_len})
            # Merged weights in the base checkpoint's dtype (bf16 for Llama-2): the one its config.json
            # declares, else the one it stores (a Meta checkpoint declares none), else the model's own.
            dtype = _declared_dtype(base_config) or stored_dtype(ckpt_dir, cfg.checkpointer.checkpoint_files)
            save_hf_checkpoint(model, tmp, dtype=dtype, base_config=base_config)
        save_hf_tokenizer(tmp, cfg.tokenizer.path, source_dir=ckpt_dir)
        if (Path(ckpt_dir) / "generation_config.json").is_file():
            shutil.copyfile(Path(ckpt_dir) / "generation_config.json", tmp / "generation_config.json")
        (tmp / TRAINING_CONFIG_FILE).write_text(resolved_yaml(cfg, seed))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The folder and recipe_state.pt are one checkpoint: until the state naming the new folder is
    # in place, the folder it replaces is kept, and put back if the state is not written (Ctrl-C,
    # a full disk), so the state on disk always names a folder saved with it.
    state_path = output_dir / checkpointing.STATE_FILE
    state_before = _file_identity(state_path)
    aside = checkpoint_folders.aside_dir(final)  # where commit_dir moves the folder it replaces
    replaced = None
    try:
        replaced = checkpoint_folders.commit_dir(tmp, final, keep_old=True)
        checkpointing.save_training_state(
            output_dir, checkpoint_name=name, epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
            seed=seed, optimizer=optimizer, scheduler=scheduler, adapter=adapter, fingerprint=fingerprint,
            metrics_log=metrics_log,
        )
    except BaseException:
        old = aside if aside.exists() else None
        if _file_identity(state_path) != state_before:  # the new state is in place (interrupted after its rename)
            checkpoint_folders.discard_old(final, old)
        elif not tmp.exists():  # the new folder was renamed into place (perhaps inside commit_dir)
            checkpoint_folders.restore_dir(final, old)
        else:  # (commit_dir moved the older folder aside, if at all, but not this one in)
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not final.exists():
                os.replace(old, final)
        raise
    checkpoint_folders.discard_old(final, replaced)
    checkpoint_folders.remove_step_folders(output_dir, keep=name)
    return final


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime, size) of a file, None without one: tells whether an atomic write replaced it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _declared_dtype(config: dict | None) -> torch.dtype | None:
    """The dtype a HF config.json declares (``torch_dtype``, or ``dtype`` in transformers 5)."""
    name = (config or {}).get("torch_dtype") or (config or {}).get("dtype")
    return HF_DTYPES.get(name) if isinstance(name, str) else None  # (not a name: as "auto", the stored dtype)
