"""Atomic file writes: a reader of the final name sees the old file or the complete new one,
never a half-written one, even if the process dies mid-write.

Each file is written under a temporary name in the destination folder (same file system, so
``os.replace`` is an atomic rename), flushed and fsync'ed, then renamed; the folder is fsync'ed
so the rename itself survives a power loss. ``StagedFiles`` does this for a set of files that
belong together (checkpoint shards and their index): all are written and synced before any is
renamed, so a crash while writing leaves every previous file untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator

_TMP_PREFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a directory entry table (makes completed renames durable); a no-op where
    directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(final_path: str) -> str:
    folder, name = os.path.split(os.path.abspath(final_path))
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{name}.", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the final checkpoint private to its writer
    return tmp


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path to write ``final_path``'s content to; on a clean exit the file is
    synced and renamed to ``final_path``, on an exception it is deleted.

        with atomic_path("out/state.pt") as tmp:
            torch.save(state, tmp)
    """
    final_path = os.fspath(final_path)
    os.makedirs(os.path.dirname(os.path.abspath(final_path)), exist_ok=True)
    tmp = _temp_path(final_path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(final_path)))


def atomic_write_bytes(final_path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``final_path`` atomically."""
    with atomic_path(final_path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(final_path: str | os.PathLike, text: str) -> None:
    """Writes UTF-8 ``text`` to ``final_path`` atomically."""
    atomic_write_bytes(final_path, text.encode("utf-8"))


class StagedFiles:
    """A group of files committed together into one folder.

        with StagedFiles(out_dir) as staged:
            staged.write("model-00001-of-00002.safetensors", lambda p: save_file(t1, p))
            staged.write("model.safetensors.index.json", lambda p: open(p, "w").write(index))
        # all renamed into place here, in the order written; an exception deletes the temporaries

    Files are renamed in the order they were staged: stage the file that names the others (an
    index, a config) last, so it only ever points at files that are complete.

    Args:
        folder: the destination folder (created if missing).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.path.abspath(os.fspath(folder))
        self._staged: list[tuple[str, str]] = []

    def write(self, name: str, writer: Callable[[str], object]) -> None:
        """Calls ``writer(temp_path)`` to produce the file ``name``, then syncs it to disk.

        Raises:
            ValueError: ``name`` is not a plain file name, or was staged already.
        """
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"StagedFiles.write: argument 'name' must be a plain file name; got {name!r}")
        if any(staged == name for staged, _ in self._staged):
            raise ValueError(f"StagedFiles.write: argument 'name' was already staged; got {name!r}")
        os.makedirs(self.folder, exist_ok=True)
        tmp = _temp_path(os.path.join(self.folder, name))
        self._staged.append((name, tmp))
        writer(tmp)
        _fsync_file(tmp)

    def commit(self) -> list[str]:
        """Renames every staged file into place; returns the final paths."""
        paths = []
        for name, tmp in self._staged:
            path = os.path.join(self.folder, name)
            os.replace(tmp, path)
            paths.append(path)
        self._staged = []
        fsync_dir(self.folder)
        return paths

    def discard(self) -> None:
        """Deletes the staged temporaries; nothing under a final name changes."""
        for _, tmp in self._staged:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        self._staged = []

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
