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
    call(ak.sliding_window_decode, good_swd())


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
