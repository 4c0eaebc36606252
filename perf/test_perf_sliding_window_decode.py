"""sliding_window_decode: one new token per sequence over its last W keys, timed inside a CUDA graph of
K calls over K rotating input/cache sets (perf.measure.bench_graph), as decode is served. The
implementations are the ``IMPLS`` records (perf.impls.Impl).

attn_kernels and the reference include the cache append; the attention-only peers do not (issue 5).
attn_kernels-pooled is attn_kernels with cache pools: rows of pools of P = 2B rows named by shuffled
cache_indices (issue 17), at every shape attn_kernels runs (target: <= 1.05x attn_kernels). All sets of a
shape share one cache_indices, as all layers of a served step share the batch's (each set is one layer with
its own pools), like the Based decode benchmark's slot map.
Ids: test_perf_sliding_window_decode[<impl>-B<B>-H<H>-W<W>-e<e>-bf16].
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from perf.cost import sliding_window_cost
from perf.impls import (FLA_MISSING, GRAPH, OPTIONAL, OURS, REFERENCE_MISSING, TORCH, Impl, bench, pool_rows,
                        randn, sdpa_backend)

OP = "sliding_window_decode"
DTYPE = torch.bfloat16
FULL_CACHE_WINDOWS = 4  # "full cache" peers (FA2, flash_attn, fla): sequences of 4*W tokens, last W attended

SHAPES = [(1, 16), (16, 16), (64, 16), (256, 16), (256, 32)]  # (B, H) at W = 64, e = 64, every impl
OURS_ONLY = [(256, 16, 64, 128), (256, 16, 256, 64)]  # (B, H, W, e): attn_kernels only


class Shape(NamedTuple):
    B: int
    H: int
    W: int
    e: int

    def info(self) -> dict:  # extra_info["shape"]
        return {"B": self.B, "H": self.H, "window": self.W, "e": self.e}

    @property
    def L(self) -> int:  # the full-cache peers' sequence length
        return FULL_CACHE_WINDOWS * self.W

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.e)


_FLEX: dict = {}


def _flex():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _r(*shape):
    return randn(*shape, dtype=DTYPE)


def _positions(B, W):
    """Mixed positions, all past the first wrap of the ring (every slot valid), continuous batching."""
    return torch.randint(W, 8 * W, (B,), dtype=torch.int32, device="cuda")


# ---- inputs -------------------------------------------------------------------------------------
def _ring_set(s: Shape):
    """q, k_new, v_new (B, H, e), the (B, H, W, e) ring buffers and positions: attn_kernels, reference."""
    B, H, W, e = s
    return _r(B, H, e), _r(B, H, e), _r(B, H, e), _r(B, H, W, e), _r(B, H, W, e), _positions(B, W)


def _pooled_set(s: Shape):
    """As _ring_set, with (2B, H, W, e) pools for caches and the pool row of each sequence (perf.impls.pool_rows:
    shuffled, one map shared by every set)."""
    B, H, W, e = s
    pools = _r(2 * B, H, W, e), _r(2 * B, H, W, e)
    return _r(B, H, e), _r(B, H, e), _r(B, H, e), *pools, _positions(B, W), pool_rows(B)


def _last_w_set(s: Shape):
    """q (B, H, 1, e) and the last W keys / values as contiguous (B, H, W, e) buffers: SDPA, flex."""
    return _r(s.B, s.H, 1, s.e), _r(s.B, s.H, s.W, s.e), _r(s.B, s.H, s.W, s.e)


def _full_cache_set(s: Shape):
    """q (B, 1, H, e) and a full cache of L tokens, (B, L, H, e) layout: FA2."""
    return _r(s.B, 1, s.H, s.e), _r(s.B, s.L, s.H, s.e), _r(s.B, s.L, s.H, s.e)


def _flash_attn_set(s: Shape):
    seqlens = torch.full((s.B,), s.L, dtype=torch.int32, device="cuda")
    return (*_full_cache_set(s), seqlens)


def _varlen_set(s: Shape):
    """varlen layout: q (1, B, H, e), k/v (1, B*L, H, e), one query at each sequence's end: fla."""
    return _r(1, s.B, s.H, s.e), _r(1, s.B * s.L, s.H, s.e), _r(1, s.B * s.L, s.H, s.e)


# ---- steps --------------------------------------------------------------------------------------
def _ours(ak, s: Shape):
    def step(q, kn, vn, kc, vc, pos):
        return ak.sliding_window_decode(q, kn, vn, kc, vc, pos, window=s.W)

    return step


def _ours_pooled(ak, s: Shape):
    def step(q, kn, vn, kc, vc, pos, rows):
        return ak.sliding_window_decode(q, kn, vn, kc, vc, pos, window=s.W, cache_indices=rows)

    return step


def _reference(ref, s: Shape):
    def step(q, kn, vn, kc, vc, pos):
        return ref.sliding_window_decode(q, kn, vn, kc, vc, pos, window=s.W)[0]

    return step


def _sdpa(_, s: Shape):
    F = torch.nn.functional
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=s.scale)


def _flex_step(_, s: Shape):
    fn = _flex()
    return lambda q, k, v: fn(q, k, v, scale=s.scale)


def _fa2_window(_, s: Shape):
    # PyTorch's bundled FlashAttention-2, (B, S, H, e) layout, over a full cache of L tokens with
    # window (W-1, 0): the kernel reads only the last W keys.
    op = torch.ops.aten._flash_attention_forward

    def step(q, k, v):
        return op(q, k, v, None, None, 1, s.L, 0.0, True, False, scale=s.scale,
                  window_size_left=s.W - 1, window_size_right=0)[0]

    return step


def _flash_attn(fa, s: Shape):
    def step(q, kc, vc, seqlens):
        return fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, softmax_scale=s.scale,
                                          causal=True, window_size=(s.W - 1, 0))

    return step


def _fla_decoding(m, s: Shape):
    cu = torch.arange(0, s.B + 1, dtype=torch.long, device="cuda") * s.L

    def step(q, k, v):
        return m.attn_decoding_one_step(q, k, v, scale=s.scale, cu_seqlens=cu, window_size=s.W)

    return step


def _cost(s: Shape) -> tuple[int, int]:
    return sliding_window_cost(s.B, s.H, s.W, s.e)


def _impl(name: str, step, inputs, *, source: str = TORCH, module: str | None = None, missing: str = "",
          context=None) -> Impl:
    """A sliding-window record: in a CUDA graph, charged sliding_window_cost, rotated over 4 to 1024 sets
    sized by the window's K and V (what each call must read)."""
    return Impl(name, (name,), source, step, inputs=inputs, cost=_cost,
                footprint=lambda s: s.B * s.H * s.W * s.e * 2 * 2, timing=GRAPH, min_sets=4, max_sets=1024,
                module=module, missing=missing, context=context)


IMPLS = [
    _impl("attn_kernels", _ours, _ring_set, source=OURS),
    _impl("attn_kernels-pooled", _ours_pooled, _pooled_set, source=OURS),  # footprint: the B rows read
    _impl("torch", _reference, _ring_set, module="attn_kernels.reference", missing=REFERENCE_MISSING),
    _impl("sdpa_cudnn", _sdpa, _last_w_set, context=sdpa_backend("CUDNN_ATTENTION")),
    _impl("sdpa_flash", _sdpa, _last_w_set, context=sdpa_backend("FLASH_ATTENTION")),
    _impl("flex", _flex_step, _last_w_set),
    _impl("fa2_window", _fa2_window, _full_cache_set),
    _impl("flash_attn", _flash_attn, _flash_attn_set, source=OPTIONAL, module="flash_attn",
          missing="flash_attn not installed (fa2_window is torch's FA2)"),
    _impl("fla_decoding", _fla_decoding, _varlen_set, source=OPTIONAL, module="fla.ops.attn.decoding",
          missing=FLA_MISSING),
]
BY_NAME = {impl.name: impl for impl in IMPLS}
CASES = [
    pytest.param(impl.name, B, H, 64, 64, id=f"{impl.name}-B{B}-H{H}-W64-e64-bf16")
    for (B, H) in SHAPES
    for impl in IMPLS
] + [pytest.param(name, B, H, W, e, id=f"{name}-B{B}-H{H}-W{W}-e{e}-bf16")
     for (B, H, W, e) in OURS_ONLY for name in ("attn_kernels", "attn_kernels-pooled")]


@pytest.mark.parametrize("impl,B,H,W,e", CASES)
def test_perf_sliding_window_decode(benchmark, perf_rounds, impl, B, H, W, e):
    rounds, warmup = perf_rounds
    benchmark.group = f"{OP} B{B} H{H} W{W} e{e}"
    bench(benchmark, BY_NAME[impl], Shape(B, H, W, e), op=OP, rounds=rounds, warmup_rounds=warmup)
