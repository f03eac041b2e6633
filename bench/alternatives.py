"""The implementations we compare against, imported only when a benchmark asks for them.

bitsandbytes and torchao are optional: when one is missing, or fails on this device, its rows are
left out and the result says why; our own rows never are (an error in ours ends the benchmark).
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any

from bench.report import Report

BNB = "bitsandbytes"
TORCHAO = "torchao"

# torchao moved its NF4 tensor between releases (0.18: under quantization/, older: under dtypes/).
_TORCHAO_NF4_MODULES = ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor")


def load_bitsandbytes() -> tuple[ModuleType | None, str]:
    """(bitsandbytes, "") or (None, why it cannot be used)."""
    try:
        bnb = importlib.import_module("bitsandbytes")
        importlib.import_module("bitsandbytes.functional")
    except Exception as e:  # an installed but broken bitsandbytes raises more than ImportError
        return None, _why("bitsandbytes", e)
    return bnb, ""


def load_torchao_nf4() -> tuple[ModuleType | None, str]:
    """(torchao's nf4 module with ``to_nf4`` and ``linear_nf4``, "") or (None, why not)."""
    errors = []
    for name in _TORCHAO_NF4_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as e:
            errors.append(e)
            continue
        if hasattr(module, "to_nf4") and hasattr(module, "linear_nf4"):
            return module, ""
    if errors and all(isinstance(e, ModuleNotFoundError) and e.name == "torchao" for e in errors):
        return None, "not installed (pip install torchao)"
    return None, "installed, but no NF4 module found at " + " or ".join(_TORCHAO_NF4_MODULES) + f" ({_short(errors[-1]) if errors else 'no to_nf4'})"


def load_torchtune() -> ModuleType:
    """torchtune, made importable next to this torchao: torchtune 0.6 imports ``NF4Tensor`` from
    ``torchao.dtypes.nf4tensor``, which torchao 0.18 moved, so the old name is made an alias of
    the new module (the same class and ops).

    Raises:
        ImportError: torchtune or torchao's NF4 is missing, with the reason.
    """
    try:
        importlib.import_module("torchao.dtypes.nf4tensor")
    except ImportError:
        nf4, why = load_torchao_nf4()
        if nf4 is None:
            raise ImportError(f"torchao {why}") from None
        sys.modules["torchao.dtypes.nf4tensor"] = nf4
        importlib.import_module("torchao.dtypes").nf4tensor = nf4
    return importlib.import_module("torchtune")


def load_nf4_alternatives(report: Report) -> tuple[ModuleType | None, ModuleType | None]:
    """(bitsandbytes, torchao's nf4 module), each None (and listed as skipped in ``report``, with
    the reason) where it cannot be used."""
    bnb, why = load_bitsandbytes()
    if bnb is None:
        report.skip(BNB, why)
    ao, why = load_torchao_nf4()
    if ao is None:
        report.skip(TORCHAO, why)
    return bnb, ao


def copy_subclass(t):
    """A copy of a traceable tensor subclass (torchao's NF4Tensor) with fresh storage, built
    from its inner tensors: its own clone() and deepcopy re-quantize, seconds per copy on a CPU."""
    names, meta = t.__tensor_flatten__()
    return type(t).__tensor_unflatten__({name: getattr(t, name).clone() for name in names}, meta, t.shape, t.stride())


def attempt(report: Report, impl: str, fn: Callable[[], Any], log: Callable[[str], None]) -> bool:
    """Runs one alternative's measurements; a failure becomes a skip with its reason, not a crash."""
    try:
        fn()
        return True
    except Exception as e:
        log(f"{impl} failed, leaving it out: {_short(e)}\n{traceback.format_exc(limit=3)}")
        report.skip(impl, f"failed here: {_short(e)}")
        return False


def _why(package: str, e: BaseException) -> str:
    if isinstance(e, ModuleNotFoundError) and e.name == package:
        return f"not installed (pip install {package})"
    return f"installed, but importing it failed: {_short(e)}"


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]
