"""based_decode: one generation step, timed inside a CUDA graph of K steps over K rotating input/state
sets (timing.bench_graph), as decode is served.

Ids: test_perf_based_decode[<impl>-state_<fp32|bf16>-B<B>-H<H>-bf16].
"""
from __future__ import annotations

import math

import pytest
import torch

import timing
from attn_kernels.reference import feature_map_compact, feature_map_expanded

OP = "based_decode"
D, E = 16, 64
F = timing.F_COMPACT
DTYPE = torch.bfloat16
SCALE = 1.0 / math.sqrt(D)
EPS = 1e-6

SHAPES = [(1, 16), (16, 16), (64, 16), (256, 16), (1024, 16)]
IMPLS = [
    ("attn_kernels", "fp32"),
    ("attn_kernels", "bf16"),
    ("torch", "fp32"),
    ("torch_compile", "fp32"),
    ("fla_fused_recurrent", "fp32"),
]
CASES = [
    pytest.param(impl, state, B, H, id=f"{impl}-state_{state}-B{B}-H{H}-bf16")
    for (B, H) in SHAPES
    for impl, state in IMPLS
]
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
    S = timing.randn(B, H, nfeat, E, dtype=dtype, std=0.1)
    z = timing.randn(B, H, nfeat, dtype=torch.float32, std=0.1)
    z[..., 0] = 100.0
    return S, z.to(dtype)


def _qkv(B, H):
    return (timing.randn(B, H, D, dtype=DTYPE), timing.randn(B, H, D, dtype=DTYPE),
            timing.randn(B, H, E, dtype=DTYPE))


def _impl(impl: str, state: str, B: int, H: int):
    """-> (step(*set), make_set(), ours?)"""
    sdt = _STATE_DTYPE[state]
    if impl == "attn_kernels":
        ak = timing.import_attn_kernels()

        def make():
            S, z = _state(B, H, F, sdt)
            return (*_qkv(B, H), S, z)

        return (lambda q, k, v, S, z: ak.based_decode(q, k, v, (S, z), eps=EPS)), make, ak
    if impl in ("torch", "torch_compile"):
        fn = torch_decode_273 if impl == "torch" else _compiled_273()

        def make():
            S, z = _state(B, H, timing.F_EXPANDED, torch.float32)
            return (*_qkv(B, H), S, z)

        return (lambda q, k, v, S, z: fn(q, k, v, S, z, SCALE, EPS)), make, None
    if impl == "fla_fused_recurrent":
        m = timing.import_optional("fla.ops.linear_attn", "fla (fla-core) not available")

        def make():
            q, k, v = _qkv(B, H)
            S, z = _state(B, H, F, torch.float32)
            # fla layout (B, T=1, H, .); z_state (B, 1, H, F)
            return q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), S, z.unsqueeze(1)

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

        return step, make, None
    raise AssertionError(impl)


@pytest.mark.parametrize("impl,state,B,H", CASES)
def test_perf_based_decode(benchmark, perf_rounds, impl, state, B, H):
    rounds, warmup = perf_rounds
    step, make, ak = _impl(impl, state, B, H)
    itemsize = torch.empty((), dtype=_STATE_DTYPE[state]).element_size()
    nbytes, flops = timing.decode_cost(B, H, state_itemsize=itemsize, d=D, e=E)
    info = timing.extra_info(OP, f"{impl}-state_{state}", {"B": B, "H": H, "e": E}, nbytes, flops)
    benchmark.group = f"{OP} B{B} H{H}"
    footprint = B * H * (F * E + F) * itemsize  # the state each step touches
    K = timing.rotation_count(footprint, min_sets=4, max_sets=1024)
    sets = [make() for _ in range(K)]
    with torch.no_grad(), timing.peer_errors_skip(impl, ak):
        timing.bench_graph(benchmark, step, sets, info, rounds=rounds, warmup_rounds=warmup)
