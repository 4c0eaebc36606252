"""based_prefill for serving (GPU): varlen batches (cu_seqlens, spec.md "Varlen based_prefill"), each packed
sequence checked as if computed alone against float64 by the same rule and state bounds as the dense matrix,
short ones also bitwise against the dense kernel on a padded batch; and final states written into a state
pool (state, state_indices), bitwise the state return_state gives, then continued by pooled decode."""
import pytest
import torch

import attn_kernels as ak
from attn_kernels import reference as ref
from harness import DTYPE_IDS, assert_close_rule, nbytes, poison_allocator, prior_state, randn, requires_cuda
from prefill_model import check_prefill, lowp_prefill, prefill_state_model
from state_model import assert_state_close

# Sequence lengths packed into one batch: ragged around the 64-token chunk, an empty one, a long one.
LENGTHS = {
    "ragged": [1, 63, 0, 65, 1000, 4097],
    "one": [257],
    "empties": [0, 0, 5, 0],
}


def packed(lengths, H, dtype, transposed, device="cuda"):
    """q, k, v (1, H, T, .) holding the sequences back to back (transposed: a (T, H, D) tensor viewed as
    (1, H, T, D), the FlashAttention / fla layout), and cu_seqlens (n + 1,) int32."""
    T = sum(lengths)
    q, k = (randn(1, H, T, 16, dtype=dtype, device=device, transposed=transposed) for _ in range(2))
    v = randn(1, H, T, 64, dtype=dtype, device=device, transposed=transposed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def check_each_sequence(o, S, z, q, k, v, cu, *, normalize=True, init=None):
    """Sequence i's rows of o and its state (S[i], z[i]) as based_prefill gives them for it alone: o by the rule,
    the state within its bounds. An empty sequence returns its initial state: zeros without one; S exactly
    (carried as is), z within the state bound (it passes through the kernel's float32 moments, spec.md)."""
    bounds = cu.tolist()
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        init_i = None if init is None else (init[0][i:i + 1], init[1][i:i + 1])
        if a == b and init is None:
            assert not S[i].any() and not z[i].any(), f"empty sequence {i}: state not zero"
            continue
        if a == b:
            assert torch.equal(S[i], init[0][i].float()), f"empty sequence {i}: S changed"
            assert_state_close(S[i:i + 1], z[i:i + 1],
                               prefill_state_model(k[:, :, a:b], v[:, :, a:b], initial_state=init_i))
            continue
        check_prefill(o[:, :, a:b], S[i:i + 1], z[i:i + 1], q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                      normalize=normalize, initial_state=init_i)


@requires_cuda
@pytest.mark.parametrize("transposed,with_init", [(False, False), (True, True)], ids=["bhnd-s0", "thd-init"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("H", [1, 3], ids=["H1", "H3"])
@pytest.mark.parametrize("name", list(LENGTHS))
def test_varlen_matrix(name, H, dtype, normalize, transposed, with_init):
    lengths = LENGTHS[name]
    q, k, v, cu = packed(lengths, H, dtype, transposed)
    n, T = len(lengths), sum(lengths)
    init = prior_state(n, H, "cuda") if with_init else None
    poison_allocator(nbytes(1, H, T, 64, dtype=dtype), nbytes(n, H, 153, 64, dtype=torch.float32))
    o, (S, z) = ak.based_prefill(q, k, v, cu_seqlens=cu, normalize=normalize, initial_state=init,
                                 return_state=True)
    assert o.shape == v.shape and S.shape == (n, H, 153, 64) and z.shape == (n, H, 153)
    assert o.stride() == v.stride(), "o is laid out like v"
    check_each_sequence(o, S, z, q, k, v, cu, normalize=normalize, init=init)


@requires_cuda
@pytest.mark.parametrize("max_seqlen", [None, 20000, 30000], ids=["bound-T", "bound-exact", "bound-loose"])
def test_varlen_split_sequences(max_seqlen):
    """Few sequences x heads: the kernel cuts the length bound into segments, which the short sequence leaves
    empty (no work, no state change) while the long one carries its state across them."""
    lengths = [20000, 3000, 70]
    q, k, v, cu = packed(lengths, 2, torch.bfloat16, True)
    init = prior_state(3, 2, "cuda")
    o, (S, z) = ak.based_prefill(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen, initial_state=init,
                                 return_state=True)
    check_each_sequence(o, S, z, q, k, v, cu, init=init)


@requires_cuda
@pytest.mark.parametrize("n", [300, 5000], ids=["n300-sorted", "n5000-unsorted"])
def test_many_short_sequences_bitwise_equal_dense_padded(n):
    """Sequences of 1..3 tokens, each row computed in one chunk from the same keys as in a padded dense batch
    (a causal row never sees the padding): bitwise equal outputs. n=300 runs the longest-first launch order,
    n=5000 (above its limit) the given order."""
    gen = torch.Generator().manual_seed(n)
    lengths = torch.randint(1, 4, (n,), generator=gen).tolist()
    H = 2
    qd, kd = (torch.randn(n, H, 3, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    vd = torch.randn(n, H, 3, 64, device="cuda", dtype=torch.bfloat16)
    dense = ak.based_prefill(qd, kd, vd)
    pick = lambda t: torch.cat([t[i, :, :m] for i, m in enumerate(lengths)], dim=1)[None]  # noqa: E731
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    o = ak.based_prefill(pick(qd), pick(kd), pick(vd), cu_seqlens=cu)
    assert torch.equal(o, pick(dense))


@requires_cuda
def test_varlen_is_deterministic_and_capturable():
    """Eager and graph replays give bitwise the same output: nothing in the launch reads cu_seqlens on the host
    (the launch order is computed on the device), so it can be captured; new cu_seqlens values between replays
    are honoured."""
    lengths = [700, 1, 0, 129, 64]
    q, k, v, cu = packed(lengths, 4, torch.bfloat16, False)
    eager = ak.based_prefill(q, k, v, cu_seqlens=cu, max_seqlen=700)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ak.based_prefill(q, k, v, cu_seqlens=cu, max_seqlen=700)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    cu.copy_(torch.tensor([0, 300, 301, 301, 594, 894], dtype=torch.int32))  # same T, other cuts
    graph.replay()
    want = ak.based_prefill(q, k, v, cu_seqlens=cu, max_seqlen=700)
    assert torch.equal(captured, want)


@requires_cuda
def test_bad_cu_seqlens_under_capture_stay_inside_the_tensors():
    """Under capture the values are not checked on the host: decreasing, negative or too large offsets are
    clamped on the device (no memory error; the results are unspecified), and the op keeps working."""
    q, k, v, cu = packed([100, 100], 2, torch.bfloat16, False)
    ak.based_prefill(q, k, v, cu_seqlens=cu)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ak.based_prefill(q, k, v, cu_seqlens=cu, return_state=True)
    for bad in ([0, 150, 100], [-50, 10 ** 9, 200], [0, 200, 10 ** 9]):
        cu.copy_(torch.tensor(bad, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()  # an out-of-bounds access would raise here
    cu.copy_(torch.tensor([0, 100, 200], dtype=torch.int32))
    o, (S, z) = ak.based_prefill(q, k, v, cu_seqlens=cu, return_state=True)
    check_each_sequence(o, S, z, q, k, v, cu)


# ---- final states into a state pool (spec.md "based_prefill into pool slots") -----------------------------

def _pool(P, H, dtype, device="cuda"):
    """A NaN-filled pool: slots nobody names must stay NaN, bit for bit."""
    return (torch.full((P, H, 153, 64), float("nan"), dtype=dtype, device=device),
            torch.full((P, H, 153), float("nan"), dtype=dtype, device=device))


@requires_cuda
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16], ids=["pool_fp32", "pool_bf16"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_prefill_into_pool_equals_the_returned_state(varlen, pool_dtype):
    """The pool slots get exactly the state return_state gives (rounded once to a bf16 pool), the outputs are
    the same bits, a -1 sequence writes nothing, and the slots nobody names keep their bits."""
    H = 3
    if varlen:
        q, k, v, cu = packed([200, 0, 65, 1000], H, torch.bfloat16, True)
        n, extra = 4, dict(cu_seqlens=cu)
    else:
        q, k, v = (randn(3, H, 300, d, dtype=torch.float16, device="cuda") for d in (16, 16, 64))
        n, extra = 3, {}
    init = prior_state(n, H, "cuda")
    o_ref, (S, z) = ak.based_prefill(q, k, v, initial_state=init, return_state=True, **extra)
    idx = torch.tensor([5, -1, 0, 2][:n], dtype=torch.int32, device="cuda")
    pool = _pool(7, H, pool_dtype)
    o = ak.based_prefill(q, k, v, initial_state=init, state=pool, state_indices=idx, **extra)
    assert torch.equal(o, o_ref)
    for i, slot in enumerate(idx.tolist()):
        if slot >= 0:
            assert torch.equal(pool[0][slot], S[i].to(pool_dtype)) and torch.equal(pool[1][slot], z[i].to(pool_dtype))
    named = set(idx.tolist())
    untouched = [p for p in range(7) if p not in named]
    assert torch.isnan(pool[0][untouched]).all() and torch.isnan(pool[1][untouched]).all()


@requires_cuda
def test_prefill_pool_bad_index_under_capture_gives_nan_and_writes_nothing():
    """Under capture the indices are not checked on the host: an index outside [-1, P) makes that sequence's
    outputs NaN and writes no slot; the other sequences are computed and written as usual."""
    q, k, v, cu = packed([100, 70, 130], 2, torch.bfloat16, False)
    o_ref, (S, z) = ak.based_prefill(q, k, v, cu_seqlens=cu, return_state=True)
    pool = _pool(4, 2, torch.float32)
    idx = torch.tensor([1, 0, 3], dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = ak.based_prefill(q, k, v, cu_seqlens=cu, state=pool, state_indices=idx)
    idx.copy_(torch.tensor([1, 4, -7], dtype=torch.int32))
    pool[0].fill_(float("nan"))
    pool[1].fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o[:, :, :100], o_ref[:, :, :100]) and torch.isnan(o[:, :, 100:]).all()
    assert torch.equal(pool[0][1], S[0]) and torch.equal(pool[1][1], z[0])
    assert torch.isnan(pool[0][[0, 2, 3]]).all() and torch.isnan(pool[1][[0, 2, 3]]).all()


@requires_cuda
def test_prefill_into_pool_then_pooled_decode_equals_a_longer_prefill():
    """The serving path: varlen prefill writes each request's state into its pool slot, pooled decode steps
    continue from there; outputs equal one prefill over prompt + generated tokens (by the rule)."""
    H, lengths, T = 2, [300, 64, 129], 6
    full = [tuple(randn(1, H, m + T, d, dtype=torch.bfloat16, device="cuda") for d in (16, 16, 64))
            for m in lengths]
    q, k, v = (torch.cat([f[j][:, :, :m] for f, m in zip(full, lengths)], 2) for j in range(3))
    cu = torch.tensor([0, 300, 364, 493], dtype=torch.int32, device="cuda")
    pool = ak.empty_state(6, H, device="cuda")
    slots = torch.tensor([4, 1, 3], dtype=torch.int32, device="cuda")
    ak.based_prefill(q, k, v, cu_seqlens=cu, state=pool, state_indices=slots)
    steps = []
    for t in range(T):
        step = [torch.cat([f[j][:, :, m + t] for f, m in zip(full, lengths)], 0) for j in range(3)]  # (3, H, d)
        steps.append(ak.based_decode(*step, pool, state_indices=slots))
    got = torch.stack(steps, 2)  # (3, H, T, 64)
    for i, (f, m) in enumerate(zip(full, lengths)):
        o64, _ = ref.based_chunked(*(x.double() for x in f))
        o_lp, _ = lowp_prefill(*f)
        assert_close_rule(f"sequence {i}", got[i:i + 1], o64[:, :, m:], o_lp[:, :, m:])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_continuous_batching_simulation(device):
    """A server's life: requests of random lengths arrive, are prefilled together (varlen, final states into
    free pool slots), decode a random number of steps in one pooled batch (fixed width, -1 padding rows), and
    leave; their slots are reused by later requests. Every request's outputs (prompt rows and generated
    tokens) equal running it alone: by the rule against float64, with the low-precision comparator."""
    gen = torch.Generator().manual_seed(7)
    H, P, dtype = 2, 4, torch.bfloat16
    reqs = []
    for r in range(10):
        L = int(torch.randint(1, 300, (1,), generator=gen))
        T = int(torch.randint(1, 7, (1,), generator=gen))
        q, k = (torch.randn(1, H, L + T, 16, generator=gen).to(dtype).to(device) for _ in range(2))
        v = torch.randn(1, H, L + T, 64, generator=gen).to(dtype).to(device)
        reqs.append(dict(id=r, L=L, T=T, q=q, k=k, v=v, slot=None, step=0, prompt_o=None, steps=[]))
    pool = ak.empty_state(P, H, device=device)
    waiting, active, free = list(reqs), [], list(range(P))
    while waiting or active:
        admit = []
        while waiting and free and len(admit) < 3:  # admit up to 3 new requests per tick
            req = waiting.pop(0)
            req["slot"] = free.pop(int(torch.randint(0, len(free), (1,), generator=gen)))
            admit.append(req)
        if admit:
            cat = lambda name: torch.cat([a[name][:, :, :a["L"]] for a in admit], 2)  # noqa: E731
            cu = torch.tensor([0, *torch.tensor([a["L"] for a in admit]).cumsum(0).tolist()], dtype=torch.int32,
                              device=device)
            slots = torch.tensor([a["slot"] for a in admit], dtype=torch.int32, device=device)
            o = ak.based_prefill(cat("q"), cat("k"), cat("v"), cu_seqlens=cu, state=pool, state_indices=slots)
            for a, start in zip(admit, cu.tolist()):
                a["prompt_o"] = o[:, :, start:start + a["L"]]
            active += admit
        rows = active + [None] * (P - len(active))  # one fixed-width decode batch, padding rows -1
        pick = lambda name: torch.stack([a[name][0, :, a["L"] + a["step"]] if a else  # noqa: E731
                                         torch.zeros_like(reqs[0][name][0, :, 0]) for a in rows])
        idx = torch.tensor([a["slot"] if a else -1 for a in rows], dtype=torch.int32, device=device)
        out = ak.based_decode(pick("q"), pick("k"), pick("v"), pool, state_indices=idx)
        assert not out[len(active):].any(), "padding rows give zeros"
        for a, o_t in zip(active, out):
            a["steps"].append(o_t)
            a["step"] += 1
        for a in [a for a in active if a["step"] == a["T"]]:  # finished: the slot is free again
            active.remove(a)
            free.append(a["slot"])
    for a in reqs:
        o64, _ = ref.based_chunked(a["q"].double(), a["k"].double(), a["v"].double())
        o_lp, _ = lowp_prefill(a["q"], a["k"], a["v"])
        got = torch.cat([a["prompt_o"], torch.stack(a["steps"], 1)[None]], 2)
        assert_close_rule(f"request {a['id']} (L={a['L']}, T={a['T']})", got, o64, o_lp)
