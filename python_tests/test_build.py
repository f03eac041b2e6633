"""The compiled library: what was built, the op schemas, and the torch-version guard."""

from __future__ import annotations

import os
import re

import pytest
import torch

import qlora_ext._extension as ext
from qlora_ext import ops

SCHEMAS = {
    "quantize_nf4": "qlora::quantize_nf4(Tensor weight) -> (Tensor packed, Tensor absmax_codes, Tensor absmax_scales, Tensor absmax_offset)",
    "dequantize_nf4": "qlora::dequantize_nf4(Tensor packed, Tensor absmax_codes, Tensor absmax_scales, Tensor absmax_offset, SymInt[] shape, ScalarType dtype) -> Tensor",
    "linear_nf4": "qlora::linear_nf4(Tensor x, Tensor packed, Tensor absmax_codes, Tensor absmax_scales, Tensor absmax_offset, int out_features, Tensor? bias=None) -> Tensor",
    "linear_nf4_grad_input": "qlora::linear_nf4_grad_input(Tensor grad_y, Tensor packed, Tensor absmax_codes, Tensor absmax_scales, Tensor absmax_offset, int in_features) -> Tensor",
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema(name):
    assert str(getattr(torch.ops.qlora, name).default._schema) == SCHEMAS[name]


def test_the_qlora_namespace_holds_exactly_the_four_ops():
    # docs/nf4_format.md fixes the op set; the CPU kernels' switches live in qlora_cpu.
    names = {s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("qlora::")}
    assert names == {f"qlora::{n}" for n in SCHEMAS}
    assert {s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("qlora_cpu::")} == {
        "qlora_cpu::cpu_kernel_isa", "qlora_cpu::set_cpu_kernel_isa", "qlora_cpu::cpu_bf16_gemm"}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_kernels_registered_per_backend(name):
    dump = torch._C._dispatch_dump(f"qlora::{name}")
    assert "\nCPU: registered at" in dump
    assert ("\nCUDA: registered at" in dump) == ext.WITH_CUDA


def test_build_was_made_for_the_imported_torch():
    from qlora_ext import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
    assert ext.BUILD_KIND.startswith("CUDA" if ext.WITH_CUDA else "CPU only")


def test_torch_version_mismatch_says_how_to_rebuild():
    ext.check_torch_version("2.14.1", "2.14.1")
    with pytest.raises(ImportError, match=r"built against torch 2\.13\.0\+cpu, but torch 2\.14\.1 is imported; rebuild .*pip install --no-build-isolation"):
        ext.check_torch_version("2.13.0+cpu", "2.14.1")


def test_torch_version_mismatch_names_the_library_and_a_checkouts_in_place_copy(tmp_path):
    # Two environments sharing a checkout: the in-place copy of the other one's build was loaded,
    # and the message named no file (rebuilding it broke the other environment in turn).
    library = tmp_path / "site-packages" / "qlora_ext" / "_C.so"
    with pytest.raises(ImportError, match=rf"but torch 2\.14\.1 is imported \({re.escape(str(library))}\); rebuild "):
        ext.check_torch_version("2.13.0+cpu", "2.14.1", str(library))
    checkout = tmp_path / "repo"
    (checkout / "qlora_ext").mkdir(parents=True)
    for name in ("pyproject.toml", "CMakeLists.txt"):
        (checkout / name).write_text("")
    with pytest.raises(ImportError, match=rf"is imported \({re.escape(str(checkout / 'qlora_ext' / '_C.so'))}\): that is the in-place "
                                          rf"copy of the source checkout {re.escape(str(checkout))}, found first on sys.path \(Python "
                                          r"started in it, or PYTHONPATH naming it\); without it there an installed qlora_ext is "
                                          r"used, or rebuild"):
        ext.check_torch_version("2.13.0+cpu", "2.14.1", str(checkout / "qlora_ext" / "_C.so"))


def _editable_install() -> bool:
    """Whether qlora_ext is installed editable (pip install -e .): its finder imports the checkout
    whatever sys.path says."""
    import importlib.metadata
    import json

    try:
        direct_url = importlib.metadata.distribution("qlora_ext").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return False
    return bool(direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"))


@pytest.mark.skipif(_editable_install(), reason="an editable install's finder imports the checkout, not the copies made here")
def test_the_library_loaded_is_the_one_the_build_info_describes(tmp_path):
    # An editable install imports the checkout's modules but finds _build_info (and its _C.so) in
    # site-packages: the checkout's in-place _C.so, another environment's build or none, was loaded.
    import shutil
    import subprocess
    import sys

    import qlora_ext
    from qlora_ext import _build_info

    source = tmp_path / "checkout" / "qlora_ext"
    shutil.copytree(os.path.dirname(qlora_ext.__file__), source,
                    ignore=shutil.ignore_patterns("_C.so", "_build_info.py", "__pycache__"))
    (source / "_C.so").write_bytes(b"another environment's build")  # loading it would fail
    installed = tmp_path / "site" / "qlora_ext"
    installed.mkdir(parents=True)
    shutil.copy(_build_info.__file__, installed / "_build_info.py")
    shutil.copy(os.path.join(os.path.dirname(_build_info.__file__), "_C.so"), installed / "_C.so")
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("qlora_ext._build_info", {str(installed / "_build_info.py")!r})
info = importlib.util.module_from_spec(spec)
spec.loader.exec_module(info)
sys.modules["qlora_ext._build_info"] = info  # as scikit-build-core's editable finder resolves it
sys.path.insert(0, {str(source.parent)!r})
import qlora_ext, torch
assert qlora_ext.__file__.startswith({str(source)!r}), qlora_ext.__file__
print(torch.ops.qlora.dequantize_nf4.default is not None)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-3000:]
    (installed / "_C.so").unlink()  # gone: said so, not an OSError from the loader
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and f"qlora_ext's compiled library is missing (no {installed / '_C.so'})" in done.stderr
    # _C.so copied alone, without the build info written beside it: said so (it said _C.so was missing)
    (source / "_C.so").unlink()
    shutil.copy(os.path.join(os.path.dirname(_build_info.__file__), "_C.so"), source / "_C.so")
    alone = f"import sys; sys.path.insert(0, {str(source.parent)!r}); import qlora_ext"
    done = subprocess.run([sys.executable, "-c", alone], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and (f"qlora_ext's build info is missing: {source / '_C.so'} is there without the _build_info.py "
                                     "the build writes beside it") in done.stderr, done.stderr[-2000:]


def test_cpu_kernel_isa_can_be_chosen():
    before = ops.cpu_kernel_isa()
    try:
        ops.set_cpu_kernel_isa("portable")
        assert ops.cpu_kernel_isa() == "portable"
        ops.set_cpu_kernel_isa("auto")
        # "auto" takes the widest kernels whose extensions the CPU has and the build compiled.
        flags = set()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                flags = {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags and "avx512" in ext.CPU_KERNELS:
            want = "avx512"
        elif {"avx2", "fma", "f16c"} <= flags and "avx2" in ext.CPU_KERNELS:
            want = "avx2"
        else:
            want = "portable"
        assert ops.cpu_kernel_isa() == want
        if "avx2" in flags and "avx2" in ext.CPU_KERNELS:
            ops.set_cpu_kernel_isa("avx2")
            assert ops.cpu_kernel_isa() == "avx2"
        with pytest.raises(ValueError, match=r"argument 'name' must be 'auto', 'portable', 'avx2' or 'avx512'.*got 'sse'"):
            ops.set_cpu_kernel_isa("sse")
    finally:
        ops.set_cpu_kernel_isa(before)


def test_a_cpu_kernel_isa_from_the_environment_that_cannot_be_used_is_said():
    # QLORA_CPU_ISA with a misspelt name was silently replaced by the default kernels.
    import subprocess
    import sys

    code = "import qlora_ext.ops as o; print(o.cpu_kernel_isa())"
    env = {**os.environ, "QLORA_CPU_ISA": "portable"}
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "portable"
    env["QLORA_CPU_ISA"] = "avx5l2"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "UserWarning: environment variable QLORA_CPU_ISA is ignored: qlora_cpu::set_cpu_kernel_isa: argument 'name' must be " \
           "'auto', 'portable', 'avx2' or 'avx512'" in done.stderr and "got 'avx5l2'; the CPU kernels are" in done.stderr, done.stderr
    assert done.stdout.strip() in ("avx512", "avx2", "portable")

