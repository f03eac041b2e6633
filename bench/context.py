"""What a benchmark's ``run(ctx)`` receives: the device, the mode, how long to measure, how large
the rings of inputs must be, and the memory bandwidth measured once per process."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bench import harness, machine
from bench.report import Row

MODES = ("full", "quick", "smoke")


@dataclass
class Context:
    """Args:
    device: "cpu" or "cuda".
    mode: "full"; "quick" (fewer shapes and repetitions); "smoke" (tiny shapes, two calls:
        proves the code runs, the numbers mean nothing).
    ring_bytes: inputs of one measurement rotate through distinct copies at least this large
        (default: twice the last-level cache; at least 64 MiB).
    """

    device: str
    mode: str = "full"
    ring_bytes: int | None = None
    log_stream: Any = sys.stderr
    _bandwidth: tuple[float, harness.Stats, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"Context: argument 'device' must be 'cpu' or 'cuda'; got {self.device!r}")
        if self.mode not in MODES:
            raise ValueError(f"Context: argument 'mode' must be one of {MODES}; got {self.mode!r}")
        if self.ring_bytes is None:
            llc = machine.llc_bytes(self.device)
            self.ring_bytes = (1 << 20) if self.smoke else max(2 * llc, 64 << 20)
        self.budget = harness.Budget.for_mode(self.mode, self.device)

    @property
    def quick(self) -> bool:
        return self.mode == "quick"

    @property
    def smoke(self) -> bool:
        return self.mode == "smoke"

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=self.log_stream, flush=True)

    # -- measuring ---------------------------------------------------------------------------

    def time(self, fn: Callable[[Any], Any], ring: Sequence[Any]) -> harness.Stats:
        return harness.time_calls(fn, ring, self.device, self.budget)

    def time_in_turns(self, calls: Sequence[tuple[Callable[[Any], Any], Sequence[Any]]]) -> list[harness.Stats]:
        """``time`` of each ``(fn, ring)``, the calls taking turns (``harness.time_in_turns``); a
        smoke run gives each one turn."""
        return harness.time_in_turns(calls, self.device, self.budget, rounds=1 if self.smoke else 3)

    def ring(self, make: Callable[[int], Any], item_bytes: int, max_items: int = 64) -> list:
        return harness.make_ring(make, item_bytes, self.ring_bytes, max_items)

    def bandwidth(self) -> tuple[float, harness.Stats, int]:
        """(bytes/s, stats, buffer bytes) of a large device copy, measured on first use."""
        if self._bandwidth is None:
            if self.smoke:
                nbytes = 64 << 20
            elif self.device == "cuda":
                nbytes = max(4 * machine.llc_bytes("cuda"), 1 << 30)
            else:
                nbytes = min(max(2 * machine.llc_bytes("cpu"), 256 << 20), 1 << 30)
            self.log(f"measuring {self.device} copy bandwidth with {nbytes >> 20} MiB")
            bw, stats = harness.measure_copy_bandwidth(self.device, nbytes, self.budget)
            self._bandwidth = (bw, stats, nbytes)
        return self._bandwidth

    def bandwidth_dict(self) -> dict:
        if self._bandwidth is None:
            return {"bytes_per_s": None, "method": "not measured"}
        bw, stats, nbytes = self._bandwidth
        return {
            "bytes_per_s": bw,
            "method": f"dst.copy_(src) of {nbytes >> 20} MiB on {self.device}, counting read + write",
            "median_ms": stats.median_s * 1e3,
            "reps": stats.reps,
        }

    def row(
        self,
        group: str,
        impl: str,
        dtype: torch.dtype | str,
        stats: harness.Stats,
        *,
        bytes_moved: int | None = None,
        flops: int | None = None,
        **params: Any,
    ) -> Row:
        """A Row with its memory floor (``bytes_moved`` at the measured bandwidth)."""
        floor_ms = bytes_moved / self.bandwidth()[0] * 1e3 if bytes_moved else None
        return Row(
            group=group,
            impl=impl,
            dtype=str(dtype).removeprefix("torch."),
            median_ms=stats.median_s * 1e3,
            min_ms=stats.min_s * 1e3,
            q1_ms=stats.q1_s * 1e3,
            q3_ms=stats.q3_s * 1e3,
            reps=stats.reps,
            bytes_moved=bytes_moved,
            flops=flops,
            floor_ms=floor_ms,
            params=params,
        )
