"""sliding_window_prefill: causal sliding-window attention over a prompt, eager timing over rotating input sets
(perf.measure), attn_kernels vs PyTorch's bundled FlashAttention-2 with window (W-1, 0), FlexAttention with a
sliding-window block mask (torch.compile'd; the block mask is built once per shape, outside the timed step)
and cuDNN SDPA with a band mask (skipped with the reason where this torch's cuDNN backend does not take it).
The implementations are the ``IMPLS`` records (perf.impls.Impl).

attn_kernels includes the ring-buffer fill (the last W keys and values into the caches); the peers compute
attention only. Every implementation reads its inputs in its own layout: ours and FA2 (B, N, H, e) (ours as the
transposed view), flex and SDPA (B, H, N, e).
Cost (perf.cost.sliding_window_prefill_cost): q, k, v read once, o written once, plus the fill;
FLOPs 4 * N * min(W, N) * e per head.
Ids: test_perf_sliding_window_prefill[<impl>-B<B>-H<H>-N<N>-W<W>-e<e>-bf16].
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from perf.cost import sliding_window_prefill_cost
from perf.impls import EAGER, OURS, TORCH, Impl, bench, randn, sdpa_backend

OP = "sliding_window_prefill"
DTYPE = torch.bfloat16

SHAPES = [(16, 16, 2048), (16, 16, 8192), (4, 16, 32768), (64, 16, 2048)]  # (B, H, N) at W in {64, 256}, e = 64
WINDOWS = (64, 256)
WIDE = [(16, 16, 8192, 64, 128)]  # (B, H, N, W, e): the e = 128 head


class Shape(NamedTuple):
    B: int
    H: int
    N: int
    W: int
    e: int

    def info(self) -> dict:  # extra_info["shape"]
        return {"B": self.B, "H": self.H, "N": self.N, "window": self.W, "e": self.e}

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.e)


def _r(*shape):
    return randn(*shape, dtype=DTYPE)


# ---- inputs -------------------------------------------------------------------------------------
def _bnhd_set(s: Shape):
    """q, k, v stored (B, N, H, e), as FlashAttention and serving engines hold them."""
    return _r(s.B, s.N, s.H, s.e), _r(s.B, s.N, s.H, s.e), _r(s.B, s.N, s.H, s.e)


def _ours_set(s: Shape):
    """(B, N, H, e) storage passed as (B, H, N, e) views, and the (B, H, W, e) ring buffers to fill."""
    q, k, v = (x.transpose(1, 2) for x in _bnhd_set(s))
    return q, k, v, _r(s.B, s.H, s.W, s.e), _r(s.B, s.H, s.W, s.e)


def _bhnd_set(s: Shape):
    return _r(s.B, s.H, s.N, s.e), _r(s.B, s.H, s.N, s.e), _r(s.B, s.H, s.N, s.e)


# ---- steps --------------------------------------------------------------------------------------
def _ours(ak, s: Shape):
    def step(q, k, v, kc, vc):
        return ak.sliding_window_prefill(q, k, v, kc, vc, window=s.W)

    return step


def _fa2_window(_, s: Shape):
    op = torch.ops.aten._flash_attention_forward

    def step(q, k, v):
        return op(q, k, v, None, None, s.N, s.N, 0.0, True, False, scale=s.scale,
                  window_size_left=s.W - 1, window_size_right=0)[0]

    return step


_FLEX: dict = {}


def _flex(_, s: Shape):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    fn = _FLEX["fn"]

    def window_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < s.W)

    block_mask = create_block_mask(window_mask, B=None, H=None, Q_LEN=s.N, KV_LEN=s.N, device="cuda")
    return lambda q, k, v: fn(q, k, v, block_mask=block_mask, scale=s.scale)


def _sdpa_band(_, s: Shape):
    F = torch.nn.functional
    i = torch.arange(s.N, device="cuda")
    band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < s.W)  # (N, N) bool, built once per shape
    cudnn = sdpa_backend("CUDNN_ATTENTION")  # eager timing: the backend is forced inside the step

    def step(q, k, v):
        with cudnn():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=s.scale)

    return step


def _cost(s: Shape) -> tuple[int, int]:
    return sliding_window_prefill_cost(s.B, s.H, s.N, s.W, s.e)


def _impl(name: str, step, inputs, *, source: str = TORCH) -> Impl:
    """A sliding-window prefill record: eager, charged sliding_window_prefill_cost, 2 to 8 sets."""
    return Impl(name, (name,), source, step, inputs=inputs, cost=_cost, footprint=lambda s: _cost(s)[0],
                timing=EAGER, min_sets=2, max_sets=8)


IMPLS = [
    _impl("attn_kernels", _ours, _ours_set, source=OURS),
    _impl("fa2_window", _fa2_window, _bnhd_set),
    _impl("flex", _flex, _bhnd_set),
    _impl("sdpa_cudnn", _sdpa_band, _bhnd_set),
]
BY_NAME = {impl.name: impl for impl in IMPLS}
CASES = [
    pytest.param(impl.name, B, H, N, W, 64, id=f"{impl.name}-B{B}-H{H}-N{N}-W{W}-e64-bf16")
    for (B, H, N) in SHAPES
    for W in WINDOWS
    for impl in IMPLS
] + [pytest.param(impl.name, B, H, N, W, e, id=f"{impl.name}-B{B}-H{H}-N{N}-W{W}-e{e}-bf16")
     for (B, H, N, W, e) in WIDE for impl in IMPLS]


@pytest.mark.parametrize("impl,B,H,N,W,e", CASES)
def test_perf_sliding_window_prefill(benchmark, perf_rounds, impl, B, H, N, W, e):
    rounds, warmup = perf_rounds
    benchmark.group = f"{OP} B{B} H{H} N{N} W{W} e{e}"
    bench(benchmark, BY_NAME[impl], Shape(B, H, N, W, e), op=OP, rounds=rounds, warmup_rounds=warmup)
