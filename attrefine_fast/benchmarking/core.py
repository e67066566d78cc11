"""The timing core: providers, cases, and the interleaved runner.

A *case* is one benchmarked task at one size (an op, an explanation, a segmentation, an attack)
with several *providers* that perform the same task: ours on each backend, and the peers
(``lime``, ``captum``, ``torchattacks``). Providers that cannot run here stay in the case with the
reason, so every report says what was skipped and why.

The runner interleaves providers: each round calls every provider once (the order rotated from
round to round), so drift on a shared machine (other jobs, thermal state, a cache warming up) hits
all providers alike. Medians over rounds are reported.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# Roles: "ours" (this package), "peer" (the packages we compare against), "model" (the model's
# own forward passes alone: the denominator of the explanation overhead).
ROLES = ("ours", "peer", "model")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates the time spent inside calls it wraps: the model's share of an explanation,
    measured inside the explanation itself.

    On CUDA it records a pair of events around each call instead of synchronizing, so the
    explainer keeps queueing work ahead of the GPU exactly as it does untimed; the events'
    elapsed times are read (after one synchronization) when ``seconds`` is asked for.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._host_seconds = 0.0
        self._events: list = []

    def reset(self) -> None:
        self._host_seconds = 0.0
        self._events.clear()

    def time(self, fn: Callable, *args):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args)
            end.record()
            self._events.append((start, end))
            return out
        start = time.perf_counter()
        out = fn(*args)
        self._host_seconds += time.perf_counter() - start
        return out

    @property
    def seconds(self) -> float:
        if self._events:
            synchronize(self.device)
        return self._host_seconds + sum(s.elapsed_time(e) for s, e in self._events) / 1000


@dataclass
class Provider:
    """One way of doing a case's task.

    fn: one call does the whole task once; None when the provider is skipped.
    skipped: why it cannot run here (empty when it runs).
    stopwatch: where fn records its model time, for explanation cases.
    detail: what the provider is, in a few words (shown in reports).
    """

    name: str
    role: str
    fn: Callable[[], object] | None = None
    skipped: str = ""
    stopwatch: Stopwatch | None = None
    detail: str = ""

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if (self.fn is None) == (not self.skipped):
            raise ValueError(f"provider {self.name}: give fn, or a reason it is skipped, not both")


def skip(name: str, role: str, reason: str, detail: str = "") -> Provider:
    return Provider(name, role, skipped=reason, detail=detail)


@dataclass
class Case:
    """A task at one size with its providers.

    kind: "op", "explain", "segmentation" or "attack" (decides which figures are reported).
    params: the sizes and settings, reported with the figures.
    """

    id: str
    kind: str
    title: str
    params: dict
    device: torch.device
    providers: list[Provider]
    notes: list[str] = field(default_factory=list)

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"case {self.id} has no provider {name!r}")


@dataclass
class Timing:
    """The measured samples of one provider: seconds per call (one entry per round) and, when
    the provider reports it, the model seconds inside each of those calls."""

    seconds: list[float]
    model_seconds: list[float] | None
    calls_per_sample: int


def _sample(p: Provider, device: torch.device, calls: int) -> tuple[float, float | None]:
    if p.stopwatch is not None:
        p.stopwatch.reset()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        p.fn()
    synchronize(device)
    elapsed = (time.perf_counter() - start) / calls
    model = p.stopwatch.seconds / calls if p.stopwatch is not None else None
    return elapsed, model


def calls_for(seconds: float, min_sample_s: float, max_calls: int) -> int:
    """Calls per timed sample so that one sample lasts at least min_sample_s: short calls are
    repeated so that timer resolution and per-sample overheads do not dominate."""
    if seconds <= 0:
        return max_calls
    return max(1, min(max_calls, math.ceil(min_sample_s / seconds)))


def run_case(
    case: Case,
    min_repeats: int = 3,
    max_repeats: int = 20,
    budget_s: float = 10.0,
    warmup: int = 1,
    min_sample_s: float = 0.05,
    max_calls: int = 200,
) -> dict[str, Timing]:
    """Time every runnable provider of ``case``, interleaved.

    ``warmup`` untimed rounds come first (the first also calls each provider a second time, to set
    its calls per sample and measure a round from a warm call); then timed rounds, each calling
    every provider once in an order rotated by one from the previous round. The number of timed rounds fits ``budget_s``
    within [min_repeats, max_repeats], so heavy cases take a few rounds and light ones many.
    """
    active = [p for p in case.providers if p.fn is not None]
    if not active:
        return {}
    calls = {p.name: 1 for p in active}
    round_s = 0.0
    for r in range(warmup):
        for p in active:
            _sample(p, case.device, 1)
            if r == 0:  # sized from a second call: the first pays one-time costs (compilation, allocation)
                elapsed, _ = _sample(p, case.device, 1)
                calls[p.name] = calls_for(elapsed, min_sample_s, max_calls)
                round_s += elapsed * calls[p.name]
    repeats = min_repeats
    if warmup and round_s > 0:
        repeats = max(min_repeats, min(max_repeats, int(budget_s / round_s)))
    seconds = {p.name: [] for p in active}
    model = {p.name: [] for p in active}
    for r in range(repeats):
        shift = r % len(active)
        for p in active[shift:] + active[:shift]:
            elapsed, model_s = _sample(p, case.device, calls[p.name])
            seconds[p.name].append(elapsed)
            if model_s is not None:
                model[p.name].append(model_s)
    return {
        p.name: Timing(seconds[p.name], model[p.name] if p.stopwatch is not None else None, calls[p.name])
        for p in active
    }


def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def interleaved_median_ms(
    calls: dict[str, Callable[[], object]], rounds: int, device: torch.device, warmup: int = 1
) -> dict[str, float]:
    """Median milliseconds of each zero-argument call, one call of each per round after
    ``warmup`` calls each (GPU work synchronized): the light-weight loop of the standalone
    benchmark scripts, which time single calls rather than whole cases."""
    times = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(warmup):
            call()
    synchronize(device)
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}
