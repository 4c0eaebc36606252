"""Device-time measurement of one benchmark, fed to pytest-benchmark through ``benchmark.pedantic``.

* ``bench_eager`` (prefill): each round = a spin kernel, a start event, ``n_inner`` op calls over rotating
  input sets, an end event. The spin kernel (``torch.cuda._sleep``) keeps the GPU busy while the host
  enqueues the calls, so the events measure back-to-back device execution, not launch latency.
* ``bench_graph`` (decode-type ops): K steps over K rotating input/state sets are captured once in a
  ``torch.cuda.CUDAGraph``; each round = spin kernel, start event, one replay, end event; per-step time is
  replay time / K. This is how decode is served.

Both run the op back to back for SETTLE_S of device time (``settle``) before pytest-benchmark's warm-up and
timed rounds, so what ran before (a heavy peer) does not slow the first rounds.

Each round advances the clock pytest-benchmark reads (perf.clock) by its event time / op executions.
``rotation_count`` sizes the rotation so the sets together hold >= 3x the L2 (no set is still cached when
it comes round again). ``forward_saved`` measures the memory a differentiable forward keeps for its backward
(extra_info of the backward and training benchmarks).
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from typing import Any, Callable, Sequence

from perf import clock, cost
from perf.machine import l2_bytes

ROTATE_L2_FACTOR = 3  # rotating input sets together hold >= this many times the L2 size
EAGER_REGION_S = 300e-6  # eager rounds run enough op calls to fill at least this much device time
SLOW_OP_BUDGET_S = 1.5  # per-benchmark time budget for the timed rounds of slow ops
MIN_ROUNDS_SLOW = 10  # fewest rounds, even for slow ops (each then >= ~100 ms: tiny spread)
MAX_SLEEP_S = 0.25  # longest spin kernel put in front of a round
# Before its timed rounds every benchmark runs its op back to back for this much device time (at most
# SETTLE_WALL_S of host time, for host-bound tiny ops), in batches of about SETTLE_BATCH_S. After a heavy
# test (cuDNN's band-masked attention, 70-86 ms per call for seconds) the next test's first rounds ran slow:
# the stored rounds of our (4,16,32768) W = 256 sliding-window prefill read 1218 us for 19 rounds, then
# 1002 us (H100).
SETTLE_S = 0.2
SETTLE_WALL_S = 2.0
SETTLE_BATCH_S = 0.02


def rotation_count(bytes_per_set: int, *, min_sets: int, max_sets: int) -> int:
    """Enough input sets that together they hold >= ROTATE_L2_FACTOR x L2 (so no set is still in L2
    when it comes round again)."""
    need = math.ceil(ROTATE_L2_FACTOR * l2_bytes() / max(1, bytes_per_set))
    return int(min(max_sets, max(min_sets, need)))


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
# timed rounds, and eager timing (prefill)
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
    from the previous round's enqueue time; the clock pytest-benchmark reads advances by event time."""
    spin = [1.5 * host_s + 5e-5]
    with clock.running() as device_clock:

        def region() -> None:
            device_s, enqueue_s = _event_time(work, spin[0])
            spin[0] = 1.5 * enqueue_s + 5e-5
            device_clock.advance(device_s / n_ops)

        benchmark.pedantic(region, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    clock.verify(benchmark, device_clock, rounds, warmup_rounds)


def settle(work: Callable[[], Any], unit_s: float, *, device_s: float = SETTLE_S,
           wall_s: float = SETTLE_WALL_S) -> float:
    """Run work() (one unit of unit_s device seconds) back to back, synchronizing after each batch of
    ~SETTLE_BATCH_S, until device_s of device time has run or wall_s of host time has passed (at least one
    batch); returns the device seconds run. The timed rounds then start from the op's own steady state."""
    per_batch = max(1, math.ceil(SETTLE_BATCH_S / max(unit_s, 1e-7)))

    def batch() -> None:
        for _ in range(per_batch):
            work()

    done, t0 = 0.0, time.perf_counter()
    while True:
        done += _event_time(batch, 0.0)[0]
        if done >= device_s or time.perf_counter() - t0 >= wall_s:
            return done


def _finish(benchmark, info: dict) -> None:
    if benchmark.stats is not None and not benchmark.disabled:
        info["pct_of_floor"] = cost.pct_of_floor(info, benchmark.stats.stats.median)
    benchmark.extra_info.update(info)


def bench_eager(benchmark, fn: Callable[..., Any], sets: Sequence[tuple], info: dict, *,
                rounds: int, warmup_rounds: int) -> None:
    """Time fn(*sets[i]) (one op call), rotating i over the sets, as device time per call."""
    import torch

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

    settle(calls, t_call * n_inner)
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
    g = capture_steps(step, sets, context=context)
    K = len(sets)

    t_rep, host = _event_time(g.replay, 1e-4)
    if t_rep * (rounds + warmup_rounds) > SLOW_OP_BUDGET_S:
        rounds = max(MIN_ROUNDS_SLOW, int(SLOW_OP_BUDGET_S / t_rep))
        warmup_rounds = min(warmup_rounds, 1)

    try:
        settle(g.replay, t_rep)
        _pedantic(benchmark, g.replay, K, host, rounds, warmup_rounds)
    finally:
        del g
    _finish(benchmark, info)


# --------------------------------------------------------------------------------------------------
# memory a forward keeps for its backward (the backward and training benchmarks' extra_info)
# --------------------------------------------------------------------------------------------------
def allocator_bytes(nbytes: int) -> int:
    """The block PyTorch's CUDA caching allocator takes for nbytes (a multiple of 512 bytes, >= 512)."""
    return max(512, -(-nbytes // 512) * 512)


def forward_saved(forward: Callable[..., Any], q, k, v, grad_o) -> dict:
    """{"saved_bytes", "saved_vs_qkvo"}: the memory forward(q, k, v)'s autograd graph holds for the backward
    beyond q, k, v (the caller's) and o, measured: torch.cuda.memory_allocated() after the forward minus
    before, minus o's block, after one warm-up forward + backward (compilation, autotuning and caches are not
    counted); and that over the bytes of q, k, v and o. q, k, v require grad. Python's garbage collector is
    run before and kept off during the measured forward: a collection inside it frees earlier tests'
    unreachable tensors (autograd graphs are reference cycles) and once made the difference negative."""
    import torch

    with torch.enable_grad():
        torch.autograd.grad(forward(q, k, v), (q, k, v), grad_o)
    gc.collect()
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.enable_grad():
            o = forward(q, k, v)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before - allocator_bytes(o.untyped_storage().nbytes())
    finally:
        if gc_was_on:
            gc.enable()
    qkvo = sum(t.numel() * t.element_size() for t in (q, k, v, o))
    del o
    return {"saved_bytes": int(held), "saved_vs_qkvo": held / qkvo}
