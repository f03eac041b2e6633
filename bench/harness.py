"""Timing: warm-up, repetitions, medians; CUDA events on GPU; inputs that rotate through a ring
larger than the last-level cache, so that every call reads its operands from memory, as the
layers of a real model do.

    budget = Budget.for_mode("full", device)
    stats = time_calls(lambda item: op(*item), ring_of_inputs, device, budget)
    stats.median_s
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

# -- statistics --------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    """The middle value (the mean of the two middle ones for an even count)."""
    if not xs:
        raise ValueError("median: argument 'xs' must be non-empty; got an empty sequence")
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default rule), q in [0, 1]."""
    if not xs or not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile: needs a non-empty 'xs' and 0 <= q <= 1; got {len(xs)} values, q={q}")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Per-call times of one measurement, in seconds."""

    median_s: float
    min_s: float
    q1_s: float
    q3_s: float
    reps: int

    @classmethod
    def of(cls, times: Sequence[float]) -> Stats:
        return cls(median(times), min(times), quantile(times, 0.25), quantile(times, 0.75), len(times))

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median: how noisy the measurement was."""
        return (self.q3_s - self.q1_s) / self.median_s if self.median_s > 0 else 0.0


def ratio(numerator_s: float | None, denominator_s: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not positive."""
    if numerator_s is None or denominator_s is None or denominator_s <= 0:
        return None
    return numerator_s / denominator_s


# -- how long to measure -----------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Warm-up for at least ``warmup_s`` (and ``warmup_calls``), then time calls until both
    ``min_reps`` calls and ``target_s`` seconds are done, or ``max_reps`` calls, or (after three
    calls at least) ``max_s`` seconds: a call of seconds (torchao on a CPU) gets three."""

    warmup_s: float
    warmup_calls: int
    min_reps: int
    max_reps: int
    target_s: float
    max_s: float = float("inf")
    min_calls: int = 3  # what even the slowest call gets

    @classmethod
    def for_mode(cls, mode: str, device: str) -> Budget:
        if mode == "smoke":  # checks that the code runs; its numbers mean nothing
            return cls(warmup_s=0.0, warmup_calls=1, min_reps=2, max_reps=2, target_s=0.0)
        if device == "cuda":
            if mode == "quick":
                return cls(warmup_s=0.05, warmup_calls=2, min_reps=5, max_reps=100, target_s=0.1, max_s=2.0)
            return cls(warmup_s=0.1, warmup_calls=3, min_reps=10, max_reps=400, target_s=0.3, max_s=5.0)
        if mode == "quick":
            return cls(warmup_s=0.1, warmup_calls=1, min_reps=3, max_reps=20, target_s=0.4, max_s=1.5)
        return cls(warmup_s=0.2, warmup_calls=1, min_reps=5, max_reps=50, target_s=1.5, max_s=5.0)

    def done(self, reps: int, spent_s: float) -> bool:
        """Whether ``reps`` timed calls taking ``spent_s`` in all are enough."""
        if reps >= self.max_reps or (reps >= self.min_reps and spent_s >= self.target_s):
            return True
        return reps >= max(self.min_calls, self.min_reps // 2) and spent_s >= self.max_s

    def share(self, rounds: int) -> Budget:
        """One of ``rounds`` equal turns of this budget (``time_in_turns``): each turn warms up with
        ``warmup_calls`` again (the other turns in between have evicted everything), with no
        ``warmup_s``, which only the first turn needs."""
        return Budget(
            warmup_s=0.0, warmup_calls=self.warmup_calls, min_reps=math.ceil(self.min_reps / rounds),
            max_reps=math.ceil(self.max_reps / rounds), target_s=self.target_s / rounds, max_s=self.max_s / rounds,
            min_calls=math.ceil(self.min_calls / rounds),
        )


# -- rings of inputs ---------------------------------------------------------------------------


def ring_length(item_bytes: int, ring_bytes: int, max_items: int = 64) -> int:
    """How many distinct items make a ring of at least ``ring_bytes`` (at least 2)."""
    return max(2, min(max_items, math.ceil(ring_bytes / max(1, item_bytes))))


def make_ring(make: Callable[[int], Any], item_bytes: int, ring_bytes: int, max_items: int = 64) -> list:
    """``[make(0), make(1), ...]``: distinct copies whose total size exceeds ``ring_bytes``."""
    return [make(i) for i in range(ring_length(item_bytes, ring_bytes, max_items))]


# -- timing ------------------------------------------------------------------------------------


def time_calls(fn: Callable[[Any], Any], ring: Sequence[Any], device: str, budget: Budget) -> Stats:
    """Times ``fn(item)`` with items taken round-robin from ``ring``; returns per-call statistics."""
    gc.collect()
    return Stats.of(_timed(fn, ring, device, budget))


def time_in_turns(calls: Sequence[tuple[Callable[[Any], Any], Sequence[Any]]], device: str, budget: Budget,
                  rounds: int = 3) -> list[Stats]:
    """Times several implementations of one case, ``calls = [(fn, ring), ...]``, taking turns:
    ``rounds`` rounds, each giving every implementation an equal share of ``budget``, in reverse
    order every other round. The speed of a shared or virtual machine drifts by tens of percent
    over seconds: timed one after the other, two implementations would each meet a different
    machine and their ratio would measure the drift. Returns one Stats per call, over all rounds."""
    times: list[list[float]] = [[] for _ in calls]
    turn = budget.share(rounds)
    gc.collect()  # once per case, not per turn: a full collection takes about 0.2 s once bitsandbytes is imported
    for r in range(rounds):
        order = range(len(calls)) if r % 2 == 0 else reversed(range(len(calls)))
        for j in order:
            fn, ring = calls[j]
            times[j] += _timed(fn, ring, device, replace(turn, warmup_s=budget.warmup_s) if r == 0 else turn)
    return [Stats.of(t) for t in times]


def _timed(fn, ring, device: str, budget: Budget) -> list[float]:
    """Per-call seconds of ``fn(item)``, items taken round-robin from ``ring``, with the garbage
    collector off (its callers collect first)."""
    if not ring:
        raise ValueError("timing: argument 'ring' must hold at least one input; got an empty one")
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of a timed call is noise, not the op's cost
    try:
        if device == "cuda":
            return _time_cuda(fn, ring, budget)
        return _time_cpu(fn, ring, budget)
    finally:
        if gc_was_enabled:
            gc.enable()


def _warm_up(fn, ring, budget: Budget, sync: Callable[[], None]) -> int:
    start = time.perf_counter()
    i = 0
    while i < budget.warmup_calls or time.perf_counter() - start < budget.warmup_s:
        fn(ring[i % len(ring)])
        i += 1
        sync()
    return i


def _time_cpu(fn, ring, budget: Budget) -> list[float]:
    i = _warm_up(fn, ring, budget, lambda: None)
    times: list[float] = []
    spent = 0.0
    while not budget.done(len(times), spent):
        item = ring[i % len(ring)]
        t0 = time.perf_counter_ns()
        fn(item)
        dt = (time.perf_counter_ns() - t0) * 1e-9
        times.append(dt)
        spent += dt
        i += 1
    return times


_SLEEP_CYCLES_PER_S: float | None = None


def _sleep_cycles_per_second() -> float:
    """Calibrates ``torch.cuda._sleep`` (a GPU spin of N clock cycles) against CUDA events."""
    global _SLEEP_CYCLES_PER_S
    if _SLEEP_CYCLES_PER_S is None:
        cycles = 10_000_000
        torch.cuda._sleep(cycles)  # first launch loads the kernel
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_S = cycles / (start.elapsed_time(end) * 1e-3)
    return _SLEEP_CYCLES_PER_S


def _time_cuda(fn, ring, budget: Budget) -> list[float]:
    # Each call is bracketed by its own pair of events on the current stream, so the time is the
    # GPU's. Before each pair the GPU spins for about twice the host time of one call: the host
    # then enqueues the whole call while the GPU is still busy, and the events measure the op's
    # kernels back to back rather than the Python launch latency between them (a model keeps the
    # GPU fed the same way). The spin sits outside the events.
    i = _warm_up(fn, ring, budget, torch.cuda.synchronize)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(ring[i % len(ring)])
    host_s = time.perf_counter() - t0
    i += 1
    torch.cuda.synchronize()
    spin = int(min(max(2 * host_s, 20e-6), 0.05) * _sleep_cycles_per_second())

    pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    wall_start = time.perf_counter()
    while not budget.done(len(pairs), time.perf_counter() - wall_start):
        item = ring[i % len(ring)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(spin)
        start.record()
        fn(item)
        end.record()
        pairs.append((start, end))
        i += 1
        if len(pairs) % 16 == 0:
            end.synchronize()  # keeps the wall-clock budget honest: the host may not run far ahead
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e-3 for s, e in pairs]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- the physical floor ------------------------------------------------------------------------


def measure_copy_bandwidth(device: str, nbytes: int, budget: Budget) -> tuple[float, Stats]:
    """Memory bandwidth in bytes/s: (read + write) of a ``dst.copy_(src)`` of ``nbytes``, with
    ``nbytes`` well above the cache, into memory touched once before (no page faults timed)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src).fill_(0)  # fill_: the pages exist before the clock starts
    synchronize(device)
    stats = time_calls(lambda _: dst.copy_(src), [None], device, budget)
    del src, dst
    return 2 * nbytes / stats.median_s, stats
