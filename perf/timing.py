"""Device-time measurement for the perf suite, plus the byte / FLOP / floor bookkeeping.

Two ways of timing one benchmark, both feeding pytest-benchmark through ``benchmark.pedantic``:

* ``bench_eager``  (prefill): each round = a spin kernel, a start event, ``n_inner`` op calls over
  rotating input sets, an end event. The spin kernel (``torch.cuda._sleep``) keeps the GPU busy while
  the host enqueues the calls, so the events measure back-to-back device execution, not launch latency.
* ``bench_graph``  (decode-type ops): K steps over K rotating input/state sets are captured once in a
  ``torch.cuda.CUDAGraph``; each round = spin kernel, start event, one replay, end event; per-step time
  is replay time / K. This is how decode is served.

pytest-benchmark reads its timer through ``benchmark._timer`` (one reading before and one after each
round). We replace it with a ``DeviceClock`` whose reading only advances by the CUDA-event time of the
rounds (divided by the op executions in them), so pytest-benchmark's statistics, tables, JSON and
``--benchmark-compare`` all work on device time. ``_check_fixture`` / ``_verify`` fail loudly if the
installed pytest-benchmark does not use that attribute the way this relies on.

Run ``python perf/timing.py --slug`` to print this machine's GPU slug (baseline folder name).
"""
from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Callable, Sequence

# --- ceilings used for the floor (issue 2): bytes at 3.0 TB/s, FLOPs at 700 TFLOP/s -----------------
HBM_BYTES_PER_S = 3.0e12
PEAK_FLOPS = 700e12

ROTATE_L2_FACTOR = 3  # rotating input sets together hold >= this many times the L2 size
EAGER_REGION_S = 300e-6  # eager rounds run enough op calls to fill at least this much device time
SLOW_OP_BUDGET_S = 1.5  # per-benchmark time budget for the timed rounds of slow ops
MIN_ROUNDS_SLOW = 10  # fewest rounds, even for slow ops (each then >= ~100 ms: tiny spread)
MAX_SLEEP_S = 0.25  # longest spin kernel put in front of a round


# --------------------------------------------------------------------------------------------------
# GPU identity
# --------------------------------------------------------------------------------------------------
def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", name.lower())).strip("-")


def gpu_slug(device: int = 0) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return slugify(torch.cuda.get_device_name(device))


def _driver_version() -> str | None:
    try:  # nvidia-ml-py, when installed
        import pynvml  # type: ignore

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        pass
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except Exception:
        pass
    return None


def gpu_info(device: int = 0) -> dict[str, Any]:
    """What goes into pytest-benchmark's machine_info (and the baselines)."""
    import torch

    info: dict[str, Any] = {"torch_version": torch.__version__, "cuda_version": torch.version.cuda}
    try:
        import triton

        info["triton_version"] = triton.__version__
    except Exception:
        info["triton_version"] = None
    if not torch.cuda.is_available():
        info.update(gpu_name=None, gpu_slug="no-cuda")
        return info
    p = torch.cuda.get_device_properties(device)
    cuda_driver_api = None
    try:
        cuda_driver_api = int(torch._C._cuda_getDriverVersion())  # e.g. 13000
    except Exception:
        pass
    info.update(
        gpu_name=p.name,
        gpu_slug=slugify(p.name),
        gpu_sm_count=p.multi_processor_count,
        gpu_l2_bytes=int(getattr(p, "L2_cache_size", 0)),
        gpu_memory_bytes=int(p.total_memory),
        gpu_compute_capability=f"{p.major}.{p.minor}",
        driver_version=_driver_version(),
        cuda_driver_api_version=cuda_driver_api,
    )
    try:
        info["cudnn_version"] = torch.backends.cudnn.version()
    except Exception:
        info["cudnn_version"] = None
    try:
        import fla  # noqa: F401

        info["fla_version"] = getattr(fla, "__version__", "unknown")
    except Exception:
        info["fla_version"] = None
    try:
        import attn_kernels as ak

        info["attn_kernels_compiled"] = bool(ak.kernels_available())
    except Exception as exc:  # noqa: BLE001
        info["attn_kernels_compiled"] = f"import failed: {type(exc).__name__}"
    return info


def l2_bytes(device: int = 0) -> int:
    import torch

    p = torch.cuda.get_device_properties(device)
    l2 = int(getattr(p, "L2_cache_size", 0))
    return l2 if l2 > 0 else 64 * 2**20  # unknown: assume a big one


# --------------------------------------------------------------------------------------------------
# bytes / flops / floor
# --------------------------------------------------------------------------------------------------
F_COMPACT = 153
F_EXPANDED = 273


def floor_us(nbytes: float, flops: float) -> float:
    return max(nbytes / HBM_BYTES_PER_S, flops / PEAK_FLOPS) * 1e6


def prefill_cost(B: int, H: int, N: int, *, d: int = 16, e: int = 64, itemsize: int = 2,
                 return_state: bool = False) -> tuple[int, int]:
    """q, k (d), v, o (e) once each; FLOPs of the nominal 273-wide form: B*H*N*(2*273 + 4*273*e)."""
    nbytes = B * H * N * (d + d + e + e) * itemsize
    if return_state:
        nbytes += B * H * (F_COMPACT * e + F_COMPACT) * 4
    flops = B * H * N * (2 * F_EXPANDED + 4 * F_EXPANDED * e)
    return nbytes, flops


def decode_cost(B: int, H: int, *, state_itemsize: int, d: int = 16, e: int = 64, itemsize: int = 2,
                F: int = F_COMPACT) -> tuple[int, int]:
    """State (S and z) read + written once in the state dtype, plus q, k, v read and o written.
    FLOPs: feature maps of q and k, S += phi(k) v^T, phi(q)^T S, phi(q).z."""
    state = B * H * (F * e + F) * state_itemsize
    nbytes = 2 * state + B * H * (d + d + e + e) * itemsize
    flops = B * H * (2 * 2 * F * e + 2 * F + 2 * F)
    return nbytes, flops


def sliding_window_cost(B: int, H: int, W: int, e: int, *, itemsize: int = 2) -> tuple[int, int]:
    """The window's K and V read once; q, k_new, v_new read, o written, k_new/v_new written to the cache."""
    nbytes = B * H * W * e * 2 * itemsize + B * H * e * (3 + 1 + 2) * itemsize
    flops = B * H * W * (4 * e + 4)
    return nbytes, flops


def extra_info(op: str, impl: str, shape: dict, nbytes: int, flops: int) -> dict:
    """The exact keys issue 2 asks for; pct_of_floor is filled after timing."""
    return {
        "op": op,
        "impl": impl,
        "shape": dict(shape),
        "bytes": int(nbytes),
        "flops": int(flops),
        "floor_us": floor_us(nbytes, flops),
        "pct_of_floor": None,
    }


def rotation_count(bytes_per_set: int, *, min_sets: int, max_sets: int) -> int:
    """Enough input sets that together they hold >= ROTATE_L2_FACTOR x L2 (so no set is still in L2
    when it comes round again)."""
    need = math.ceil(ROTATE_L2_FACTOR * l2_bytes() / max(1, bytes_per_set))
    return int(min(max_sets, max(min_sets, need)))


# --------------------------------------------------------------------------------------------------
# the clock pytest-benchmark reads
# --------------------------------------------------------------------------------------------------
class DeviceClock:
    """A timer for pytest-benchmark: its reading advances only by measured device time."""

    __name__ = "cuda_event_device_clock"  # pytest-benchmark stores the timer's name in the JSON

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


def _check_fixture(benchmark) -> None:
    if not hasattr(benchmark, "_timer") or not hasattr(benchmark, "pedantic"):
        import pytest_benchmark

        raise RuntimeError(
            f"pytest-benchmark {pytest_benchmark.__version__}: BenchmarkFixture has no `_timer` attribute; "
            "perf/timing.py relies on it to feed CUDA-event device time into pytest-benchmark. "
            "Pin pytest-benchmark 5.x or adapt perf/timing.py."
        )


def _verify(benchmark, clock: DeviceClock, rounds: int, warmup_rounds: int) -> None:
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
            f"pytest-benchmark {pytest_benchmark.__version__} did not time the rounds with benchmark._timer "
            f"(clock reads {clock.reads}, expected {2 * (rounds + warmup_rounds)}; {len(data)} stats vs "
            f"{len(expect)} device timings). The recorded numbers would not be device time; refusing them."
        )


def _finish(benchmark, info: dict) -> None:
    if benchmark.stats is not None and not benchmark.disabled:
        median_us = benchmark.stats.stats.median * 1e6
        info["pct_of_floor"] = info["floor_us"] / median_us * 100.0 if median_us > 0 else None
    benchmark.extra_info.update(info)


# --------------------------------------------------------------------------------------------------
# spin kernel (hides host enqueue time in front of a timed region)
# --------------------------------------------------------------------------------------------------
_SLEEP_CYCLES_PER_S: float | None = None


def _sleep_rate() -> float:
    global _SLEEP_CYCLES_PER_S
    if _SLEEP_CYCLES_PER_S is None:
        import torch

        cycles = 2_000_000
        torch.cuda._sleep(cycles // 10)  # warm the kernel up
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(3):
            a.record()
            torch.cuda._sleep(cycles)
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b) * 1e-3)
        _SLEEP_CYCLES_PER_S = cycles / best
    return _SLEEP_CYCLES_PER_S


def _spin(seconds: float) -> None:
    import torch

    torch.cuda._sleep(int(max(1e-6, min(seconds, MAX_SLEEP_S)) * _sleep_rate()))


# --------------------------------------------------------------------------------------------------
# eager timing (prefill)
# --------------------------------------------------------------------------------------------------
def _event_time(fn: Callable[[], Any], spin_s: float) -> tuple[float, float]:
    """(device seconds, host enqueue seconds) of fn() run behind a spin kernel."""
    import torch

    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _spin(spin_s)
    a.record()
    t0 = time.perf_counter()
    fn()
    host = time.perf_counter() - t0
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e-3, host


def _pedantic(benchmark, work: Callable[[], Any], n_ops: int, host_s: float, rounds: int,
              warmup_rounds: int) -> None:
    """benchmark.pedantic over rounds of work() (n_ops op executions), each behind a spin kernel sized
    from the previous round's enqueue time; the fixture's timer is a DeviceClock advanced by event time."""
    clock = DeviceClock()
    spin = [1.5 * host_s + 5e-5]

    def region() -> None:
        device_s, enqueue_s = _event_time(work, spin[0])
        spin[0] = 1.5 * enqueue_s + 5e-5
        clock.advance(device_s / n_ops)

    benchmark._timer = clock
    benchmark.pedantic(region, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    _verify(benchmark, clock, rounds, warmup_rounds)


def bench_eager(benchmark, fn: Callable[..., Any], sets: Sequence[tuple], info: dict, *,
                rounds: int, warmup_rounds: int) -> None:
    """Time fn(*sets[i]) (one op call), rotating i over the sets, as device time per call."""
    import torch

    _check_fixture(benchmark)
    n_sets = len(sets)
    for s in sets:  # compile / autotune / allocator warm-up, outside anything timed
        fn(*s)
    torch.cuda.synchronize()

    t_call, host = _event_time(lambda: fn(*sets[0]), 1e-4)
    t_call, host = _event_time(lambda: fn(*sets[1 % n_sets]), 1.5 * host + 5e-5)
    n_inner = max(1, min(64, math.ceil(EAGER_REGION_S / max(t_call, 1e-7))))
    if t_call * (rounds + warmup_rounds) > SLOW_OP_BUDGET_S:
        rounds = max(MIN_ROUNDS_SLOW, int(SLOW_OP_BUDGET_S / t_call))
        warmup_rounds = min(warmup_rounds, 1)

    state = {"i": 0}

    def calls() -> None:
        for _ in range(n_inner):
            fn(*sets[state["i"] % n_sets])
            state["i"] += 1

    _pedantic(benchmark, calls, n_inner, host * n_inner, rounds, warmup_rounds)
    _finish(benchmark, info)


# --------------------------------------------------------------------------------------------------
# CUDA-graph timing (decode-type ops)
# --------------------------------------------------------------------------------------------------
class NotCapturable(RuntimeError):
    """The implementation could not be captured in a CUDA graph."""


def capture_steps(step: Callable[..., Any], sets: Sequence[tuple], *,
                  context: Callable[[], Any] | None = None):
    """Warm step up on a side stream (compile, autotune, handles), then capture one graph that runs
    step(*s) for every s in sets, in order. Returns the graph."""
    import contextlib

    import torch

    ctx = context or contextlib.nullcontext
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), ctx():
        for _ in range(2):
            for s in sets[: min(len(sets), 3)]:
                step(*s)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    try:
        with ctx(), torch.cuda.graph(g):
            for s in sets:
                step(*s)
    except Exception as exc:  # noqa: BLE001
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        raise NotCapturable(f"{type(exc).__name__}: {exc}") from exc
    torch.cuda.synchronize()
    return g


def bench_graph(benchmark, step: Callable[..., Any], sets: Sequence[tuple], info: dict, *,
                rounds: int, warmup_rounds: int, context: Callable[[], Any] | None = None) -> None:
    """Time step(*s) as served: one CUDA graph runs K = len(sets) steps over the rotating sets;
    reported time = replay device time / K."""
    _check_fixture(benchmark)
    g = capture_steps(step, sets, context=context)
    K = len(sets)

    t_rep, host = _event_time(g.replay, 1e-4)
    if t_rep * (rounds + warmup_rounds) > SLOW_OP_BUDGET_S:
        rounds = max(MIN_ROUNDS_SLOW, int(SLOW_OP_BUDGET_S / t_rep))
        warmup_rounds = min(warmup_rounds, 1)

    try:
        _pedantic(benchmark, g.replay, K, host, rounds, warmup_rounds)
    finally:
        del g
    _finish(benchmark, info)


# --------------------------------------------------------------------------------------------------
# helpers shared by the test modules
# --------------------------------------------------------------------------------------------------
def import_attn_kernels():
    """attn_kernels, or skip: not importable, or its CUDA extension (attn_kernels._C) not built."""
    import pytest

    try:
        import attn_kernels as ak
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"attn_kernels not importable: {type(exc).__name__}: {exc}")
    if not ak.kernels_available():
        why = getattr(getattr(ak, "_library", None), "_C_ERROR", None)
        pytest.skip(f"attn_kernels CUDA extension not built ({why}): run `nox -s build` first")
    ops = slowed_ops()
    return _Slowed(ak, ops) if ops else ak


# --------------------------------------------------------------------------------------------------
# deliberate slow-down, to prove the regression gate (perf/README.md, "Regression gate")
# --------------------------------------------------------------------------------------------------
SLOWDOWN_ENV = "ATTN_KERNELS_PERF_SLOWDOWN"


def slowed_ops() -> list[str]:
    """attn_kernels ops named in ATTN_KERNELS_PERF_SLOWDOWN (comma-separated); empty when unset."""
    return [op.strip() for op in os.environ.get(SLOWDOWN_ENV, "").split(",") if op.strip()]


class _Slowed:
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


def import_optional(module: str, what: str):
    """Import an optional peer's module or skip the test with the reason."""
    import importlib

    import pytest

    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{what}: `import {module}` failed: {type(exc).__name__}: {exc}")


import contextlib  # noqa: E402


@contextlib.contextmanager
def peer_errors_skip(impl: str, ak=None):
    """A peer that fails on this machine (no kernel for these inputs, not capturable, ...) is skipped with
    the reason. attn_kernels failures (ak given) fail the test."""
    import pytest

    try:
        yield
    except NotCapturable as exc:
        if ak is not None:
            raise
        pytest.skip(f"{impl}: not capturable in a CUDA graph here: {str(exc)[:400]}")
    except Exception as exc:  # noqa: BLE001
        if ak is not None:
            raise
        pytest.skip(f"{impl}: failed on this machine: {type(exc).__name__}: {str(exc)[:400]}")


def randn(*shape, dtype, device="cuda", std: float = 1.0):
    import torch

    return torch.randn(*shape, dtype=torch.float32, device=device).mul_(std).to(dtype)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--slug"]:
        s = gpu_slug()
        print(s if s else "no-cuda")
    elif sys.argv[1:] == ["--info"]:
        import json

        print(json.dumps(gpu_info(), indent=2))
    else:
        print("usage: python perf/timing.py --slug | --info", file=sys.stderr)
        sys.exit(2)
