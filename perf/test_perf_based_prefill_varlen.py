"""based_prefill on a varlen batch (cu_seqlens, issue 16): one mixed-length batch a server would build, timed
for attn_kernels packed (varlen), attn_kernels on the same number of tokens in equal lengths (dense, the
target's yardstick), attn_kernels padded to the longest sequence (what users do without varlen), and fla's
varlen linear attention (``chunk_linear_attn(..., cu_seqlens=)``) on the 153-wide Taylor features.

The batch: 64 sequences, lengths log-uniform in [16, 8192] (seed 16), H = 16, bf16. Every implementation is
charged the useful work, prefill_cost of the T packed tokens, so % of floor compares them on one scale.
Ids: test_perf_based_prefill_varlen[<impl>-<varlen|dense|padded>-n64-H16-T<T>-bf16]; all normalize.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from attn_kernels.reference import feature_map_compact
from perf.cost import prefill_cost
from perf.impls import EAGER, FLA_MISSING, OPTIONAL, OURS, Impl, bench, randn

OP = "based_prefill_varlen"  # extra_info["op"]: its own table in REPORT.md (the op called is based_prefill)
D, E = 16, 64
DTYPE = torch.bfloat16
SCALE = 1.0 / math.sqrt(D)
EPS = 1e-6


class Shape(NamedTuple):
    n: int
    H: int
    lengths: tuple

    @property
    def T(self) -> int:
        return sum(self.lengths)

    def info(self) -> dict:  # extra_info["shape"]
        return {"n": self.n, "H": self.H, "T": self.T, "longest": max(self.lengths)}


def mixed_batch(n: int = 64, H: int = 16, lo: int = 16, hi: int = 8192, seed: int = 16) -> Shape:
    """n lengths log-uniform in [lo, hi], from a fixed seed (the same batch on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    lengths = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).round().long().tolist()
    return Shape(n, H, tuple(lengths))


BATCHES = [mixed_batch()]


def _cu(lengths, dtype) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device="cuda")


# ---- input sets per layout ------------------------------------------------------------------------
def _packed(b: Shape):
    """(1, H, T, .) contiguous, cu_seqlens int32 (ours)."""
    q, k, v = (randn(1, b.H, b.T, n, dtype=DTYPE) for n in (D, D, E))
    return q, k, v, _cu(b.lengths, torch.int32)


def _dense(b: Shape):
    """The same token count in n equal sequences: (n, H, T // n, .)."""
    N = b.T // b.n
    return tuple(randn(b.n, b.H, N, n, dtype=DTYPE) for n in (D, D, E))


def _padded(b: Shape):
    """n sequences padded to the longest: (n, H, longest, .)."""
    N = max(b.lengths)
    return tuple(randn(b.n, b.H, N, n, dtype=DTYPE) for n in (D, D, E))


def _fla_packed(b: Shape):
    """(1, T, H, .) contiguous (fla's layout), cu_seqlens int64 (fla's dtype)."""
    q, k, v = (randn(1, b.T, b.H, n, dtype=DTYPE) for n in (D, D, E))
    return q, k, v, _cu(b.lengths, torch.int64)


def _cost(b: Shape) -> tuple[int, int]:
    return prefill_cost(1, b.H, b.T, d=D, e=E)


def _impl(peer: str, mode: str, step, inputs, *, source: str = OPTIONAL, module: str | None = None,
            missing: str = "") -> Impl:
    """A record normalizing like based_prefill's default (mode: which batch layout it runs)."""
    return Impl(f"{peer}-{mode}", (peer, mode), source, step, inputs=inputs, cost=_cost,
                footprint=lambda b: _cost(b)[0], timing=EAGER, min_sets=2, max_sets=8, module=module,
                missing=missing)


def _fla_varlen(m, b: Shape):
    # fla's chunked linear attention over the packed batch (numerator, float32 state) on the 153-wide Taylor
    # features, computed by the caller (timed), scale=1. The denominator phi(q_i).sum_{j<=i} phi(k_j) within
    # each sequence is also the caller's: a float32 cumsum over T minus its value before the sequence start
    # (fla's own normalize=True would add its chunk_global_cumsum, whose autotune costs ~40 s per machine).
    def run(q, k, v, cu):
        fq, fk = feature_map_compact(q, SCALE), feature_map_compact(k, SCALE)
        num = m.chunk_linear_attn(fq, fk, v, scale=1.0, normalize=False, cu_seqlens=cu)[0]
        cs = torch.cumsum(fk, dim=1, dtype=torch.float32)  # (1, T, H, F)
        start = torch.repeat_interleave(cu[:-1], cu.diff(), output_size=q.shape[1])  # each token's start
        before = torch.where((start > 0)[None, :, None, None], cs[:, (start - 1).clamp_min(0)], 0.0)
        den = (fq.float() * (cs - before)).sum(-1, keepdim=True)
        return (num.float() / (den + EPS)).to(q.dtype)

    return run


IMPLS = [
    _impl("attn_kernels", "varlen", lambda ak, b: lambda q, k, v, cu: ak.based_prefill(
        q, k, v, cu_seqlens=cu, max_seqlen=max(b.lengths), eps=EPS), _packed, source=OURS),
    _impl("attn_kernels", "dense", lambda ak, b: lambda q, k, v: ak.based_prefill(q, k, v, eps=EPS), _dense,
          source=OURS),
    _impl("attn_kernels", "padded", lambda ak, b: lambda q, k, v: ak.based_prefill(q, k, v, eps=EPS), _padded,
          source=OURS),
    _impl("fla_chunk", "varlen", _fla_varlen, _fla_packed, module="fla.ops.linear_attn", missing=FLA_MISSING),
]
BY_PARAMS = {impl.params: impl for impl in IMPLS}
CASES = [
    pytest.param(*impl.params, *b, id=f"{impl.name}-n{b.n}-H{b.H}-T{b.T}-bf16")
    for b in BATCHES
    for impl in IMPLS
]


@pytest.mark.parametrize("impl,mode,n,H,lengths", CASES)
def test_perf_based_prefill_varlen(benchmark, perf_rounds, impl, mode, n, H, lengths):
    rounds, warmup = perf_rounds
    batch = Shape(n, H, lengths)
    benchmark.group = f"{OP} varlen n{n} H{H} T{batch.T}"
    bench(benchmark, BY_PARAMS[impl, mode], batch, op=OP, rounds=rounds, warmup_rounds=warmup)
