"""based_decode against the float64 reference: output AND updated state, over the matrix (GPU) and on
the CPU; long-run drift; in-place semantics."""
import pytest
import torch

import attn_kernels as ak
from attn_kernels import reference as ref
from harness import (DTYPE_IDS, assert_close_rule, max_err, nbytes, poison_allocator, prior_state, randn,
                     requires_cuda)
from prefill_model import lowp_prefill
from state_model import StateModel, assert_state_close, decode_state_advance, decode_state_model

BH = [(1, 1), (2, 8), (40, 25), (128, 128)]  # B*H = 1, 16, 1000, 16384


def lowp_step(q, k, v, state, **kw):
    """The comparator of a decode step: the kernel's arithmetic for either state dtype — float32 math on the
    state as given (a bf16 state is read exactly), the output rounded once to the input dtype."""
    o, new_state = ref.based_decode_step(q.float(), k.float(), v.float(), tuple(t.float() for t in state), **kw)
    return o.to(q.dtype), new_state


def run_and_check(B, H, dtype, state_dtype, normalize, transposed, device):
    q, k = (randn(B, H, 16, dtype=dtype, device=device, transposed=transposed) for _ in range(2))
    v = randn(B, H, 64, dtype=dtype, device=device, transposed=transposed)
    S, z = prior_state(B, H, device, state_dtype, tokens=8)
    S_in, z_in = S.clone(), z.clone()
    if device == "cuda":
        poison_allocator(nbytes(B, H, 64, dtype=dtype))
    o = ak.based_decode(q, k, v, (S, z), normalize=normalize)
    kw = dict(normalize=normalize)
    o64, _ = ref.based_decode_step(q.double(), k.double(), v.double(), (S_in.double(), z_in.double()), **kw)
    o_lp, _ = lowp_step(q, k, v, (S_in, z_in), **kw)
    assert o.dtype == dtype and S.dtype == state_dtype
    assert_close_rule("o", o, o64, o_lp)
    # The updated state: float32-level (float32 state) or one bf16 rounding (bf16 state) from the exact update.
    assert_state_close(S, z, decode_state_model((S_in, z_in), k, v, state_dtype=state_dtype))


@requires_cuda
@pytest.mark.parametrize("transposed", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "state_" + DTYPE_IDS[d])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("B,H", [pytest.param(*s, id=f"B{s[0]}-H{s[1]}") for s in BH])
def test_matrix(B, H, dtype, state_dtype, normalize, transposed):
    run_and_check(B, H, dtype, state_dtype, normalize, transposed, "cuda")


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "state_" + DTYPE_IDS[d])
def test_cpu_op(state_dtype):
    run_and_check(2, 3, torch.bfloat16, state_dtype, True, True, "cpu")


@requires_cuda
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "state_" + DTYPE_IDS[d])
def test_ten_thousand_steps_drift(state_dtype, record_property):
    """10,000 decode steps from a prefilled state against a float64 recurrence started from that same state
    (so only the decode steps' rounding is measured). The float32 state must stay within 5e-5 relative;
    the bf16 state's drift is reported at 100, 1,000 and 10,000 steps (README: its accuracy cost). With
    ATTN_KERNELS_DRIFT_JSON naming a file, both state dtypes' numbers are merged into it (perf/drift.py; commit
    it as perf/results/decode_drift.json, from which `python -m perf.report` writes the README table)."""
    from perf import drift as drift_file  # the data file's writer, schema and steps (shared with the README)

    B, H, N0, T = 2, 4, drift_file.PREFILL_TOKENS, drift_file.STEPS[-1]  # 512, 10,000
    q, k = (torch.randn(B, H, N0 + T, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, H, N0 + T, 64, device="cuda", dtype=torch.bfloat16)
    _, (S, z) = ak.based_prefill(q[:, :, :N0], k[:, :, :N0], v[:, :, :N0], return_state=True)
    S, z = S.to(state_dtype), z.to(state_dtype)
    S64, z64 = S.double(), z.double()
    drift = {}
    for t in range(N0, N0 + T):
        o = ak.based_decode(q[:, :, t], k[:, :, t], v[:, :, t], (S, z))
        o64, (S64, z64) = ref.based_decode_step(q[:, :, t].double(), k[:, :, t].double(), v[:, :, t].double(),
                                                (S64, z64))
        steps = t - N0 + 1
        if steps in drift_file.STEPS:
            assert torch.isfinite(o).all() and torch.isfinite(S).all()
            drift[steps] = (max_err(o, o64) / o64.abs().max().item(), max_err(S, S64) / S64.abs().max().item())
    for steps, (o_rel, s_rel) in drift.items():
        record_property(f"drift_{steps}_output_rel", o_rel)
        record_property(f"drift_{steps}_state_rel", s_rel)
    print(f"\ndecode drift, {DTYPE_IDS[state_dtype]} state (relative to max|ref|), steps: output / state: "
          + "; ".join(f"{n}: {o:.2e} / {s:.2e}" for n, (o, s) in drift.items()))
    drift_file.record(DTYPE_IDS[state_dtype], drift, gpu_name=torch.cuda.get_device_name(),
                      torch_version=torch.__version__)  # writes only where ATTN_KERNELS_DRIFT_JSON is set
    if state_dtype == torch.float32:
        o_rel, s_rel = drift[10_000]
        assert s_rel < 5e-5, f"fp32 state drifted {s_rel:.2e} over 10,000 steps"
        assert o_rel < 1e-2, f"fp32-state outputs drifted {o_rel:.2e} (bf16 output rounding is ~4e-3)"


@requires_cuda
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "state_" + DTYPE_IDS[d])
def test_cuda_graph_capture_updates_state_every_replay(state_dtype):
    """Served as a captured graph: new inputs are copied into the captured buffers before each replay; after
    every replay o, S and z are checked against a float64 recurrence (o by the rule, the state within the
    step bounds accumulated over the replays)."""
    B, H, dtype = 4, 16, torch.bfloat16
    q, k = (torch.randn(B, H, 16, device="cuda", dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, 64, device="cuda", dtype=dtype)
    S, z = ak.empty_state(B, H, dtype=state_dtype, device="cuda")
    ak.based_decode(q, k, v, (S, z))  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = ak.based_decode(q, k, v, (S, z))
    S.zero_()
    z.zero_()
    zeros = ref.zero_state(B, H, dtype=torch.float64, device="cuda")
    model = StateModel(*zeros, *(torch.zeros_like(t) for t in zeros))
    for replay in range(4):
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device="cuda"))
        S_in, z_in = S.clone(), z.clone()
        graph.replay()
        torch.cuda.synchronize()
        o64, _ = ref.based_decode_step(q.double(), k.double(), v.double(), (model.S, model.z))
        o_lp, _ = lowp_step(q, k, v, (S_in, z_in))
        assert_close_rule(f"o after replay {replay}", o, o64, o_lp)
        model = decode_state_advance(model, k, v, state_dtype=state_dtype)
        assert_state_close(S, z, model)


@requires_cuda
def test_accepts_prefill_state_unchanged():
    """The state based_prefill returns goes to based_decode as is (contiguous float32, updated in place), and
    the step continues the sequence: its output is the longer prefill's at that position (the rule), its
    state the prefill's plus the new token (the decode step's bound)."""
    B, H, N = 2, 4, 100
    q, k = (torch.randn(B, H, N + 1, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, H, N + 1, 64, device="cuda", dtype=torch.bfloat16)
    _, state = ak.based_prefill(q[:, :, :N], k[:, :, :N], v[:, :, :N], return_state=True)
    S, z = state
    assert S.is_contiguous() and z.is_contiguous() and S.dtype == z.dtype == torch.float32
    S_before, z_before = S.clone(), z.clone()
    o = ak.based_decode(q[:, :, N], k[:, :, N], v[:, :, N], state)
    assert state[0] is S and state[1] is z and not torch.equal(S, S_before) and not torch.equal(z, z_before)
    assert_state_close(S, z, decode_state_model((S_before, z_before), k[:, :, N], v[:, :, N]))
    o64, _ = ref.based_chunked(q.double(), k.double(), v.double())
    o_lp, _ = lowp_prefill(q, k, v)
    assert_close_rule("decode after prefill", o, o64[:, :, N], o_lp[:, :, N])


def test_empty_state():
    S, z = ak.empty_state(3, 5)
    assert S.shape == (3, 5, 153, 64) and z.shape == (3, 5, 153) and S.dtype == torch.float32
    assert S.abs().sum() == 0 and z.abs().sum() == 0
    S, z = ak.empty_state(1, 2, dtype=torch.bfloat16)
    assert S.dtype == z.dtype == torch.bfloat16


# ---- a state pool (state_indices) ---------------------------------------------------------------------------
# Pooled decode does contiguous decode's arithmetic on other addresses, so it is checked bitwise against the
# contiguous kernel run on the slots gathered into a contiguous state (same B*H, so the same column split).

POOL_BH = [(1, 1), (2, 8), (3, 12), (40, 25), (130, 16)]  # splits 8, 4, 2, 1 (PDL) and 1 (B*H > 1024: plain)


def bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def assert_bitwise(name, got, want):
    """Equal bits, except that a NaN matches any NaN (the kernel's NaN rows have their own payload)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    differ = (bits(got) != bits(want)) & ~(torch.isnan(got) & torch.isnan(want))
    assert not differ.any(), f"{name}: {int(differ.sum())} of {got.numel()} elements differ bitwise"


def slot_map(B, P, device, padding=0):
    """(B,) int32: distinct shuffled slots of [0, P), `padding` random rows -1."""
    idx = torch.randperm(P)[:B]
    if padding:
        idx[torch.randperm(B)[:padding]] = -1
    return idx.to(torch.int32).to(device)


def pooled_expectation(q, k, v, pool, idx, **kw):
    """What pooled decode must give, from the contiguous kernel (or the CPU op) on the gathered slots: o with
    padding rows 0 and out-of-range rows NaN, and the pool with exactly the named slots updated."""
    S_pool, z_pool = pool
    P = S_pool.shape[0]
    valid = (idx >= 0) & (idx < P)
    safe = torch.where(valid, idx, 0).long()
    S, z = S_pool[safe].clone(), z_pool[safe].clone()  # rows of padding / bad rows: scratch, discarded
    o = ak.based_decode(q, k, v, (S, z), **kw)
    o = torch.where((idx == -1)[:, None, None], 0.0, o)
    o = torch.where((~valid & (idx != -1))[:, None, None], float("nan"), o).to(q.dtype)
    S_exp, z_exp = S_pool.clone(), z_pool.clone()
    S_exp[idx[valid].long()], z_exp[idx[valid].long()] = S[valid], z[valid]
    return o, S_exp, z_exp


def run_pooled_and_check(B, H, dtype, state_dtype, normalize, strided, device, padding=0, P=None):
    P = 2 * B + 1 if P is None else P
    q, k = (randn(B, H, 16, dtype=dtype, device=device, transposed=strided) for _ in range(2))
    v = randn(B, H, 64, dtype=dtype, device=device, transposed=strided)
    pool = prior_state(P, H, device, state_dtype, tokens=8)
    idx = slot_map(B, P, device, padding)
    o_exp, S_exp, z_exp = pooled_expectation(q, k, v, pool, idx, normalize=normalize)
    pool_in = tuple(t.clone() for t in pool)
    if device == "cuda":
        poison_allocator(nbytes(B, H, 64, dtype=dtype))
    o = ak.based_decode(q, k, v, pool, state_indices=idx, normalize=normalize)
    assert o.dtype == dtype and pool[0].dtype == state_dtype
    assert_bitwise("o", o, o_exp)
    assert_bitwise("S pool", pool[0], S_exp)
    assert_bitwise("z pool", pool[1], z_exp)
    # and against float64 (the reference of the pooled semantics), rows with a slot
    rows = idx >= 0
    o64, _ = ref.based_decode_pooled(q.double(), k.double(), v.double(), tuple(t.double() for t in pool_in), idx,
                                     normalize=normalize)
    o_lp, _ = lowp_step(q[rows], k[rows], v[rows], tuple(t[idx[rows].long()] for t in pool_in), normalize=normalize)
    if rows.any():
        assert_close_rule("o (pooled)", o[rows], o64[rows], o_lp)
    return o, idx


@requires_cuda
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "state_" + DTYPE_IDS[d])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("B,H", [pytest.param(*s, id=f"B{s[0]}-H{s[1]}") for s in POOL_BH])
def test_pooled_equals_contiguous_bitwise(B, H, dtype, state_dtype, normalize, strided):
    """Shuffled distinct slots of a pool of P = 2B + 1: o and the named slots bitwise those of contiguous
    decode on the gathered slots; every other slot bitwise untouched."""
    run_pooled_and_check(B, H, dtype, state_dtype, normalize, strided, "cuda")


@requires_cuda
@pytest.mark.parametrize("padding", ["some", "all"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "state_" + DTYPE_IDS[d])
@pytest.mark.parametrize("B,H", [pytest.param(*s, id=f"B{s[0]}-H{s[1]}") for s in POOL_BH])
def test_pooled_padding_rows(B, H, state_dtype, padding):
    """-1 rows (repeated): o exactly 0 (over a NaN-poisoned allocation), no slot read or written for them."""
    pad = B if padding == "all" else max(1, B // 3) + (B > 2)
    o, idx = run_pooled_and_check(B, H, torch.bfloat16, state_dtype, True, False, "cuda", padding=pad)
    assert int((idx == -1).sum()) == pad and (o[idx == -1] == 0).all()


def bad_index_case(device, state_dtype=torch.float32):
    """B = 5 rows of a pool of P = 7: a slot, -1, an index >= P, an index < -1, a slot."""
    B, H, P = 5, 4, 7
    q, k = (torch.randn(B, H, 16, device=device, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, H, 64, device=device, dtype=torch.bfloat16)
    pool = prior_state(P, H, device, state_dtype, tokens=8)
    good = slot_map(B, P, device)
    bad = good.clone()
    bad[1], bad[2], bad[3] = -1, P + 3, -5
    return q, k, v, pool, good, bad


def check_bad_indices(o, pool, expected):
    o_exp, S_exp, z_exp = expected
    assert torch.isnan(o[2]).all() and torch.isnan(o[3]).all(), "out-of-range rows must be NaN"
    assert (o[1] == 0).all(), "the padding row must be 0"
    assert_bitwise("o", o, o_exp)
    assert_bitwise("S pool", pool[0], S_exp)
    assert_bitwise("z pool", pool[1], z_exp)


@requires_cuda
def test_pooled_out_of_range_index_through_the_op():
    """The op itself (no host check: torch.ops) with indices >= P and < -1: NaN rows, nothing written for
    them, the other rows as contiguous decode."""
    q, k, v, pool, _, bad = bad_index_case("cuda")
    expected = pooled_expectation(q, k, v, pool, bad)
    o = torch.ops.attn_kernels.based_decode(q, k, v, *pool, 0.25, True, 1e-6, bad)
    check_bad_indices(o, pool, expected)


@requires_cuda
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "state_" + DTYPE_IDS[d])
def test_pooled_out_of_range_index_under_graph_capture(state_dtype):
    """Captured with valid indices (no host check can run inside the capture), replayed with an index >= P and
    one < -1: those rows are NaN and write nothing, the padding row is 0, the other rows are contiguous
    decode's, bitwise."""
    q, k, v, pool, good, bad = bad_index_case("cuda", state_dtype)
    idx = good.clone()
    ak.based_decode(q, k, v, pool, state_indices=idx)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = ak.based_decode(q, k, v, pool, state_indices=idx)
    idx.copy_(bad)
    expected = pooled_expectation(q, k, v, pool, bad)
    graph.replay()
    torch.cuda.synchronize()
    check_bad_indices(o, pool, expected)


@requires_cuda
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "state_" + DTYPE_IDS[d])
def test_pooled_graph_replays_with_new_indices(state_dtype):
    """One captured step replayed 5 times on one pool, new q, k, v and a new slot map (shuffled, some -1)
    copied in before each replay: after every replay o and the whole pool are bitwise what contiguous decode
    on the gathered slots gives."""
    B, H, P = 6, 16, 10
    q, k = (torch.randn(B, H, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, H, 64, device="cuda", dtype=torch.bfloat16)
    pool = prior_state(P, H, "cuda", state_dtype, tokens=8)
    idx = slot_map(B, P, "cuda")
    ak.based_decode(q, k, v, pool, state_indices=idx)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = ak.based_decode(q, k, v, pool, state_indices=idx)
    for replay in range(5):
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device="cuda"))
        idx.copy_(slot_map(B, P, "cuda", padding=replay % 3))
        o_exp, S_exp, z_exp = pooled_expectation(q, k, v, pool, idx)
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise(f"o after replay {replay}", o, o_exp)
        assert_bitwise(f"S pool after replay {replay}", pool[0], S_exp)
        assert_bitwise(f"z pool after replay {replay}", pool[1], z_exp)


@requires_cuda
@pytest.mark.parametrize("writer_rows", [64, 1], ids=lambda r: f"writer_B{r}")
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "state_" + DTYPE_IDS[d])
def test_pooled_indices_written_by_the_previous_kernel(state_dtype, writer_rows):
    """A small batch's pooled kernel guesses its slot before waiting on the previous grid (PDL) and must
    correct the guess with the index read after the wait. Here the previous kernel writes the indices:
    state_indices is an int32 view of a sliding_window_decode cache slot that the call just before overwrites
    (its k_new holds the new indices' bits; that kernel lets its dependents launch before it writes). Whether
    a block saw the old indices is timing; whatever it saw, every step must give bitwise what contiguous
    decode gives on the slots the new indices name, and leave the other slots alone. Two writers: several
    waves (the decode's blocks start as its last CTAs retire) and 16 CTAs (the GPU is free for the decode's
    clusters from the writer's trigger on)."""
    B1, H1, W1, e1, slot = writer_rows, 16, 256, 128, 7  # the writer's last CTA writes the indices
    B, H, P, pairs = 4, 4, 40, 6  # 16 heads, 4 blocks each: the PDL-launched grid that guesses (kGuess)
    dt = torch.bfloat16
    c1 = [torch.randn(B1, H1, W1, e1, device="cuda").to(dt) for _ in range(2)]
    q1, vn1 = (torch.randn(B1, H1, e1, device="cuda", dtype=dt) for _ in range(2))
    pos1 = torch.full((B1,), slot, dtype=torch.int32, device="cuda")
    idx = c1[0][B1 - 1, H1 - 1, slot, :2 * B].view(torch.int32)  # (B,) int32 in the slot's first 64 bytes
    sets = [slot_map(B, P, "cuda") for _ in range(pairs + 1)]
    kn1 = [torch.randn(B1, H1, e1, device="cuda", dtype=dt) for _ in range(pairs)]
    for i in range(pairs):
        kn1[i][B1 - 1, H1 - 1, :2 * B] = sets[i + 1].view(dt)
    steps = [dict(q=torch.randn(B, H, 16, device="cuda", dtype=dt), k=torch.randn(B, H, 16, device="cuda", dtype=dt),
                  v=torch.randn(B, H, 64, device="cuda", dtype=dt), pool=prior_state(P, H, "cuda", state_dtype, tokens=8))
             for _ in range(pairs)]

    def run_pairs():
        outs = []
        for i, s in enumerate(steps):
            ak.sliding_window_decode(q1, kn1[i], vn1, *c1, pos1, window=W1)
            outs.append(ak.based_decode(s["q"], s["k"], s["v"], s["pool"], state_indices=idx))
        return outs

    idx.copy_(sets[0])
    run_pairs()  # loads both kernels (eager: the host checks each set of indices)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run_pairs()
    for replay in range(5):
        idx.copy_(sets[0])
        before = [tuple(t.clone() for t in s["pool"]) for s in steps]
        expected = [pooled_expectation(s["q"], s["k"], s["v"], before[i], sets[i + 1]) for i, s in enumerate(steps)]
        graph.replay()
        torch.cuda.synchronize()
        for i, s in enumerate(steps):
            o_exp, S_exp, z_exp = expected[i]
            assert_bitwise(f"o of step {i}, replay {replay}", outs[i], o_exp)
            assert_bitwise(f"S pool of step {i}, replay {replay}", s["pool"][0], S_exp)
            assert_bitwise(f"z pool of step {i}, replay {replay}", s["pool"][1], z_exp)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=lambda d: "state_" + DTYPE_IDS[d])
def test_cpu_pooled_op(state_dtype):
    run_pooled_and_check(3, 2, torch.bfloat16, state_dtype, True, True, "cpu", padding=1)


def test_cpu_out_of_range_index_through_the_op():
    q, k, v, pool, _, bad = bad_index_case("cpu")
    expected = pooled_expectation(q, k, v, pool, bad)
    check_bad_indices(torch.ops.attn_kernels.based_decode(q, k, v, *pool, 0.25, True, 1e-6, bad), pool, expected)


def test_cpu_compiled_pooled_decode_skips_the_host_checks():
    """Under torch.compile the index values are not read on the host (no graph break, no error): an
    out-of-range index gives the op's NaN row and writes nothing, as under graph capture."""
    q, k, v, pool, _, bad = bad_index_case("cpu")
    expected = pooled_expectation(q, k, v, pool, bad)

    def step(q, k, v, S, z, idx):
        return ak.based_decode(q, k, v, (S, z), state_indices=idx)

    o = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, *pool, bad)
    check_bad_indices(o, pool, expected)
