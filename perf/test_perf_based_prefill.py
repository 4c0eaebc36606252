"""based_prefill: attn_kernels vs PyTorch, fla and ThunderKittens. Eager timing over rotating input sets
(perf.measure).

The implementations are the ``IMPLS`` records (perf.impls.Impl); every record runs at every shape it supports
(``SUPPORTS``: ThunderKittens needs N % 64 == 0).
Ids: test_perf_based_prefill[<impl>-<norm|num>-B<B>-H<H>-N<N>-bf16].
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from attn_kernels.reference import feature_map_compact
from perf import thunderkittens as tk_build
from perf.cost import prefill_cost
from perf.impls import EAGER, FLA_MISSING, OPTIONAL, OURS, REFERENCE_MISSING, TORCH, Impl, bench, randn

OP = "based_prefill"
D, E = 16, 64
DTYPE = torch.bfloat16
SCALE = 1.0 / math.sqrt(D)
EPS = 1e-6

# The last two: shapes users run (issue 14), one long sequence over few heads and a wider model. Every peer
# runs there too: at N = 65536 the eager PyTorch reference is host-bound (~20 launches per 64-token chunk,
# ~0.5 s a call: ~10 s for its few rounds) and the compiled one holds a few GB of per-chunk states; neither
# takes minutes (perf/README.md, "Implementations").
SHAPES = [(16, 16, 1024), (16, 16, 2048), (16, 16, 4096), (16, 16, 8192), (16, 16, 16384), (4, 16, 32768),
          (64, 16, 2048), (1, 16, 65536), (2, 32, 8192)]


class Shape(NamedTuple):
    B: int
    H: int
    N: int

    def info(self) -> dict:  # extra_info["shape"]
        return {"B": self.B, "H": self.H, "N": self.N}


# ---- the torch.compile peer ---------------------------------------------------------------------
def based_chunked_loopfree(q, k, v, scale: float, normalize: bool, eps: float, chunk: int = 64):
    """reference.based_chunked's algorithm with the Python loop over chunks replaced by a cumsum over
    chunk states (same math; torch.compile of the looped form unrolls N/64 iterations and takes minutes
    to compile at N = 32768). Operands in the input dtype, chunk states accumulated in float32."""
    B, H, N, d = q.shape
    e = v.shape[-1]
    nc = N // chunk
    qc, kc, vc = q.view(B, H, nc, chunk, d), k.view(B, H, nc, chunk, d), v.view(B, H, nc, chunk, e)
    s = scale * (qc @ kc.transpose(-1, -2))
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    w = (1 + s + 0.5 * s * s).masked_fill(~causal, 0)
    num = w @ vc
    den = w.float().sum(-1)
    phi_q, phi_k = feature_map_compact(qc, scale), feature_map_compact(kc, scale)
    kv = (phi_k.transpose(-1, -2) @ vc).float()  # (B, H, nc, F, e) per-chunk state
    ks = phi_k.float().sum(-2)  # (B, H, nc, F)
    S = (kv.cumsum(2) - kv).to(q.dtype)  # exclusive prefix: state before each chunk
    z = ks.cumsum(2) - ks
    num = num.float() + (phi_q @ S).float()
    if normalize:
        den = den + (phi_q.float() * z.unsqueeze(-2)).sum(-1)
        num = num / (den.unsqueeze(-1) + eps)
    return num.to(q.dtype).view(B, H, N, e)


_COMPILED: dict = {}


def compiled_loopfree():
    """based_chunked_loopfree compiled (dynamic=False, fullgraph); one object, shared with the backward and
    training benchmarks (perf/test_perf_based_prefill_backward.py)."""
    if "fn" not in _COMPILED:
        feature_map_compact(torch.ones(1, D, device="cuda"), SCALE)  # cache the index tensors first
        _COMPILED["fn"] = torch.compile(based_chunked_loopfree, dynamic=False, fullgraph=True)
    return _COMPILED["fn"]


# ---- inputs and implementations -----------------------------------------------------------------
def _inputs(layout: str):
    """-> shape -> one (q, k, v) set. layout 'bhnd': (B, H, N, .) contiguous (ours, reference).
    'bthd_view': (B, N, H, .) *views* of (B, H, N, .)-contiguous storage: fla's based kernels take
    (B, T, H, D) and transpose to (B, H, T, D) + .contiguous() internally, which is then free.
    'bthd': (B, N, H, .) contiguous (fla's fused_recurrent kernel reads (B, T, H, K) directly)."""

    def make(s: Shape):
        dims = (s.B, s.N, s.H) if layout == "bthd" else (s.B, s.H, s.N)
        q, k, v = (randn(*dims, n, dtype=DTYPE) for n in (D, D, E))
        if layout == "bthd_view":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return q, k, v

    return make


def _cost(s: Shape) -> tuple[int, int]:
    return prefill_cost(s.B, s.H, s.N, d=D, e=E)


def _impl(peer: str, mode: str, step, *, source: str = OPTIONAL, module: str | None = None,
          missing: str = "", layout: str = "bhnd") -> Impl:
    """A prefill record: eager, charged prefill_cost, 2 to 8 sets of that many bytes."""
    return Impl(f"{peer}-{mode}", (peer, mode), source, step, inputs=_inputs(layout), cost=_cost,
                footprint=lambda s: _cost(s)[0], timing=EAGER, min_sets=2, max_sets=8, module=module,
                missing=missing)


def _fla_fused_recurrent(m, s: Shape):
    # fla's recurrent linear-attention kernel (numerator, state in float32) on the 153-wide Taylor features,
    # computed by the caller (timed), scale=1. The denominator phi(q_i).sum_{j<=i} phi(k_j) is also the
    # caller's: the float32 cumsum + dot that fla's own normalize=True does, minus its chunk_global_cumsum
    # kernel, whose 48-config autotune (re-run for every B, H) costs ~40 s of compilation per fresh machine.
    def run(q, k, v):
        fq, fk = feature_map_compact(q, SCALE), feature_map_compact(k, SCALE)
        num = m.fused_recurrent_linear_attn(fq, fk, v, scale=1.0, normalize=False)[0]
        den = (fq.float() * torch.cumsum(fk, dim=1, dtype=torch.float32)).sum(-1, keepdim=True)
        return (num.float() / (den + EPS)).to(q.dtype)

    return run


def _ours(normalize: bool):
    return lambda ak, s: lambda q, k, v: ak.based_prefill(q, k, v, normalize=normalize, eps=EPS)


def _thunderkittens(m, s: Shape):
    # TK's based(q, k, v) -> (o, kv_state): the numerator only (no denominator), scale 1/sqrt(16) built in,
    # the 273-wide state written in bf16 and concatenated by its launcher (part of its call, as TK ships it).
    # perf/thunderkittens.py builds it without the launcher's cudaDeviceSynchronize() calls, on the current
    # stream.
    return lambda q, k, v: m.based(q, k, v)[0]


def _torch_compile(_, s: Shape):
    fn = compiled_loopfree()
    return lambda q, k, v: fn(q, k, v, SCALE, True, EPS)


IMPLS = [
    _impl("attn_kernels", "norm", _ours(True), source=OURS),
    _impl("attn_kernels", "num", _ours(False), source=OURS),
    _impl("torch", "norm",
          lambda ref, s: lambda q, k, v: ref.based_chunked(q, k, v, normalize=True, eps=EPS)[0],
          source=TORCH, module="attn_kernels.reference", missing=REFERENCE_MISSING),
    _impl("torch_compile", "norm", _torch_compile, source=TORCH),
    _impl("fla_parallel", "norm",
          lambda m, s: lambda q, k, v: m.parallel_based(q, k, v, scale=SCALE, use_norm=True),
          module="fla.ops.based", missing=FLA_MISSING, layout="bthd_view"),
    _impl("fla_fused_chunk", "norm",
          lambda m, s: lambda q, k, v: m.fused_chunk_based(q, k, v, scale=SCALE, use_norm=True),
          module="fla.ops.based", missing=FLA_MISSING, layout="bthd_view"),
    _impl("fla_fused_recurrent", "norm", _fla_fused_recurrent, module="fla.ops.linear_attn",
          missing=FLA_MISSING, layout="bthd"),
    _impl("thunderkittens", "num", _thunderkittens, module=tk_build.NAME, missing=tk_build.MISSING),
]
tk_build.install_import_hook()  # `import thunderkittens` builds the peer where there is a checkout
# peer -> the shapes it runs (every shape where absent): an id exists only where the peer can run
SUPPORTS = {"thunderkittens": tk_build.supports}
BY_PARAMS = {impl.params: impl for impl in IMPLS}
CASES = [
    pytest.param(*impl.params, B, H, N, id=f"{impl.name}-B{B}-H{H}-N{N}-bf16")
    for (B, H, N) in SHAPES
    for impl in IMPLS
    if SUPPORTS.get(impl.peer, lambda *shape: True)(B, H, N)
]


@pytest.mark.parametrize("impl,mode,B,H,N", CASES)
def test_perf_based_prefill(benchmark, perf_rounds, impl, mode, B, H, N):
    rounds, warmup = perf_rounds
    benchmark.group = f"{OP} B{B} H{H} N{N}"
    bench(benchmark, BY_PARAMS[impl, mode], Shape(B, H, N), op=OP, rounds=rounds, warmup_rounds=warmup)
