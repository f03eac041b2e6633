"""What a result was measured on: machine, software versions, git revision, date.

Results of different machines are kept apart under ``bench/results/<slug>/``; the slug names the
CPU model and core count, or the GPU.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from bench.report import ALTERNATIVE_PACKAGES

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use, not the host's total
    except AttributeError:
        return os.cpu_count() or 1


def cpu_llc_bytes() -> int:
    """Size of the largest (last-level) CPU cache, from sysfs; 32 MiB where it cannot be read."""
    best_level, best_size = -1, 32 << 20
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m and level > best_level:
            best_level = level
            best_size = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]
    return best_size


def llc_bytes(device: str) -> int:
    """The cache a ring of inputs must outgrow: the CPU's last level, or the GPU's L2."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)
    return cpu_llc_bytes()


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def machine_slug(device: str) -> str:
    """E.g. ``intel-xeon-processor-2c`` or ``nvidia-h100-80gb-hbm3``."""
    if device == "cuda":
        return slugify(torch.cuda.get_device_name(torch.cuda.current_device()))
    return f"{slugify(cpu_model())}-{cpu_count()}c"


def git_revision() -> str:
    """HEAD of the checkout (``+dirty`` with uncommitted changes outside what the tool itself
    writes: bench/results, bench/README.md and README.md's status), or, where the code is not a
    git checkout of its own (a copy on a GPU machine, perhaps inside another repository), the
    ``QLORA_BENCH_GIT_REVISION`` environment variable that names what was copied."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top != REPO.resolve():
            raise subprocess.SubprocessError(f"{REPO} lies inside the git checkout {top}, not one of its own")
        rev = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--", ".", ":(exclude)bench/results", ":(exclude)bench/README.md", ":(exclude)README.md")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("QLORA_BENCH_GIT_REVISION") or "unknown (no git checkout)"
    return rev + ("+dirty" if status else "")


def package_version(name: str) -> str | None:
    """The installed version, without importing the package (importing bitsandbytes is slow)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(device: str) -> dict:
    """The ``machine`` and ``software`` parts of a result."""
    import qlora_ext._extension as ext
    from qlora_ext import ops

    machine = {
        "slug": machine_slug(device),
        "cpu": cpu_model(),
        "cpu_cores": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "llc_bytes": llc_bytes(device),
        "gpu": None,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        machine["gpu"] = {
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_bytes": int(props.total_memory),
            "multiprocessors": props.multi_processor_count,
        }
    software = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "qlora_ext_build": ext.BUILD_KIND,
        "qlora_ext_cuda_kernels": bool(ext.WITH_CUDA),
        "cpu_kernel_isa": ops.cpu_kernel_isa(),
        "cpu_bf16_gemm": ops.cpu_bf16_gemm(),
        **{name: package_version(name) for name in ALTERNATIVE_PACKAGES},
    }
    return {"machine": machine, "software": software}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
