"""based_prefill against the float64 reference: the correctness matrix (GPU) and the op's plumbing (CPU)."""
import pytest
import torch

import attn_kernels as ak
from attn_kernels import reference as ref
from harness import (DTYPE_IDS, assert_close_rule, assert_written, nbytes, poison_allocator, prior_state, randn,
                     requires_cuda)
from prefill_model import check_prefill, lowp_prefill

# (B, H, N): ragged lengths around the 64-token chunk, long ones, and several B*H.
SHAPES = [(1, 1, 1), (2, 3, 63), (2, 3, 65), (1, 4, 1000), (2, 2, 4097), (3, 8, 257), (1, 64, 130)]


def run_and_check(B, H, N, dtype, device, transposed, normalize, with_init, scale=None):
    """o by the rule against float64 with the kernel-faithful comparator (prefill_model.lowp_prefill), row by row;
    S and z against the float64 model of what the spec promises, within the derived float32-level bounds."""
    q = randn(B, H, N, 16, dtype=dtype, device=device, transposed=transposed)
    k = randn(B, H, N, 16, dtype=dtype, device=device, transposed=transposed)
    v = randn(B, H, N, 64, dtype=dtype, device=device, transposed=transposed)
    init = prior_state(B, H, device) if with_init else None
    if device == "cuda":
        poison_allocator(nbytes(B, H, N, 64, dtype=dtype), nbytes(B, H, 153, 64, dtype=torch.float32),
                         nbytes(B, H, 153, dtype=torch.float32))
    o, (S, z) = ak.based_prefill(q, k, v, scale=scale, normalize=normalize, initial_state=init, return_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32 and z.dtype == torch.float32
    assert o.stride() == v.stride(), "o is laid out like v"
    check_prefill(o, S, z, q, k, v, scale=scale, normalize=normalize, initial_state=init)


@requires_cuda
@pytest.mark.parametrize("with_init", [False, True], ids=["s0", "init"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("transposed", [False, True], ids=["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("B,H,N", [pytest.param(*s, id=f"B{s[0]}-H{s[1]}-N{s[2]}") for s in SHAPES])
def test_matrix(B, H, N, dtype, transposed, normalize, with_init):
    run_and_check(B, H, N, dtype, "cuda", transposed, normalize, with_init)


@requires_cuda
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("B,H,N", [(1, 1, 32768), (1, 2, 20000)], ids=["B1-H1-N32768", "B1-H2-N20000"])
def test_long_sequences_split_across_blocks(B, H, N, normalize):
    """Few heads, long N: the kernel splits the sequence over blocks and scans the chunk states. The row-by-row
    rule holds the late tokens to their own magnitude, and the state to float32 accuracy: a wrong carried state,
    tail or scan fails here (the CPU emulations of such kernels in test_tolerance.py fail these same checks)."""
    run_and_check(B, H, N, torch.bfloat16, "cuda", True, normalize, True)


@requires_cuda
@pytest.mark.parametrize("scale", [0.1, 0.5, 1e-40], ids=["0.1", "0.5", "subnormal"])
def test_scale_and_eps(scale):
    run_and_check(2, 2, 100, torch.bfloat16, "cuda", False, True, False, scale=scale)
    q, k = (torch.randn(1, 2, 70, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, 2, 70, 64, device="cuda", dtype=torch.bfloat16)
    for eps in (0.0, 10.0):
        o = ak.based_prefill(q, k, v, scale=scale, eps=eps)
        o64, _ = ref.based_chunked(q.double(), k.double(), v.double(), scale=scale, eps=eps)
        o_lp, _ = lowp_prefill(q, k, v, scale=scale, eps=eps)
        assert_close_rule(f"o(eps={eps})", o, o64, o_lp)


def tiny_fp16(*shape, device) -> torch.Tensor:
    """fp16 entries whose scaled value sqrt(c) x (c = 1/4) falls below fp16's normal range and is not exact there:
    odd bit patterns 0x0001..0x07ff (subnormals and the lowest normal binade), random signs."""
    bits = torch.randint(0, 0x400, shape, device=device, dtype=torch.int32) * 2 + 1
    sign = torch.randint(0, 2, shape, device=device, dtype=torch.int32) * 0x8000
    return (bits | sign).to(torch.int16).view(torch.float16)


@requires_cuda
@pytest.mark.parametrize("scale", [None, 0.1], ids=["c1/4", "c0.1"])
@pytest.mark.parametrize("N", [1, 65, 1000])
def test_fp16_inputs_near_zero(N, scale):
    """Half the q and k columns tiny (tiny_fp16): each feature is still rounded once, from float32 (spec.md). A
    kernel that rounds sqrt(c) x to fp16 before forming the features moves many of them by a subnormal ulp,
    which the state's float32-level bound sees (a short sequence's state holds near-exact products). c = 1/4 takes
    the packed feature path for the other rows, c = 0.1 the float path for all."""
    B, H = 1, 3
    q, k = (randn(B, H, N, 16, dtype=torch.float16, device="cuda") for _ in range(2))
    for x in (q, k):
        x[..., torch.randperm(16)[:8]] = tiny_fp16(B, H, N, 8, device="cuda")
    v = randn(B, H, N, 64, dtype=torch.float16, device="cuda")
    o, (S, z) = ak.based_prefill(q, k, v, scale=scale, return_state=True)
    check_prefill(o, S, z, q, k, v, scale=scale)


@requires_cuda
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
def test_bfloat16_initial_state(normalize):
    """initial_state may be bfloat16 (half the bytes): its values, widened to float32, are the ones used."""
    B, H, N = 2, 3, 200
    q, k = (randn(B, H, N, 16, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    v = randn(B, H, N, 64, dtype=torch.bfloat16, device="cuda")
    init = tuple(t.to(torch.bfloat16) for t in prior_state(B, H, "cuda"))
    o, (S, z) = ak.based_prefill(q, k, v, normalize=normalize, initial_state=init, return_state=True)
    check_prefill(o, S, z, q, k, v, normalize=normalize, initial_state=tuple(t.float() for t in init))


@requires_cuda
def test_without_return_state_gives_same_output():
    q, k = (torch.randn(2, 4, 300, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
    o_only = ak.based_prefill(q, k, v)
    o, _ = ak.based_prefill(q, k, v, return_state=True)
    assert isinstance(o_only, torch.Tensor)
    torch.testing.assert_close(o_only, o, rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("B,H,N", [(4, 8, 1000), (1, 2, 16384)], ids=["B4-H8-N1000", "B1-H2-N16384-split"])
def test_bitwise_deterministic(B, H, N):
    q, k = (torch.randn(B, H, N, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, H, N, 64, device="cuda", dtype=torch.bfloat16)
    first, (S, z) = ak.based_prefill(q, k, v, return_state=True)
    for _ in range(19):
        o, (S2, z2) = ak.based_prefill(q, k, v, return_state=True)
        assert torch.equal(o, first) and torch.equal(S2, S) and torch.equal(z2, z)


@requires_cuda
def test_prefill_then_decode_kernels_equal_longer_prefill():
    """spec: prefill(N, return_state) + decode steps == prefill(N + T) at those positions, on the kernels."""
    B, H, N, T = 2, 8, 1000, 20
    q, k = (torch.randn(B, H, N + T, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, H, N + T, 64, device="cuda", dtype=torch.bfloat16)
    o64, _ = ref.based_chunked(q.double(), k.double(), v.double())
    o_lp, _ = lowp_prefill(q, k, v)
    _, state = ak.based_prefill(q[:, :, :N], k[:, :, :N], v[:, :, :N], return_state=True)
    steps = torch.stack([ak.based_decode(q[:, :, t], k[:, :, t], v[:, :, t], state) for t in range(N, N + T)], 2)
    assert_close_rule("decode after prefill", steps, o64[:, :, N:], o_lp[:, :, N:])


@requires_cuda
def test_cuda_graph_capture():
    q, k = (torch.randn(2, 4, 200, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(2, 4, 200, 64, device="cuda", dtype=torch.bfloat16)
    eager = ak.based_prefill(q, k, v)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ak.based_prefill(q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.parametrize("transposed", [False, True], ids=["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
def test_cpu_op(dtype, transposed):
    """On the CPU the op runs the reference in float32: same contract (dtypes, layouts, state); its state is
    checked against the promise with float32 features (docs/spec.md)."""
    run_and_check(2, 3, 65, dtype, "cpu", transposed, True, True)


def test_cpu_op_writes_every_output():
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    o = ak.based_prefill(q, k, torch.randn(1, 2, 3, 64))
    assert_written("o", o)
