"""Atomic file writes: a reader of the final name sees the old file or the complete new one,
never a half-written one, even if the process dies mid-write.

Each file is written under a temporary name in the destination folder (same file system, so
``os.replace`` is an atomic rename), flushed and fsync'ed, then renamed; the folder is fsync'ed
so the rename itself survives a power loss. ``StagedFiles`` does this for a set of files that
belong together (checkpoint shards and their index): all are written and synced before any is
renamed, so a crash while writing leaves every previous file untouched, and the commit is ordered
so that a crash while renaming leaves a folder loaders refuse, never a mix of old and new files.

Temporaries are named ``.tmp-<final name>.<8 random characters>``. A process killed mid-save
cannot delete its own, so a later save into the folder does (``sweep_temporaries``). Two saves into
one folder at the same time (every rank of a distributed job saving, say) take turns: a
``StagedFiles`` holds an exclusive ``flock`` on the folder from its sweep to its commit, so the
later one waits, sweeps nothing of the other's, and its files replace the other's whole. (A child
forked during a save holds that lock too, until it exits.)
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator

try:
    import fcntl
except ImportError:  # (Windows: saves into one folder at once are not serialized there)
    fcntl = None

_TMP_PREFIX = ".tmp-"
# mkstemp's names: our prefix and the final name, a dot, then 8 of its random characters.
_TMP_NAME = re.compile(r"\.tmp-(?P<name>.+)\.[a-z0-9_]{8}")


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
    # The prefix and mkstemp's 8 characters make a name longer than the final one: a final name
    # near the file system's 255 bytes gets a shortened one (a temporary sweep_temporaries misses).
    while len(os.fsencode(f"{_TMP_PREFIX}{name}.")) + 8 > 255:
        name = name[:-1]
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{name}.", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the final checkpoint private to its writer
    return tmp


def sweep_temporaries(folder: str | os.PathLike, owns: Callable[[str], object]) -> list[str]:
    """Deletes the temporaries that killed writers left in ``folder`` for the final names ``owns``
    accepts (files named by this module's pattern only); returns their paths."""
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    swept = []
    for name in names:
        match = _TMP_NAME.fullmatch(name)
        if match and owns(match["name"]):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
                swept.append(os.path.join(folder, name))
    return swept


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path to write ``final_path``'s content to; on a clean exit the file is
    synced and renamed to ``final_path``, on an exception it is deleted. Temporaries of
    ``final_path`` that a killed writer left are deleted first.

        with atomic_path("out/state.pt") as tmp:
            torch.save(state, tmp)
    """
    final_path = os.fspath(final_path)
    folder, name = os.path.split(os.path.abspath(final_path))
    os.makedirs(folder, exist_ok=True)
    sweep_temporaries(folder, lambda stale: stale == name)
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

        with StagedFiles(out_dir, owns=is_checkpoint_file) as staged:
            staged.write("model-00001-of-00002.safetensors", lambda p: save_file(t1, p))
            staged.write("config.json", lambda p: open(p, "w").write(config))
        # all moved into place here (see commit); an exception deletes the temporaries

    Loaders find a group by some of its files (a config, an index): ``finders``. The commit takes
    every existing file of those names away first and puts the staged ones back last, in the order
    given; by default the file staged last is the only finder.

    Args:
        folder: the destination folder (created if missing).
        owns: tells which final names belong to this kind of group (e.g. every HF weight file
            name and ``config.json``). Temporaries of such names that a killed save left in the
            folder are deleted now, and files of such names that the group does not write again
            (shards of an earlier, larger save) are deleted by the commit. Default: none.
        finders: the names loaders find the group by, in the order the commit puts them back; a
            loader must refuse a folder that lacks the last one present in the group.

    Raises:
        ValueError: ``folder``, or the nearest of its parents that exists, is not a folder (a file).
    """

    def __init__(
        self, folder: str | os.PathLike, *, owns: Callable[[str], object] | None = None, finders: tuple[str, ...] | None = None
    ):
        self.folder = os.path.abspath(os.fspath(folder))
        existing = self.folder
        while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ValueError(f"{self.folder} cannot be a folder to write into: {existing} exists and is not a folder")
        self._owns = owns
        self._finders = finders
        self._staged: list[tuple[str, str]] = []
        self._locked = False
        self._lock_fd: int | None = None
        if os.path.isdir(self.folder):  # (else at the first write, which creates it)
            self._lock()

    def _lock(self) -> None:
        """Waits for the folder's exclusive lock (another save into it finishing), then sweeps."""
        self._locked = True
        try:
            self._lock_fd = os.open(self.folder, os.O_RDONLY)
        except OSError:  # (a folder that cannot be opened: Windows)
            self._lock_fd = None
        try:
            if self._lock_fd is not None and fcntl is not None:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                except OSError:  # (a file system without locks: saves are not serialized there)
                    pass
            if self._owns is not None:
                sweep_temporaries(self.folder, self._owns)
        except BaseException:  # (a sweep that fails, Ctrl-C: a retry of the save must not wait on this one)
            self._unlock()
            raise

    def __del__(self) -> None:  # (one dropped uncommitted: its lock, not its temporaries, goes with it)
        self._unlock()

    def _unlock(self) -> None:
        self._locked = False
        if getattr(self, "_lock_fd", None) is not None:  # (None too where __init__ refused the folder)
            os.close(self._lock_fd)  # (releases the flock)
            self._lock_fd = None

    def write(self, name: str, writer: Callable[[str], object]) -> None:
        """Calls ``writer(temp_path)`` to produce the file ``name``, then syncs it to disk; if that
        fails, the whole group is discarded (``discard``) and the error propagates.

        Raises:
            ValueError: ``name`` is not a plain file name, or was staged already.
        """
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"StagedFiles.write: argument 'name' must be a plain file name; got {name!r}")
        if any(staged == name for staged, _ in self._staged):
            raise ValueError(f"StagedFiles.write: argument 'name' was already staged; got {name!r}")
        if not self._locked:
            os.makedirs(self.folder, exist_ok=True)
            self._lock()
        tmp = _temp_path(os.path.join(self.folder, name))
        self._staged.append((name, tmp))
        try:
            writer(tmp)
            _fsync_file(tmp)
        except BaseException:  # (the group is broken: its temporaries go, and the lock, also without a with block)
            self.discard()
            raise

    def commit(self) -> list[str]:
        """Moves every staged file into place; returns the final paths, in staging order.

        The steps: (1) delete the existing files under the finder names, the one put back last
        first; (2) rename the other staged files into place, in order; (3) delete the files of
        owned names that were not staged (stale shards); (4) rename the staged finders into place,
        in the finders' order. The folder is synced after (1) and before (4), so even after a
        power loss a reader sees the previous group complete, or a folder without its last finder
        (which loaders refuse), or the new group complete: never new files under an old index or
        config, nor old ones under a new one.

        Raises:
            OSError (or whatever interrupted it): a failed step. The temporaries not yet renamed
                are deleted and the exception propagates; the folder is then left without its
                last finder, or unchanged if step (1) itself failed first.
        """
        staged, self._staged = self._staged, []
        if not staged:
            self._unlock()
            return []
        finders = self._finders if self._finders is not None else (staged[-1][0],)
        order = [item for item in staged if item[0] not in finders]
        order += sorted((item for item in staged if item[0] in finders), key=lambda item: finders.index(item[0]))
        first_finder = len(staged) - sum(1 for name, _ in staged if name in finders)
        done = 0
        try:
            for name in reversed(finders):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.folder, name))
            fsync_dir(self.folder)
            for name, tmp in order[:first_finder]:
                os.replace(tmp, os.path.join(self.folder, name))
                done += 1
            if self._owns is not None:
                keep = {name for name, _ in staged}
                for name in os.listdir(self.folder):
                    if name not in keep and self._owns(name) and not _TMP_NAME.fullmatch(name):
                        os.remove(os.path.join(self.folder, name))
            fsync_dir(self.folder)
            for name, tmp in order[first_finder:]:
                os.replace(tmp, os.path.join(self.folder, name))
                done += 1
        except BaseException:
            self._staged = order[done:]
            self.discard()
            raise
        fsync_dir(self.folder)
        self._unlock()
        return [os.path.join(self.folder, name) for name, _ in staged]

    def discard(self) -> None:
        """Deletes the staged temporaries; nothing under a final name changes."""
        for _, tmp in self._staged:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        self._staged = []
        self._unlock()

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
