"""based_prefill's backward and training step: attn_kernels vs fla and torch.compile, at based_prefill's
shapes (perf/test_perf_based_prefill.py SHAPES), bf16, scale 1/4, eps 1e-6. Eager timing over rotating
input sets (perf.measure). Two ops (benchmark groups), one test each:

* ``based_prefill_backward``: the backward alone, from a saved forward. attn_kernels calls the op,
  ``ak.based_prefill_backward(q, k, v, grad_o, normalize=..., needs=(dq, dk, dv only))``, what autograd calls.
  Convention: **grad_o only** (grad_state=None, no initial state): the training forward returns o alone
  (return_state=False), so no gradient flows into a returned state. A peer is timed as
  ``torch.autograd.grad(o, (q, k, v), grad_o, retain_graph=True)`` through the graph of its forward, which
  runs once per input set when the set is made (untimed): its own backward kernels, as autograd runs them.
* ``based_prefill_train``: forward + backward through autograd, ``o = forward(q, k, v)`` then
  ``torch.autograd.grad(o, (q, k, v), grad_o)``: ``o.backward(grad_o)`` without the accumulation into
  q.grad, k.grad, v.grad (in a model q, k, v are activations whose gradients flow on to the projections).

Implementations (normalized, o = num / (den + eps), unless named -num):
* ``attn_kernels-norm``, ``attn_kernels-num``: ``ak.based_prefill`` (its autograd formula calls the CUDA op);
  -num only in the backward group (no peer computes the numerator alone with a backward).
* ``fla_parallel-norm``, ``fla_fused_chunk-norm``: ``fla.ops.based.parallel_based`` / ``fused_chunk_based``
  (fla-core 0.6.0), use_norm=True: the same math (Taylor weights 1 + s + s^2/2, s = q.k / 4, eps 1e-6). Their
  Triton kernels return the numerator and the denominator z; the division ``o / (z + 1e-6)`` is PyTorch, so
  autograd keeps the numerator and z for it, and its backward is PyTorch too (in the timed region, as in
  training). Layout (B, T, H, D): (B, N, H, .) views of (B, H, N, .)-contiguous tensors, grad_o likewise, as
  in the forward benchmark, so fla's internal transposes back to (B, H, N, .) are free.
* ``torch_compile-norm``: torch.compile of test_perf_based_prefill's loop-free chunked reference (bf16
  operands, float32 chunk states); AOTAutograd compiles its backward, without donated buffers (a donating
  backward refuses the timed retain_graph), in both groups.

Bytes and FLOPs: perf.cost.prefill_backward_cost / prefill_train_cost (nominal; the derivation is there).
extra_info adds what the forward keeps for the backward, measured by ``perf.measure.forward_saved``:
``saved_bytes``, the memory its autograd graph holds beyond q, k, v and o, and ``saved_vs_qkvo`` =
saved_bytes / bytes of q, k, v and o (issue 15's target for ours: <= 0.25).
Ids: test_perf_based_prefill_backward[<impl>-<norm|num>-B<B>-H<H>-N<N>-bf16],
     test_perf_based_prefill_train[<impl>-norm-B<B>-H<H>-N<N>-bf16].
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

import pytest
import torch
from torch._functorch import config as functorch_config

from perf.cost import prefill_backward_cost, prefill_cost, prefill_train_cost
from perf.impls import EAGER, FLA_MISSING, OPTIONAL, OURS, TORCH, Impl, bench, peer_errors_skip, randn
from perf.measure import forward_saved
from perf.test_perf_based_prefill import D, DTYPE, E, EPS, SCALE, SHAPES, Shape, compiled_loopfree

OP = "based_prefill_backward"
TRAIN_OP = "based_prefill_train"
NEEDS = (True, True, True, False, False)  # dq, dk, dv; no initial state (what autograd asks for here)


class Forward(NamedTuple):
    """One implementation's differentiable forward, from which both groups' records are made."""

    peer: str
    mode: str  # "norm" | "num"
    source: str  # perf.impls OURS / TORCH / OPTIONAL
    make: Callable[[Any, Shape], Callable[..., torch.Tensor]]  # (module, shape) -> forward(q, k, v) -> o
    module: str | None = None
    missing: str = ""
    layout: str = "bhnd"  # "bhnd": (B, H, N, .) contiguous; "bthd_view": (B, N, H, .) views of that storage

    @property
    def name(self) -> str:
        return f"{self.peer}-{self.mode}"

    def import_module(self):
        """The module make() takes (a peer's; None for torch_compile). Ours is loaded by Impl.load."""
        return importlib.import_module(self.module) if self.module else None


def _ours(normalize: bool):
    return lambda ak, s: lambda q, k, v: ak.based_prefill(q, k, v, normalize=normalize, eps=EPS)


def _torch_compile(q, k, v):
    # Compiled without donated buffers: the backward benchmark re-runs one graph (retain_graph), which a
    # donating compiled backward refuses. The switch counts when a shape compiles, and any call may be the
    # first of its shape (forward_saved's was, and the H200 run of 2026-12-07 skipped every shape), so every
    # call holds it.
    with functorch_config.patch(donated_buffer=False):
        return compiled_loopfree()(q, k, v, SCALE, True, EPS)


def _fla(fn: str):
    return lambda m, s: lambda q, k, v: getattr(m, fn)(q, k, v, scale=SCALE, use_norm=True)


FORWARDS = [
    Forward("attn_kernels", "norm", OURS, _ours(True)),
    Forward("attn_kernels", "num", OURS, _ours(False)),
    Forward("fla_parallel", "norm", OPTIONAL, _fla("parallel_based"), "fla.ops.based", FLA_MISSING,
            "bthd_view"),
    Forward("fla_fused_chunk", "norm", OPTIONAL, _fla("fused_chunk_based"), "fla.ops.based", FLA_MISSING,
            "bthd_view"),
    Forward("torch_compile", "norm", TORCH, lambda _, s: _torch_compile),
]
TRAIN_FORWARDS = [f for f in FORWARDS if f.mode == "norm"]


# ---- inputs --------------------------------------------------------------------------------------------
def leaf_inputs(f: Forward, s: Shape) -> tuple[torch.Tensor, ...]:
    """(q, k, v, grad_o): q, k, v leaves that require grad, N(0, 1) bf16, in f's layout; grad_o like o."""
    q, k, v, g = (randn(s.B, s.H, s.N, n, dtype=DTYPE) for n in (D, D, E, E))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    if f.layout == "bthd_view":
        q, k, v, g = (t.transpose(1, 2) for t in (q, k, v, g))
    return q, k, v, g


def _saved_forward_set(f: Forward):
    """Backward group, a peer: one input set with its forward's graph kept, (o, q, k, v, grad_o). The
    forward runs here, outside the timed region; a peer whose forward fails is skipped with the reason."""

    def make(s: Shape):
        q, k, v, g = leaf_inputs(f, s)
        with peer_errors_skip(f.peer, ours=False), torch.enable_grad():
            o = f.make(f.import_module(), s)(q, k, v)
        return o, q, k, v, g

    return make


# ---- steps ---------------------------------------------------------------------------------------------
def _op_backward(normalize: bool):
    def build(ak, s: Shape):
        def step(q, k, v, g):
            return ak.based_prefill_backward(q, k, v, g, normalize=normalize, eps=EPS, needs=NEEDS)

        return step

    return build


def _graph_backward(_, s: Shape):
    return lambda o, q, k, v, g: torch.autograd.grad(o, (q, k, v), g, retain_graph=True)


def _train_step(f: Forward):
    def build(module, s: Shape):
        forward = f.make(module, s)

        def step(q, k, v, g):
            with torch.enable_grad():  # perf.impls.bench runs steps under no_grad
                return torch.autograd.grad(forward(q, k, v), (q, k, v), g)

        return step

    return build


# ---- records -------------------------------------------------------------------------------------------
def _record(f: Forward, step, inputs, cost) -> Impl:
    """Eager, 2 to 8 sets; a set's footprint: q, k, v and grad_o (the bytes of the forward's q, k, v, o)."""
    module = f.module if f.source != OURS else None
    return Impl(f.name, (f.peer, f.mode), f.source, step, inputs=inputs, cost=cost,
                footprint=lambda s: prefill_cost(s.B, s.H, s.N, d=D, e=E)[0], timing=EAGER, min_sets=2,
                max_sets=8, module=module, missing=f.missing if module else "")


def _backward_record(f: Forward) -> Impl:
    cost = lambda s: prefill_backward_cost(s.B, s.H, s.N, d=D, e=E)  # noqa: E731
    if f.source == OURS:
        return _record(f, _op_backward(f.mode == "norm"), lambda s: leaf_inputs(f, s), cost)
    return _record(f, _graph_backward, _saved_forward_set(f), cost)


def _train_record(f: Forward) -> Impl:
    return _record(f, _train_step(f), lambda s: leaf_inputs(f, s),
                   lambda s: prefill_train_cost(s.B, s.H, s.N, d=D, e=E))


IMPLS = [_backward_record(f) for f in FORWARDS]
TRAIN_IMPLS = [_train_record(f) for f in TRAIN_FORWARDS]
# test function -> (op, its records): what tests/test_perf_accounting.py enumerates
BENCHMARKS = {"test_perf_based_prefill_backward": (OP, IMPLS),
              "test_perf_based_prefill_train": (TRAIN_OP, TRAIN_IMPLS)}
FORWARD_OF = {f.name: f for f in FORWARDS}


def _cases(impls: list[Impl]) -> list:
    return [pytest.param(*impl.params, B, H, N, id=f"{impl.name}-B{B}-H{H}-N{N}-bf16")
            for (B, H, N) in SHAPES for impl in impls]


CASES, TRAIN_CASES = _cases(IMPLS), _cases(TRAIN_IMPLS)


def _run(benchmark, perf_rounds, op: str, impl: Impl, shape: Shape) -> None:
    rounds, warmup = perf_rounds
    benchmark.group = f"{op} B{shape.B} H{shape.H} N{shape.N}"
    f = FORWARD_OF[impl.name]
    module = impl.load()  # skips when the package or the extension is missing
    with peer_errors_skip(f.peer, ours=f.source == OURS):
        memory = forward_saved(f.make(module, shape), *leaf_inputs(f, shape))
    bench(benchmark, impl, shape, op=op, rounds=rounds, warmup_rounds=warmup, extra=memory)


BY_PARAMS = {impl.params: impl for impl in IMPLS}
TRAIN_BY_PARAMS = {impl.params: impl for impl in TRAIN_IMPLS}


@pytest.mark.parametrize("impl,mode,B,H,N", CASES)
def test_perf_based_prefill_backward(benchmark, perf_rounds, impl, mode, B, H, N):
    _run(benchmark, perf_rounds, OP, BY_PARAMS[impl, mode], Shape(B, H, N))


@pytest.mark.parametrize("impl,mode,B,H,N", TRAIN_CASES)
def test_perf_based_prefill_train(benchmark, perf_rounds, impl, mode, B, H, N):
    _run(benchmark, perf_rounds, TRAIN_OP, TRAIN_BY_PARAMS[impl, mode], Shape(B, H, N))
