"""Running compiled modules eagerly on purpose: torch.compiler's "force_eager" stance, without the
warning torch 2.12 gives there that a ``fullgraph=True`` call compiled nothing ("may become an
error in the future"; 2.13 and later check only in the default stance). Evaluation and generation
use it: the layers compiled for training see a new shape at each decoding step."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

NO_COMPILED_FRAMES = "torch.compile with fullgraph=True found no compiled frames"


@contextlib.contextmanager
def force_eager() -> Iterator[None]:
    """``torch.compiler.set_stance("force_eager")`` as a context manager or decorator."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_COMPILED_FRAMES, category=UserWarning)
        with torch.compiler.set_stance("force_eager"):
            yield
