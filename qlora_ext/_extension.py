"""Loads the compiled library that registers ``torch.ops.qlora.*``, after checking that it was
built against the torch that is imported (a C++ extension only works with that exact torch)."""

from __future__ import annotations

import os

import torch

_REBUILD = (
    "rebuild qlora_ext against the installed torch: from its source folder run "
    "`pip install scikit-build-core cmake ninja` (the build tools; build isolation would fetch them, "
    "and a newer torch with them) and then "
    "`pip install --no-build-isolation --force-reinstall --no-deps .`"
)


def check_torch_version(built_against: str, imported: str) -> None:
    """Raises ImportError when the library was built for another torch than the imported one."""
    if built_against != imported:
        raise ImportError(
            f"qlora_ext was built against torch {built_against}, but torch {imported} is imported; {_REBUILD}"
        )


def _missing(library: str) -> ImportError:
    return ImportError(
        f"qlora_ext's compiled library is missing (no {library}): install the package with "
        "`pip install .`, or for a source checkout build it in place with "
        "`cmake -S . -B build/dev -DQLORA_INPLACE=ON && cmake --build build/dev`"
    )


def _load() -> None:
    try:
        from qlora_ext import _build_info
    except ImportError:
        raise _missing(os.path.join(os.path.dirname(__file__), "_C.so")) from None
    # The library beside the build info that describes it: an editable install finds both in
    # site-packages while this module is the checkout's, whose in-place copy may be another build's.
    library = os.path.join(os.path.dirname(_build_info.__file__), "_C.so")
    if not os.path.isfile(library):
        raise _missing(library)
    check_torch_version(_build_info.TORCH_VERSION, torch.__version__)
    torch.ops.load_library(library)


_load()

from qlora_ext._build_info import BUILD_KIND, CPU_KERNELS, WITH_CUDA  # noqa: E402

__all__ = ["BUILD_KIND", "CPU_KERNELS", "WITH_CUDA", "check_torch_version"]
