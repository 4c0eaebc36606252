"""The clock pytest-benchmark reads: it advances only by device time measured with CUDA events.

perf/conftest.py makes ``cuda_event_device_clock`` the session's timer through pytest-benchmark's public
option, ``--benchmark-timer=perf.clock.cuda_event_device_clock`` (``TIMER``), so the benchmark fixture reads
it once before and once after every round of ``benchmark.pedantic``. perf.measure runs each pedantic call
inside ``running()``, which installs a fresh ``DeviceClock``; every timed round ends by advancing it by the
CUDA-event time of the round divided by the op executions in it. pytest-benchmark's statistics, tables, JSON
and ``--benchmark-compare`` therefore all work on device time per op.

Pedantic mode never calibrates the timer (only ``benchmark(fn)`` does), so a clock that stands still between
rounds is fine there. Read outside ``running()`` -- ``benchmark(fn)``'s calibration, another plugin -- the
clock raises instead of returning a time nobody measured (calibration would otherwise wait forever for it to
tick). ``verify`` checks after each benchmark that the clock was read exactly twice per round and that the
stored round times are exactly the measured ones, so a pytest-benchmark that times rounds differently fails
loudly instead of recording host time.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

TIMER = "perf.clock.cuda_event_device_clock"  # the --benchmark-timer value; the name ends up in the JSON


class DeviceClock:
    """A reading that advances only by measured device time; counts its reads."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0
        self.recorded: list[float] = []

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def advance(self, seconds: float) -> None:
        self.recorded.append(seconds)
        self.now += seconds


_current: DeviceClock | None = None


def cuda_event_device_clock() -> float:
    """The timer pytest-benchmark reads (``TIMER``): the clock of the measurement running now."""
    if _current is None:
        raise RuntimeError(
            f"{TIMER} was read outside a perf measurement: the perf suite's timer advances only by "
            "CUDA-event time inside benchmark.pedantic run by perf.measure (benchmark(fn) calibrates the "
            "timer and would time nothing). Time through perf.measure.bench_eager / bench_graph."
        )
    return _current()


@contextlib.contextmanager
def running() -> Iterator[DeviceClock]:
    """Install a fresh DeviceClock as the one ``cuda_event_device_clock`` reads, for one benchmark."""
    global _current
    if _current is not None:
        raise RuntimeError("perf.clock.running() is already active: one measurement at a time")
    _current = clock = DeviceClock()
    try:
        yield clock
    finally:
        _current = None


def verify(benchmark, clock: DeviceClock, rounds: int, warmup_rounds: int) -> None:
    """After pedantic: every round must have read our clock exactly twice and recorded exactly the
    device times we measured -- otherwise the numbers are host time and must not be reported."""
    if benchmark.disabled or benchmark.stats is None:
        return
    data = list(benchmark.stats.stats.data)
    expect = clock.recorded[warmup_rounds:]
    same = len(data) == len(expect) and all(
        math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12) for x, y in zip(data, expect)
    )
    if clock.reads != 2 * (rounds + warmup_rounds) or len(data) != rounds or not same:
        import pytest_benchmark

        raise RuntimeError(
            f"pytest-benchmark {pytest_benchmark.__version__} did not time the rounds with {TIMER} "
            f"(clock reads {clock.reads}, expected {2 * (rounds + warmup_rounds)}; {len(data)} stats vs "
            f"{len(expect)} device timings). The recorded numbers would not be device time; refusing them. "
            f"Is --benchmark-timer={TIMER} (perf/conftest.py sets it)?"
        )
