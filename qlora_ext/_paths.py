"""What stops a path from being used, in words: mkdir alone says "File exists" for a dangling
symbolic link or a file on the way, and a name the file system's encoding cannot hold reads as
a file that does not exist; neither tells what to change."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def why_not_a_folder(path: Path, error: OSError) -> str:
    """The reason ``path`` (a folder to create or write into) failed with ``error``: a dangling
    symbolic link or a file at it or on its way, else the error itself. (``os.path``'s tests,
    which answer False on any error, not ``Path``'s, which raise on some: a name too long, a
    folder that cannot be searched.)"""
    for place in (path, *path.parents):
        if os.path.islink(place) and not os.path.exists(place):
            return f"'{place}' is a symbolic link to '{os.readlink(place)}', which does not exist"
        if os.path.lexists(place):
            return str(error) if os.path.isdir(place) else f"'{place}' exists and is not a folder"
    return str(error)


def unwritable_folder(key: str, path: Path, error: OSError) -> str:
    """The error for config key ``key``, whose folder ``path`` could not be created or written."""
    return f"{key}: '{path}' must be a folder this user can create or write to: {why_not_a_folder(path, error)}"


def unencodable_name(path: str | Path) -> str | None:
    """Why ``path`` cannot be a file name here, when the file system's encoding cannot hold it (a
    non-ASCII name from a UTF-8 config file under an ASCII locale, PYTHONUTF8=0); else None."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return (f"{str(path)!r} cannot be a file name in this system's encoding ({sys.getfilesystemencoding()}); "
                "run with PYTHONUTF8=1 or under a UTF-8 locale")
    return None
