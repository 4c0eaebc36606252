"""The implementations the perf suite times, as records, and the one function that times a record.

Each op's benchmark module (perf/test_perf_<op>.py) lists its implementations as ``Impl`` records, one per
implementation and variant, and parametrizes its test over (record, shape). A record holds what differs
between implementations: its name, where it comes from (``source``: ours, PyTorch, or an optional peer and
the module it needs), how to build its step, how to make one input set, the cost model it is charged with,
how much memory one set occupies (sizing the rotation), how it is timed (eager, or K steps in a CUDA graph)
and the context its warm-up and capture run in. ``bench`` does the rest, the same for every record: load,
extra_info, rotation, ``torch.no_grad()``, the error policy (a peer that fails is skipped with the reason,
attn_kernels fails), and the timing itself (perf.measure).
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

from perf import cost, measure
from perf.slowdown import maybe_slowed

EAGER, GRAPH = "eager", "graph"  # Impl.timing: eager rounds of op calls, or K steps in a CUDA graph
OURS, TORCH, OPTIONAL = "ours", "torch", "optional"  # Impl.source
# Impl.missing of the peers several ops have (the gate matches the skip reasons these start)
REFERENCE_MISSING = "PyTorch reference"  # attn_kernels.reference
FLA_MISSING = "fla (fla-core) not available"  # fla.ops.*


@dataclass(frozen=True)
class Impl:
    """One implementation (and variant) of one op, as the perf suite times it.

    ``shape`` below is the op module's own shape record; ``module`` is what ``load`` returns (None when
    nothing is imported)."""

    name: str  # as in the test id and extra_info["impl"], e.g. "attn_kernels-norm", "sdpa_cudnn"
    params: tuple  # the test's implementation parameters (stored in the baselines' "params"); [0] = the peer
    source: str  # OURS (attn_kernels: its failures fail), TORCH (PyTorch itself), OPTIONAL (another package)
    step: Callable[[Any, Any], Callable[..., Any]]  # (module, shape) -> step(*input_set), the timed call
    inputs: Callable[[Any], tuple]  # shape -> one fresh input set (random data, never zeros)
    cost: Callable[[Any], tuple[int, int]]  # shape -> (bytes, FLOPs) charged per step (perf.cost)
    footprint: Callable[[Any], int]  # shape -> bytes of one set a step reads: sizes the rotation (>= 3x L2)
    timing: str  # EAGER or GRAPH
    min_sets: int  # rotation bounds (perf.measure.rotation_count)
    max_sets: int
    module: str | None = None  # what to import first; a failed import skips (ours: attn_kernels, built)
    missing: str = ""  # the skip reason's prefix when ``module`` does not import
    context: Callable[[], ContextManager] | None = None  # GRAPH: entered around warm-up and capture

    @property
    def peer(self) -> str:
        """The implementation without its variant: the first test parameter, named in skip reasons."""
        return self.params[0]

    def load(self):
        """The module the step is built from, or skip the test (pytest.skip) with the reason."""
        if self.source == OURS:
            return import_attn_kernels()
        return import_optional(self.module, self.missing) if self.module else None


def bench(benchmark, impl: Impl, shape, *, op: str, rounds: int, warmup_rounds: int,
          extra: dict | None = None) -> None:
    """Time impl on shape with pytest-benchmark's ``benchmark`` fixture: device time per step; extra_info =
    ``extra_info(op, impl, shape)`` plus ``extra`` (keys the caller fills after timing)."""
    import torch

    module = impl.load()
    step = impl.step(module, shape)
    info = extra_info(op, impl, shape)
    info.update(extra or {})
    K = measure.rotation_count(impl.footprint(shape), min_sets=impl.min_sets, max_sets=impl.max_sets)
    sets = [impl.inputs(shape) for _ in range(K)]
    with torch.no_grad(), peer_errors_skip(impl.peer, ours=impl.source == OURS):
        if impl.timing == EAGER:
            measure.bench_eager(benchmark, step, sets, info, rounds=rounds, warmup_rounds=warmup_rounds)
        else:
            measure.bench_graph(benchmark, step, sets, info, rounds=rounds, warmup_rounds=warmup_rounds,
                                context=impl.context)


def extra_info(op: str, impl: Impl, shape) -> dict:
    """What a benchmark of impl on shape records (pct_of_floor still None): shape.info() is the op module's
    extra_info["shape"], impl.cost(shape) its bytes and FLOPs."""
    nbytes, flops = impl.cost(shape)
    return cost.extra_info(op, impl.name, shape.info(), nbytes, flops)


def import_attn_kernels():
    """attn_kernels, or skip: not importable, or its CUDA extension (attn_kernels._C) not built. With
    ATTN_KERNELS_PERF_SLOWDOWN set, the named ops run twice per call (perf.slowdown)."""
    import pytest

    try:
        import attn_kernels as ak
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"attn_kernels not importable: {type(exc).__name__}: {exc}")
    if not ak.kernels_available():
        why = getattr(getattr(ak, "_library", None), "_C_ERROR", None)
        pytest.skip(f"attn_kernels CUDA extension not built ({why}): run `nox -s build` first")
    return maybe_slowed(ak)


def import_optional(module: str, what: str):
    """Import a peer's module or skip the test with the reason (perf/gate.py reads it: a missing optional
    peer is excused only for ``ModuleNotFoundError``)."""
    import pytest

    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{what}: `import {module}` failed: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def peer_errors_skip(peer: str, *, ours: bool):
    """A peer that fails on this machine (no kernel for these inputs, not capturable, ...) is skipped with
    the reason. attn_kernels failures (ours) fail the test."""
    import pytest

    try:
        yield
    except measure.NotCapturable as exc:
        if ours:
            raise
        pytest.skip(f"{peer}: not capturable in a CUDA graph here: {str(exc)[:400]}")
    except Exception as exc:  # noqa: BLE001
        if ours:
            raise
        pytest.skip(f"{peer}: failed on this machine: {type(exc).__name__}: {str(exc)[:400]}")


def sdpa_backend(name: str) -> Callable[[], ContextManager]:
    """A context factory that forces F.scaled_dot_product_attention's backend, e.g. "CUDNN_ATTENTION"."""

    def context():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, name)])

    return context


def randn(*shape, dtype, device="cuda", std: float = 1.0):
    """N(0, std) in float32, cast to dtype (the suite's input data)."""
    import torch

    return torch.randn(*shape, dtype=torch.float32, device=device).mul_(std).to(dtype)


_POOL_ROWS: dict = {}


def pool_rows(B: int):
    """(B,) int32 on the GPU: B distinct shuffled rows of a pool of 2B, the pooled benchmarks' slot map. One map
    per B, shared by every set of the rotation and every benchmark, as all layers of a served step share the
    batch's (each set is one layer with its own pool)."""
    import torch

    if B not in _POOL_ROWS:
        _POOL_ROWS[B] = torch.randperm(2 * B, device="cuda")[:B].to(torch.int32)
    return _POOL_ROWS[B]
