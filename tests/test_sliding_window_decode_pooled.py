"""sliding_window_decode with cache pools (cache_indices): a pooled call is bitwise the contiguous call on the
rows gathered from the pool, scattered back (same kernel arithmetic, so no tolerance); padding rows (-1) give
zeros and touch nothing; pool rows no row names keep their bits; under CUDA-graph capture an out-of-range
index gives a NaN row and writes nothing, and replays follow indices changed between them; indices written by
the kernel right before (a PDL predecessor) are read correctly. CPU: the reference op, the same rules.
Validation of the arguments: tests/test_validation.py."""
import pytest
import torch

import attn_kernels as ak
from attn_kernels import reference as ref
from harness import DTYPE_IDS, assert_close_rule, nbytes, poison_allocator, randn, requires_cuda


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def assert_bitwise(name: str, out: torch.Tensor, expected: torch.Tensor) -> None:
    differ = (bits(out) != bits(expected)).sum().item()
    assert differ == 0, f"{name}: {differ} of {out.numel()} elements differ in their bits"


def make_pool(P, H, W, e, dtype, device, layout):
    """(k_pool, v_pool), each (P, H, W, e): 'contig'; 'strided' = (P, W, H, e) memory seen as (P, H, W, e);
    'kv' = both halves of one (P, 2, H, W, e) buffer (row stride 2*H*W*e, as in a paged KV cache)."""
    if layout == "kv":
        kv = torch.randn(P, 2, H, W, e, device=device).to(dtype)
        return kv[:, 0], kv[:, 1]
    if layout == "strided":
        return tuple(torch.randn(P, W, H, e, device=device).to(dtype).transpose(1, 2) for _ in range(2))
    return tuple(torch.randn(P, H, W, e, device=device).to(dtype) for _ in range(2))


def shuffled_indices(B, P, n_pad, device):
    """B distinct pool rows in random order out of P > B, n_pad of them replaced by -1 (padding)."""
    idx = torch.randperm(P)[:B].to(torch.int32)
    idx[torch.randperm(B)[:n_pad]] = -1
    return idx.to(device)


def contiguous_expectation(q, kn, vn, k_pool, v_pool, pos, idx, W):
    """What a pooled call must give: the contiguous op on the live rows (0 <= index < P) gathered from the
    pool, o zero on padding rows, and the pools with the gathered rows written back. Returns (o, live, k, v)
    with o for the live rows only."""
    P = k_pool.shape[0]
    live = (idx >= 0) & (idx < P)
    rows = idx[live].long()
    k_rows, v_rows = k_pool[rows].clone(), v_pool[rows].clone()
    o_live = q[live]  # no live row: nothing to run
    if live.any():
        o_live = ak.sliding_window_decode(q[live], kn[live], vn[live], k_rows, v_rows, pos[live], window=W)
    k_exp, v_exp = k_pool.clone(), v_pool.clone()
    k_exp[rows] = k_rows
    v_exp[rows] = v_rows
    return o_live, live, k_exp, v_exp


def check_pooled(o, o_live, live, idx, k_pool, v_pool, k_exp, v_exp, exact=True):
    """exact: o's live rows bitwise those of the contiguous op (the kernels); else within float32 rounding of
    the output dtype (the CPU reference, whose batched matmuls may block differently for fewer rows)."""
    if exact:
        assert_bitwise("o (live rows) vs the contiguous op", o[live], o_live)
    else:
        torch.testing.assert_close(o[live], o_live)
    pad = idx == -1
    assert torch.equal(bits(o[pad]), torch.zeros_like(bits(o[pad]))), "padding rows: o must be +0"
    bad = ~live & ~pad
    assert torch.isnan(o[bad]).all(), "out-of-range rows: o must be NaN"
    # every pool row: the written rows as the contiguous op left them, every other row bit for bit
    assert_bitwise("k_pool", k_pool, k_exp)
    assert_bitwise("v_pool", v_pool, v_exp)


def run_pooled(B, H, W, e, dtype, layout, P, n_pad, device, positions=None, strided_inputs=False):
    pos_list = positions or sorted({0, 1, max(W - 2, 0), W - 1, W, 5 * W + 3, 3 * W // 2})
    pos = torch.tensor((pos_list * B)[:B], dtype=torch.int32, device=device)
    q, kn, vn = (randn(B, H, e, dtype=dtype, device=device, transposed=strided_inputs) for _ in range(3))
    k_pool, v_pool = make_pool(P, H, W, e, dtype, device, layout)
    idx = shuffled_indices(B, P, n_pad, device)
    k_before, v_before = k_pool.clone(), v_pool.clone()
    o_live, live, k_exp, v_exp = contiguous_expectation(q, kn, vn, k_before, v_before, pos, idx, W)
    if device == "cuda":
        poison_allocator(nbytes(B, H, e, dtype=dtype))
    o = ak.sliding_window_decode(q, kn, vn, k_pool, v_pool, pos, window=W, cache_indices=idx)
    check_pooled(o, o_live, live, idx, k_pool, v_pool, k_exp, v_exp)
    # and the pooled reference (float64) agrees within the rule: the semantics, not only the equivalence
    o64, k64, _ = ref.sliding_window_decode(q.double(), kn.double(), vn.double(), k_before.double(),
                                            v_before.double(), pos, window=W, cache_indices=idx)
    o_lp, _, _ = ref.sliding_window_decode(q, kn, vn, k_before, v_before, pos, window=W, cache_indices=idx)
    assert_close_rule("o vs the float64 pooled reference", o, o64, o_lp)
    assert torch.equal(k_pool.double(), k64)


CASES = [pytest.param(W, e, dtype, layout, id=f"W{W}-e{e}-{DTYPE_IDS[dtype]}-{layout}")
         for W in (1, 17, 64, 256) for e in (64, 128) for dtype in (torch.float16, torch.bfloat16)
         for layout in ("contig", "strided")]
CASES += [pytest.param(W, e, torch.bfloat16, "kv", id=f"W{W}-e{e}-bf16-kv")
          for W, e in ((63, 64), (100, 128))]


@requires_cuda
@pytest.mark.parametrize("W,e,dtype,layout", CASES)
def test_pooled_equals_contiguous(W, e, dtype, layout):
    """Shuffled indices into a pool of P = 2B + 3 rows, two padding rows, positions before and after the
    wrap; strided inputs with the strided pools."""
    run_pooled(9, 3, W, e, dtype, layout, P=21, n_pad=2, device="cuda", strided_inputs=layout != "contig")


@requires_cuda
@pytest.mark.parametrize("B,H,P,n_pad", [(1, 1, 1, 0), (1, 16, 5, 0), (300, 8, 700, 30), (64, 16, 64, 0)],
                         ids=["B1-H1-P1", "B1-H16-P5", "B300-H8-P700-pad30", "B64-H16-P64-perm"])
def test_pooled_batch_sizes(B, H, P, n_pad):
    """A pool row per sequence at several B*H (one CTA each: 1 to 2400, several waves), a full permutation."""
    positions = list(range(0, 1000, 7))
    run_pooled(B, H, 64, 64, torch.bfloat16, "contig", P=P, n_pad=n_pad, device="cuda", positions=positions)


@requires_cuda
def test_padding_rows_read_and_write_nothing():
    """All rows padding, positions negative (ignored for padding, also by the host check): o = 0, pools
    untouched even when they hold NaN."""
    B, H, W, e, P = 4, 2, 16, 64, 6
    q, kn, vn = (randn(B, H, e, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    k_pool, v_pool = (torch.full((P, H, W, e), float("nan"), dtype=torch.bfloat16, device="cuda")
                      for _ in range(2))
    before = k_pool.clone(), v_pool.clone()
    idx = torch.full((B,), -1, dtype=torch.int32, device="cuda")
    pos = torch.tensor([-5, 0, 3, -1], dtype=torch.int32, device="cuda")
    poison_allocator(nbytes(B, H, e, dtype=torch.bfloat16))
    o = ak.sliding_window_decode(q, kn, vn, k_pool, v_pool, pos, window=W, cache_indices=idx)
    assert torch.equal(bits(o), torch.zeros_like(bits(o)))
    assert_bitwise("k_pool", k_pool, before[0])
    assert_bitwise("v_pool", v_pool, before[1])


def capture(fn):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@requires_cuda
def test_graph_replays_follow_the_indices_and_refuse_out_of_range_ones():
    """One captured call, replayed with new indices each time (no host check inside the graph): each replay is
    bitwise the contiguous op on the rows those indices name. Indices >= P or < -1 give a NaN row and write
    nothing (the pool's other rows as the contiguous op leaves them)."""
    B, H, W, e, P = 7, 4, 32, 128, 16
    q, kn, vn = (randn(B, H, e, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    k_pool, v_pool = make_pool(P, H, W, e, torch.bfloat16, "cuda", "contig")
    pos = torch.tensor([0, 5, 31, 32, 40, 100, 3], dtype=torch.int32, device="cuda")
    idx = shuffled_indices(B, P, 1, "cuda")
    ak.sliding_window_decode(q, kn, vn, k_pool, v_pool, pos, window=W, cache_indices=idx)  # loads the kernel
    torch.cuda.synchronize()
    graph, o = capture(lambda: ak.sliding_window_decode(q, kn, vn, k_pool, v_pool, pos, window=W,
                                                        cache_indices=idx))
    new_sets = [shuffled_indices(B, P, n_pad, "cuda") for n_pad in (0, 2, 1)]
    out_of_range = shuffled_indices(B, P, 1, "cuda")
    out_of_range[[1, 4]] = torch.tensor([P, -7], dtype=torch.int32, device="cuda")
    for new in new_sets + [out_of_range]:
        idx.copy_(new)
        k_before, v_before = k_pool.clone(), v_pool.clone()
        o_live, live, k_exp, v_exp = contiguous_expectation(q, kn, vn, k_before, v_before, pos, idx, W)
        o.fill_(float("nan"))  # the replay must write every row: NaN where a value is due, 0 where NaN is
        o[~live & (idx != -1)] = 0
        graph.replay()
        torch.cuda.synchronize()
        check_pooled(o, o_live, live, idx, k_pool, v_pool, k_exp, v_exp)


@requires_cuda
def test_indices_written_by_the_previous_kernel():
    """The kernel guesses its pool row before waiting on the previous grid (PDL) and must correct the guess
    with the index read after the wait. Here the previous kernel writes the indices: cache_indices is an int32
    view of a cache slot that the contiguous call captured just before overwrites (its k_new holds the new
    indices' bits). Whether a CTA saw the old indices is timing; whatever it saw, every pair of calls must
    give bitwise what the contiguous op gives on the rows the new indices name."""
    B1, H1, W1, e1, slot = 64, 16, 256, 128, 7  # the writer: several waves, its last CTA writes the indices
    B2, H2, W2, e2, P, pairs = 16, 4, 64, 64, 40, 6
    dt = torch.bfloat16
    c1 = [torch.randn(B1, H1, W1, e1, device="cuda").to(dt) for _ in range(2)]
    q1, vn1 = (randn(B1, H1, e1, dtype=dt, device="cuda") for _ in range(2))
    pos1 = torch.full((B1,), slot, dtype=torch.int32, device="cuda")
    idx = c1[0][B1 - 1, H1 - 1, slot, :2 * B2].view(torch.int32)  # (B2,) int32 in the slot's first 64 bytes
    sets = [torch.randperm(P)[:B2].to(torch.int32).cuda() for _ in range(pairs + 1)]
    kn1 = [randn(B1, H1, e1, dtype=dt, device="cuda") for _ in range(pairs)]
    for k in range(pairs):
        kn1[k][B1 - 1, H1 - 1, :2 * B2] = sets[k + 1].view(dt)
    calls = [dict(q=randn(B2, H2, e2, dtype=dt, device="cuda"), kn=randn(B2, H2, e2, dtype=dt, device="cuda"),
                  vn=randn(B2, H2, e2, dtype=dt, device="cuda"),
                  pools=make_pool(P, H2, W2, e2, dt, "cuda", "contig"),
                  pos=torch.randint(0, 4 * W2, (B2,), dtype=torch.int32, device="cuda"))
             for _ in range(pairs)]

    def run_pairs():
        outs = []
        for k, c in enumerate(calls):
            ak.sliding_window_decode(q1, kn1[k], vn1, *c1, pos1, window=W1)
            outs.append(ak.sliding_window_decode(c["q"], c["kn"], c["vn"], *c["pools"], c["pos"], window=W2,
                                                 cache_indices=idx))
        return outs

    idx.copy_(sets[0])
    run_pairs()  # loads both kernels (eager: the host checks each set of indices)
    torch.cuda.synchronize()
    graph, outs = capture(run_pairs)
    for _ in range(5):
        idx.copy_(sets[0])
        before = [(c["pools"][0].clone(), c["pools"][1].clone()) for c in calls]
        graph.replay()
        torch.cuda.synchronize()
        for k, c in enumerate(calls):
            o_live, live, k_exp, v_exp = contiguous_expectation(c["q"], c["kn"], c["vn"], *before[k],
                                                                c["pos"], sets[k + 1], W2)
            assert live.all()
            check_pooled(outs[k], o_live, live, sets[k + 1], *c["pools"], k_exp, v_exp)


# ---- CPU: the reference op (torch.ops.attn_kernels.sliding_window_decode's CPU kernel) ---------------------

@pytest.mark.parametrize("layout", ["contig", "strided", "kv"])
def test_cpu_pooled_equals_contiguous(layout):
    """The CPU op with cache_indices: the contiguous CPU op on the gathered rows, pools updated in place."""
    B, H, W, e, P = 5, 2, 8, 64, 9
    q, kn, vn = (randn(B, H, e, dtype=torch.bfloat16, device="cpu") for _ in range(3))
    k_pool, v_pool = make_pool(P, H, W, e, torch.bfloat16, "cpu", layout)
    pos = torch.tensor([0, 3, 7, 8, 30], dtype=torch.int32)
    idx = torch.tensor([6, -1, 0, 2, -1], dtype=torch.int32)
    k_before, v_before = k_pool.clone(), v_pool.clone()
    o_live, live, k_exp, v_exp = contiguous_expectation(q, kn, vn, k_before, v_before, pos, idx, W)
    o = ak.sliding_window_decode(q, kn, vn, k_pool, v_pool, pos, window=W, cache_indices=idx)
    check_pooled(o, o_live, live, idx, k_pool, v_pool, k_exp, v_exp, exact=False)
