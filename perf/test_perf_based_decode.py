"""based_decode: one generation step, timed inside a CUDA graph of K steps over K rotating input/state
sets (perf.measure.bench_graph), as decode is served. The implementations are the ``IMPLS`` records
(perf.impls.Impl).

Ids: test_perf_based_decode[<impl>-state_<fp32|bf16>-B<B>-H<H>-bf16]. ``attn_kernels-pooled`` is the same step
on a state pool (state_indices: B shuffled slots of a pool of 2B), charged the same state bytes plus the indices.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from attn_kernels.reference import feature_map_compact, feature_map_expanded
from perf.cost import F_COMPACT, F_EXPANDED, decode_cost
from perf.impls import FLA_MISSING, GRAPH, OPTIONAL, OURS, TORCH, Impl, bench, pool_rows, randn

OP = "based_decode"
D, E = 16, 64
F = F_COMPACT
DTYPE = torch.bfloat16
SCALE = 1.0 / math.sqrt(D)
EPS = 1e-6

SHAPES = [(1, 16), (16, 16), (64, 16), (256, 16), (1024, 16)]


class Shape(NamedTuple):
    B: int
    H: int

    def info(self) -> dict:  # extra_info["shape"]
        return {"B": self.B, "H": self.H, "e": E}


_STATE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- the PyTorch peer: eager decode step on the 273-wide expanded map, fp32 state ----------------
def torch_decode_273(q, k, v, S, z, scale: float, eps: float):
    """q, k (B, H, 16), v (B, H, e); S (B, H, 273, e), z (B, H, 273) float32, updated in place."""
    phi_q, phi_k = feature_map_expanded(q.float(), scale), feature_map_expanded(k.float(), scale)
    S.add_(phi_k.unsqueeze(-1) * v.float().unsqueeze(-2))
    z.add_(phi_k)
    num = (phi_q.unsqueeze(-2) @ S).squeeze(-2)
    den = (phi_q * z).sum(-1, keepdim=True)
    return (num / (den + eps)).to(q.dtype)


_COMPILED: dict = {}


def _compiled_273():
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(torch_decode_273, dynamic=False)
    return _COMPILED["fn"]


def _state(B, H, nfeat, dtype):
    """A plausible non-zero state: z's constant feature ~ tokens seen, the rest small and random."""
    S = randn(B, H, nfeat, E, dtype=dtype, std=0.1)
    z = randn(B, H, nfeat, dtype=torch.float32, std=0.1)
    z[..., 0] = 100.0
    return S, z.to(dtype)


def _qkv(B, H):
    return randn(B, H, D, dtype=DTYPE), randn(B, H, D, dtype=DTYPE), randn(B, H, E, dtype=DTYPE)


def _inputs(nfeat: int, state_dtype: torch.dtype):
    """-> shape -> one (q, k, v, S, z) set, the state nfeat wide in state_dtype."""

    def make(s: Shape):
        S, z = _state(s.B, s.H, nfeat, state_dtype)
        return (*_qkv(s.B, s.H), S, z)

    return make


def _fla_inputs(s: Shape):
    q, k, v = _qkv(s.B, s.H)
    S, z = _state(s.B, s.H, F, torch.float32)
    # fla layout (B, T=1, H, .); z_state (B, 1, H, F)
    return q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), S, z.unsqueeze(1)


def _fla_step(m, s: Shape):
    def step(q, k, v, S, z):
        # 153-wide Taylor features computed by the caller (inside the graph, timed), scale 1: fla's
        # kernel updates S (written to a new fp32 buffer) and gives the numerator phi(q).S'; the
        # caller updates z and divides -- what fla's normalize=True does, minus its autotuned
        # cumsum kernel (48 configs re-tuned for every B, H: ~40 s per fresh machine).
        fq, fk = feature_map_compact(q, SCALE), feature_map_compact(k, SCALE)
        num, _ = m.fused_recurrent_linear_attn(fq, fk, v, scale=1.0, initial_state=S,
                                               output_final_state=True, normalize=False)
        z_new = z + fk.float()
        den = (fq.float() * z_new).sum(-1, keepdim=True)
        return (num.float() / (den + EPS)).to(q.dtype)

    return step


def _torch_step(compiled: bool):
    def build(_, s: Shape):
        fn = _compiled_273() if compiled else torch_decode_273
        return lambda q, k, v, S, z: fn(q, k, v, S, z, SCALE, EPS)

    return build


def _impl(peer: str, state: str, step, inputs, *, source: str, module: str | None = None,
          pooled: bool = False) -> Impl:
    """A decode record: in a CUDA graph, charged decode_cost in the state dtype, rotated over 4 to 1024
    sets sized by the 153-wide state in that dtype (the state each step touches)."""
    itemsize = torch.empty((), dtype=_STATE_DTYPE[state]).element_size()
    return Impl(f"{peer}-state_{state}", (peer, state), source, step, inputs=inputs,
                cost=lambda s: decode_cost(s.B, s.H, state_itemsize=itemsize, d=D, e=E, pooled=pooled),
                footprint=lambda s: s.B * s.H * (F * E + F) * itemsize, timing=GRAPH, min_sets=4,
                max_sets=1024, module=module, missing=FLA_MISSING if module else "")


def _ours(ak, s: Shape):
    return lambda q, k, v, S, z: ak.based_decode(q, k, v, (S, z), eps=EPS)


def _pooled_inputs(state_dtype: torch.dtype):
    """-> shape -> one (q, k, v, S, z, state_indices) set: a pool of P = 2B slots, row b using slot
    state_indices[b] (perf.impls.pool_rows: B distinct slots shuffled, one map shared by every set)."""

    def make(s: Shape):
        S, z = _state(2 * s.B, s.H, F, state_dtype)
        return (*_qkv(s.B, s.H), S, z, pool_rows(s.B))

    return make


def _ours_pooled(ak, s: Shape):
    return lambda q, k, v, S, z, idx: ak.based_decode(q, k, v, (S, z), state_indices=idx, eps=EPS)


IMPLS = [
    _impl("attn_kernels", "fp32", _ours, _inputs(F, torch.float32), source=OURS),
    _impl("attn_kernels", "bf16", _ours, _inputs(F, torch.bfloat16), source=OURS),
    _impl("attn_kernels-pooled", "fp32", _ours_pooled, _pooled_inputs(torch.float32), source=OURS, pooled=True),
    _impl("attn_kernels-pooled", "bf16", _ours_pooled, _pooled_inputs(torch.bfloat16), source=OURS, pooled=True),
    _impl("torch", "fp32", _torch_step(False), _inputs(F_EXPANDED, torch.float32), source=TORCH),
    _impl("torch_compile", "fp32", _torch_step(True), _inputs(F_EXPANDED, torch.float32), source=TORCH),
    _impl("fla_fused_recurrent", "fp32", _fla_step, _fla_inputs, source=OPTIONAL,
          module="fla.ops.linear_attn"),
]
BY_PARAMS = {impl.params: impl for impl in IMPLS}
CASES = [
    pytest.param(*impl.params, B, H, id=f"{impl.name}-B{B}-H{H}-bf16")
    for (B, H) in SHAPES
    for impl in IMPLS
]


@pytest.mark.parametrize("impl,state,B,H", CASES)
def test_perf_based_decode(benchmark, perf_rounds, impl, state, B, H):
    rounds, warmup = perf_rounds
    benchmark.group = f"{OP} B{B} H{H}"
    bench(benchmark, BY_PARAMS[impl, state], Shape(B, H), op=OP, rounds=rounds, warmup_rounds=warmup)
