"""sliding_window_decode against the float64 reference: output and both caches, positions before and after
the ring buffer wraps, mixed in one batch; step-by-step decoding against full-sequence attention."""
import pytest
import torch

import attn_kernels as ak
from attn_kernels import reference as ref
from harness import DTYPE_IDS, assert_close_rule, nbytes, poison_allocator, randn, requires_cuda


def positions_for(window):
    """Before, at and after the wrap: 0, 1, W-2, W-1, W, 5W+3 (deduplicated for tiny windows)."""
    return sorted({0, 1, max(window - 2, 0), window - 1, window, 5 * window + 3})


def make_cache(B, H, W, e, dtype, device, strided):
    """A (B, H, W, e) cache, optionally held as (B, W, H, e) memory (a strided view)."""
    if strided:
        return torch.randn(B, W, H, e, device=device).to(dtype).transpose(1, 2)
    return torch.randn(B, H, W, e, device=device).to(dtype)


def run_and_check(W, e, dtype, H, device, strided, positions=None):
    pos_list = positions_for(W) if positions is None else positions
    B = len(pos_list)
    pos = torch.tensor(pos_list, dtype=torch.int32, device=device)
    q, kn, vn = (randn(B, H, e, dtype=dtype, device=device, transposed=strided) for _ in range(3))
    k_cache, v_cache = make_cache(B, H, W, e, dtype, device, strided), make_cache(B, H, W, e, dtype, device, strided)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    if device == "cuda":
        poison_allocator(nbytes(B, H, e, dtype=dtype))
    o = ak.sliding_window_decode(q, kn, vn, k_cache, v_cache, pos, window=W)
    o64, k_exp, v_exp = ref.sliding_window_decode(q.double(), kn.double(), vn.double(), k_before.double(),
                                                  v_before.double(), pos, window=W)
    o_lp, _, _ = ref.sliding_window_decode(q, kn, vn, k_before, v_before, pos, window=W)
    assert o.dtype == dtype
    assert_close_rule("o", o, o64, o_lp)
    # The caches hold exactly the old contents plus the new token in its slot.
    assert torch.equal(k_cache.double(), k_exp) and torch.equal(v_cache.double(), v_exp)


@requires_cuda
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("e", [64, 128], ids=lambda e: f"e{e}")
@pytest.mark.parametrize("W", [16, 64, 256], ids=lambda w: f"W{w}")
def test_matrix(W, e, dtype, strided):
    run_and_check(W, e, dtype, 3, "cuda", strided)


@requires_cuda
@pytest.mark.parametrize("W", [1, 2, 63, 100], ids=lambda w: f"W{w}")
def test_odd_windows(W):
    run_and_check(W, 64, torch.bfloat16, 2, "cuda", False)


@requires_cuda
def test_many_heads_and_sequences():
    run_and_check(64, 64, torch.bfloat16, 16, "cuda", False, positions=list(range(0, 2000, 7)))


@requires_cuda
@pytest.mark.parametrize("W,e", [(16, 64), (64, 128)])
def test_step_by_step_equals_full_sliding_window_attention(W, e):
    """3W steps of decode == full-sequence causal sliding-window attention at every step: against the float64
    reference (the rule) and PyTorch's bundled FlashAttention-2 with window (W-1, 0) as an independent check."""
    B, H, N = 2, 4, 3 * W
    dtype = torch.bfloat16
    q, k, v = (torch.randn(B, H, N, e, device="cuda", dtype=dtype) for _ in range(3))
    full64 = ref.sliding_window_attention(q.double(), k.double(), v.double(), window=W)
    full_lp = ref.sliding_window_attention(q, k, v, window=W)
    k_cache, v_cache = (torch.randn(B, H, W, e, device="cuda", dtype=dtype) for _ in range(2))
    steps = []
    for t in range(N):
        pos = torch.full((B,), t, dtype=torch.int32, device="cuda")
        steps.append(ak.sliding_window_decode(q[:, :, t], k[:, :, t], v[:, :, t], k_cache, v_cache, pos, window=W))
    steps = torch.stack(steps, 2)
    assert_close_rule("decode steps", steps, full64, full_lp)
    fa2 = flash_attention_window(q, k, v, W)
    if fa2 is not None:
        assert_close_rule("decode steps vs FA2", steps, full64, fa2)


def flash_attention_window(q, k, v, window):
    """PyTorch's bundled FlashAttention-2 forward with window (window-1, 0); None where this build lacks it."""
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # FA layout (B, N, H, e)
    try:
        out = torch.ops.aten._flash_attention_forward(
            qt, kt, vt, None, None, q.shape[2], k.shape[2], 0.0, True, False,
            window_size_left=window - 1, window_size_right=0)
    except (RuntimeError, TypeError, AttributeError):
        return None
    return out[0].transpose(1, 2)


@requires_cuda
def test_negative_position_under_graph_capture_writes_nan_and_keeps_cache():
    """Inside a CUDA graph the host cannot check positions: the kernel refuses a negative one itself."""
    B, H, W, e = 2, 2, 16, 64
    q, kn, vn = (torch.randn(B, H, e, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k_cache, v_cache = (torch.randn(B, H, W, e, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos = torch.tensor([5, 7], dtype=torch.int32, device="cuda")
    ak.sliding_window_decode(q, kn, vn, k_cache, v_cache, pos, window=W)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = ak.sliding_window_decode(q, kn, vn, k_cache, v_cache, pos, window=W)
    pos.copy_(torch.tensor([-3, 7], dtype=torch.int32))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isnan(o[0]).all() and torch.isfinite(o[1]).all()
    assert torch.equal(k_cache[0], k_before[0]) and torch.equal(v_cache[0], v_before[0])


@pytest.mark.parametrize("e", [64, 128], ids=lambda e: f"e{e}")
def test_cpu_op(e):
    run_and_check(8, e, torch.bfloat16, 2, "cpu", True)
