"""One trainer per output folder. A second run started on the same ``output_dir`` would sweep
the first one's temporary files mid-write and interleave its metrics log, so a run holds an
exclusive lock on ``output_dir/.lock`` while it trains (``flock``: the operating system releases
it when the process ends, however it ends, so a killed run never leaves a stale lock).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from qlora_ext.training.config import ConfigError

LOCK_NAME = ".lock"


def missing_folders(output_dir: str | Path) -> list[Path]:
    """The folders that ``mkdir(parents=True)`` of ``output_dir`` would create, innermost first."""
    output_dir = Path(output_dir)
    return list(itertools.takewhile(lambda p: not os.path.lexists(p), (output_dir, *output_dir.parents)))


def _remove_if_unused(output_dir: Path, new_folders: Sequence[Path]) -> None:
    """After a run that stopped before writing anything (a refused run): removes what it left in
    the folders it created (``new_folders``, innermost first), as long as that is only the lock
    file and empty files and folders (the metrics log setup opens), and then those folders."""
    if not new_folders:
        return
    try:
        walk = list(os.walk(output_dir, topdown=False))  # (innermost first; output_dir last)
        files = [Path(root) / name for root, _, names in walk for name in names]
        lock = output_dir / LOCK_NAME
        if not all(f == lock or (f.is_file() and not f.is_symlink() and f.stat().st_size == 0) for f in files):
            return
        for f in sorted(files, key=lambda f: f == lock):  # the lock last (a run waiting on it is refused)
            os.unlink(f)
        for folder in [*(Path(root) for root, _, _ in walk[:-1]), *new_folders]:
            os.rmdir(folder)  # (fails on a folder that is not empty: what another process put there stays)
    except OSError:
        pass


@contextlib.contextmanager
def exclusive_output_dir(output_dir: str | Path, *, new_folders: Sequence[Path] = (), key: str = "output_dir") -> Iterator[None]:
    """Holds the run lock of ``output_dir`` for the ``with`` block (``key``: the config key that
    names the folder, for the errors; the metrics' folder is locked too). ``new_folders``: the folders
    the caller created for ``output_dir`` (``missing_folders`` before its mkdir); when the block
    raises with nothing but the lock file in ``output_dir`` (a run refused in setup), they are
    removed, so that a refused run leaves no trace.

    Raises:
        ConfigError: another process holds it (its pid is named), or the lock file cannot be
            opened. Where the file system has no locks (some network mounts), the run goes on
            unguarded.
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform: unguarded, as torchtune runs
        yield
        return
    output_dir = Path(output_dir)
    path = Path(output_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError as e:
        # Another user's lock file in a shared folder: flock works on a read-only descriptor too
        # (the holder's pid is then not recorded).
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            raise ConfigError(f"{key}: its lock file '{path}' cannot be opened: {e.strerror}; make it writable "
                              f"for this user (or delete it while no run uses the folder), or choose another {key}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
            raise ConfigError(
                f"{key}: '{output_dir}' is in use by another training run (pid {holder}); wait for it to end, "
                f"or choose another {key}"
            ) from None
        except OSError:  # a file system without locks
            locked = False
        if locked:
            try:  # the pid only names the holder to a second run; a full disk or a read-only descriptor skips it
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass
        try:
            yield
        except BaseException:
            _remove_if_unused(output_dir, new_folders)
            raise
    finally:
        os.close(fd)  # releases the lock
