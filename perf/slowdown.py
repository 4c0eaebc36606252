"""The deliberate slow-down switch, to prove the regression gate (perf/README.md, "Regression gate").

ATTN_KERNELS_PERF_SLOWDOWN=based_decode,sliding_window_decode makes the perf suite's attn_kernels (as
perf.impls loads it) run each named op twice per call, so twice per timed step, inside the CUDA graph too.
Only the perf suite reads it; perf/conftest.py records it as machine_info["perf_slowdown"], so a slowed run
can never serve as a baseline or as noise.
"""
from __future__ import annotations

import os
from typing import Any, Callable

SLOWDOWN_ENV = "ATTN_KERNELS_PERF_SLOWDOWN"


def slowed_ops() -> list[str]:
    """attn_kernels ops named in ATTN_KERNELS_PERF_SLOWDOWN (comma-separated); empty when unset."""
    return [op.strip() for op in os.environ.get(SLOWDOWN_ENV, "").split(",") if op.strip()]


class Slowed:
    """attn_kernels as the perf suite sees it when ATTN_KERNELS_PERF_SLOWDOWN is set: each named op runs
    twice per call (so twice per timed step, inside the CUDA graph too); everything else is the module's."""

    def __init__(self, ak, ops: list[str]) -> None:
        self._ak = ak
        for op in ops:
            fn = getattr(ak, op, None)
            if not callable(fn):  # a typo must not yield a "nothing regressed" proof
                raise ValueError(f"{SLOWDOWN_ENV}: attn_kernels has no op {op!r}")
            setattr(self, op, self._twice(fn))

    @staticmethod
    def _twice(fn: Callable[..., Any]) -> Callable[..., Any]:
        def slowed(*args, **kwargs):
            fn(*args, **kwargs)
            return fn(*args, **kwargs)

        return slowed

    def __getattr__(self, name: str):
        return getattr(self._ak, name)


def maybe_slowed(ak):
    """ak itself, or ak with the ops ATTN_KERNELS_PERF_SLOWDOWN names run twice per call."""
    ops = slowed_ops()
    return Slowed(ak, ops) if ops else ak
