"""Writing result files whole: a JSON result or README interrupted mid-write (Ctrl-C, a killed
job) must not be left truncated, since both are committed. Kept apart from
``qlora_ext.checkpoint.atomic`` so that ``python -m bench readme`` runs without the compiled
extension, which importing ``qlora_ext`` loads."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes UTF-8 ``text`` to a temporary file beside ``path``, syncs it, and renames it over
    ``path``; on any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
