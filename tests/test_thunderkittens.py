"""ThunderKittens' Based prefill kernel (the perf suite's ``thunderkittens`` peer, built by
perf/thunderkittens.py) against ours, so that the benchmark compares two correct kernels.

GPU tests (skipped without CUDA or without a ThunderKittens checkout; a checkout that does not build fails):
TK's o by the project's rule next to ours, and its 273-wide bf16 state against ours through
``attn_kernels.state_to_expanded``. CPU tests: the build-time copy changes exactly the launcher lines
perf/README.md names, and a missing checkout skips the benchmark with the reason the gate excuses.

What TK computes (kernels/based/linear_attn.cu): ``based(q, k, v) -> (o, kv_state)`` for bf16 q, k
(B, H, N, 16), v (B, H, N, 64), N % 64 == 0, scale 1/sqrt(16) built in. o is the numerator only (no
denominator): ours with ``normalize=False``. kv_state is (B, H, 273, 64) bf16, rows = the Based model's
expanded features [1, x / 16^(1/4), vec(x x^T) / (sqrt(2) sqrt(16))] (row 17 + 16 a + f = the pair (a, f);
rows 1-16 are the kernel's (64, 16) a1 block transposed by its launcher), i.e. the transpose of
``state_to_expanded(S, z)[0][:, :, 0]`` (B, H, 64, 273).
"""
from __future__ import annotations

import math

import pytest
import torch
from harness import assert_close_rule, randn, requires_cuda
from prefill_model import K_CARRY, K_TERMS, lowp_prefill, prefill_state_model
from state_model import U32, UNIT_ROUNDOFF

import attn_kernels as ak
from attn_kernels import reference as ref
from perf import gate, impls
from perf import thunderkittens as tk_build

SCALE = 0.25  # TK's built-in 1 / sqrt(16)
CHUNK = 64
# (B, H, N), every N a multiple of 64: one chunk, a few heads, the benchmark's N = 4096, a long sequence
SHAPES = [(1, 1, 64), (2, 3, 1024), (2, 4, 4096), (1, 2, 16384)]
TK_ID = "perf/test_perf_based_prefill.py::test_perf_based_prefill[thunderkittens-num-B16-H16-N4096-bf16]"


@pytest.fixture(scope="module")
def tk():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        return tk_build.load()
    except ModuleNotFoundError:
        pytest.skip(f"{tk_build.MISSING}: no checkout")


def _inputs(B, H, N):
    q, k = (randn(B, H, N, 16, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    return q, k, randn(B, H, N, 64, dtype=torch.bfloat16, device="cuda")


@requires_cuda
@pytest.mark.parametrize("B,H,N", [pytest.param(*s, id=f"B{s[0]}-H{s[1]}-N{s[2]}") for s in SHAPES])
def test_output_within_the_rule(tk, B, H, N):
    """TK's o and ours (numerator only) against float64 by the rule (harness.assert_close_rule, row by row:
    error <= 2 x the comparator's + one bf16 step at the row's magnitude), lowp_prefill as the comparator.
    TK's arithmetic is the comparator's (float32 Q K^T, W rounded to bf16, tensor-core products into float32,
    the state rounded to bf16 for phi(Q) S; its constant-feature sum even stays float32) except that it
    rounds phi(q)'s quadratic features two or three times (q / 4 * bf16(1/sqrt 2) to bf16, then the bf16
    product) where the comparator rounds once: a share of the error, within the factor 2."""
    q, k, v = _inputs(B, H, N)
    o_tk, _ = tk.based(q, k, v)
    o_ours = ak.based_prefill(q, k, v, normalize=False, scale=SCALE)
    o64, _ = ref.based_chunked(q.double(), k.double(), v.double(), scale=SCALE, normalize=False)
    o_lp, _ = lowp_prefill(q, k, v, scale=SCALE, normalize=False)
    assert o_tk.dtype == torch.bfloat16
    assert_close_rule("thunderkittens o", o_tk, o64, o_lp)
    assert_close_rule("attn_kernels o (normalize=False)", o_ours, o64, o_lp)


def tk_state_model(k, v):
    """TK's state as a float64 model of its arithmetic, and the bound on its float32 accumulation.

    Per token TK adds phi(k) v^T with phi(k) = [1, k / 2, fl_bf16(k_a k_f) / (4 sqrt 2)]: the quadratic
    products are formed in bf16 (one rounding each, to nearest), the rest exact; it accumulates in float32
    over 64-token chunks with tensor-core products (a0: warp sums + shared-memory atomics). Returns
    (M (B, H, 273, 64), E) with E = 1.01 u sum_c [K_CARRY |P_c| + K_TERMS A_c] (the coefficients of our
    kernel's bound, prefill_model.py: groups of <= 16 products into a float32 accumulator, over the 64 tokens
    of a chunk), P_c the sum before chunk c, A_c the sum of |phi(k_j) v_j^T| over it."""
    B, H, N, _ = k.shape
    M = torch.zeros(B, H, 273, 64, dtype=torch.float64, device=k.device)
    acc = torch.zeros_like(M)
    for start in range(0, N, CHUNK):
        kc, vc = k[..., start:start + CHUNK, :], v[..., start:start + CHUNK, :].double()
        kk = (kc.float()[..., :, None] * kc.float()[..., None, :]).to(torch.bfloat16).double().flatten(-2)
        phi = torch.cat([torch.ones_like(kc[..., :1], dtype=torch.float64), kc.double() / 2,
                         kk / (4 * math.sqrt(2))], -1)
        acc += K_CARRY * M.abs() + K_TERMS * (phi.abs().transpose(-1, -2) @ vc.abs())
        M += phi.transpose(-1, -2) @ vc
    return M, 1.01 * U32 * acc


def expanded(S, z):
    """(B, H, 273, e): state_to_expanded's kv_state in TK's layout."""
    return ak.state_to_expanded(S, z)[0][:, :, 0].transpose(-1, -2)


@requires_cuda
@pytest.mark.parametrize("B,H,N", [pytest.param(*s, id=f"B{s[0]}-H{s[1]}-N{s[2]}") for s in SHAPES])
def test_state_matches_ours(tk, B, H, N):
    """TK's bf16 kv_state against ours (float32, 153-wide) through state_to_expanded, elementwise:

        |tk - ours| <= |tk - M_tk| + |M_tk - M_ours| + |M_ours - ours|

    * |tk - M_tk|: TK's float32 sum V is within E of M_tk (tk_state_model), its final float32 scaling of the
      quadratic block (by fl32(0.70710678f * 0.25f)) adds <= 2 u32 |M_tk|, and the one rounding of V to bf16
      (to nearest) <= u_bf16 |V|, u_bf16 = 2^-8: in all <= u_bf16 (|M_tk| + E + 2 u32 |M_tk|) + E
      + 2 u32 |M_tk|. The bf16 rounding is the main term: 2^-8 relative.
    * |M_tk - M_ours|: exact (float64) difference of the two models. Both round each quadratic feature of k
      once to bf16, ours after the scale: identical off the diagonal (c k_a k_f with c = 1/4 rounds as k_a k_f
      does), different on it (ours rounds c k_a^2 / sqrt 2, TK k_a^2): the difference is computed exactly.
    * |M_ours - ours|: our kernel's state bound (prefill_model.prefill_state_model, expanded with the same
      factors, all <= 1), plus 3 u32 |ours| for state_to_expanded's float32 multiply by fl32(1/sqrt 2).

    The bound is a few 2^-8 relative: a 3% scale error or a feature row out of place fails (checked below)."""
    q, k, v = _inputs(B, H, N)
    _, kv_tk = tk.based(q, k, v)
    _, (S, z) = ak.based_prefill(q, k, v, normalize=False, scale=SCALE, return_state=True)
    assert kv_tk.shape == (B, H, 273, 64) and kv_tk.dtype == torch.bfloat16
    ours = expanded(S, z).double()
    M_tk, E = tk_state_model(k, v)
    model = prefill_state_model(k, v, scale=SCALE)
    M_ours = expanded(model.S, model.z)
    bound_ours = expanded(model.bound_S, model.bound_z)
    ub, scaling = UNIT_ROUNDOFF[torch.bfloat16], 2 * U32 * M_tk.abs()
    bound = (ub * (M_tk.abs() + E + scaling) + E + scaling + (M_tk - M_ours).abs() + bound_ours
             + 3 * U32 * ours.abs())

    def worst(got: torch.Tensor) -> tuple[float, tuple, int]:
        ratio = (got.double() - ours).abs() / bound
        i = int(ratio.flatten().argmax())
        index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), ratio.shape))
        return float(ratio.flatten()[i]), index, int((ratio > 1).sum())

    r, index, over = worst(kv_tk)
    assert r <= 1, (f"TK state vs ours: element {index} (B, H, feature, e): |tk - ours| "
                    f"{abs(float(kv_tk[index]) - float(ours[index])):.3e} > bound {float(bound[index]):.3e} "
                    f"(ratio {r:.3g}; {over} of {bound.numel()} over)")
    # the bound is tight enough to see a wrong kernel: a 3% scale error, a feature row out of place
    assert worst(kv_tk.double() * 1.03)[0] > 1
    assert worst(kv_tk.double().roll(1, dims=-2))[0] > 1


# ---- CPU: the build-time copy and the skip reason ----------------------------------------------------------

def _checkout_source() -> str:
    root = tk_build.tk_dir()
    if root is None:
        pytest.skip(f"{tk_build.MISSING}: no checkout")
    return (root / tk_build.SOURCE).read_text()


def test_copy_changes_only_the_launcher_syncs_and_stream():
    """perf/README.md's promise: the copy drops the 3 cudaDeviceSynchronize() lines and launches on torch's
    current stream; every other line (the kernel included) is TK's."""
    upstream = _checkout_source()
    patched = tk_build.patched_source(upstream)
    assert "cudaDeviceSynchronize" not in patched
    assert patched.count("at::cuda::getCurrentCUDAStream()") == 1
    up, pa = upstream.splitlines(), patched.splitlines()
    removed = [line for line in up if line not in pa]
    added = [line for line in pa if line not in up]
    assert [line.strip() for line in removed].count("cudaDeviceSynchronize();") == 3 and len(removed) == 4
    assert [line.strip() for line in removed if "<<<" in line] == \
        ["based_linear_attention<<<grid,NUM_THREADS,mem_size>>>(g);"]
    assert [line.strip() for line in added] == \
        ["based_linear_attention<<<grid,NUM_THREADS,mem_size,at::cuda::getCurrentCUDAStream()>>>(g);"]
    kernel_end = upstream.index("#ifdef TK_COMPILE_BASED\n#include")
    assert patched[:kernel_end] == upstream[:kernel_end], "the kernel itself is TK's"


def test_copy_refuses_a_changed_launcher():
    text = ("void f() {\n    cudaDeviceSynchronize();\n"
            "    based_linear_attention<<<grid,NUM_THREADS,mem_size>>>(g);\n}\n")
    with pytest.raises(tk_build.ThunderKittensBuildError, match="expected 3"):
        tk_build.patched_source(text)


def _skip_reason(monkeypatch) -> str:
    import sys

    monkeypatch.delitem(sys.modules, tk_build.NAME, raising=False)
    tk_build.install_import_hook()
    with pytest.raises(pytest.skip.Exception) as info:
        impls.import_optional(tk_build.NAME, tk_build.MISSING)
    return str(info.value.msg)


def test_no_checkout_skips_as_not_installed(monkeypatch, tmp_path):
    """No checkout anywhere: the benchmark skips with the reason of an optional peer whose package is not
    installed, which the gate excuses for the thunderkittens ids (and for no other peer's)."""
    monkeypatch.delenv(tk_build.ENV_DIR, raising=False)
    monkeypatch.setattr(tk_build, "DEFAULT_DIRS", (tmp_path / "absent",))
    reason = _skip_reason(monkeypatch)
    assert "`import thunderkittens` failed: ModuleNotFoundError: No module named 'thunderkittens'" in reason
    assert gate.not_installed_excuse(TK_ID, reason)
    assert not gate.not_installed_excuse(TK_ID.replace("thunderkittens", "attn_kernels"), reason)


def test_wrong_checkout_is_not_excused(monkeypatch, tmp_path):
    """ATTN_KERNELS_TK_DIR naming a folder without TK's sources is an error the gate does not excuse."""
    monkeypatch.setenv(tk_build.ENV_DIR, str(tmp_path))
    reason = _skip_reason(monkeypatch)
    assert "ThunderKittensBuildError" in reason and tk_build.ENV_DIR in reason
    assert not gate.not_installed_excuse(TK_ID, reason)
