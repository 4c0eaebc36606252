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
