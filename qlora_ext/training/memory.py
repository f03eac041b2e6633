"""Memory statistics for the logs: CUDA peaks (allocated / reserved / active) on a GPU, the
process's resident memory on CPU. Printed after model init as torchtune does:

    Memory Stats after model init::
    GPU peak memory allocation: 13.96 GB
    GPU peak memory reserved: 13.98 GB
    GPU peak memory active: 13.96 GB

The unit is the seed tutorial's: GB, 1e9 bytes (the torchtune that printed its figures divided by
1e9; later versions print GiB, 7% smaller for the same bytes), so the figures compare with the
seed's directly. The metrics log's values are in GB too.
"""

from __future__ import annotations

import os
import resource
import sys

import torch

_GB = 1e9  # bytes


def memory_stats(device: torch.device, reset_peak: bool = False) -> dict[str, float]:
    """Peak memory in GB (1e9 bytes); on CUDA the allocator's peaks since the last reset (``reset_peak``
    starts a new window), on CPU the resident set now and its peak over the process's life."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        out = {
            "peak_memory_alloc": stats.get("allocated_bytes.all.peak", 0) / _GB,
            "peak_memory_reserved": stats.get("reserved_bytes.all.peak", 0) / _GB,
            "peak_memory_active": stats.get("active_bytes.all.peak", 0) / _GB,
        }
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
        return out
    current = _current_rss_bytes()
    # Two kernel counters (statm now, ru_maxrss at its last update): the peak is at least the current.
    return {"rss_memory": current / _GB, "peak_rss_memory": max(_peak_rss_bytes(), current) / _GB}


def format_memory_stats(stats: dict[str, float], title: str) -> str:
    """The multi-line block logged after model init (torchtune's wording on a GPU)."""
    names = {
        "peak_memory_alloc": "GPU peak memory allocation",
        "peak_memory_reserved": "GPU peak memory reserved",
        "peak_memory_active": "GPU peak memory active",
        "rss_memory": "CPU resident memory",
        "peak_rss_memory": "CPU peak resident memory",
    }
    lines = [f"Memory Stats {title}::"]
    lines += [f"{names.get(k, k)}: {v:.2f} GB" for k, v in stats.items()]
    return "\n".join(lines)


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
