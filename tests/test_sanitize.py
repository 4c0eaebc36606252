"""The small GPU subset `nox -s sanitize` runs under compute-sanitizer (memcheck, racecheck, initcheck,
synccheck): three shapes per op (and pooled decode), ragged tails and the split-sequence path included. Plain
tests too."""
import pytest
import torch

import attn_kernels as ak
from harness import assert_written, requires_cuda

pytestmark = requires_cuda


@pytest.mark.parametrize("B,H,N", [(1, 2, 65), (2, 3, 1000), (1, 1, 8193)], ids=["N65", "N1000", "N8193-split"])
def test_based_prefill(B, H, N):
    q, k = (torch.randn(B, N, H, 16, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    v = torch.randn(B, N, H, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    init = (torch.rand(B, H, 153, 64, device="cuda"), torch.rand(B, H, 153, device="cuda") + 1)
    o, (S, z) = ak.based_prefill(q, k, v, initial_state=init, return_state=True)
    torch.cuda.synchronize()
    for name, t in (("o", o), ("S", S), ("z", z)):
        assert_written(name, t)


# B*H <= 1024: splits 8 / 4 / 1 with PDL. B*H = 2080: launched without PDL, prefetching a later block's state
# (the contiguous kernel for an fp32 state, the pooled one for either).
DECODE_BH = [(1, 1, torch.float32), (3, 7, torch.bfloat16), (64, 16, torch.float32)]
DECODE_IDS = ["BH1", "BH21-bf16", "BH1024"]


@pytest.mark.parametrize("B,H,state_dtype", DECODE_BH + [(130, 16, torch.float32)],
                         ids=DECODE_IDS + ["BH2080-plain"])
def test_based_decode(B, H, state_dtype):
    q, k = (torch.randn(B, H, 16, device="cuda", dtype=torch.float16) for _ in range(2))
    v = torch.randn(B, H, 64, device="cuda", dtype=torch.float16)
    state = ak.empty_state(B, H, dtype=state_dtype, device="cuda")
    o = ak.based_decode(q, k, v, state)
    torch.cuda.synchronize()
    assert_written("o", o)


@pytest.mark.parametrize("B,H,state_dtype", DECODE_BH + [(130, 16, torch.bfloat16)],
                         ids=DECODE_IDS + ["BH2080-bf16-plain"])
def test_based_decode_pooled(B, H, state_dtype):
    """A pool of 2B + 2 slots; from B = 3 on, row 1 is padding (-1) and the last row out of range (the op: no
    host check), so whole clusters (splits > 1) leave early, and at B*H = 2080 (launched without PDL) earlier
    blocks skip prefetching the bad row's state."""
    P = 2 * B + 2
    q, k = (torch.randn(B, H, 16, device="cuda", dtype=torch.float16) for _ in range(2))
    v = torch.randn(B, H, 64, device="cuda", dtype=torch.float16)
    S, z = ak.empty_state(P, H, dtype=state_dtype, device="cuda")
    idx = torch.randperm(P, device="cuda")[:B].to(torch.int32)
    if B >= 3:
        idx[1], idx[-1] = -1, P + 5
    o = torch.ops.attn_kernels.based_decode(q, k, v, S, z, 0.25, True, 1e-6, idx)
    torch.cuda.synchronize()
    assert_written("o (rows with a slot)", o[(idx >= 0) & (idx < P)])


@pytest.mark.parametrize("W,e,positions", [(16, 64, [0, 15, 16]), (64, 128, [3, 200]), (256, 64, [255, 1000, 7])],
                         ids=["W16-e64", "W64-e128", "W256-e64"])
def test_sliding_window_decode(W, e, positions):
    B, H = len(positions), 3
    q, kn, vn = (torch.randn(B, H, e, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k_cache, v_cache = (torch.randn(B, H, W, e, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos = torch.tensor(positions, dtype=torch.int32, device="cuda")
    o = ak.sliding_window_decode(q, kn, vn, k_cache, v_cache, pos, window=W)
    torch.cuda.synchronize()
    assert_written("o", o)


@pytest.mark.parametrize("N,W,e,varlen", [(65, 16, 64, False), (1000, 256, 128, False), (300, 64, 64, True)],
                         ids=["N65-W16-e64", "N1000-W256-e128", "varlen-W64-e64"])
def test_sliding_window_prefill(N, W, e, varlen):
    H = 3
    B = 1 if varlen else 2
    q, k, v = (torch.randn(B, N, H, e, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    cu = torch.tensor([0, 70, 70, N], dtype=torch.int32, device="cuda") if varlen else None
    rows = 3 if varlen else B
    k_cache, v_cache = (torch.randn(rows, H, W, e, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o = ak.sliding_window_prefill(q, k, v, k_cache, v_cache, window=W, cu_seqlens=cu)
    torch.cuda.synchronize()
    assert_written("o", o)


@pytest.mark.parametrize("W,e", [(16, 64), (256, 128)], ids=["W16-e64", "W256-e128"])
def test_sliding_window_decode_pooled(W, e):
    """Cache pools: shuffled rows, padding, and indices out of range given to the op itself (no host check):
    nothing read or written outside the pools; o written everywhere, NaN exactly on the out-of-range rows."""
    B, H, P = 6, 3, 9
    q, kn, vn = (torch.randn(B, H, e, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k_pool, v_pool = (torch.randn(P, H, W, e, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos = torch.tensor([0, 5, W, 3 * W + 1, 2, 7], dtype=torch.int32, device="cuda")
    idx = torch.tensor([4, -1, P, 0, -5, 2**31 - 1], dtype=torch.int32, device="cuda")
    o = torch.ops.attn_kernels.sliding_window_decode(q, kn, vn, k_pool, v_pool, pos, e ** -0.5, idx)
    torch.cuda.synchronize()
    assert torch.isnan(o[[2, 4, 5]]).all() and torch.equal(o[1], torch.zeros_like(o[1]))
    assert_written("o (pool rows)", o[[0, 3]])


@pytest.mark.parametrize("B,H,N,normalize", [(1, 2, 65, True), (2, 3, 1000, False)], ids=["N65-norm", "N1000-num"])
def test_based_prefill_backward(B, H, N, normalize):
    """Both sweeps with an initial state and gradients into the returned state; every gradient written."""
    q, k = (torch.randn(B, N, H, 16, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    v, go = (torch.randn(B, N, H, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    init = (torch.rand(B, H, 153, 64, device="cuda"), torch.rand(B, H, 153, device="cuda") + 1)
    gstate = (torch.randn(B, H, 153, 64, device="cuda"), torch.randn(B, H, 153, device="cuda"))
    grads = ak.based_prefill_backward(q, k, v, go, grad_state=gstate, initial_state=init, normalize=normalize)
    torch.cuda.synchronize()
    for name, t in zip(("dq", "dk", "dv", "dS0", "dz0"), grads):
        assert_written(name, t)
