"""Bad input gets a clear error before any launch: the op, the argument, expected and actual value.
These run on the CPU (the checks are the same code on every device); CUDA-only checks at the end."""
import math

import pytest
import torch

import attn_kernels as ak
from harness import requires_cuda

B, H, N = 2, 3, 5


def good_prefill():
    return dict(q=torch.randn(B, H, N, 16), k=torch.randn(B, H, N, 16), v=torch.randn(B, H, N, 64))


def good_decode():
    return dict(q=torch.randn(B, H, 16), k=torch.randn(B, H, 16), v=torch.randn(B, H, 64),
                state=ak.empty_state(B, H))


def good_swd(e=64, W=8):
    return dict(q=torch.randn(B, H, e), k_new=torch.randn(B, H, e), v_new=torch.randn(B, H, e),
                k_cache=torch.randn(B, H, W, e), v_cache=torch.randn(B, H, W, e),
                positions=torch.tensor([0, 9], dtype=torch.int32), window=W)


def good_swd_pooled(P=5):
    """Pools of P = 5 rows for B = 2 sequences: rows 3 and 0."""
    return dict(good_swd(), k_cache=torch.randn(P, H, 8, 64), v_cache=torch.randn(P, H, 8, 64),
                cache_indices=torch.tensor([3, 0], dtype=torch.int32))


def call(op, args, **override):
    args = {**args, **override}
    if op is ak.based_prefill:
        return op(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    if op is ak.based_decode:
        return op(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("state"), **args)
    names = ("q", "k_new", "v_new", "k_cache", "v_cache", "positions")
    positional = [args.pop(n) for n in names]
    return op(*positional, **args)


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


S_OK = torch.zeros(B, H, 153, 64)
Z_OK = torch.zeros(B, H, 153)

PREFILL = [
    # (id, override, exception, words the message must contain)
    ("q-not-tensor", dict(q=[[1.0]]), TypeError, ["q must be a torch.Tensor", "list"]),
    ("q-rank3", dict(q=t(B, N, 16)), ValueError, ["q must have 4 dimensions", "got 3"]),
    ("q-d32", dict(q=t(B, H, N, 32)), ValueError, ["q.shape[-1] must be 16", "got 32"]),
    ("k-d8", dict(k=t(B, H, N, 8)), ValueError, ["k.shape[-1] must be 16", "got 8"]),
    ("v-e128", dict(v=t(B, H, N, 128)), ValueError, ["v.shape[-1] must be 64", "got 128"]),
    ("k-N-differs", dict(k=t(B, H, N + 1, 16)), ValueError, ["k.shape must be (2, 3, 5, 16)", "(2, 3, 6, 16)"]),
    ("v-B-differs", dict(v=t(B + 1, H, N, 64)), ValueError, ["v.shape must be (2, 3, 5, 64)", "(3, 3, 5, 64)"]),
    ("v-H-differs", dict(v=t(B, H + 1, N, 64)), ValueError, ["v.shape must be (2, 3, 5, 64)"]),
    ("N-zero", dict(q=t(B, H, 0, 16), k=t(B, H, 0, 16), v=t(B, H, 0, 64)), ValueError, ["q must not be empty"]),
    ("q-int", dict(q=torch.ones(B, H, N, 16, dtype=torch.int32)), TypeError, ["q.dtype must be a floating", "int32"]),
    ("k-dtype-differs", dict(k=t(B, H, N, 16, dtype=torch.float64)), TypeError,
     ["k.dtype must match q.dtype torch.float32", "torch.float64"]),
    ("v-dtype-differs", dict(v=t(B, H, N, 64, dtype=torch.bfloat16)), TypeError, ["v.dtype must match q.dtype"]),
    ("q-last-stride", dict(q=t(B, H, 16, N).transpose(2, 3)), ValueError, ["q.stride(-1) must be 1", "got 5"]),
    ("scale-nan", dict(scale=math.nan), ValueError, ["scale must be finite and > 0", "nan"]),
    ("scale-inf", dict(scale=math.inf), ValueError, ["scale must be finite and > 0", "inf"]),
    ("scale-negative", dict(scale=-0.25), ValueError, ["scale must be finite and > 0", "-0.25"]),
    ("scale-zero", dict(scale=0.0), ValueError, ["scale must be finite and > 0", "0.0"]),
    ("scale-str", dict(scale="0.25"), TypeError, ["scale must be a real number", "str"]),
    ("scale-tensor", dict(scale=torch.tensor(0.25)), TypeError, ["scale must be a real number", "Tensor"]),
    ("eps-negative", dict(eps=-1e-6), ValueError, ["eps must be finite and >= 0", "-1e-06"]),
    ("eps-nan", dict(eps=math.nan), ValueError, ["eps must be finite and >= 0"]),
    ("normalize-int", dict(normalize=1), TypeError, ["normalize must be a bool", "int"]),
    ("return_state-str", dict(return_state="yes"), TypeError, ["return_state must be a bool", "str"]),
    ("state-not-tuple", dict(initial_state=S_OK), TypeError, ["initial_state must be a tuple (S, z)", "Tensor"]),
    ("state-len3", dict(initial_state=(S_OK, Z_OK, Z_OK)), TypeError, ["initial_state must be a tuple", "length 3"]),
    ("state-S-shape", dict(initial_state=(torch.zeros(B, H, 273, 64), Z_OK)), ValueError,
     ["initial_state[0] (S).shape must be (2, 3, 153, 64)", "(2, 3, 273, 64)"]),
    ("state-z-shape", dict(initial_state=(S_OK, torch.zeros(B, H, 152))), ValueError,
     ["initial_state[1] (z).shape must be (2, 3, 153)", "(2, 3, 152)"]),
    ("state-B-differs", dict(initial_state=(torch.zeros(1, H, 153, 64), torch.zeros(1, H, 153))), ValueError,
     ["initial_state[0] (S).shape must be (2, 3, 153, 64)"]),
    ("state-dtypes-differ", dict(initial_state=(S_OK, Z_OK.double())), TypeError,
     ["initial_state[1] (z).dtype must match", "torch.float64"]),
    ("state-int", dict(initial_state=(S_OK.int(), Z_OK)), TypeError, ["initial_state[0] (S).dtype must be a floating"]),
]

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


DECODE = [
    ("q-rank4", dict(q=t(B, H, 1, 16)), ValueError, ["q must have 3 dimensions", "got 4"]),
    ("q-d15", dict(q=t(B, H, 15)), ValueError, ["q.shape[-1] must be 16", "got 15"]),
    ("k-B-differs", dict(k=t(B + 1, H, 16)), ValueError, ["k.shape must be (2, 3, 16)", "(3, 3, 16)"]),
    ("v-H-differs", dict(v=t(B, H + 1, 64)), ValueError, ["v.shape must be (2, 3, 64)", "(2, 4, 64)"]),
    ("v-e32", dict(v=t(B, H, 32)), ValueError, ["v.shape[-1] must be 64", "got 32"]),
    ("k-dtype-differs", dict(k=t(B, H, 16, dtype=torch.float16)), TypeError, ["k.dtype must match q.dtype"]),
    ("state-none", dict(state=None), TypeError, ["state must be a tuple (S, z)", "NoneType"]),
    ("state-S-wrong-F", dict(state=(torch.zeros(B, H, 273, 64), Z_OK)), ValueError,
     ["state[0] (S).shape must be (2, 3, 153, 64)", "(2, 3, 273, 64)"]),
    ("state-z-wrong-B", dict(state=(S_OK.clone(), torch.zeros(1, H, 153))), ValueError,
     ["state[1] (z).shape must be (2, 3, 153)", "(1, 3, 153)"]),
    ("state-dtypes-differ", dict(state=(S_OK.clone(), Z_OK.bfloat16())), TypeError,
     ["state[1] (z).dtype must match state[0] (S).dtype torch.float32", "torch.bfloat16"]),
    ("state-S-noncontiguous", dict(state=(torch.zeros(B, H, 64, 153).transpose(2, 3), Z_OK.clone())), ValueError,
     ["state[0] (S).stride(-1) must be 1"]),
    ("state-z-noncontiguous", dict(state=(S_OK.clone(), torch.zeros(H, B, 153).transpose(0, 1))), ValueError,
     ["state[1] (z) must be contiguous to be updated in place"]),
    ("scale-negative", dict(scale=-1.0), ValueError, ["scale must be finite and > 0"]),
    ("eps-str", dict(eps="1e-6"), TypeError, ["eps must be a real number"]),
    ("normalize-none", dict(normalize=None), TypeError, ["normalize must be a bool", "NoneType"]),
]

P = 5  # pool slots of the pooled decode cases


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

SWD = [
    ("q-e96", dict(q=t(B, H, 96)), ValueError, ["q.shape[-1] must be one of (64, 128)", "got 96"]),
    ("k_new-shape", dict(k_new=t(B, H + 1, 64)), ValueError, ["k_new.shape must be (2, 3, 64)", "(2, 4, 64)"]),
    ("v_new-rank", dict(v_new=t(B, H, 1, 64)), ValueError, ["v_new must have 3 dimensions"]),
    ("window-zero", dict(window=0), ValueError, ["window must be in [1, 256]", "got 0"]),
    ("window-too-big", dict(window=257), ValueError, ["window must be in [1, 256]", "got 257"]),
    ("window-float", dict(window=8.0), TypeError, ["window must be an int", "float"]),
    ("window-not-cache", dict(window=16), ValueError, ["k_cache.shape must be (2, 3, 16, 64)", "(2, 3, 8, 64)"]),
    ("k_cache-e-differs", dict(k_cache=t(B, H, 8, 128)), ValueError, ["k_cache.shape must be (2, 3, 8, 64)"]),
    ("v_cache-B-differs", dict(v_cache=t(B + 1, H, 8, 64)), ValueError, ["v_cache.shape must be (2, 3, 8, 64)"]),
    ("k_cache-dtype", dict(k_cache=t(B, H, 8, 64, dtype=torch.float64)), TypeError,
     ["k_cache.dtype must match q.dtype"]),
    ("v_cache-last-stride", dict(v_cache=t(B, H, 64, 8).transpose(2, 3)), ValueError, ["v_cache.stride(-1) must be 1"]),
    ("positions-list", dict(positions=[0, 1]), TypeError, ["positions must be a torch.Tensor", "list"]),
    ("positions-int64", dict(positions=torch.tensor([0, 1])), TypeError,
     ["positions.dtype must be torch.int32", "torch.int64"]),
    ("positions-float", dict(positions=torch.tensor([0.0, 1.0])), TypeError, ["positions.dtype must be torch.int32"]),
    ("positions-length", dict(positions=torch.tensor([0, 1, 2], dtype=torch.int32)), ValueError,
     ["positions.shape must be (2,)", "(3,)"]),
    ("positions-2d", dict(positions=torch.tensor([[0, 1]], dtype=torch.int32)), ValueError,
     ["positions.shape must be (2,)", "(1, 2)"]),
    ("positions-negative", dict(positions=torch.tensor([3, -1], dtype=torch.int32)), ValueError,
     ["positions must be >= 0", "got -1"]),
    ("scale-nan", dict(scale=math.nan), ValueError, ["scale must be finite and > 0"]),
]


I32 = dict(dtype=torch.int32)
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


def _check(op, good, override, exc, words):
    args = good()
    before = {n: a.clone() for n, a in args.items() if isinstance(a, torch.Tensor)}
    with pytest.raises(exc) as info:
        call(op, args, **override)
    message = str(info.value)
    assert message.startswith(op.__name__ + ":"), message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    for n, a in before.items():  # nothing ran: inputs (caches, state) untouched
        assert torch.equal(args[n], a), f"{n} was modified by a rejected call"


@pytest.mark.parametrize("override,exc,words", [pytest.param(*c[1:], id=c[0]) for c in PREFILL])
def test_based_prefill_rejects(override, exc, words):
    _check(ak.based_prefill, good_prefill, override, exc, words)


@pytest.mark.parametrize("override,exc,words", [pytest.param(*c[1:], id=c[0]) for c in DECODE])
def test_based_decode_rejects(override, exc, words):
    _check(ak.based_decode, good_decode, override, exc, words)


@pytest.mark.parametrize("override,exc,words", [pytest.param(*c[1:], id=c[0]) for c in SWD])
def test_sliding_window_decode_rejects(override, exc, words):
    _check(ak.sliding_window_decode, good_swd, override, exc, words)


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


def test_decode_state_untouched_when_rejected():
    args = good_decode()
    S, z = args["state"]
    S.normal_()
    z.normal_()
    S0, z0 = S.clone(), z.clone()
    with pytest.raises(ValueError):
        call(ak.based_decode, args, v=t(B, H, 63))
    assert torch.equal(S, S0) and torch.equal(z, z0)


@pytest.mark.parametrize("kwargs,exc,words", [
    pytest.param(dict(B=0, H=1), ValueError, ["B must be a positive int", "0"], id="B-zero"),
    pytest.param(dict(B=1, H=2.0), ValueError, ["H must be a positive int", "2.0"], id="H-float"),
    pytest.param(dict(B=1, H=1, dtype=torch.float16), TypeError, ["dtype must be torch.float32 or torch.bfloat16"],
                 id="dtype-fp16"),
])
def test_empty_state_rejects(kwargs, exc, words):
    with pytest.raises(exc) as info:
        ak.empty_state(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_good_calls_pass():
    """The templates above are valid: each rejection is due to its one override."""
    call(ak.based_prefill, good_prefill())
    call(ak.based_decode, good_decode())
    call(ak.based_decode, good_pooled())
    call(ak.sliding_window_decode, good_swd())
    call(ak.sliding_window_decode, good_swd_pooled())


@requires_cuda
@pytest.mark.parametrize("op,good,override,words", [
    pytest.param(ak.based_prefill, good_prefill, lambda: dict(k=t(B, H, N, 16).cuda()), ["k must be on q's device"],
                 id="prefill-mixed-devices"),
    pytest.param(ak.sliding_window_decode, good_swd, lambda: dict(k_cache=t(B, H, 8, 64).cuda()),
                 ["k_cache must be on q's device"], id="swd-cache-on-cuda"),
    pytest.param(ak.sliding_window_decode, good_swd,
                 lambda: dict(positions=torch.tensor([0, 1], dtype=torch.int32).cuda()),
                 ["positions must be on q's device"], id="swd-positions-on-cuda"),
])
def test_device_mismatch_rejected(op, good, override, words):
    _check(op, good, override(), ValueError, words)


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


@requires_cuda
def test_fp32_on_cuda_rejected():
    args = {n: a.cuda() for n, a in good_prefill().items()}
    with pytest.raises(TypeError, match="q.dtype must be torch.float16 or torch.bfloat16 on CUDA"):
        call(ak.based_prefill, args)


@requires_cuda
def test_fp16_state_on_cuda_rejected():
    args = good_decode()
    args = {n: (a.cuda().half() if n != "state" else tuple(s.cuda().half() for s in a)) for n, a in args.items()}
    with pytest.raises(TypeError, match="state dtype must be torch.float32 or torch.bfloat16 on CUDA"):
        call(ak.based_decode, args)


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
