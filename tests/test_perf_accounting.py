"""The perf suite's byte/FLOP accounting and floors (perf/cost.py), checked on the CPU against the floors
the issues publish, so a wrong count cannot silently skew every % of floor; its implementation registry
(perf/impls.py and the IMPLS of each perf/test_perf_<op>.py) against the newest stored baseline; and the
clock pytest-benchmark reads (perf/clock.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from perf import clock, cost, gate, impls

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("B,H,N,floor_ms", [(16, 16, 4096, 0.112), (16, 16, 16384, 0.447)])
def test_prefill_floor_matches_issue(B, H, N, floor_ms):
    nbytes, flops = cost.prefill_cost(B, H, N)
    assert nbytes == B * H * N * 320  # q, k, v read and o written, bf16
    assert flops == B * H * N * (2 * 273 + 4 * 273 * 64)
    assert cost.floor_us(nbytes, flops) / 1e3 == pytest.approx(floor_ms, rel=5e-3)


def test_backward_and_training_cost():
    """prefill_backward_cost: q, k, v, grad_o read and dq, dk, dv written, bf16; FLOPs per token: the
    forward's three products (phi(q)^T S, phi(k) v^T: 2*273*64 each; phi(q).z: 2*273) recomputed once and
    differentiated (two products each). Training = forward + backward."""
    B, H, N = 16, 16, 4096
    forward = 2 * 273 * 64 + 2 * 273 * 64 + 2 * 273
    nbytes, flops = cost.prefill_backward_cost(B, H, N)
    assert nbytes == B * H * N * ((16 + 16 + 64 + 64) + (16 + 16 + 64)) * 2 == B * H * N * 512
    assert flops == B * H * N * (forward + 2 * forward) == 3 * cost.prefill_cost(B, H, N)[1]
    assert cost.floor_us(nbytes, flops) == pytest.approx(flops / 700e12 * 1e6)  # compute-bound: ~317 us
    train_bytes, train_flops = cost.prefill_train_cost(B, H, N)
    assert (train_bytes, train_flops) == (B * H * N * 832, 4 * cost.prefill_cost(B, H, N)[1])


def test_allocator_block_rounding():
    """perf.measure.forward_saved subtracts o's allocation as the caching allocator rounds it."""
    from perf import measure

    assert [measure.allocator_bytes(n) for n in (1, 512, 513, 4096 * 128)] == [512, 512, 1024, 4096 * 128]


def test_forward_saved_is_not_moved_by_a_garbage_collection(monkeypatch):
    """A collection during the measured forward freed earlier tests' unreachable tensors and made the bytes
    the forward keeps negative (fla_fused_chunk at B16 H16 N8192 on the H200, 2026-12-07: -8.7 x q, k, v, o):
    forward_saved collects first. Faked on the CPU: a counter stands for torch.cuda.memory_allocated, the
    warm-up forward leaves a 1 GB reference cycle behind, and every forward collects (as Python's collector
    may at any allocation) and keeps 1000 bytes beside o. Collections are otherwise off in the test."""
    import gc

    import torch

    from perf import measure

    allocated, calls = [0], [0]

    class Garbage:  # an unreachable cycle holding device memory until a collection frees it
        def __init__(self):
            allocated[0] += 10**9
            self.cycle = self

        def __del__(self):
            allocated[0] -= 10**9

    def forward(q, k, v):
        gc.collect()
        calls[0] += 1
        if calls[0] == 1:
            Garbage()
        o = q * k * v
        allocated[0] += 1000 + measure.allocator_bytes(o.untyped_storage().nbytes())
        return o

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: allocated[0])
    q, k, v = (torch.randn(4, 8, requires_grad=True) for _ in range(3))
    gc.disable()  # no automatic collection frees the cycle before the measured forward's own collection
    try:
        assert measure.forward_saved(forward, q, k, v, torch.randn(4, 8))["saved_bytes"] == 1000
    finally:
        gc.enable()
    assert calls[0] == 2


def test_torch_compile_peer_compiles_without_donated_buffers(monkeypatch):
    """Every call of the backward module's torch_compile forward runs with AOTAutograd's donated buffers off:
    a shape compiles at its first call, whichever that is (forward_saved's, outside the timed backward's set-up,
    compiled a donating backward and the H200 run of 2026-12-07 skipped all 9 shapes: "compiled with
    non-empty donated buffers" under retain_graph)."""
    from torch._functorch import config as functorch_config

    module = _op_module("test_perf_based_prefill_backward")
    seen = []
    monkeypatch.setattr(module, "compiled_loopfree",
                        lambda: lambda *args: seen.append(functorch_config.donated_buffer))
    forward = module.FORWARD_OF["torch_compile-norm"]
    assert forward in module.TRAIN_FORWARDS
    forward.make(None, module.Shape(1, 1, 64))(None, None, None)
    assert seen == [False] and functorch_config.donated_buffer  # off for the call only


# The issues' decode floors count the state (issue 4) or the window's K and V (issue 5) alone; the suite also
# counts q, k, v read and o written (and the appended k/v), every byte the op must move: up to ~5% more.
@pytest.mark.parametrize("B,H,floor_us", [(16, 16, 6.7), (64, 16, 26.7), (1024, 16, 428)])
def test_decode_floor_matches_issue(B, H, floor_us):
    """Issue 4's 'floor fp32·153' column: the state's bytes read + written at 3.0 TB/s."""
    nbytes, flops = cost.decode_cost(B, H, state_itemsize=4)
    state = 2 * B * H * (153 * 64 + 153) * 4
    assert nbytes == state + B * H * (16 + 16 + 64 + 64) * 2
    assert floor_us * 0.99 <= cost.floor_us(nbytes, flops) <= floor_us * 1.06


@pytest.mark.parametrize("B,H,floor_us", [(16, 16, 1.4), (64, 16, 5.6), (256, 16, 22.4), (256, 32, 44.7)])
def test_sliding_window_floor_matches_issue(B, H, floor_us):
    nbytes, flops = cost.sliding_window_cost(B, H, 64, 64)
    assert nbytes == B * H * 64 * 64 * 2 * 2 + B * H * 64 * 6 * 2
    assert floor_us * 0.99 <= cost.floor_us(nbytes, flops) <= floor_us * 1.06


def test_extra_info_has_exactly_the_issue_keys():
    info = cost.extra_info("based_decode", "attn_kernels-state_fp32", {"B": 2, "H": 3, "e": 64}, 1000, 10)
    assert set(info) == {"op", "impl", "shape", "bytes", "flops", "floor_us", "pct_of_floor"}
    assert info["floor_us"] == pytest.approx(1000 / 3.0e12 * 1e6)
    assert cost.pct_of_floor(info, 2 * info["floor_us"] * 1e-6) == pytest.approx(50.0)


# --------------------------------------------------------------------------------------------------
# the registry: every op module's IMPLS, and the ids / params / extra_info they produce
# --------------------------------------------------------------------------------------------------
OP_MODULES = ["test_perf_based_prefill", "test_perf_based_prefill_varlen", "test_perf_based_prefill_backward",
              "test_perf_based_decode", "test_perf_sliding_window_decode", "test_perf_based_generation",
              "test_perf_sliding_window_prefill"]
# Modules newer than every stored baseline: all of their ids are new.
NEW_MODULES = ["test_perf_based_prefill_varlen", "test_perf_sliding_window_prefill",
               "test_perf_based_prefill_backward"]


def _op_module(name):
    import importlib

    return importlib.import_module(f"perf.{name}")


def _benchmarks(name) -> dict:
    """test function -> (op, its Impl records) of one op module: one test named like the module (OP, IMPLS),
    or the module's BENCHMARKS where it has several (test_perf_based_prefill_backward's two)."""
    module = _op_module(name)
    return getattr(module, "BENCHMARKS", {name: (module.OP, module.IMPLS)})


def _cases(name):
    """(fullname, params, impl record, shape, op) of every case of one op module, named as pytest-benchmark
    names it."""
    module = _op_module(name)
    for test_name, (op, records) in _benchmarks(name).items():
        (mark,) = [m for m in getattr(module, test_name).pytestmark if m.name == "parametrize"]
        argnames = [a.strip() for a in mark.args[0].split(",")]
        impls_by_params = {impl.params: impl for impl in records}
        for case in mark.args[1]:
            params = dict(zip(argnames, case.values))
            n = len(next(iter(impls_by_params)))
            impl = impls_by_params[tuple(case.values[:n])]
            yield f"perf/{name}.py::{test_name}[{case.id}]", params, impl, module.Shape(*case.values[n:]), op


def _newest_baselines():
    folders = [f for f in sorted((ROOT / "perf" / "baselines").iterdir()) if f.is_dir()]
    stored = [sorted(f.glob("[0-9][0-9][0-9][0-9]_*.json")) for f in folders]
    return [files[-1] for files in stored if files]  # a GPU's folder may exist before its first baseline


@pytest.mark.parametrize("name", OP_MODULES)
def test_every_impl_record_is_complete(name):
    records = [impl for _, group in _benchmarks(name).values() for impl in group]
    for _, group in _benchmarks(name).values():
        assert group and all(isinstance(i, impls.Impl) for i in group)
        assert len({i.name for i in group}) == len({i.params for i in group}) == len(group)
    for impl in records:
        assert impl.name.startswith(impl.peer) and impl.peer in impl.params
        assert impl.source in (impls.OURS, impls.TORCH, impls.OPTIONAL), impl.name
        assert impl.timing in (impls.EAGER, impls.GRAPH), impl.name
        assert impl.timing == impls.GRAPH or impl.context is None, f"{impl.name}: context of an eager op"
        assert all(callable(f) for f in (impl.step, impl.inputs, impl.cost, impl.footprint)), impl.name
        assert 1 <= impl.min_sets <= impl.max_sets, impl.name
        if impl.source == impls.OURS:
            assert impl.module is None, f"{impl.name}: ours is loaded by impls.import_attn_kernels"
        else:
            assert bool(impl.module) == bool(impl.missing), f"{impl.name}: a module needs its skip reason"
        assert impl.source != impls.OPTIONAL or impl.module, f"{impl.name}: which package it needs"
    for fullname, _, impl, shape, _ in _cases(name):
        # the gate's view of the id agrees with the record: ours never excused, optional peers by package
        assert gate.is_ours(fullname) == (impl.source == impls.OURS), fullname
        package = gate.optional_package(fullname)
        assert (package is not None) == (impl.source == impls.OPTIONAL), fullname
        assert package is None or impl.module.split(".")[0] == package, fullname
        nbytes, flops = impl.cost(shape)
        assert isinstance(nbytes, int) and isinstance(flops, int) and nbytes > 0 and flops > 0, fullname
        footprint = impl.footprint(shape)
        assert isinstance(footprint, int) and footprint > 0, fullname


# Ids newer than the stored baselines (issue 14): the thunderkittens peer (numerator only) at every prefill
# shape, and every prefill implementation at the two shapes added then. A baseline may lack exactly these.
_PREFILL_ID = "perf/test_perf_based_prefill.py::test_perf_based_prefill[{}-bf16]"
_PREFILL_SHAPES = ["B16-H16-N1024", "B16-H16-N2048", "B16-H16-N4096", "B16-H16-N8192", "B16-H16-N16384",
                   "B4-H16-N32768", "B64-H16-N2048"]
_NEW_PREFILL_SHAPES = ["B1-H16-N65536", "B2-H32-N8192"]
_PREFILL_IMPLS = ["attn_kernels-norm", "attn_kernels-num", "torch-norm", "torch_compile-norm",
                  "fla_parallel-norm", "fla_fused_chunk-norm", "fla_fused_recurrent-norm"]
# Ids newer than some GPU's newest baseline (H100's 0002 predates all of them; H200's 0005 has them but for the
# ids its run skipped): TK and the two newer prefill shapes, every id of NEW_MODULES (varlen and sliding-window
# prefill: issues 16, 17; backward and training: issue 15), and the pooled variants (16, 17) at every shape.
NEW_IDS = ({_PREFILL_ID.format(f"thunderkittens-num-{s}") for s in _PREFILL_SHAPES + _NEW_PREFILL_SHAPES}
           | {_PREFILL_ID.format(f"{i}-{s}") for i in _PREFILL_IMPLS for s in _NEW_PREFILL_SHAPES}
           | {fullname for name in NEW_MODULES for fullname, *_ in _cases(name)}
           | {fullname for name in OP_MODULES for fullname, _, impl, *_ in _cases(name) if "-pooled" in impl.name})
# extra_info keys some benchmarks add to cost.extra_info's: generation's tokens/s; the backward and training
# benchmarks' memory the forward keeps for the backward (perf/test_perf_based_prefill_backward.py).
EXTRA_KEYS = {"tokens_per_s", "saved_bytes", "saved_vs_qkvo"}


def test_collected_ids_cover_the_newest_baseline():
    """Stored baselines match benchmarks by full test name: every id of each GPU's newest baseline is still
    collected, with the same params and the same extra_info (all but the timed fields), and the suite's
    only ids beyond them are the flash_attn peer's (not installed where that baseline was recorded) and
    NEW_IDS (added after it)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "perf", "--collect-only", "-q", "-p",
                           "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    cases = {fullname: (params, impl, shape, op) for name in OP_MODULES
             for fullname, params, impl, shape, op in _cases(name)}
    assert len(NEW_IDS) == 23 + 4 + 36 + 10 + 7 + 81 and NEW_IDS <= set(collected)
    assert sorted(collected) == sorted(cases) and len(collected) == len(set(collected)) == 124 + len(NEW_IDS)
    for path in _newest_baselines():
        baseline = json.loads(path.read_text())
        stored = {b["fullname"]: b for b in baseline["benchmarks"]}
        assert not sorted(set(stored) - set(collected)), f"{path.name}: ids the suite no longer has"
        extra = sorted(set(collected) - set(stored))
        assert all(gate.impl_of(n) == "flash_attn" or n in NEW_IDS for n in extra), extra
        for fullname, b in stored.items():
            params, impl, shape, op = cases[fullname]
            assert b["params"] == json.loads(json.dumps(params)), fullname  # as stored: tuples are lists
            info = impls.extra_info(op, impl, shape)
            assert {k: b["extra_info"][k] for k in info if k != "pct_of_floor"} == \
                {k: v for k, v in info.items() if k != "pct_of_floor"}, fullname
            assert set(b["extra_info"]) - set(info) <= EXTRA_KEYS, fullname
            assert b["options"]["timer"] == clock.TIMER.rsplit(".", 1)[1], fullname


# --------------------------------------------------------------------------------------------------
# the clock pytest-benchmark reads
# --------------------------------------------------------------------------------------------------
def test_device_clock_advances_only_by_measured_time():
    with clock.running() as c:
        t0 = clock.cuda_event_device_clock()
        assert clock.cuda_event_device_clock() == t0  # no time passes between readings by itself
        c.advance(2e-6)
        c.advance(3e-6)
        assert clock.cuda_event_device_clock() - t0 == pytest.approx(5e-6)
    assert c.reads == 3 and c.recorded == [2e-6, 3e-6]
    with clock.running() as fresh:  # each measurement starts from its own clock
        assert clock.cuda_event_device_clock() == 0.0 and fresh is not c


def test_device_clock_refuses_readings_outside_a_measurement():
    """benchmark(fn) calibrates the timer by waiting for it to tick: it must fail, never hang or time host."""
    with pytest.raises(RuntimeError, match="outside a perf measurement"):
        clock.cuda_event_device_clock()
    with clock.running(), pytest.raises(RuntimeError, match="one measurement at a time"):
        with clock.running():
            pass
    with pytest.raises(RuntimeError, match="outside"):  # the clock is uninstalled after an error too
        clock.cuda_event_device_clock()


def test_timer_name_is_importable_as_pytest_benchmark_loads_it():
    from pytest_benchmark.utils import load_timer

    timer = load_timer(clock.TIMER)
    assert timer.target is clock.cuda_event_device_clock and str(timer) == clock.TIMER


# --------------------------------------------------------------------------------------------------
# perf.measure.settle: back-to-back work before the timed rounds
# --------------------------------------------------------------------------------------------------
def _fake_events(monkeypatch, unit_s):
    """measure._event_time without a GPU: runs fn and charges unit_s per work() call it made."""
    from perf import measure

    calls = []

    def event_time(fn, spin_s):
        before = len(calls)
        fn()
        return (len(calls) - before) * unit_s, 1e-6

    monkeypatch.setattr(measure, "_event_time", event_time)
    return calls


def test_settle_runs_the_op_for_its_device_time(monkeypatch):
    from perf import measure

    calls = _fake_events(monkeypatch, 1e-3)
    done = measure.settle(lambda: calls.append(1), 1e-3, device_s=0.19, wall_s=60)
    # batches of 20 calls (SETTLE_BATCH_S / 1 ms) until 0.19 s: 10 batches, not one more
    assert len(calls) == 200 and done == pytest.approx(0.2)
    slow = _fake_events(monkeypatch, 0.5)
    measure.settle(lambda: slow.append(1), 0.5, device_s=0.2, wall_s=60)  # a slow op: one call
    assert len(slow) == 1


def test_settle_stops_at_its_wall_time(monkeypatch):
    from perf import measure

    calls = _fake_events(monkeypatch, 1e-6)  # host-bound: device time hardly moves
    measure.settle(lambda: calls.append(1), 1e-6, device_s=0.2, wall_s=0.0)
    assert len(calls) == round(measure.SETTLE_BATCH_S / 1e-6)  # one batch, then the wall limit


@pytest.mark.parametrize("timing", ["eager", "graph"])
def test_benchmarks_settle_before_their_timed_rounds(monkeypatch, timing):
    """bench_eager and bench_graph run settle on the op they time, before pytest-benchmark's rounds."""
    import torch

    from perf import measure

    order = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(measure, "_event_time", lambda fn, spin_s: (fn(), (1e-3, 1e-5))[1])
    monkeypatch.setattr(measure, "settle", lambda work, unit_s: order.append(("settle", work, unit_s)))
    monkeypatch.setattr(measure, "_pedantic", lambda benchmark, work, *a: order.append(("timed", work)))
    monkeypatch.setattr(measure, "_finish", lambda benchmark, info: None)
    op = []
    sets = [(1,), (2,)]
    if timing == "eager":
        measure.bench_eager(None, lambda x: op.append(x), sets, {}, rounds=5, warmup_rounds=1)
    else:
        class Graph:
            def replay(self):
                op.append("replay")

        monkeypatch.setattr(measure, "capture_steps", lambda step, sets, context=None: Graph())
        measure.bench_graph(None, lambda x: None, sets, {}, rounds=5, warmup_rounds=1)
    assert [o[0] for o in order] == ["settle", "timed"]
    (_, settled, unit_s), (_, timed) = order
    assert settled == timed and unit_s > 0  # the same work, the timed rounds' unit
    before = len(op)
    settled()
    assert len(op) > before  # it runs the op
