"""based_prefill with cu_seqlens (varlen batches, spec.md "Varlen based_prefill"): each packed sequence is
checked as if computed alone, against float64 by the same rule and state bounds as the dense matrix (GPU);
short sequences also bitwise against the dense kernel on a padded batch."""
import pytest
import torch

import attn_kernels as ak
from harness import DTYPE_IDS, nbytes, poison_allocator, prior_state, randn, requires_cuda
from prefill_model import check_prefill

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
    the state within its bounds; an empty sequence returns its initial state (zeros without one) exactly."""
    bounds = cu.tolist()
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        init_i = None if init is None else (init[0][i:i + 1], init[1][i:i + 1])
        if a == b:
            want_S = torch.zeros_like(S[i]) if init is None else init[0][i].float()
            want_z = torch.zeros_like(z[i]) if init is None else init[1][i].float()
            assert torch.equal(S[i], want_S) and torch.equal(z[i], want_z), f"empty sequence {i}: state changed"
            continue
        check_prefill(o[:, :, a:b], S[i:i + 1], z[i:i + 1], q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                      normalize=normalize, initial_state=init_i)


@requires_cuda
@pytest.mark.parametrize("with_init", [False, True], ids=["s0", "init"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("transposed", [False, True], ids=["bhnd", "thd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("H", [1, 3], ids=["H1", "H3"])
@pytest.mark.parametrize("name", list(LENGTHS))
def test_varlen_matrix(name, H, dtype, transposed, normalize, with_init):
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
