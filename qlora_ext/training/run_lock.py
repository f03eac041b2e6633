"""One trainer per output folder. A second run started on the same ``output_dir`` would sweep
the first one's temporary files mid-write and interleave its metrics log, so a run holds an
exclusive lock on ``output_dir/.lock`` while it trains (``flock``: the operating system releases
it when the process ends, however it ends, so a killed run never leaves a stale lock).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from qlora_ext.training.config import ConfigError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def exclusive_output_dir(output_dir: str | Path, *, key: str = "output_dir") -> Iterator[None]:
    """Holds the run lock of ``output_dir`` for the ``with`` block (``key``: the config key that
    names the folder, for the errors; the metrics' folder is locked too). The lock file stays when
    the run ends: removing it would let a run that opened it meanwhile lock a file no longer there,
    beside one that creates it anew.

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
        yield
    finally:
        os.close(fd)  # releases the lock
