"""Running compiled modules eagerly on purpose: torch.compiler's "force_eager" stance, without the
warning torch 2.12 gives there that a ``fullgraph=True`` call compiled nothing ("may become an
error in the future"; 2.13 and later check only in the default stance). Evaluation and generation
use it: the layers compiled for training see a new shape at each decoding step. And telling
torch.compile's module wrapper apart (``is_compile_wrapper``)."""

from __future__ import annotations

import contextlib
import sys
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


def is_compile_wrapper(module: object) -> bool:
    """Whether ``module`` is torch.compile's ``OptimizedModule`` (``torch.compile(module)``), told
    without importing torch._dynamo: before it is imported nothing is compiled."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)
