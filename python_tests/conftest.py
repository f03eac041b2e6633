"""Shared test setup: the devices to run on, dtypes, seeding, and tolerances.

CUDA cases are parametrized like the CPU ones and skipped (reported as such) where there is no
GPU or the extension was built without CUDA kernels.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import qlora_ext._extension as ext

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cuda_available() -> bool:
    return ext.WITH_CUDA and torch.cuda.is_available()


# Why a CUDA case cannot run here. bench/gpu_check.sh selects the CUDA cases with `-k cuda` and
# fails when one of them was skipped with one of these reasons.
_NO_CUDA_REASON = "no CUDA GPU" if not torch.cuda.is_available() else "extension built without CUDA"

# For a test that needs a GPU; its name must contain "cuda" (pytest_collection_modifyitems checks).
needs_cuda = pytest.mark.skipif(not cuda_available(), reason=_NO_CUDA_REASON)


def devices() -> list:
    """cpu, and cuda as a case that skips itself when it cannot run."""
    return ["cpu", pytest.param("cuda", marks=needs_cuda)]


def pytest_collection_modifyitems(config, items):
    """A test that needs a GPU must have "cuda" in its name: the GPU check runs only those."""
    unnamed = [
        item.nodeid
        for item in items
        if "cuda" not in item.name
        and any(m.kwargs.get("reason") == _NO_CUDA_REASON for m in item.iter_markers("skipif"))
    ]
    if unnamed:
        raise pytest.UsageError(f"tests that need a GPU must have 'cuda' in their names (gpu_check.sh runs -k cuda): {unnamed}")


def at_odd_address(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data starts ``offset`` bytes past a 16-byte boundary, on
    ``t``'s device: what ``torch.frombuffer(..., offset=1)``, a numpy view or a safetensors file
    with a float tensor after an odd number of bytes gives (torch allocates aligned blocks)."""
    nbytes = t.numel() * t.element_size()
    storage = torch.UntypedStorage(nbytes + 32, device=t.device)
    start = (-storage.data_ptr()) % 16 + offset
    out = torch.empty(0, dtype=t.dtype, device=t.device).set_(storage[start:start + nbytes], 0, t.shape, t.contiguous().stride())
    out.copy_(t)
    assert out.data_ptr() % 16 == offset and out.is_contiguous()
    return out


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh seed per test, derived from its name: new random inputs per test, reproducible runs.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def no_vmap_fallback():
    """torch.func.vmap raises at an op without a batching rule, rather than running it sample by sample."""
    before = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(before)


@pytest.fixture(params=["avx512", "avx2", "portable"])
def cpu_isa(request):
    """Runs a test once per CPU kernel table (one this CPU or build lacks is skipped)."""
    from qlora_ext import ops

    before = ops.cpu_kernel_isa()
    try:
        ops.set_cpu_kernel_isa(request.param)
    except ValueError:
        pytest.skip(f"{request.param} kernels not available on this CPU/build")
    yield request.param
    ops.set_cpu_kernel_isa(before)


def unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]


def torchao_nf4():
    """torchao's NF4 module (it moved between releases), or skip the test."""
    import importlib

    for name in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    pytest.skip("torchao (a test dependency) with NF4 support is not installed")
