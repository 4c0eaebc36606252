"""sliding_window_prefill against the float64 reference (flash-attn's rule, harness.assert_close_rule) and against
PyTorch's bundled FlashAttention-2 with window (W-1, 0); the ring fill checked bitwise (caches start as NaN: they
are never read, the written slots hold exact copies, every other slot keeps its bits); prefill then decode equals
the longer prefill; varlen and pooled calls bitwise equal to the dense calls the same kernel path computes; an
out-of-range pool index under graph capture. CPU tests of every argument rule at the end."""
import pytest
import torch

import attn_kernels as ak
from attn_kernels import reference as ref
from harness import DTYPE_IDS, assert_close_rule, assert_written, nbytes, poison_allocator, randn, requires_cuda
from test_sliding_window_decode import flash_attention_window

BITS = torch.int16  # compare fp16 / bf16 tensors bit by bit (NaN payloads included)


def nan_caches(rows, H, W, e, dtype, device):
    """Caches as a server allocates them (torch.empty garbage): NaN, so a read would show and untouched slots
    can be checked bitwise."""
    return [torch.full((rows, H, W, e), float("nan"), dtype=dtype, device=device) for _ in range(2)]


def bits_equal(a, b):
    return torch.equal(a.view(BITS), b.view(BITS))


def run_dense(B, H, N, W, e, dtype, strided, device="cuda"):
    """One dense call: o within the rule of the float64 reference; the caches bitwise the reference's fill."""
    q, k, v = (randn(B, H, N, e, dtype=dtype, device=device, transposed=strided) for _ in range(3))
    kc, vc = nan_caches(B, H, W, e, dtype, device)
    kc0, vc0 = kc.clone(), vc.clone()
    if device == "cuda":
        poison_allocator(nbytes(B, H, N, e, dtype=dtype))
    o = ak.sliding_window_prefill(q, k, v, kc, vc, window=W)
    o64, _, _ = ref.sliding_window_prefill(q.double(), k.double(), v.double(), kc0.double(), vc0.double(),
                                           window=W)
    o_lp, k_exp, v_exp = ref.sliding_window_prefill(q, k, v, kc0, vc0, window=W)  # caches: exact copies
    assert o.dtype == dtype and o.shape == q.shape
    assert_close_rule("o", o, o64, o_lp)
    assert bits_equal(kc, k_exp) and bits_equal(vc, v_exp), "ring fill: wrong slots or values"
    return q, k, v, o


def case_id(B, H, N, W, e, dtype, layout):
    return f"B{B}-H{H}-N{N}-W{W}-e{e}-{DTYPE_IDS[dtype]}-{layout}"


MATRIX = [pytest.param(B, H, N, W, e, dtype, id=case_id(B, H, N, W, e, dtype, "bnhd"))
          for (B, H, N) in [(3, 2, 1), (2, 3, 63), (2, 2, 65), (1, 3, 1000)]
          for W in (1, 16, 63, 64, 256) for e in (64, 128) for dtype in (torch.float16, torch.bfloat16)]


@requires_cuda
@pytest.mark.parametrize("B,H,N,W,e,dtype", MATRIX)
def test_matrix(B, H, N, W, e, dtype):
    run_dense(B, H, N, W, e, dtype, strided=True)


@requires_cuda
@pytest.mark.parametrize("strided", [False, True], ids=["bhnd", "bnhd"])
@pytest.mark.parametrize("W,e", [(64, 64), (256, 64), (256, 128), (16, 128)],
                         ids=["W64-e64", "W256-e64", "W256-e128", "W16-e128"])
def test_long_sequence(W, e, strided):
    """N = 4097: 64 full query blocks and a one-row tail; B = 1, H = 2 (the float64 reference is N x N)."""
    run_dense(1, 2, 4097, W, e, torch.bfloat16, strided)


@requires_cuda
def test_many_heads_and_sequences():
    run_dense(8, 16, 300, 64, 64, torch.float16, strided=True)


OFF_GRID = [pytest.param(2, 3, 1000, W, e, dtype, id=case_id(2, 3, 1000, W, e, dtype, "bnhd"))
            for W in (17, 100, 255) for e, dtype in ((64, torch.bfloat16), (128, torch.float16))]


@requires_cuda
@pytest.mark.parametrize("B,H,N,W,e,dtype", OFF_GRID)
def test_windows_off_the_sub_block_grid(B, H, N, W, e, dtype):
    """More window lengths for the per-warp sub-block skip (a warp skips the 16-key sub-blocks masked for all
    its rows, masks element by element only those its diagonal or window edge crosses): 17, 100, 255 besides
    the matrix's 1, 16, 63, 64, 256; N = 1000 ends inside the third warp of the last query block, the fourth
    has no row."""
    run_dense(B, H, N, W, e, dtype, strided=True)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("N,W,e", [(65, 1, 64), (1000, 16, 64), (1000, 63, 128), (4097, 64, 64),
                                   (4097, 256, 128), (1000, 256, 64)],
                         ids=lambda x: str(x))
def test_equals_flash_attention_2(N, W, e, dtype):
    """An independent implementation: PyTorch's bundled FA2 forward with window (W-1, 0) must satisfy the rule
    against the float64 reference, and our output the rule with FA2's output as the reference."""
    B, H = 1, 3
    q, k, v = (randn(B, H, N, e, dtype=dtype, device="cuda", transposed=True) for _ in range(3))
    fa2 = flash_attention_window(q, k, v, W)
    o64 = ref.sliding_window_attention(q.double(), k.double(), v.double(), window=W)
    o_lp = ref.sliding_window_attention(q, k, v, window=W)
    assert_close_rule("FA2 vs the float64 reference", fa2, o64, o_lp)
    kc, vc = nan_caches(B, H, W, e, dtype, "cuda")
    assert_close_rule("o vs FA2", ak.sliding_window_prefill(q, k, v, kc, vc, window=W), fa2, o_lp)


@requires_cuda
def test_empty_sequence_writes_nothing():
    q = torch.empty(2, 3, 0, 64, device="cuda", dtype=torch.bfloat16)
    kc, vc = nan_caches(2, 3, 16, 64, torch.bfloat16, "cuda")
    o = ak.sliding_window_prefill(q, q, q, kc, vc, window=16)
    torch.cuda.synchronize()
    assert o.shape == q.shape and torch.isnan(kc).all() and torch.isnan(vc).all()


@requires_cuda
@pytest.mark.parametrize("N,W,e", [(63, 16, 64), (65, 64, 128), (300, 256, 64), (1000, 63, 64)],
                         ids=lambda x: str(x))
def test_prefill_then_decode_equals_longer_prefill(N, W, e):
    """prefill(N) then T decode steps at positions N..N+T-1 give prefill(N+T)'s outputs for those tokens (both
    within the rule of the float64 reference); the fill equals N decode steps from the same caches, bitwise."""
    B, H, T, dtype = 2, 3, W + 3, torch.bfloat16
    q, k, v = (randn(B, H, N + T, e, dtype=dtype, device="cuda") for _ in range(3))
    kc, vc = nan_caches(B, H, W, e, dtype, "cuda")
    ak.sliding_window_prefill(q[:, :, :N], k[:, :, :N], v[:, :, :N], kc, vc, window=W)
    kd, vd = nan_caches(B, H, W, e, dtype, "cuda")
    for t in range(N):
        pos = torch.full((B,), t, dtype=torch.int32, device="cuda")
        ak.sliding_window_decode(q[:, :, t], k[:, :, t], v[:, :, t], kd, vd, pos, window=W)
    assert bits_equal(kc, kd) and bits_equal(vc, vd), "the ring fill differs from N decode steps"
    steps = []
    for t in range(N, N + T):
        pos = torch.full((B,), t, dtype=torch.int32, device="cuda")
        steps.append(ak.sliding_window_decode(q[:, :, t], k[:, :, t], v[:, :, t], kc, vc, pos, window=W))
    kl, vl = nan_caches(B, H, W, e, dtype, "cuda")
    longer = ak.sliding_window_prefill(q, k, v, kl, vl, window=W)
    o64 = ref.sliding_window_attention(q.double(), k.double(), v.double(), window=W)
    o_lp = ref.sliding_window_attention(q, k, v, window=W)
    assert_close_rule("decode after prefill", torch.stack(steps, 2), o64[:, :, N:], o_lp[:, :, N:])
    assert_close_rule("prefill(N + T)", longer, o64, o_lp)
    assert bits_equal(kl, kc) and bits_equal(vl, vc), "caches after decode differ from prefill(N + T)'s"


LENGTHS = [0, 1, 63, 64, 65, 0, 200, 1000, 130]


def pack(lengths, H, e, dtype):
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (randn(1, H, T, e, dtype=dtype, device="cuda", transposed=True) for _ in range(3))
    return q, k, v, cu


@requires_cuda
@pytest.mark.parametrize("max_seqlen", [None, 1000, 5000], ids=["max-none", "max-exact", "max-loose"])
@pytest.mark.parametrize("W,e,dtype", [(16, 64, torch.bfloat16), (64, 128, torch.float16),
                                       (256, 64, torch.float16)], ids=["W16-e64-bf16", "W64-e128-fp16", "W256-e64-fp16"])
def test_varlen_equals_each_sequence_alone(W, e, dtype, max_seqlen):
    """Packed sequences (empty ones included) give, bitwise, each sequence's dense output and cache row (the
    same kernel path: tiles start at the same offsets from the sequence's start); and the rule vs float64."""
    H = 3
    q, k, v, cu = pack(LENGTHS, H, e, dtype)
    n = len(LENGTHS)
    kc, vc = nan_caches(n, H, W, e, dtype, "cuda")
    kc0, vc0 = kc.clone(), vc.clone()
    poison_allocator(nbytes(1, H, q.shape[2], e, dtype=dtype))
    o = ak.sliding_window_prefill(q, k, v, kc, vc, window=W, cu_seqlens=cu, max_seqlen=max_seqlen)
    assert_written("o", o)
    bounds = cu.tolist()
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        kd, vd = nan_caches(1, H, W, e, dtype, "cuda")
        if b > a:
            od = ak.sliding_window_prefill(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], kd, vd, window=W)
            assert bits_equal(o[:, :, a:b], od), f"sequence {i}: output differs from the sequence alone"
        assert bits_equal(kc[i], kd[0]) and bits_equal(vc[i], vd[0]), f"sequence {i}: cache row differs"
    o64, _, _ = ref.sliding_window_prefill(q.double(), k.double(), v.double(), kc0.double(), vc0.double(),
                                           window=W, cu_seqlens=cu)
    o_lp, _, _ = ref.sliding_window_prefill(q, k, v, kc0, vc0, window=W, cu_seqlens=cu)
    assert_close_rule("varlen o", o, o64, o_lp)


@requires_cuda
def test_varlen_no_sequences():
    q = torch.empty(1, 2, 0, 64, device="cuda", dtype=torch.float16)
    kc, vc = nan_caches(0, 2, 8, 64, torch.float16, "cuda")
    cu = torch.zeros(1, dtype=torch.int32, device="cuda")
    assert ak.sliding_window_prefill(q, q, q, kc, vc, window=8, cu_seqlens=cu).shape == q.shape


@requires_cuda
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_pool_equals_contiguous(varlen):
    """Pool rows named by cache_indices receive, bitwise, what the contiguous call writes into its rows; -1
    rows and rows no sequence names keep their bits; outputs bitwise the contiguous call's."""
    H, W, e, dtype, P = 2, 64, 64, torch.bfloat16, 7
    idx_list = [4, -1, 0, 6, -1]
    if varlen:
        q, k, v, cu = pack([70, 0, 130, 1, 64], H, e, dtype)
        n, kw = 5, dict(cu_seqlens=cu)
    else:
        q, k, v = (randn(5, H, 150, e, dtype=dtype, device="cuda", transposed=True) for _ in range(3))
        n, kw = 5, {}
    kc, vc = nan_caches(n, H, W, e, dtype, "cuda")
    o_contig = ak.sliding_window_prefill(q, k, v, kc, vc, window=W, **kw)
    kp = torch.randn(P, H, W, e, device="cuda").to(dtype)
    vp = torch.randn(P, H, W, e, device="cuda").to(dtype)
    kp0, vp0 = kp.clone(), vp.clone()
    idx = torch.tensor(idx_list, dtype=torch.int32, device="cuda")
    o = ak.sliding_window_prefill(q, k, v, kp, vp, window=W, cache_indices=idx, **kw)
    assert bits_equal(o, o_contig)
    exp_k, exp_v = kp0.clone(), vp0.clone()
    for i, r in enumerate(idx_list):
        if r >= 0:  # NaN slots of the contiguous rows are those the fill did not write: the pool keeps its own
            exp_k[r] = torch.where(torch.isnan(kc[i]), kp0[r], kc[i])
            exp_v[r] = torch.where(torch.isnan(vc[i]), vp0[r], vc[i])
    assert bits_equal(kp, exp_k) and bits_equal(vp, exp_v)


@requires_cuda
def test_out_of_range_index_under_graph_capture():
    """Under capture the host cannot check cache_indices: an index >= P or < -1 writes nothing to the pools
    and gives NaN for every output row of that sequence; the other sequences are as in eager mode."""
    B, H, N, W, e, P = 3, 2, 150, 16, 64, 4
    q, k, v = (randn(B, H, N, e, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    kp, vp = (torch.randn(P, H, W, e, device="cuda").to(torch.bfloat16) for _ in range(2))
    idx = torch.tensor([0, 2, 3], dtype=torch.int32, device="cuda")
    eager = ak.sliding_window_prefill(q, k, v, kp.clone(), vp.clone(), window=W, cache_indices=idx)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = ak.sliding_window_prefill(q, k, v, kp, vp, window=W, cache_indices=idx)
    for bad in (P, -5):
        idx.copy_(torch.tensor([0, bad, 3], dtype=torch.int32))
        kp.normal_()
        vp.normal_()
        k_before, v_before = kp.clone(), vp.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isnan(o[1]).all(), f"index {bad}: outputs not NaN"
        assert bits_equal(o[0], eager[0]) and bits_equal(o[2], eager[2])
        for r in (1, 2):  # rows no valid sequence names (2 was sequence 1's before): untouched
            assert bits_equal(kp[r], k_before[r]) and bits_equal(vp[r], v_before[r])


# ---- CPU: the op's reference path and every argument rule ----------------------------------------------

def test_cpu_op_matches_reference():
    q, k, v = (torch.randn(2, 3, 70, 64, dtype=torch.float64) for _ in range(3))
    kc, vc = (torch.full((2, 3, 16, 64), float("nan"), dtype=torch.float64) for _ in range(2))
    o = ak.sliding_window_prefill(q, k, v, kc, vc, window=16)
    o_ref, k_ref, v_ref = ref.sliding_window_prefill(q, k, v, torch.full_like(kc, float("nan")),
                                                     torch.full_like(vc, float("nan")), window=16)
    assert torch.equal(o, o_ref) and torch.equal(kc, k_ref) and torch.equal(vc, v_ref)


def good(varlen=False, pool=False, e=64, W=8):
    H = 2
    if varlen:
        q, k, v = (torch.randn(1, H, 10, e) for _ in range(3))
        args = dict(cu_seqlens=torch.tensor([0, 3, 3, 10], dtype=torch.int32))
        n = 3
    else:
        q, k, v = (torch.randn(2, H, 10, e) for _ in range(3))
        args, n = {}, 2
    rows = 5 if pool else n
    args.update(q=q, k=k, v=v, k_cache=torch.randn(rows, H, W, e), v_cache=torch.randn(rows, H, W, e), window=W)
    if pool:
        args["cache_indices"] = torch.tensor([4, -1, 0][:n], dtype=torch.int32)
    return args


def call(args, **override):
    a = {**args, **override}
    return ak.sliding_window_prefill(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("k_cache"), a.pop("v_cache"), **a)


I32 = torch.int32
REJECTS = [
    # (id, good() kwargs, override, exception, words the message must contain)
    ("q-rank3", {}, dict(q=torch.randn(2, 10, 64)), ValueError, ["q must have 4 dimensions"]),
    ("q-e32", {}, dict(q=torch.randn(2, 2, 10, 32)), ValueError, ["q.shape[-1] must be one of (64, 128)", "32"]),
    ("k-shape", {}, dict(k=torch.randn(2, 2, 11, 64)), ValueError, ["k.shape must be (2, 2, 10, 64)"]),
    ("v-e128", {}, dict(v=torch.randn(2, 2, 10, 128)), ValueError, ["v.shape must be (2, 2, 10, 64)"]),
    ("q-int", {}, dict(q=torch.ones(2, 2, 10, 64, dtype=I32)), TypeError, ["q.dtype must be a floating"]),
    ("k-dtype", {}, dict(k=torch.randn(2, 2, 10, 64, dtype=torch.float64)), TypeError, ["k.dtype must match"]),
    ("q-last-stride", {}, dict(q=torch.randn(2, 2, 64, 10).transpose(-1, -2)), ValueError, ["q.stride(-1)"]),
    ("window-0", {}, dict(window=0), ValueError, ["window must be in [1, 256]", "0"]),
    ("window-257", {}, dict(window=257), ValueError, ["window must be in [1, 256]", "257"]),
    ("window-float", {}, dict(window=8.0), TypeError, ["window must be an int"]),
    ("cache-window", {}, dict(window=4), ValueError, ["k_cache.shape must be (2, 2, 4, 64)"]),
    ("cache-rows", {}, dict(k_cache=torch.randn(3, 2, 8, 64)), ValueError, ["k_cache.shape[0] must be B = 2"]),
    ("v-cache-e", {}, dict(v_cache=torch.randn(2, 2, 8, 128)), ValueError, ["v_cache.shape must be (2, 2, 8, 64)"]),
    ("cache-dtype", {}, dict(v_cache=torch.randn(2, 2, 8, 64, dtype=torch.float64)), TypeError,
     ["v_cache.dtype must match q.dtype"]),
    ("scale-0", {}, dict(scale=0.0), ValueError, ["scale must be finite and > 0"]),
    ("max-without-cu", {}, dict(max_seqlen=10), ValueError, ["max_seqlen is for varlen batches"]),
    ("cu-int64", dict(varlen=True), dict(cu_seqlens=torch.tensor([0, 3, 3, 10])), TypeError,
     ["cu_seqlens.dtype must be torch.int32", "int64"]),
    ("cu-2d", dict(varlen=True), dict(cu_seqlens=torch.tensor([[0, 3, 3, 10]], dtype=I32)), ValueError,
     ["cu_seqlens.shape must be 1-D"]),
    ("cu-empty", dict(varlen=True), dict(cu_seqlens=torch.zeros(0, dtype=I32)), ValueError, ["(n + 1,)"]),
    ("cu-not-0", dict(varlen=True), dict(cu_seqlens=torch.tensor([1, 3, 3, 10], dtype=I32)), ValueError,
     ["cu_seqlens[0] must be 0", "1"]),
    ("cu-decreasing", dict(varlen=True), dict(cu_seqlens=torch.tensor([0, 4, 3, 10], dtype=I32)), ValueError,
     ["non-decreasing", "cu_seqlens[1] = 4 > cu_seqlens[2] = 3"]),
    ("cu-last", dict(varlen=True), dict(cu_seqlens=torch.tensor([0, 3, 3, 9], dtype=I32)), ValueError,
     ["cu_seqlens[-1] must equal the packed length T = 10", "9"]),
    ("cu-B2", {}, dict(cu_seqlens=torch.tensor([0, 3, 10], dtype=I32)), ValueError, ["packed as (1, H, T, .)", "got B = 2"]),
    ("cu-cache-rows", dict(varlen=True), dict(k_cache=torch.randn(2, 2, 8, 64), v_cache=torch.randn(2, 2, 8, 64)),
     ValueError, ["k_cache.shape[0] must be n (one per packed sequence) = 3"]),
    ("max-short", dict(varlen=True), dict(max_seqlen=6), ValueError, ["max_seqlen must be >= the longest", "7"]),
    ("max-negative", dict(varlen=True), dict(max_seqlen=-1), ValueError, ["max_seqlen must be >= the longest sequence", "got -1"]),
    ("too-many-heads", {}, dict(q=torch.randn(1, 65536, 1, 64).expand(2, -1, 10, -1),
                                k=torch.randn(1, 65536, 1, 64).expand(2, -1, 10, -1),
                                v=torch.randn(1, 65536, 1, 64).expand(2, -1, 10, -1)), ValueError,
     ["at most 65535 sequences and 65535 heads", "65536 heads"]),
    ("idx-int64", dict(pool=True), dict(cache_indices=torch.tensor([4, -1])), TypeError,
     ["cache_indices.dtype must be torch.int32"]),
    ("idx-length", dict(pool=True), dict(cache_indices=torch.tensor([4, -1, 0], dtype=I32)), ValueError,
     ["cache_indices.shape must be (2,)", "(3,)"]),
    ("idx-range", dict(pool=True), dict(cache_indices=torch.tensor([5, -1], dtype=I32)), ValueError,
     ["cache_indices must be -1 (padding) or a slot in [0, 5)", "got 5"]),
    ("idx-below", dict(pool=True), dict(cache_indices=torch.tensor([-2, 1], dtype=I32)), ValueError,
     ["cache_indices must be -1 (padding) or a slot in [0, 5)", "got -2"]),
    ("idx-dup", dict(pool=True), dict(cache_indices=torch.tensor([3, 3], dtype=I32)), ValueError,
     ["cache_indices must not repeat a slot", "slot 3 at rows"]),
    ("idx-varlen-length", dict(varlen=True, pool=True), dict(cache_indices=torch.tensor([4, -1], dtype=I32)),
     ValueError, ["cache_indices.shape must be (3,)"]),
]


@pytest.mark.parametrize("base,override,exc,words", [pytest.param(*r[1:], id=r[0]) for r in REJECTS])
def test_rejects(base, override, exc, words):
    args = good(**base)
    kc, vc = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(exc) as info:
        call(args, **override)
    msg = str(info.value)
    assert msg.startswith("sliding_window_prefill: "), msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert torch.equal(args["k_cache"], kc) and torch.equal(args["v_cache"], vc), "written on error"


@pytest.mark.parametrize("base", [{}, dict(varlen=True), dict(pool=True), dict(varlen=True, pool=True)],
                         ids=["dense", "varlen", "pool", "varlen-pool"])
def test_accepts(base):
    args = good(**base)
    assert call(args).shape == args["q"].shape


def test_accepts_padding_repeated_and_empty_inputs():
    call(good(pool=True), cache_indices=torch.tensor([-1, -1], dtype=I32))
    q = torch.randn(1, 2, 0, 64)
    call(dict(q=q, k=q, v=q, k_cache=torch.randn(1, 2, 8, 64), v_cache=torch.randn(1, 2, 8, 64), window=8))
    call(dict(q=q, k=q, v=q, k_cache=torch.randn(0, 2, 8, 64), v_cache=torch.randn(0, 2, 8, 64), window=8,
              cu_seqlens=torch.zeros(1, dtype=I32)))


@requires_cuda
@pytest.mark.parametrize("name", ["k_cache", "cu_seqlens", "cache_indices"])
def test_rejects_other_device(name):
    base = dict(varlen=name == "cu_seqlens", pool=name == "cache_indices")
    args = {key: (val.to(torch.bfloat16) if val.is_floating_point() else val) if isinstance(val, torch.Tensor) else val
            for key, val in good(**base).items()}  # CUDA takes only fp16 / bf16: only the device may be wrong
    args = {key: (val.cuda() if isinstance(val, torch.Tensor) and key != name else val) for key, val in args.items()}
    with pytest.raises((TypeError, ValueError), match=f"{name}"):
        call(args)


@requires_cuda
def test_rejects_float32_on_cuda():
    args = {key: (val.cuda() if isinstance(val, torch.Tensor) else val) for key, val in good().items()}
    with pytest.raises(TypeError, match="torch.float16 or torch.bfloat16 on CUDA"):
        call(args)
