"""sliding_window_decode: one new token per sequence over its last W keys, timed inside a CUDA graph of
K calls over K rotating input/cache sets (timing.bench_graph), as decode is served.

attn_kernels and the reference include the cache append; the attention-only peers do not (issue 5).
Ids: test_perf_sliding_window_decode[<impl>-B<B>-H<H>-W<W>-e<e>-bf16].
"""
from __future__ import annotations

import math

import pytest
import torch

import timing

OP = "sliding_window_decode"
DTYPE = torch.bfloat16
FULL_CACHE_WINDOWS = 4  # "full cache" peers (FA2, flash_attn, fla): sequences of 4*W tokens, last W attended

PEERS = ["attn_kernels", "torch", "sdpa_cudnn", "sdpa_flash", "flex", "fa2_window", "flash_attn",
         "fla_decoding"]
SHAPES = [(1, 16), (16, 16), (64, 16), (256, 16), (256, 32)]
CASES = [
    pytest.param(impl, B, H, 64, 64, id=f"{impl}-B{B}-H{H}-W64-e64-bf16")
    for (B, H) in SHAPES
    for impl in PEERS
] + [
    pytest.param("attn_kernels", 256, 16, 64, 128, id="attn_kernels-B256-H16-W64-e128-bf16"),
    pytest.param("attn_kernels", 256, 16, 256, 64, id="attn_kernels-B256-H16-W256-e64-bf16"),
]

_FLEX: dict = {}


def _flex():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _positions(B, W):
    """Mixed positions, all past the first wrap of the ring (every slot valid), continuous batching."""
    return torch.randint(W, 8 * W, (B,), dtype=torch.int32, device="cuda")


def _impl(impl: str, B: int, H: int, W: int, e: int):
    """-> (step(*set), make_set(), context factory or None, attn_kernels module for ours else None)."""
    r = lambda *s: timing.randn(*s, dtype=DTYPE)  # noqa: E731
    L = FULL_CACHE_WINDOWS * W
    scale = 1.0 / math.sqrt(e)

    def ring_set():
        return r(B, H, e), r(B, H, e), r(B, H, e), r(B, H, W, e), r(B, H, W, e), _positions(B, W)

    if impl == "attn_kernels":
        ak = timing.import_attn_kernels()
        def step(q, kn, vn, kc, vc, pos):
            return ak.sliding_window_decode(q, kn, vn, kc, vc, pos, window=W)

        return step, ring_set, None, ak
    if impl == "torch":
        ref = timing.import_optional("attn_kernels.reference", "PyTorch reference")
        def step(q, kn, vn, kc, vc, pos):
            return ref.sliding_window_decode(q, kn, vn, kc, vc, pos, window=W)[0]

        return step, ring_set, None, None
    if impl in ("sdpa_cudnn", "sdpa_flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.CUDNN_ATTENTION if impl == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION
        F = torch.nn.functional
        # the last W keys as a contiguous (B, H, W, e) buffer; q (B, H, 1, e)
        make = lambda: (r(B, H, 1, e), r(B, H, W, e), r(B, H, W, e))  # noqa: E731
        step = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
        return step, make, (lambda: sdpa_kernel([backend])), None
    if impl == "flex":
        fn = _flex()
        make = lambda: (r(B, H, 1, e), r(B, H, W, e), r(B, H, W, e))  # noqa: E731
        return (lambda q, k, v: fn(q, k, v, scale=scale)), make, None, None
    if impl == "fa2_window":
        op = torch.ops.aten._flash_attention_forward
        # PyTorch's bundled FlashAttention-2, (B, S, H, e) layout, over a full cache of L tokens with
        # window (W-1, 0): the kernel reads only the last W keys.
        make = lambda: (r(B, 1, H, e), r(B, L, H, e), r(B, L, H, e))  # noqa: E731

        def step(q, k, v):
            return op(q, k, v, None, None, 1, L, 0.0, True, False, scale=scale,
                      window_size_left=W - 1, window_size_right=0)[0]

        return step, make, None, None
    if impl == "flash_attn":
        fa = timing.import_optional("flash_attn", "flash_attn not installed (fa2_window is torch's FA2)")

        def make():
            seqlens = torch.full((B,), L, dtype=torch.int32, device="cuda")
            return r(B, 1, H, e), r(B, L, H, e), r(B, L, H, e), seqlens

        def step(q, kc, vc, seqlens):
            return fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, softmax_scale=scale,
                                              causal=True, window_size=(W - 1, 0))

        return step, make, None, None
    if impl == "fla_decoding":
        m = timing.import_optional("fla.ops.attn.decoding", "fla (fla-core) not available")
        cu = torch.arange(0, B + 1, dtype=torch.long, device="cuda") * L

        def make():  # varlen layout: q (1, B, H, e), k/v (1, B*L, H, e), one query at each sequence's end
            return r(1, B, H, e), r(1, B * L, H, e), r(1, B * L, H, e)

        def step(q, k, v):
            return m.attn_decoding_one_step(q, k, v, scale=scale, cu_seqlens=cu, window_size=W)

        return step, make, None, None
    raise AssertionError(impl)


@pytest.mark.parametrize("impl,B,H,W,e", CASES)
def test_perf_sliding_window_decode(benchmark, perf_rounds, impl, B, H, W, e):
    rounds, warmup = perf_rounds
    step, make, context, ak = _impl(impl, B, H, W, e)
    nbytes, flops = timing.sliding_window_cost(B, H, W, e)
    info = timing.extra_info(OP, impl, {"B": B, "H": H, "window": W, "e": e}, nbytes, flops)
    benchmark.group = f"{OP} B{B} H{H} W{W} e{e}"
    footprint = B * H * W * e * 2 * 2  # the window's K and V: what each call must read
    K = timing.rotation_count(footprint, min_sets=4, max_sets=1024)
    sets = [make() for _ in range(K)]
    with torch.no_grad(), timing.peer_errors_skip(impl, ak):
        timing.bench_graph(benchmark, step, sets, info, rounds=rounds, warmup_rounds=warmup, context=context)
