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


def check_torch_version(built_against: str, imported: str, library: str | None = None) -> None:
    """Raises ImportError when the library was built for another torch than the imported one,
    naming ``library`` (the file) where given, and, for the in-place copy of a source checkout,
    the installed package as the other way out."""
    if built_against == imported:
        return
    message = f"qlora_ext was built against torch {built_against}, but torch {imported} is imported"
    if library is None:
        raise ImportError(f"{message}; {_REBUILD}")
    message += f" ({library})"
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(library)))
    if all(os.path.isfile(os.path.join(checkout, name)) for name in ("pyproject.toml", "CMakeLists.txt")):
        raise ImportError(f"{message}: that is the in-place copy of the source checkout {checkout}, found first on sys.path "
                          f"(Python started in it, or PYTHONPATH naming it); without it there an installed qlora_ext is used, or "
                          f"{_REBUILD}")
    raise ImportError(f"{message}; {_REBUILD}")


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
        library = os.path.join(os.path.dirname(__file__), "_C.so")
        if os.path.isfile(library):  # (copied alone: the build writes both)
            raise ImportError(f"qlora_ext's build info is missing: {library} is there without the _build_info.py the build "
                              "writes beside it (copy both, or build again)") from None
        raise _missing(library) from None
    # The library beside the build info that describes it: an editable install finds both in
    # site-packages while this module is the checkout's, whose in-place copy may be another build's.
    library = os.path.join(os.path.dirname(_build_info.__file__), "_C.so")
    if not os.path.isfile(library):
        raise _missing(library)
    check_torch_version(_build_info.TORCH_VERSION, torch.__version__, library)
    torch.ops.load_library(library)


_load()

from qlora_ext._build_info import BUILD_KIND, CPU_KERNELS, WITH_CUDA  # noqa: E402

__all__ = ["BUILD_KIND", "CPU_KERNELS", "WITH_CUDA", "check_torch_version"]
