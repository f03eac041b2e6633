"""Checkpoint folders ``output_dir/epoch_E`` and ``output_dir/step_S`` (adapter, merged model,
tokenizer, config), committed whole: written into a staging folder beside the final name and
renamed into place when complete. ``recover_interrupted_saves`` removes what a killed save left
(or puts back the folder it was replacing) when the next run starts.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

from qlora_ext.checkpoint.atomic import fsync_dir

_CHECKPOINT_NAME = re.compile(r"(?:epoch|step)_\d+")  # the folders the trainer saves: epoch_E, step_S

__all__ = ["checkpoint_folder_holding", "list_checkpoint_folders", "commit_dir", "discard_old", "recover_interrupted_saves", "remove_dir", "remove_step_folders",
           "restore_dir", "staging_dir"]


def staging_dir(final: str | Path) -> Path:
    """A fresh temporary folder beside ``final`` to write a checkpoint into."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: str | Path, final: str | Path, *, keep_old: bool = False) -> Path | None:
    """Moves a completely written staging folder to ``final`` (replacing an older one). With
    ``keep_old``, the folder it replaced is not deleted but returned (``.NAME.old-PID``), for the
    caller to delete once the save is complete (``discard_old``) or put back (``restore_dir``)."""
    tmp, final = Path(tmp), Path(final)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if final.exists():
        old = aside_dir(final)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if keep_old:
        return old
    if old is not None:
        _delete_or_warn(old, f"the checkpoint folder {final} replaced")
    return None


def aside_dir(final: str | Path) -> Path:
    """Where ``commit_dir`` moves the folder ``final`` it replaces (``.NAME.old-PID``)."""
    final = Path(final)
    return final.with_name(f".{final.name}.old-{os.getpid()}")


def restore_dir(final: str | Path, old: Path | None) -> None:
    """Undoes ``commit_dir(..., keep_old=True)``: ``final`` goes (``remove_dir``) and the folder it
    replaced, if any, takes its name again."""
    final = Path(final)
    if final.exists():
        remove_dir(final)
    if old is not None and old.exists():
        os.replace(old, final)
        fsync_dir(final.parent)


def discard_old(final: str | Path, old: Path | None) -> None:
    """Deletes the folder ``commit_dir(..., keep_old=True)`` kept, once the save is complete."""
    if old is not None:
        _delete_or_warn(old, f"the checkpoint folder {final} replaced")


def _delete_or_warn(folder: Path, what: str) -> str | None:
    """Deletes ``folder`` as far as it can; where some of it stays (a write-protected file or
    folder), warns once, naming it and why, and returns that line: a leftover copy of a merged
    7B model is 13 GB that nothing else would mention."""
    shutil.rmtree(folder, ignore_errors=True)
    if not folder.exists():
        return None
    try:
        shutil.rmtree(folder)  # again, for the reason
        return None
    except OSError as e:
        line = f"could not delete {folder} ({what}): {e}; delete it by hand"
        warnings.warn(line, RuntimeWarning, stacklevel=3)
        return line


def remove_dir(folder: str | Path) -> None:
    """Deletes a checkpoint folder so that no half of it stays under its name: renamed to
    ``.NAME.del-PID`` first (one atomic step), then deleted. A kill midway leaves that name, which
    ``recover_interrupted_saves`` removes."""
    folder = Path(folder)
    doomed = folder.with_name(f".{folder.name}.del-{os.getpid()}")
    os.replace(folder, doomed)
    fsync_dir(folder.parent)
    _delete_or_warn(doomed, f"what was {folder}")


def remove_step_folders(output_dir: str | Path, *, keep: str | None) -> None:
    """Deletes every ``step_N`` checkpoint folder of ``output_dir`` but ``keep`` (``remove_dir``):
    only the newest checkpoint of a run is kept between epoch ends. One that cannot be moved away
    (write-protected) stays, with a warning: the save before this is complete, and training goes on."""
    for old in Path(output_dir).glob("step_*"):
        if old.name != keep and old.is_dir() and re.fullmatch(r"step_\d+", old.name):
            try:
                remove_dir(old)
            except OSError as e:
                warnings.warn(f"could not delete the older checkpoint {old}: {e}; delete it by hand", RuntimeWarning, stacklevel=2)


def list_checkpoint_folders(output_dir: str | Path) -> list[str]:
    """The names of ``output_dir``'s checkpoint folders (``epoch_E``, then ``step_S``), in number order."""
    names = [p.name for p in Path(output_dir).iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(names, key=lambda n: (not n.startswith("epoch_"), int(n.split("_")[1])))


def checkpoint_folder_holding(output_dir: str | Path, path: str | Path) -> Path | None:
    """The ``epoch_N`` / ``step_N`` folder of ``output_dir`` that is or contains ``path`` (links
    resolved), if any: a later save of the run replaces (epoch) or deletes (step) that folder."""
    output_dir, path = Path(os.path.realpath(output_dir)), Path(os.path.realpath(path))
    try:
        first = path.relative_to(output_dir).parts[:1]
    except ValueError:  # not inside output_dir
        return None
    if first and _CHECKPOINT_NAME.fullmatch(first[0]):
        return output_dir / first[0]
    return None


# The names staging_dir, commit_dir and remove_dir give: .epoch_0.tmp-1234, .step_6.old-1234,
# .step_6.del-1234 (1234: the writer's pid).
_LEFTOVER = re.compile(rf"\.({_CHECKPOINT_NAME.pattern})\.(tmp|old|del)-(\d+)")


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
    may be the one ``recipe_state.pt`` names); every other ``.NAME.tmp-PID`` / ``.NAME.old-PID``,
    and every ``.NAME.del-PID`` (a deletion by ``remove_dir`` cut short), is removed. Only folders
    of that exact pattern whose writer is no longer running are touched, so a concurrent save
    (which one output_dir does not support anyway) is never cut short.

    Returns:
        One line per folder restored or removed, or that could not be deleted (and why).
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
        if path.exists():  # one that cannot be removed does not stop the run
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the returned line says it
                failed = _delete_or_warn(path, "left by a killed save")
            notes.append(failed or f"removed {path} (left by a killed save)")
    if notes:
        fsync_dir(output_dir)
    return notes
