"""based_prefill_backward's CUDA kernels (csrc/based_prefill_backward/) against the float64 reference backward
(reference_backward.based_vjp), and training through based_prefill on CUDA.

Tolerance (tests/README.md's rule, row by row): |kernel - ref64| <= 2 |lowp - ref64| + eps(dtype) |ref64|, with
ref64 = based_vjp in float64 from the same low-precision inputs and the comparator lowp = based_vjp run in the
input dtype (every input, state and gradient rounded to it; PyTorch's fp16/bf16 matmuls accumulate in float32):
what a PyTorch training step in that precision computes. The kernel keeps every running state (S, z, dS, dz) in
float32 and runs its products on tensor cores with float32 accumulation, chunk operands in the input dtype (dnum as
hi + lo) and a state operand rounded to bf16 (fp16 inputs: bf16 hi + lo): the operand roundings of the comparator's
class (tests/bwd_emulation.py measures the kernel's rounding against this rule on the CPU), which
also rounds s, A, ds and every intermediate to the input dtype, so a correct kernel sits below the bound; a wrong
carry, mask, term or index is off by O(1) of the gradient."""
import pytest
import torch

import attn_kernels as ak
from attn_kernels.reference_backward import based_vjp
from harness import (DTYPE_IDS, assert_close_rule, bwd_split, nbytes, poison_allocator, prior_state, randn,
                     requires_cuda)

pytestmark = requires_cuda

NAMES = ("dq", "dk", "dv", "dS0", "dz0")
ALL = (True, True, True, True, True)
# (B, H, N): one token, ragged lengths around the 64-token chunk, long ones, several B*H (on an H100's 132 SMs
# (1, 4, 1000) and (1, 2, 4097) take the sequence-parallel path, harness.bwd_split).
SHAPES = [(1, 1, 1), (2, 3, 63), (2, 3, 65), (1, 4, 1000), (1, 2, 4097), (3, 8, 130)]
# Shapes the split cuts into >= 3 segments on any GPU of >= 9 SMs (checked in the test): 2 x 3 heads, 65 chunks
# (132 SMs: 8 segments, the last ragged, its last chunk one token); 2 heads of 20000 tokens (issue 15's length).
SPLIT_SHAPES = [(2, 3, 4097), (1, 2, 20000)]


def num_sms():
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def make(B, H, N, dtype, transposed=False, init=True, grad_state=True):
    """Fresh random inputs: q, k, v, grad_o (laid out (B, N, H, .) when transposed), the initial state
    (prior_state, float32) and the gradients into the returned state (float32)."""
    q, k = (randn(B, H, N, 16, dtype=dtype, device="cuda", transposed=transposed) for _ in range(2))
    v, go = (randn(B, H, N, 64, dtype=dtype, device="cuda", transposed=transposed) for _ in range(2))
    init_state = prior_state(B, H, "cuda") if init else None
    gstate = (torch.randn(B, H, 153, 64, device="cuda"), torch.randn(B, H, 153, device="cuda")) if grad_state else None
    return q, k, v, go, init_state, gstate


def run(q, k, v, go, init, gstate, normalize=True, needs=ALL, scale=None, eps=1e-6):
    return ak.based_prefill_backward(q, k, v, go, grad_state=gstate, initial_state=init, normalize=normalize,
                                     needs=needs, scale=scale, eps=eps)


def references(q, k, v, go, init, gstate, normalize, scale=None, eps=1e-6):
    """(ref64, lowp): based_vjp in float64 and in the input dtype, from the same inputs. based_vjp is quadratic
    in N: a long sequence runs one head at a time (N = 20000: ~20 GB of float64 N x N matrices per head)."""
    B, H, N = q.shape[:3]
    if N > 4100 and B * H > 1:
        heads = [references(*(None if t is None else t[b:b + 1, h:h + 1] for t in (q, k, v, go)),
                            None if init is None else tuple(t[b:b + 1, h:h + 1] for t in init),
                            None if gstate is None else tuple(t[b:b + 1, h:h + 1] for t in gstate),
                            normalize, scale, eps) for b in range(B) for h in range(H)]
        join = lambda gs: None if gs[0] is None else torch.cat(gs).unflatten(0, (B, H)).squeeze(2)  # noqa: E731
        return tuple(tuple(join([hd[i][j] for hd in heads]) for j in range(5)) for i in range(2))

    def vjp(dt):
        cast = lambda t: None if t is None else t.to(dt)  # noqa: E731
        gS, gz = (None, None) if gstate is None else gstate
        return based_vjp(cast(q), cast(k), cast(v), cast(go), cast(gS), cast(gz), scale=scale, normalize=normalize,
                         eps=eps, initial_state=None if init is None else (cast(init[0]), cast(init[1])))
    return vjp(torch.float64), vjp(q.dtype)


def check(grads, q, k, v, go, init, gstate, normalize, needs=ALL, scale=None, eps=1e-6):
    ref64, lowp = references(q, k, v, go, init, gstate, normalize, scale, eps)
    for name, g, r64, rl, need in zip(NAMES, grads, ref64, lowp, needs):
        if r64 is None or not need:
            assert g.numel() == 0, f"{name}: expected an empty tensor, got {tuple(g.shape)}"
            continue
        assert_close_rule(name, g, r64, rl)


@pytest.mark.parametrize("init", [False, True], ids=["s0", "init"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("transposed", [False, True], ids=["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("B,H,N", [pytest.param(*s, id=f"B{s[0]}-H{s[1]}-N{s[2]}") for s in SHAPES])
def test_matrix(B, H, N, dtype, transposed, normalize, init):
    """Every gradient, from o and from the returned state, NaN-poisoned outputs (assert_close_rule checks that
    every element was written)."""
    q, k, v, go, init_state, gstate = make(B, H, N, dtype, transposed, init)
    poison_allocator(nbytes(B, H, N, 16, dtype=dtype), nbytes(B, H, N, 64, dtype=dtype),
                     nbytes(B, H, 153, 64, dtype=torch.float32), nbytes(B, H, 153, dtype=torch.float32))
    grads = run(q, k, v, go, init_state, gstate, normalize)
    for g, t in zip(grads, (q, k, v)):
        assert g.dtype == dtype and g.shape == t.shape
    check(grads, q, k, v, go, init_state, gstate, normalize)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("B,H,N", [pytest.param(*s, id=f"B{s[0]}-H{s[1]}-N{s[2]}") for s in SPLIT_SHAPES])
def test_split_matrix(B, H, N, dtype, normalize):
    """Few heads, long N: the sequence-parallel path (segments carried the earlier segments' key sums forward and
    the later segments' query sums backward, scanned). Every gradient against the rule, NaN-poisoned outputs;
    the rows of every segment are held to their own magnitude, so a segment that misses a carry fails."""
    assert bwd_split(B, H, N, num_sms())[0] >= 3, "not the split path (with its scans) on this GPU"
    q, k, v, go, init_state, gstate = make(B, H, N, dtype, transposed=True)
    poison_allocator(nbytes(B, H, N, 16, dtype=dtype), nbytes(B, H, N, 64, dtype=dtype),
                     nbytes(B, H, 153, 64, dtype=torch.float32), nbytes(B, H, 153, dtype=torch.float32))
    grads = run(q, k, v, go, init_state, gstate, normalize)
    check(grads, q, k, v, go, init_state, gstate, normalize)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_split_agrees_with_unsplit(dtype, normalize):
    """The same 2 heads split (alone) and unsplit (among enough copies of them to fill the GPU: one segment).
    Both within the rule; bitwise where the arithmetic is the same: dq of the first segment (its forward sweep
    starts from S0 either way) and, without normalize (dnum = grad_o, dden = 0), dk and dv of the last segment
    (its backward sweep starts from grad_S either way). Elsewhere the split only reorders float32 sums."""
    B, H, N = 1, 2, 4097
    nseg, seg_chunks = bwd_split(B, H, N, num_sms())
    copies = -(-2 * num_sms() // H)
    assert nseg >= 3 and bwd_split(B, H * copies, N, num_sms())[0] == 1
    q, k, v, go, init_state, gstate = make(B, H, N, dtype)
    split = run(q, k, v, go, init_state, gstate, normalize)
    many = lambda t: t.repeat(1, copies, *([1] * (t.dim() - 2)))  # noqa: E731
    full = run(many(q), many(k), many(v), many(go), tuple(map(many, init_state)), tuple(map(many, gstate)),
               normalize)
    unsplit = tuple(t[:, :H] for t in full)
    ref64, lowp = references(q, k, v, go, init_state, gstate, normalize)
    for name, a, b, r64, rl in zip(NAMES, split, unsplit, ref64, lowp):
        assert_close_rule(f"{name} split", a, r64, rl)
        assert_close_rule(f"{name} unsplit", b, r64, rl)
    first, last = seg_chunks * 64, (nseg - 1) * seg_chunks * 64
    assert torch.equal(split[0][:, :, :first], unsplit[0][:, :, :first]), "dq, first segment"
    if not normalize:
        assert torch.equal(split[1][:, :, last:], unsplit[1][:, :, last:]), "dk, last segment"
        assert torch.equal(split[2][:, :, last:], unsplit[2][:, :, last:]), "dv, last segment"


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
def test_without_gradient_into_the_state(normalize):
    q, k, v, go, init_state, _ = make(2, 3, 200, torch.bfloat16)
    check(run(q, k, v, go, init_state, None, normalize), q, k, v, go, init_state, None, normalize)


@pytest.mark.parametrize("scale,eps", [(0.1, 1e-6), (0.5, 0.0), (0.25, 10.0)], ids=["c0.1", "c0.5-eps0", "eps10"])
def test_scale_and_eps(scale, eps):
    q, k, v, go, init_state, gstate = make(2, 2, 150, torch.bfloat16)
    check(run(q, k, v, go, init_state, gstate, scale=scale, eps=eps), q, k, v, go, init_state, gstate, True,
          scale=scale, eps=eps)


@pytest.mark.parametrize("shape", [(2, 3, 130), (1, 2, 1600)], ids=["B2-H3-N130", "B1-H2-N1600-split"])
@pytest.mark.parametrize("needs", [(True, False, False, False, False), (False, True, False, False, False),
                                   (False, False, True, False, False), (False, False, False, True, False),
                                   (False, False, False, False, True), (False, True, True, False, True)],
                         ids=["dq", "dk", "dv", "dS0", "dz0", "dk-dv-dz0"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
def test_needs_mask(needs, normalize, shape):
    """Gradients not needed come back empty; the needed ones are bitwise those of the full call (the same
    arithmetic: a sweep or step that is skipped never feeds another gradient; split: dS0, dz0 alone skip every
    segment's backward sweep but the first)."""
    q, k, v, go, init_state, gstate = make(*shape, torch.bfloat16)
    full = run(q, k, v, go, init_state, gstate, normalize)
    part = run(q, k, v, go, init_state, gstate, normalize, needs=needs)
    for name, a, b, n in zip(NAMES, part, full, needs):
        if n:
            assert torch.equal(a, b), name
        else:
            assert a.numel() == 0, name


def test_nothing_needed_gives_empty_outputs():
    q, k, v, go, init_state, gstate = make(1, 2, 70, torch.float16)
    assert all(t.numel() == 0 for t in run(q, k, v, go, init_state, gstate, needs=(False,) * 5))


@pytest.mark.parametrize("shape", [(2, 4, 1100), (1, 2, 4097)], ids=["B2-H4-N1100", "B1-H2-N4097-split"])
def test_bitwise_deterministic(shape):
    """No atomics: 20 runs give the same bits (a long sequence, many heads; the split path's sums and scans)."""
    q, k, v, go, init_state, gstate = make(*shape, torch.bfloat16, transposed=True)
    first = run(q, k, v, go, init_state, gstate)
    for _ in range(20):
        for name, a, b in zip(NAMES, run(q, k, v, go, init_state, gstate), first):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("shape", [(2, 2, 300), (1, 2, 1600)], ids=["B2-H2-N300", "B1-H2-N1600-split"])
def test_cuda_graph_capture_and_replay(shape):
    """The backward captures into a CUDA graph (current stream, no sync, workspace from the allocator) and
    replays on new input values, bitwise equal to eager calls (split: 3 segments, their sums and scans)."""
    q, k, v, go, init_state, gstate = make(*shape, torch.float16)
    run(q, k, v, go, init_state, gstate)  # warm-up (function attributes) outside capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = run(q, k, v, go, init_state, gstate)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(2):
        for t in (q, k, v, go, *init_state, *gstate):
            t.copy_(torch.randn_like(t, dtype=torch.float32).to(t.dtype))
        graph.replay()
        torch.cuda.synchronize()
        for name, a, b in zip(NAMES, out, run(q, k, v, go, init_state, gstate)):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_training_through_autograd_equals_the_op(dtype, normalize):
    """loss.backward() through based_prefill (o and the returned state used) gives bitwise the gradients of
    calling the backward op with the same upstream gradients."""
    B, H, N = 2, 3, 150
    q, k, v, _, (S0, z0), _ = make(B, H, N, dtype, transposed=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, S0, z0)]
    W = torch.randn(B, H, N, 64, device="cuda")
    WS, wz = torch.randn(B, H, 153, 64, device="cuda"), torch.randn(B, H, 153, device="cuda")
    o, (S, z) = ak.based_prefill(*leaves[:3], initial_state=tuple(leaves[3:]), normalize=normalize, return_state=True)
    ((o.float() * W).sum() + (S * WS).sum() + (z * wz).sum()).backward()
    want = run(q, k, v, W.to(dtype), (S0, z0), (WS, wz), normalize)
    for name, leaf, g in zip(NAMES, leaves, want):
        assert torch.equal(leaf.grad, g), name


def test_o_sum_backward_expanded_gradient():
    """o.sum().backward(): autograd's grad_o is an expanded tensor (stride 0), read correctly."""
    q, k, v, _, _, _ = make(1, 2, 90, torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ak.based_prefill(*leaves).sum().backward()
    want = run(q, k, v, torch.ones_like(v), None, None)
    for name, leaf, g in zip(NAMES, leaves, want):
        assert torch.equal(leaf.grad, g), name


def test_bfloat16_initial_state():
    """A bfloat16 (S0, z0) is widened exactly: the gradients equal those from its float32 copy, and dS0, dz0
    come back in bfloat16."""
    q, k, v, go, init_state, gstate = make(2, 2, 100, torch.bfloat16)
    init16 = tuple(t.to(torch.bfloat16) for t in init_state)
    got = run(q, k, v, go, init16, gstate)
    want = run(q, k, v, go, tuple(t.float() for t in init16), gstate)
    assert got[3].dtype == torch.bfloat16 and got[4].dtype == torch.bfloat16
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b.to(a.dtype)), name
