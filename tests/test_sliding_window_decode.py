"""sliding_window_decode against the float64 reference: output and both caches, positions before and after
the ring buffer wraps, mixed in one batch; slots not yet written holding NaN / inf / huge values (a server's
torch.empty cache) never reach the output; step-by-step decoding against full-sequence attention and against
PyTorch's bundled FlashAttention-2."""
import pytest
import torch

import attn_kernels as ak
from attn_kernels import reference as ref
from harness import DTYPE_IDS, assert_close_rule, assert_written, nbytes, poison_allocator, randn, requires_cuda


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


def decode_steps(q, k, v, window):
    """Decode the whole sequence token by token from caches that start as NaN (torch.empty garbage: the slots
    not yet written must never be read); (B, H, N, e)."""
    B, H, N, e = q.shape
    k_cache, v_cache = (torch.full((B, H, window, e), float("nan"), device=q.device, dtype=q.dtype)
                        for _ in range(2))
    steps = []
    for t in range(N):
        pos = torch.full((B,), t, dtype=torch.int32, device=q.device)
        steps.append(ak.sliding_window_decode(q[:, :, t], k[:, :, t], v[:, :, t], k_cache, v_cache, pos,
                                              window=window))
    return torch.stack(steps, 2)


@requires_cuda
@pytest.mark.parametrize("W,e", [(16, 64), (64, 128)])
def test_step_by_step_equals_full_sliding_window_attention(W, e):
    """3W steps of decode == full-sequence causal sliding-window attention at every step (the rule)."""
    B, H, N = 2, 4, 3 * W
    q, k, v = (torch.randn(B, H, N, e, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    full64 = ref.sliding_window_attention(q.double(), k.double(), v.double(), window=W)
    full_lp = ref.sliding_window_attention(q, k, v, window=W)
    assert_close_rule("decode steps", decode_steps(q, k, v, W), full64, full_lp)


@requires_cuda
@pytest.mark.parametrize("W,e", [(16, 64), (64, 128)])
def test_step_by_step_equals_flash_attention_2(W, e):
    """An independent implementation of the same semantics: PyTorch's bundled FlashAttention-2 forward with
    window (W-1, 0). FA2 must agree with the float64 reference, and the decode steps with FA2 (FA2's output as
    the reference of the rule). Skipped, with the reason, only where this torch build cannot run it."""
    B, H, N = 2, 4, 3 * W
    q, k, v = (torch.randn(B, H, N, e, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fa2 = flash_attention_window(q, k, v, W)
    full64 = ref.sliding_window_attention(q.double(), k.double(), v.double(), window=W)
    full_lp = ref.sliding_window_attention(q, k, v, window=W)
    assert_close_rule("FA2 vs the float64 reference", fa2, full64, full_lp)
    assert_close_rule("decode steps vs FA2", decode_steps(q, k, v, W), fa2, full_lp)


def flash_attention_window(q, k, v, window):
    """PyTorch's bundled FlashAttention-2 forward with window (window-1, 0), (B, H, N, e). pytest.skip where
    this torch build has no FA2 kernels or its aten::_flash_attention_forward takes no window; any other error
    propagates (a failure, never a silent pass)."""
    if not torch.backends.cuda.is_flash_attention_available():
        pytest.skip("this torch build has no FlashAttention-2 kernels "
                    "(torch.backends.cuda.is_flash_attention_available() is False)")
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    if "window_size_left" not in schema:
        pytest.skip(f"this torch's aten::_flash_attention_forward has no window_size_left: {schema}")
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # FA layout (B, N, H, e)
    out = torch.ops.aten._flash_attention_forward(qt, kt, vt, None, None, q.shape[2], k.shape[2], 0.0, True, False,
                                                  window_size_left=window - 1, window_size_right=0)
    return out[0].transpose(1, 2)


UNWRITTEN = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": None}  # None: finfo.max


def run_unwritten_slots(device, W, e, dtype, fill):
    """Slots no position <= p has written (p < W - 1: slots p+1 .. W-1) hold `fill`; nothing may depend on
    them: o is bitwise the o from caches with those slots zeroed, and within the rule of the float64 reference
    computed from the clean caches; the op writes exactly slot p % W and leaves every other slot's bits."""
    positions = sorted({0, 1, W // 2, max(W - 2, 0), W - 1, W + 3})
    B, H = len(positions), 3
    pos = torch.tensor(positions, dtype=torch.int32, device=device)
    q, kn, vn = (randn(B, H, e, dtype=dtype, device=device) for _ in range(3))
    clean = [randn(B, H, W, e, dtype=dtype, device=device) for _ in range(2)]
    value = torch.finfo(dtype).max if UNWRITTEN[fill] is None else UNWRITTEN[fill]
    for cache in clean:
        for b, p in enumerate(positions):
            cache[b, :, p + 1:] = 0
    poisoned = [c.clone() for c in clean]
    for cache in poisoned:
        for b, p in enumerate(positions):
            cache[b, :, p + 1:] = value
    before, clean_before = [c.clone() for c in poisoned], [c.clone() for c in clean]
    o = ak.sliding_window_decode(q, kn, vn, *poisoned, pos, window=W)
    o_clean = ak.sliding_window_decode(q, kn, vn, *clean, pos, window=W)
    assert_written(f"o with unwritten slots = {fill}", o)
    assert torch.equal(o, o_clean), f"o depends on the unwritten slots ({fill})"
    o64, _, _ = ref.sliding_window_decode(q.double(), kn.double(), vn.double(), *(c.double() for c in clean_before),
                                          pos, window=W)
    o_lp, _, _ = ref.sliding_window_decode(q, kn, vn, *clean_before, pos, window=W)
    assert_close_rule(f"o (unwritten slots = {fill})", o, o64, o_lp)
    for name, cache, old, new in (("k_cache", poisoned[0], before[0], kn), ("v_cache", poisoned[1], before[1], vn)):
        expected = old.clone()
        expected[torch.arange(B, device=device), :, pos.long() % W] = new
        bits = torch.int16
        assert torch.equal(cache.view(bits), expected.view(bits)), f"{name}: wrong slot written or others changed"


@requires_cuda
@pytest.mark.parametrize("fill", list(UNWRITTEN))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("W,e", [(16, 64), (64, 128), (256, 64)], ids=["W16-e64", "W64-e128", "W256-e64"])
def test_unwritten_slots_never_reach_the_output(W, e, dtype, fill):
    run_unwritten_slots("cuda", W, e, dtype, fill)


@pytest.mark.parametrize("fill", list(UNWRITTEN))
def test_cpu_unwritten_slots_never_reach_the_output(fill):
    run_unwritten_slots("cpu", 8, 64, torch.bfloat16, fill)


@pytest.mark.parametrize("fill", list(UNWRITTEN))
def test_reference_ignores_unwritten_slots(fill):
    """reference.sliding_window_decode itself (float64): the unwritten slots' values are masked, not only
    their scores (0 * NaN is NaN)."""
    B, H, W, e = 3, 2, 8, 64
    pos = torch.tensor([0, 3, 6], dtype=torch.int32)
    q, kn, vn = (torch.randn(B, H, e, dtype=torch.float64) for _ in range(3))
    clean = [torch.randn(B, H, W, e, dtype=torch.float64) for _ in range(2)]
    value = torch.finfo(torch.float64).max if UNWRITTEN[fill] is None else UNWRITTEN[fill]
    poisoned = [c.clone() for c in clean]
    for c in poisoned:
        for b, p in enumerate(pos.tolist()):
            c[b, :, p + 1:] = value
    o, k_out, v_out = ref.sliding_window_decode(q, kn, vn, *poisoned, pos, window=W)
    o_clean, _, _ = ref.sliding_window_decode(q, kn, vn, *clean, pos, window=W)
    assert torch.equal(o, o_clean)
    assert torch.equal(k_out[torch.arange(B), :, pos.long()], kn)


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
