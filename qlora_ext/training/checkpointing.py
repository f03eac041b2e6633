"""The training state that lets an interrupted run continue exactly: ``output_dir/recipe_state.pt``
(optimizer, schedule, counters, RNG states, adapter weights in full precision, and the checkpoint
folder it belongs to), replaced atomically *after* that folder is committed (see
``checkpoint_folders``). A run killed at any moment therefore leaves the previous
``recipe_state.pt`` and the folder it names intact.
"""

from __future__ import annotations

import errno
import pickle
import random
from pathlib import Path
from typing import Any

import torch
import yaml

from qlora_ext.checkpoint.atomic import atomic_path
from qlora_ext.checkpoint.readers import refused_pickle_global

__all__ = ["ResumeError", "atomic_torch_save", "load_training_state", "rng_state", "save_training_state", "set_rng_state"]

STATE_FILE = "recipe_state.pt"
STATE_VERSION = 1
# What a resume reads from the state (besides "version"; "metrics_log" is optional).
STATE_KEYS = ("checkpoint_name", "epoch", "step_in_epoch", "global_step", "seed", "optimizer", "lr_scheduler", "rng",
              "adapter", "fingerprint")


_TORCHTUNE_STATE = (
    "torchtune's training state, which this trainer cannot continue (another optimizer and data order); start a "
    "new run from the model the torchtune run saved (checkpointer.checkpoint_dir=its epoch_N folder), or from the base "
    "with its adapter, in another output_dir"
)


class ResumeError(RuntimeError):
    """No usable training state, or one from an incompatible config."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (a temp file in the same folder, fsync, rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    output_dir: str | Path,
    *,
    checkpoint_name: str,
    epoch: int,
    step_in_epoch: int,
    global_step: int,
    seed: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    adapter: dict[str, torch.Tensor],
    fingerprint: dict[str, Any],
    metrics_log: str | None = None,
) -> Path:
    """Writes ``output_dir/recipe_state.pt`` atomically; ``(epoch, step_in_epoch)`` is where the
    data resumes (optimizer steps already done in that epoch); ``metrics_log``, the metrics log as
    it stands, is what a resume restores."""
    state = {
        "version": STATE_VERSION,
        "checkpoint_name": checkpoint_name,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "seed": seed,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "adapter": {k: v.detach().to("cpu", copy=True) for k, v in adapter.items()},
        "fingerprint": fingerprint,
        "metrics_log": metrics_log,
    }
    path = Path(output_dir) / STATE_FILE
    atomic_torch_save(state, path)
    return path


def read_state_summary(output_dir: str | Path) -> tuple[str, int, int] | None:
    """(checkpoint name, global step, epochs completed) of ``output_dir``'s training state, or
    None without one; read memory-mapped, so a large optimizer state is not loaded for it."""
    path = Path(output_dir) / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state["checkpoint_name"], state["global_step"], state["epoch"]


def as_config_text(value: Any) -> str:
    """A config value as the YAML config and ``key=value`` overrides write it: null, true, 0.01,
    [0.9, 0.999], cosine_with_warmup (not Python's None, True, (0.9, 0.999), 'cosine_with_warmup')."""
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("...").strip()


def load_training_state(
    output_dir: str | Path, fingerprint: dict[str, Any], may_change: tuple[str, ...] = (), seed: int | None = None
) -> dict[str, Any]:
    """Reads ``output_dir/recipe_state.pt`` and checks it was written by a compatible config.

    Args:
        output_dir: the run's folder.
        fingerprint: the config values the state must have been written with (dotted keys).
        may_change: keys (or sections: ``"lr_scheduler"`` covers ``"lr_scheduler.name"``) whose
            value may differ from the saved one.
        seed: the config's seed; None takes the one the state was trained with (``state["seed"]``,
            a drawn one included).

    Raises:
        ResumeError: no state file, an unreadable one, or a config key that differs.
    """
    path = Path(output_dir) / STATE_FILE
    if not path.is_file():
        torchtune_state = Path(output_dir) / "recipe_state" / STATE_FILE  # where torchtune 0.5+ keeps its own
        if torchtune_state.is_file():
            raise ResumeError(f"resume_from_checkpoint=true: {output_dir} is a torchtune run ({torchtune_state}: {_TORCHTUNE_STATE})")
        raise ResumeError(
            f"resume_from_checkpoint=true: there is no {path} (no checkpoint to resume from); "
            "run without it first, or set output_dir to the interrupted run's folder"
        )
    try:
        # weights_only: a run folder may come from elsewhere, and a pickle could run code. The
        # state's Python RNG state (tuples of ints) is among what that loader allows.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file is the same user-facing problem)
        # permissions or the disk, not the file (a truncated one is EINVAL from torch's zip reader)
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EIO, errno.EISDIR):
            raise ResumeError(f"resume_from_checkpoint=true: {path} cannot be read: {e.strerror}") from None
        refused = refused_pickle_global(e) if isinstance(e, pickle.UnpicklingError) else None
        if refused is not None:  # (torch's own text advises an unsafe load)
            why = (f"it holds Python objects besides tensors (torch.load(weights_only=True) refuses to unpickle {refused}), "
                   "which this trainer never writes")
        else:
            # (an UnpicklingError's own text advises the unsafe load weights_only=False)
            reason = "" if isinstance(e, pickle.UnpicklingError) else (str(e).strip().splitlines() or [""])[0][:200]
            why = f"it is damaged or truncated, or not a training state ({type(e).__name__}{': ' + reason if reason else ''})"
        raise ResumeError(f"resume_from_checkpoint=true: {path} cannot be read: {why}; restore it from a copy, or start "
                          "afresh without resume_from_checkpoint (in another output_dir, or after removing this one)") from None
    if isinstance(state, dict) and "version" not in state and {"epochs_run", "total_epochs"} <= state.keys():
        raise ResumeError(f"resume_from_checkpoint=true: {path} is {_TORCHTUNE_STATE}")
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else f"none (it holds a {type(state).__name__})"
        raise ResumeError(f"resume_from_checkpoint=true: {path} has state version {version}, expected {STATE_VERSION}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ResumeError(f"resume_from_checkpoint=true: {path} lacks the entries {missing} of a training state; "
                          "it is damaged or not one this trainer wrote")
    # The seed is compared with the one actually used (states of earlier versions also kept the
    # configured one among the fingerprint's keys).
    saved = state["fingerprint"] = {k: v for k, v in state["fingerprint"].items() if k != "seed"}
    if seed is not None and seed != state["seed"]:
        raise ResumeError(
            f"resume_from_checkpoint=true: config key 'seed' is {seed!r} but the checkpoint in {output_dir} was trained "
            f"with seed {state['seed']!r}; use the same value to resume, or seed=null to take the checkpoint's"
        )
    # A key only one side has is not compared: a state of an earlier version lacks the keys added
    # since, and the fingerprint lacks what cannot be read (the base's weights: reported when the
    # model is built).
    for key in sorted(set(saved) & set(fingerprint)):
        if saved[key] == fingerprint[key] or any(key == k or key.startswith(f"{k}.") for k in may_change):
            continue
        if key == "checkpointer.weights":  # not a config key: what the base checkpoint holds
            raise ResumeError(
                f"resume_from_checkpoint=true: checkpointer.checkpoint_dir holds other weights ({fingerprint[key]}) than "
                f"the base the checkpoint in {output_dir} was trained on ({saved[key]}); resume on that base"
            )
        raise ResumeError(
            f"resume_from_checkpoint=true: config key '{key}' is {as_config_text(fingerprint[key])} but the checkpoint in "
            f"{output_dir} was trained with {as_config_text(saved[key])}; use the same value to resume"
            + (f" (of the settings a resumed run must share, only {', '.join(may_change)} may change)" if may_change else "")
        )
    return state
