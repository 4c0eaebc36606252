"""Bad input to the serving variants gets a clear error before any launch (issues 16, 17): cu_seqlens and
max_seqlen of varlen based_prefill, state pools (based_prefill, based_decode) and cache pools
(sliding_window_decode), and index values read once per version of their tensor. CPU, with CUDA-only checks
marked. The shared cases and helpers are test_validation.py's."""
import pytest
import torch

import attn_kernels as ak
from harness import requires_cuda
from test_validation import I32, B, H, _check, call, good_prefill, good_swd_pooled, t

P = 5  # pool slots of the pooled decode cases


def good_varlen():
    """Three sequences (2, 0 and 5 tokens) packed along T = 7."""
    return dict(q=torch.randn(1, H, 7, 16), k=torch.randn(1, H, 7, 16), v=torch.randn(1, H, 7, 64),
                cu_seqlens=torch.tensor([0, 2, 2, 7], dtype=torch.int32))


def _cu(*vals, dtype=torch.int32):
    return torch.tensor(vals, dtype=dtype)


VARLEN = [
    ("cu-int64", dict(cu_seqlens=_cu(0, 2, 2, 7, dtype=torch.int64)), TypeError,
     ["cu_seqlens.dtype must be torch.int32", "torch.int64"]),
    ("cu-list", dict(cu_seqlens=[0, 2, 2, 7]), TypeError, ["cu_seqlens must be a torch.Tensor", "list"]),
    ("cu-rank2", dict(cu_seqlens=_cu(0, 2, 2, 7).view(2, 2)), ValueError,
     ["cu_seqlens.shape must be 1-D", "(2, 2)"]),
    ("cu-empty", dict(cu_seqlens=_cu()), ValueError, ["cu_seqlens.shape must be (n + 1,) with n >= 0", "(0,)"]),
    ("cu-start", dict(cu_seqlens=_cu(1, 2, 2, 7)), ValueError, ["cu_seqlens[0] must be 0", "got 1"]),
    ("cu-decreasing", dict(cu_seqlens=_cu(0, 3, 2, 7)), ValueError,
     ["cu_seqlens must be non-decreasing", "cu_seqlens[1] = 3 > cu_seqlens[2] = 2"]),
    ("cu-last", dict(cu_seqlens=_cu(0, 2, 2, 6)), ValueError,
     ["cu_seqlens[-1] must equal the packed length T = 7", "got 6"]),
    ("cu-B2", dict(q=torch.randn(2, H, 7, 16), k=torch.randn(2, H, 7, 16), v=torch.randn(2, H, 7, 64)),
     ValueError, ["packed as (1, H, T, .)", "B = 2"]),
    ("max-seqlen-short", dict(max_seqlen=4), ValueError, ["max_seqlen must be >= the longest sequence (5)", "got 4"]),
    ("max-seqlen-float", dict(max_seqlen=5.0), TypeError, ["max_seqlen must be an int", "float"]),
    ("max-seqlen-zero", dict(max_seqlen=0), ValueError, ["max_seqlen must be >= the longest sequence", "got 0"]),
    ("state-per-sequence", dict(initial_state=(torch.zeros(1, H, 153, 64), torch.zeros(1, H, 153))), ValueError,
     ["initial_state[0] (S).shape must be (3, 3, 153, 64)", "(1, 3, 153, 64)"]),
]


@pytest.mark.parametrize("override,exc,words", [pytest.param(*c[1:], id=c[0]) for c in VARLEN])
def test_based_prefill_varlen_rejects(override, exc, words):
    _check(ak.based_prefill, good_varlen, override, exc, words)


def _prefill_pool(P=4, **kw):
    return (torch.zeros(P, H, 153, 64, **kw), torch.zeros(P, H, 153, **kw))


PREFILL_POOL = [
    ("pool-alone", dict(state_indices=None), ValueError, ["state (a pool) and state_indices go together", "state alone"]),
    ("indices-alone", dict(state=None), ValueError, ["go together", "state_indices alone"]),
    ("with-return-state", dict(return_state=True), ValueError, ["pass return_state=False"]),
    ("pool-H", dict(state=(torch.zeros(4, H + 1, 153, 64), torch.zeros(4, H + 1, 153))), ValueError,
     ["state[0] (S).shape must be (4, 3, 153, 64)", "(4, 4, 153, 64)"]),
    ("pool-P-differs", dict(state=(torch.zeros(4, H, 153, 64), torch.zeros(5, H, 153))), ValueError,
     ["state[1] (z).shape must be (4, 3, 153)", "(5, 3, 153)"]),
    ("pool-strided", dict(state=(torch.zeros(8, H, 153, 64)[::2], torch.zeros(4, H, 153))), ValueError,
     ["state[0] (S) must be contiguous to be updated in place"]),
    ("indices-int64", dict(state_indices=torch.tensor([0, 1], dtype=torch.int64)), TypeError,
     ["state_indices.dtype must be torch.int32", "torch.int64"]),
    ("indices-short", dict(state_indices=torch.tensor([0], dtype=torch.int32)), ValueError,
     ["state_indices.shape must be (2,)", "(1,)"]),
    ("index-equals-P", dict(state_indices=torch.tensor([0, 4], dtype=torch.int32)), ValueError,
     ["state_indices must be -1 (padding) or a slot in [0, 4)", "got 4 at row 1"]),
    ("index-duplicate", dict(state_indices=torch.tensor([2, 2], dtype=torch.int32)), ValueError,
     ["state_indices must not repeat a slot", "slot 2 at rows [0, 1]"]),
]


@pytest.mark.parametrize("override,exc,words", [pytest.param(*c[1:], id=c[0]) for c in PREFILL_POOL])
def test_based_prefill_pool_rejects(override, exc, words):
    def good():
        return dict(good_prefill(), state=_prefill_pool(), state_indices=torch.tensor([3, -1], dtype=torch.int32))
    _check(ak.based_prefill, good, override, exc, words)


def test_based_prefill_max_seqlen_needs_cu_seqlens():
    _check(ak.based_prefill, good_prefill, dict(max_seqlen=5), ValueError, ["max_seqlen is for varlen batches"])


def test_based_prefill_varlen_accepts_empty_batches():
    """n = 0 (cu_seqlens = [0]) and all-empty sequences (T = 0) are valid: no rows, states as given."""
    q, k, v = torch.randn(1, H, 0, 16), torch.randn(1, H, 0, 16), torch.randn(1, H, 0, 64)
    o, (S, z) = ak.based_prefill(q, k, v, cu_seqlens=_cu(0), return_state=True)
    assert o.shape == (1, H, 0, 64) and S.shape == (0, H, 153, 64) and z.shape == (0, H, 153)
    init = (torch.rand(2, H, 153, 64), torch.rand(2, H, 153))
    o, (S, z) = ak.based_prefill(q, k, v, cu_seqlens=_cu(0, 0, 0), initial_state=init, return_state=True)
    assert torch.equal(S, init[0]) and torch.equal(z, init[1])


def good_pooled():
    pool = (torch.randn(P, H, 153, 64), torch.rand(P, H, 153) + 1)
    return dict(q=torch.randn(B, H, 16), k=torch.randn(B, H, 16), v=torch.randn(B, H, 64), state=pool,
                state_indices=torch.tensor([3, -1], dtype=torch.int32))


def idx(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


POOLED = [
    ("idx-list", dict(state_indices=[3, -1]), TypeError, ["state_indices must be a torch.Tensor", "list"]),
    ("idx-int64", dict(state_indices=idx(3, -1, dtype=torch.int64)), TypeError,
     ["state_indices.dtype must be torch.int32", "torch.int64"]),
    ("idx-float", dict(state_indices=idx(3.0, 1.0, dtype=torch.float32)), TypeError,
     ["state_indices.dtype must be torch.int32", "torch.float32"]),
    ("idx-length", dict(state_indices=idx(3, -1, 0)), ValueError, ["state_indices.shape must be (2,)", "(3,)"]),
    ("idx-2d", dict(state_indices=idx(3, -1).view(1, 2)), ValueError, ["state_indices.shape must be (2,)", "(1, 2)"]),
    ("idx-equals-P", dict(state_indices=idx(0, 5)), ValueError,
     ["state_indices must be -1 (padding) or a slot in [0, 5)", "got 5 at row 1"]),
    ("idx-below-minus-one", dict(state_indices=idx(-2, 0)), ValueError,
     ["state_indices must be -1 (padding) or a slot in [0, 5)", "got -2 at row 0"]),
    ("idx-duplicate", dict(state_indices=idx(4, 4)), ValueError,
     ["state_indices must not repeat a slot", "slot 4 at rows [0, 1]"]),
    ("pool-z-rows-differ", dict(state=(torch.zeros(P, H, 153, 64), torch.zeros(P + 1, H, 153))), ValueError,
     ["state[1] (z).shape must be (5, 3, 153)", "(6, 3, 153)"]),
    ("pool-S-wrong-F", dict(state=(torch.zeros(P, H, 152, 64), torch.zeros(P, H, 153))), ValueError,
     ["state[0] (S).shape must be (5, 3, 153, 64)", "(5, 3, 152, 64)"]),
    ("pool-H-differs", dict(state=(torch.zeros(P, H + 1, 153, 64), torch.zeros(P, H + 1, 153))), ValueError,
     ["state[0] (S).shape must be (5, 3, 153, 64)"]),
    ("pool-dtypes-differ", dict(state=(torch.zeros(P, H, 153, 64), torch.zeros(P, H, 153).bfloat16())), TypeError,
     ["state[1] (z).dtype must match state[0] (S).dtype torch.float32", "torch.bfloat16"]),
    ("pool-noncontiguous", dict(state=(torch.zeros(P, H, 153, 64), torch.zeros(H, P, 153).transpose(0, 1))),
     ValueError, ["state[1] (z) must be contiguous to be updated in place"]),
]

SWD_POOLED = [
    ("indices-list", dict(cache_indices=[3, 0]), TypeError, ["cache_indices must be a torch.Tensor", "list"]),
    ("indices-int64", dict(cache_indices=torch.tensor([3, 0])), TypeError,
     ["cache_indices.dtype must be torch.int32", "torch.int64"]),
    ("indices-float", dict(cache_indices=torch.tensor([3.0, 0.0])), TypeError, ["cache_indices.dtype must be"]),
    ("indices-length", dict(cache_indices=torch.tensor([3, 0, 1], **I32)), ValueError,
     ["cache_indices.shape must be (2,)", "(3,)"]),
    ("indices-2d", dict(cache_indices=torch.tensor([[3, 0]], **I32)), ValueError,
     ["cache_indices.shape must be (2,)", "(1, 2)"]),
    ("index-equals-P", dict(cache_indices=torch.tensor([3, 5], **I32)), ValueError,
     ["cache_indices must be -1 (padding) or a slot in [0, 5)", "got 5 at row 1"]),
    ("index-below-minus-one", dict(cache_indices=torch.tensor([-2, 0], **I32)), ValueError,
     ["cache_indices must be -1 (padding) or a slot in [0, 5)", "got -2 at row 0"]),
    ("index-duplicate", dict(cache_indices=torch.tensor([4, 4], **I32)), ValueError,
     ["cache_indices must not repeat a slot", "slot 4 at rows [0, 1]"]),
    ("v-pool-P-differs", dict(v_cache=t(4, H, 8, 64)), ValueError,
     ["v_cache.shape must be (5, 3, 8, 64)", "(4, 3, 8, 64)"]),
    ("k-pool-H-differs", dict(k_cache=t(5, H + 1, 8, 64)), ValueError, ["k_cache.shape must be (5, 3, 8, 64)"]),
    ("pool-window-differs", dict(window=16), ValueError,
     ["k_cache.shape must be (5, 3, 16, 64)", "(5, 3, 8, 64)"]),
    ("pool-e-differs", dict(v_cache=t(5, H, 8, 128)), ValueError, ["v_cache.shape must be (5, 3, 8, 64)"]),
    ("pool-empty", dict(k_cache=t(0, H, 8, 64), v_cache=t(0, H, 8, 64)), ValueError,
     ["k_cache must not be empty"]),
    ("pool-rank3", dict(k_cache=t(5, H, 8)), ValueError, ["k_cache must have 4 dimensions"]),
    ("pool-dtype", dict(v_cache=t(5, H, 8, 64, dtype=torch.float16)), TypeError,
     ["v_cache.dtype must match q.dtype"]),
    ("live-position-negative", dict(positions=torch.tensor([3, -1], **I32)), ValueError,
     ["positions must be >= 0", "got -1"]),
]


@pytest.mark.parametrize("override,exc,words", [pytest.param(*c[1:], id=c[0]) for c in POOLED])
def test_based_decode_pooled_rejects(override, exc, words):
    _check(ak.based_decode, good_pooled, override, exc, words)


@pytest.mark.parametrize("bad", [idx(0, 5), idx(-2, 0), idx(4, 4)], ids=["idx-equals-P", "idx-below-minus-one",
                                                                       "idx-duplicate"])
def test_pool_untouched_when_indices_rejected(bad):
    args = good_pooled()
    before = tuple(t.clone() for t in args["state"])
    with pytest.raises(ValueError, match="state_indices"):
        call(ak.based_decode, args, state_indices=bad)
    assert all(torch.equal(t, b) for t, b in zip(args["state"], before))


def test_pooled_indices_may_repeat_padding_and_leave_slots_unnamed():
    args = good_pooled()
    before = tuple(t.clone() for t in args["state"])
    o = call(ak.based_decode, args, state_indices=idx(-1, -1))
    assert (o == 0).all() and all(torch.equal(t, b) for t, b in zip(args["state"], before))


@pytest.mark.parametrize("override,exc,words", [pytest.param(*c[1:], id=c[0]) for c in SWD_POOLED])
def test_sliding_window_decode_pooled_rejects(override, exc, words):
    _check(ak.sliding_window_decode, good_swd_pooled, override, exc, words)


def test_pooled_padding_rows_may_repeat_and_have_any_position():
    """-1 may repeat, and a padding row's position is ignored (also by the host check); a pool may be smaller
    than the batch. Output zeros there, pools untouched."""
    args = good_swd_pooled(P=1)
    k_pool, v_pool = args["k_cache"].clone(), args["v_cache"].clone()
    o = call(ak.sliding_window_decode, args, cache_indices=torch.tensor([-1, -1], **I32),
             positions=torch.tensor([-4, 2], **I32))
    assert torch.equal(o, torch.zeros_like(o))
    assert torch.equal(args["k_cache"], k_pool) and torch.equal(args["v_cache"], v_pool)


@requires_cuda
@pytest.mark.parametrize("where", ["cpu-indices", "cpu-pool"])
def test_pooled_device_mismatch_rejected(where):
    args = {n: (a.cuda().bfloat16() if n in ("q", "k", "v") else a) for n, a in good_pooled().items()}
    if where == "cpu-pool":
        args["state_indices"] = args["state_indices"].cuda()
        exc, words = ValueError, ["state must be on the inputs' device cuda:0"]
    else:
        args["state"] = tuple(t.cuda() for t in args["state"])
        exc, words = TypeError, ["state_indices must be on the inputs' device cuda:0", "got cpu"]
    _check(ak.based_decode, lambda: args, {}, exc, words)


@requires_cuda
def test_cache_indices_on_another_device_rejected():
    _check(ak.sliding_window_decode, good_swd_pooled, dict(cache_indices=torch.tensor([3, 0], **I32).cuda()),
           TypeError, ["cache_indices must be on the inputs' device cpu", "cuda:0"])


@requires_cuda
def test_pooled_values_are_checked_on_cuda_too():
    """Outside graph capture the host reads CUDA indices as well (the kernel's NaN rule is for capture)."""
    args = {n: a.cuda().bfloat16() if a.is_floating_point() else a.cuda() for n, a in good_swd_pooled().items()
            if isinstance(a, torch.Tensor)}
    bad = dict(cache_indices=torch.tensor([3, 7], **I32).cuda())
    _check(ak.sliding_window_decode, lambda: dict(args, window=8), bad, ValueError,
           ["cache_indices must be -1 (padding) or a slot in [0, 5)", "got 7 at row 1"])


def test_index_values_are_read_once_per_version(monkeypatch):
    """A model calls its ops with the same index tensors in every layer: their values are read (a sync) once,
    and again after PyTorch changes them in place; inference tensors (no version counter) are read each time."""
    from attn_kernels import _validate

    reads = []
    real = _validate.cu_seqlens_values
    monkeypatch.setattr(_validate, "cu_seqlens_values", lambda *a: reads.append(1) or real(*a))
    args = good_varlen()
    for _ in range(3):
        call(ak.based_prefill, args)
    assert len(reads) == 1
    args["cu_seqlens"][1] = 9  # in place: the next call reads (and refuses) it
    with pytest.raises(ValueError, match="non-decreasing"):
        call(ak.based_prefill, args)
    with torch.inference_mode():
        cu = torch.tensor([0, 2, 2, 7], dtype=torch.int32)
    for _ in range(2):
        call(ak.based_prefill, dict(args, cu_seqlens=cu))
    assert len(reads) == 4


def test_good_serving_calls_pass():
    """The templates above are valid: each rejection is due to its one override."""
    call(ak.based_prefill, good_varlen())
    call(ak.based_decode, good_pooled())
    call(ak.sliding_window_decode, good_swd_pooled())
