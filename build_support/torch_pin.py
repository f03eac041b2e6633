"""scikit-build-core metadata provider for the wheel's ``dependencies``: torch pinned to the
release the extension is compiled against, then the other requirements as written.

The compiled library loads only with the torch it was built against (``qlora_ext._extension``
checks). With the range of the source tree (``torch>=2.11,<2.15``) in the wheel, pip installed the
wheel beside any torch of that range and kept it on a later upgrade of torch, and the mismatch
showed only at import. Pinned, pip installs (or keeps) that torch with it, as for torchvision's
wheels. The pin is the public release (``2.14.1``, not ``2.14.1+cu130``): package indexes name the
same build differently, and a CPU/CUDA mismatch of one release is still named at import.

Configured in pyproject.toml (``[tool.scikit-build.metadata.dependencies]``), with the other
requirements in its ``requires`` setting.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def dynamic_metadata(field: str, settings: dict) -> list[str]:
    if field != "dependencies":
        raise ValueError(f"torch_pin provides the 'dependencies' field only; asked for {field!r}")
    requires = settings.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise ValueError(f"torch_pin: setting 'requires' must be a list of requirement strings; got {requires!r}")
    try:
        built_against = version("torch")
    except PackageNotFoundError:
        raise RuntimeError("torch_pin: torch is not installed in the build environment, so the extension cannot be built "
                           "against it; install torch first (or build with isolation, which installs it)") from None
    return [f"torch=={built_against.split('+')[0]}", *requires]
