"""Atomic files and the training state that lets an interrupted run continue exactly.

A checkpoint is a folder ``output_dir/epoch_E`` or ``output_dir/step_S`` (adapter, merged model,
tokenizer, config), written under a temporary name and renamed into place when complete, plus
``output_dir/recipe_state.pt`` (optimizer, schedule, counters, RNG states, adapter weights in
full precision, and the folder it belongs to), replaced atomically *after* the folder. A run killed
at any moment therefore leaves the previous ``recipe_state.pt`` and the folder it names intact;
``recover_interrupted_saves`` then removes what the killed save left (or puts back the folder it
was replacing) when the next run starts.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from qlora_ext.checkpoint.atomic import atomic_path, atomic_write_text, fsync_dir

__all__ = [
    "atomic_torch_save", "atomic_write_text", "commit_dir", "load_training_state", "recover_interrupted_saves",
    "save_training_state", "staging_dir",
]

STATE_FILE = "recipe_state.pt"
STATE_VERSION = 1


class ResumeError(RuntimeError):
    """No usable training state, or one from an incompatible config."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (a temp file in the same folder, fsync, rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def staging_dir(final: str | Path) -> Path:
    """A fresh temporary folder beside ``final`` to write a checkpoint into."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: str | Path, final: str | Path) -> None:
    """Moves a completely written staging folder to ``final`` (replacing an older one)."""
    tmp, final = Path(tmp), Path(final)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# The names staging_dir and commit_dir give: .epoch_0.tmp-1234, .step_6.old-1234 (1234: the writer's pid).
_LEFTOVER = re.compile(r"\.((?:epoch|step)_\d+)\.(tmp|old)-(\d+)")


def _writer_may_be_running(pid: int) -> bool:
    """Whether process ``pid`` may still be writing. Our own pid counts as gone: this is called
    before this process saves anything (a container that restarts the trainer gives it the same
    pid each time). Where liveness cannot be checked (not POSIX) every writer counts as running."""
    if pid == os.getpid():
        return False
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def recover_interrupted_saves(output_dir: str | Path) -> list[str]:
    """Cleans up after checkpoint saves that were killed (no exception handler ran), before a run
    or a resume writes into ``output_dir``: a ``.NAME.old-PID`` folder whose ``NAME`` is missing is
    renamed back (the save died between commit_dir's two renames, and the folder it was replacing
    may be the one ``recipe_state.pt`` names); every other ``.NAME.tmp-PID`` / ``.NAME.old-PID`` is
    removed. Only folders of that exact pattern whose writer is no longer running are touched, so
    a concurrent save (which one output_dir does not support anyway) is never cut short.

    Returns:
        One line per folder restored or removed.
    """
    output_dir = Path(output_dir)
    leftovers = []
    for path in sorted(output_dir.iterdir()):
        match = _LEFTOVER.fullmatch(path.name)
        if match and path.is_dir() and not _writer_may_be_running(int(match.group(3))):
            leftovers.append((path, output_dir / match.group(1), match.group(2)))
    notes = []
    for path, final, kind in leftovers:
        if kind == "old" and not final.exists():
            os.replace(path, final)
            notes.append(f"restored {final} from {path.name} (a save was killed while replacing it)")
    for path, _, _ in leftovers:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)  # one that cannot be removed does not stop the run
            if not path.exists():
                notes.append(f"removed {path} (left by a killed save)")
    if notes:
        fsync_dir(output_dir)
    return notes


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
) -> Path:
    """Writes ``output_dir/recipe_state.pt`` atomically; ``(epoch, step_in_epoch)`` is where the
    data resumes (optimizer steps already done in that epoch)."""
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
    }
    path = Path(output_dir) / STATE_FILE
    atomic_torch_save(state, path)
    return path


def load_training_state(output_dir: str | Path, fingerprint: dict[str, Any], may_change: tuple[str, ...] = ()) -> dict[str, Any]:
    """Reads ``output_dir/recipe_state.pt`` and checks it was written by a compatible config.

    Args:
        output_dir: the run's folder.
        fingerprint: the config values the state must have been written with (dotted keys).
        may_change: keys (or sections: ``"lr_scheduler"`` covers ``"lr_scheduler.name"``) whose
            value may differ from the saved one.

    Raises:
        ResumeError: no state file, an unreadable one, or a config key that differs.
    """
    path = Path(output_dir) / STATE_FILE
    if not path.is_file():
        raise ResumeError(
            f"resume_from_checkpoint=true: there is no {path} (no checkpoint to resume from); "
            "run without it first, or set output_dir to the interrupted run's folder"
        )
    try:
        # The state holds Python RNG state (tuples) besides tensors; it is our own file.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (any unreadable file is the same user-facing problem)
        raise ResumeError(f"resume_from_checkpoint=true: {path} cannot be read ({e})") from None
    if state.get("version") != STATE_VERSION:
        raise ResumeError(f"resume_from_checkpoint=true: {path} has state version {state.get('version')}, expected {STATE_VERSION}")
    saved = state["fingerprint"]
    for key in sorted(set(saved) | set(fingerprint)):
        if any(key == k or key.startswith(f"{k}.") for k in may_change):
            continue
        if saved.get(key) != fingerprint.get(key):
            raise ResumeError(
                f"resume_from_checkpoint=true: config key '{key}' is {fingerprint.get(key)!r} but the checkpoint in "
                f"{output_dir} was trained with {saved.get(key)!r}; use the same value to resume"
                + (f" (of the settings a resumed run must share, only {', '.join(may_change)} may change)" if may_change else "")
            )
    return state
