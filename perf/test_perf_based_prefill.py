"""based_prefill: attn_kernels vs PyTorch and fla. Eager timing over rotating input sets (timing.py).

Ids: test_perf_based_prefill[<impl>-<norm|num>-B<B>-H<H>-N<N>-bf16].
"""
from __future__ import annotations

import math

import pytest
import torch

import timing
from attn_kernels.reference import feature_map_compact

OP = "based_prefill"
D, E = 16, 64
DTYPE = torch.bfloat16
SCALE = 1.0 / math.sqrt(D)
EPS = 1e-6

SHAPES = [(16, 16, 1024), (16, 16, 2048), (16, 16, 4096), (16, 16, 8192), (16, 16, 16384), (4, 16, 32768),
          (64, 16, 2048)]
IMPLS = [
    ("attn_kernels", "norm"),
    ("attn_kernels", "num"),
    ("torch", "norm"),
    ("torch_compile", "norm"),
    ("fla_parallel", "norm"),
    ("fla_fused_chunk", "norm"),
    ("fla_fused_recurrent", "norm"),
]
CASES = [
    pytest.param(impl, mode, B, H, N, id=f"{impl}-{mode}-B{B}-H{H}-N{N}-bf16")
    for (B, H, N) in SHAPES
    for impl, mode in IMPLS
]


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


def _compiled_loopfree():
    if "fn" not in _COMPILED:
        feature_map_compact(torch.ones(1, D, device="cuda"), SCALE)  # cache the index tensors first
        _COMPILED["fn"] = torch.compile(based_chunked_loopfree, dynamic=False, fullgraph=True)
    return _COMPILED["fn"]


# ---- inputs and implementations -----------------------------------------------------------------
def _make_sets(n_sets: int, B: int, H: int, N: int, layout: str):
    """layout 'bhnd': (B, H, N, .) contiguous (ours, reference).
    'bthd_view': (B, N, H, .) *views* of (B, H, N, .)-contiguous storage: fla's based kernels take
    (B, T, H, D) and transpose to (B, H, T, D) + .contiguous() internally, which is then free.
    'bthd': (B, N, H, .) contiguous (fla's fused_recurrent kernel reads (B, T, H, K) directly)."""
    sets = []
    for _ in range(n_sets):
        if layout == "bthd":
            q = timing.randn(B, N, H, D, dtype=DTYPE)
            k = timing.randn(B, N, H, D, dtype=DTYPE)
            v = timing.randn(B, N, H, E, dtype=DTYPE)
        else:
            q = timing.randn(B, H, N, D, dtype=DTYPE)
            k = timing.randn(B, H, N, D, dtype=DTYPE)
            v = timing.randn(B, H, N, E, dtype=DTYPE)
            if layout == "bthd_view":
                q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        sets.append((q, k, v))
    return sets


def _impl(impl: str, mode: str):
    """-> (callable(q, k, v), layout, attn_kernels module for ours else None)."""
    normalize = mode == "norm"
    if impl == "attn_kernels":
        ak = timing.import_attn_kernels()
        return (lambda q, k, v: ak.based_prefill(q, k, v, normalize=normalize, eps=EPS)), "bhnd", ak
    if impl == "torch":
        ref = timing.import_optional("attn_kernels.reference", "PyTorch reference")
        return (lambda q, k, v: ref.based_chunked(q, k, v, normalize=normalize, eps=EPS)[0]), "bhnd", None
    if impl == "torch_compile":
        fn = _compiled_loopfree()
        return (lambda q, k, v: fn(q, k, v, SCALE, normalize, EPS)), "bhnd", None
    if impl == "fla_parallel":
        m = timing.import_optional("fla.ops.based", "fla (fla-core) not available")
        return (lambda q, k, v: m.parallel_based(q, k, v, scale=SCALE, use_norm=normalize)), "bthd_view", None
    if impl == "fla_fused_chunk":
        m = timing.import_optional("fla.ops.based", "fla (fla-core) not available")
        fn = m.fused_chunk_based
        return (lambda q, k, v: fn(q, k, v, scale=SCALE, use_norm=normalize)), "bthd_view", None
    if impl == "fla_fused_recurrent":
        m = timing.import_optional("fla.ops.linear_attn", "fla (fla-core) not available")
        # fla's recurrent linear-attention kernel (numerator, state in float32) on the 153-wide Taylor
        # features, computed by the caller (timed), scale=1. The denominator phi(q_i).sum_{j<=i} phi(k_j)
        # is also the caller's: the float32 cumsum + dot that fla's own normalize=True does, minus its
        # chunk_global_cumsum kernel, whose 48-config autotune (re-run for every B, H) costs ~40 s of
        # compilation per fresh machine.
        if not normalize:
            pytest.skip("fla_fused_recurrent is benchmarked normalized only")

        def run(q, k, v):
            fq, fk = feature_map_compact(q, SCALE), feature_map_compact(k, SCALE)
            num = m.fused_recurrent_linear_attn(fq, fk, v, scale=1.0, normalize=False)[0]
            den = (fq.float() * torch.cumsum(fk, dim=1, dtype=torch.float32)).sum(-1, keepdim=True)
            return (num.float() / (den + EPS)).to(q.dtype)

        return run, "bthd", None
    raise AssertionError(impl)


@pytest.mark.parametrize("impl,mode,B,H,N", CASES)
def test_perf_based_prefill(benchmark, perf_rounds, impl, mode, B, H, N):
    rounds, warmup = perf_rounds
    fn, layout, ak = _impl(impl, mode)
    nbytes, flops = timing.prefill_cost(B, H, N, d=D, e=E)
    info = timing.extra_info(OP, f"{impl}-{mode}", {"B": B, "H": H, "N": N}, nbytes, flops)
    benchmark.group = f"{OP} B{B} H{H} N{N}"
    n_sets = timing.rotation_count(nbytes, min_sets=2, max_sets=8)
    sets = _make_sets(n_sets, B, H, N, layout)
    with torch.no_grad(), timing.peer_errors_skip(impl, ak):
        timing.bench_eager(benchmark, fn, sets, info, rounds=rounds, warmup_rounds=warmup)
