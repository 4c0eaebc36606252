"""CPU emulation of based_prefill_backward's CUDA kernels' rounding (csrc/based_prefill_backward/), to measure
the error / bound ratios of tests/test_based_prefill_backward_cuda.py's rule without a GPU, for the kernel as
of GPU run 1 ("kernel") and for candidate operand schemes (SCHEMES; the kernel now runs CURRENT, "dnum2-all+gk2").
Not a test (pytest does not collect it):
    python tests/bwd_emulation.py [--seeds 20] [--cases NAME,..] [--schemes NAME,..]

What it models (float64 arithmetic, rounded where the kernel rounds; the float32 accumulations of the tensor
cores and CUDA cores are taken as exact: their error is ~2^-24 per add, far below the operand roundings):
- chunks of 64 tokens; features phi from prefill_model.kernel_features (float32, the kernel's operation order),
  rounded to the input dtype T where they are a tile operand (phi(Q), phi(K)), exact where the CUDA cores
  use them (den, dot, dz, the Jacobians);
- forward sweep: s, A, P' = G V^T in float32 (exact products of T values); the running S (float32, exact here)
  meets the tensor cores as bf16 (fp16 inputs: S and G split into bf16 hi + lo, hi.hi + hi.lo + lo.hi);
  den, dot, inv = fl32(1 / (den + eps)), dden = -inv^2 dot; dq = fl_T(c fl_T(ds) K + sqrt(c) phi'^T(inv g' +
  dden z));
- backward sweep: dnum = fl_T(fl32(grad_o inv)); P^T = V dnum^T, ds^T = fl_T(causal (P^T + dden)(1 + s));
  gk = stash(dS) V^T (stash = bf16 of dS, fp16: hi + lo with V split), dk = fl_T(c ds^T Q + sqrt(c)
  phi'^T(gk + dz)); dv = fl_T(phi(K) stash(dS) + fl_T(A)^T dnum); dz += phi(Q)^T dden (exact features);
  dS += (the variant's operands of phi(Q)^T dnum).
- z and dz as the kernel adds them up: from each chunk's moments (z: K^T K, K^T 1, exact; dz: Q^T diag(dden) Q,
  Q^T dden with diag(dden) Q and dden as bf16 hi + lo), mapped onto the compact features (moment_features).
dS-path variants ("dsv"): kernel = fl_T(phi(Q))^T fl_T(dnum) (as written); dnum2 = dnum as hi + lo (2 mma);
phi2 = phi(Q) as hi + lo; both = hi.hi + hi.lo + lo.hi (3 mma); scaled = (inv phi(Q)) as bf16 hi + lo against
grad_o itself (2 mma, exact B operand); exact = no operand rounding. Scheme "dnum2-all" also feeds P^T and
A^T dnum with dnum's hi + lo; "+gk2" forms gk with dS as bf16 hi + lo for bf16 inputs.
The comparator and ref64 are the test's: reference_backward.based_vjp in T and in float64 (here on the CPU)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from harness import prior_state  # noqa: E402
from prefill_model import kernel_features  # noqa: E402

from attn_kernels.reference_backward import based_vjp, feature_map_vjp  # noqa: E402

CH = 64
F64 = torch.float64
NAMES = ("dq", "dk", "dv", "dS0", "dz0")
VARIANTS = ("kernel", "dnum2", "phi2", "both", "scaled", "exact")  # the dS product's operands
SCHEMES = {  # name: (dS product variant, P^T / A^T dnum operand[, gk's dS as hi + lo])
    "kernel": ("kernel", "kernel"), "dnum2-dS": ("dnum2", "kernel"), "phi2-dS": ("phi2", "kernel"),
    "both-dS": ("both", "kernel"), "scaled-dS": ("scaled", "kernel"), "dnum2-all": ("dnum2", "dnum2"),
    "both-all": ("both", "dnum2"), "dnum2-all+gk2": ("dnum2", "dnum2", True), "exact-dS+dnum2": ("exact", "dnum2"),
}
CURRENT = "dnum2-all+gk2"  # the kernel's scheme now
OUT_DTYPE = {"dS0": torch.float32, "dz0": torch.float32}


def fl(x, dt):
    return x.to(dt).to(F64)


def split(x, dt):
    """x (float32 values) = hi + lo, hi = fl_dt(x), lo = fl_dt(x - hi), as float64."""
    hi = fl(x.float(), dt)
    return hi, fl((x.float().double() - hi).float(), dt)


def state_op(S, other, dt_in, eq, split_bf16=False):
    """einsum(eq, S as the state operand, other) as the tensor cores form it: S bf16 (fp16 inputs: bf16 hi + lo,
    the other operand split too, hi.hi + hi.lo + lo.hi; split_bf16: bf16 inputs with S as hi + lo, 2 mma)."""
    if dt_in == torch.bfloat16:
        return torch.einsum(eq, sum(split(S, torch.bfloat16)) if split_bf16 else fl(S.float(), torch.bfloat16),
                            other)
    sh, sl = split(S, torch.bfloat16)
    oh, ol = split(other, torch.bfloat16)
    return torch.einsum(eq, sh, oh) + torch.einsum(eq, sh, ol) + torch.einsum(eq, sl, oh)


def moment_features(M, m1, m0, c):
    """The compact features' chunk sums from the moments (the kernel's add_moments): M (.., 16, 16), m1 (.., 16),
    m0 (..) -> (.., 153): m0, sqrt(c) m1, c M_ii / sqrt(2), c M_ij (i < j, row i the unweighted operand)."""
    i, j = torch.triu_indices(16, 16, offset=1)
    diag = torch.diagonal(M, dim1=-2, dim2=-1)
    return torch.cat([m0[..., None], c ** 0.5 * m1, c * 0.70710678118654752 * diag, c * M[..., i, j]], -1)


def dz_moments(q_, dden, c, T):
    """The chunks' dz terms phi(Q)^T dden as the kernel forms them (tiles.cuh's chunk_moments, weighted):
    M = X^T W, W = fl32(dden x) as bf16 hi + lo, m1 = X^T (dden as bf16 hi + lo), X = Q (bf16 inputs: exact;
    fp16: bf16 hi + lo, the lo.lo product dropped), m0 = sum dden; q_ (BH, C, 64, 16), dden (BH, C, 64)."""
    bf = torch.bfloat16
    wh, wl = split((q_.float() * dden[..., None].float()).double(), bf)
    dh, dl = split(dden, bf)
    xh, xl = (q_, torch.zeros_like(q_)) if T == bf else split(q_, bf)
    M = torch.einsum("bcri,bcrj->bcij", xh, wh + wl) + torch.einsum("bcri,bcrj->bcij", xl, wh)
    m1 = torch.einsum("bcri,bcr->bci", xh, dh + dl) + torch.einsum("bcri,bcr->bci", xl, dh)
    return moment_features(M, m1, dden.sum(2), c)


def chunked(x, C):
    """(BH, N, d) -> (BH, C, 64, d), zero-padded."""
    BH, N, d = x.shape
    out = x.new_zeros(BH, C * CH, d)
    out[:, :N] = x
    return out.view(BH, C, CH, d)


def emulate(q, k, v, go, S0, z0, gS, gz, *, scale=0.25, eps=1e-6, dsv="kernel", pv="kernel", gk2=False):
    """The kernel's gradients (dq, dk, dv, dS0, dz0), float64 tensors. Inputs as the test makes them. dsv: the
    dS product's operands (VARIANTS); pv: dnum as the operand of P^T = V dnum^T and A^T dnum ("kernel": fl_T,
    "dnum2": hi + lo, 2 mma each); gk2: bf16 inputs' dS as hi + lo in gk = dS V^T (2 mma)."""
    T = q.dtype
    B, H, N, _ = q.shape
    BH, C = B * H, (N + CH - 1) // CH
    c32 = torch.tensor(scale, dtype=torch.float32)
    c = c32.double().item()
    rs = lambda t: t.reshape(BH, *t.shape[2:])  # noqa: E731
    q_, k_, v_, g_ = (chunked(rs(t).to(F64), C) for t in (q, k, v, go))
    phiq32, phik32 = (chunked(rs(kernel_features(t, scale)).to(F64), C) for t in (q, k))
    valid = chunked(torch.ones(BH, N, 1, dtype=F64), C)[..., 0]  # (BH, C, 64)
    phik_op = fl(phik32.float(), T) * valid[..., None]  # padding keys: zero rows (their v rows are zero too)
    S0 = rs(S0).to(F64) if S0 is not None else torch.zeros(BH, 153, 64, dtype=F64)
    z0 = rs(z0).to(F64) if z0 is not None else torch.zeros(BH, 153, dtype=F64)
    mask = torch.ones(CH, CH, dtype=torch.bool).tril()

    # forward sweep: the states before each chunk
    dSk = torch.einsum("bctf,bcte->bcfe", phik_op, v_)
    dzk = moment_features(torch.einsum("bcri,bcrj->bcij", k_, k_), k_.sum(2), valid.sum(2), c)  # exact
    S_before = S0[:, None] + torch.cumsum(dSk, 1) - dSk
    z_before = z0[:, None] + torch.cumsum(dzk, 1) - dzk
    s = c * (q_ @ k_.transpose(-1, -2))
    A = torch.where(mask, 1 + s + 0.5 * s * s, torch.zeros((), dtype=F64))
    P = g_ @ v_.transpose(-1, -2)  # P'[query, key]
    gp = state_op(S_before, g_, T, "bcfe,bcte->bctf")  # g' = S G^T, per token
    den = A.sum(-1) + torch.einsum("bctf,bcf->bct", phiq32, z_before)
    dot = (A * P).sum(-1) + (phiq32 * gp).sum(-1)
    inv = torch.where(valid > 0, (1 / (den + eps)).float().double(), torch.zeros((), dtype=F64))
    dden = (-(inv * inv) * dot).float().double()
    ds = fl(torch.where(mask, (inv[..., None] * P + dden[..., None]) * (1 + s), torch.zeros((), dtype=F64)), T)
    gq = inv[..., None] * gp + dden[..., None] * z_before[:, :, None, :]
    dq = fl(c * (ds @ k_) + feature_map_vjp(q_, gq, scale), T)

    # backward sweep
    dnum32 = (g_.float() * inv[..., None].float()).double()
    dnum = fl(dnum32, T)
    sT = s.transpose(-1, -2)
    dnum_pv = sum(split(dnum32, T)) if pv == "dnum2" else dnum
    PT = v_ @ dnum_pv.transpose(-1, -2)  # P^T[key, query]
    dsT = fl(torch.where(mask.T, (PT + dden[:, :, None, :]) * (1 + sT), torch.zeros((), dtype=F64)), T)
    phiq_op = fl(phiq32.float(), T)
    if dsv == "kernel":
        dSq = torch.einsum("bctf,bcte->bcfe", phiq_op, dnum)
    elif dsv == "dnum2":
        hi, lo = split(dnum32, T)
        dSq = torch.einsum("bctf,bcte->bcfe", phiq_op, hi + lo)
    elif dsv == "phi2":
        hi, lo = split(phiq32, T)
        dSq = torch.einsum("bctf,bcte->bcfe", hi + lo, dnum)
    elif dsv == "both":
        ph, pl = split(phiq32, T)
        dh, dl = split(dnum32, T)
        dSq = sum(torch.einsum("bctf,bcte->bcfe", a, b) for a, b in ((ph, dh), (ph, dl), (pl, dh)))
    elif dsv == "scaled":
        ph, pl = split((phiq32 * inv[..., None]).float(), torch.bfloat16)
        dSq = torch.einsum("bctf,bcte->bcfe", ph + pl, g_)
    else:
        dSq = torch.einsum("bctf,bcte->bcfe", phiq32, dnum32)
    dzq = dz_moments(q_, dden, c, T)
    gS = rs(gS).to(F64) if gS is not None else torch.zeros(BH, 153, 64, dtype=F64)
    gz = rs(gz).to(F64) if gz is not None else torch.zeros(BH, 153, dtype=F64)
    dS_after = gS[:, None] + dSq.flip(1).cumsum(1).flip(1) - dSq  # dS of the later chunks
    dz_after = gz[:, None] + dzq.flip(1).cumsum(1).flip(1) - dzq
    gk = state_op(dS_after, v_, T, "bcfe,bcte->bctf", gk2) + dz_after[:, :, None, :]
    dk = fl(c * (dsT @ q_) + feature_map_vjp(k_, gk, scale), T)
    if T == torch.bfloat16:
        dv_state = torch.einsum("bctf,bcfe->bcte", phik_op, fl(dS_after.float(), torch.bfloat16))
    else:
        ph, pl = split(phik32, torch.bfloat16)
        sh, sl = split(dS_after, torch.bfloat16)
        dv_state = sum(torch.einsum("bctf,bcfe->bcte", a, b) for a, b in ((ph, sh), (ph, sl), (pl, sh)))
    dv = fl(dv_state + fl(A, T).transpose(-1, -2) @ dnum_pv, T)
    dS0 = gS + dSq.sum(1)
    dz0 = gz + dzq.sum(1)
    back = lambda t: t.reshape(BH, C * CH, -1)[:, :N].reshape(B, H, N, -1)  # noqa: E731
    return back(dq), back(dk), back(dv), dS0.view(B, H, 153, 64), dz0.view(B, H, 153)


def case(seed, B, H, N, dtype, init=True, grad_state=True, normalize=True):
    """One test case's inputs as tests/test_based_prefill_backward_cuda.make draws them (CPU), with ref64 and
    the comparator."""
    assert normalize, "the emulation models the normalized backward"
    torch.manual_seed(seed)
    q, k = (torch.randn(B, H, N, 16).to(dtype) for _ in range(2))
    v, go = (torch.randn(B, H, N, 64).to(dtype) for _ in range(2))
    S0, z0 = prior_state(B, H, "cpu") if init else (None, None)
    gS, gz = (torch.randn(B, H, 153, 64), torch.randn(B, H, 153)) if grad_state else (None, None)

    def vjp(dt):
        cast = lambda t: None if t is None else t.to(dt)  # noqa: E731
        return based_vjp(cast(q), cast(k), cast(v), cast(go), cast(gS), cast(gz), normalize=True, eps=1e-6,
                         initial_state=None if S0 is None else (cast(S0), cast(z0)))
    return (q, k, v, go, S0, z0, gS, gz), vjp(F64), vjp(dtype)


def row_ratios(out, r64, rl, dtype):
    """Per-row error / bound of the test's rule (harness.rule_check's formula; eps of the output's dtype),
    flattened."""
    r64 = r64.double()
    err = (out - r64).abs().amax(-1)
    bound = 2 * (rl.double() - r64).abs().amax(-1) + torch.finfo(dtype).eps * r64.abs().amax(-1)
    return (err / bound).flatten()


CASES = {  # name: (B, H, N, dtype, init, grad_state)
    "B2H3N200-bf16-nogradS": (2, 3, 200, torch.bfloat16, True, False),
    "B2H3N200-bf16": (2, 3, 200, torch.bfloat16, True, True),
    "B3H8N130-bf16-nogradS": (3, 8, 130, torch.bfloat16, True, False),
    "B1H4N1000-bf16-nogradS": (1, 4, 1000, torch.bfloat16, True, False),
    "B1H2N4097-bf16-nogradS": (1, 2, 4097, torch.bfloat16, True, False),
    "B2H3N200-fp16-nogradS": (2, 3, 200, torch.float16, True, False),
    "B1H4N1000-fp16-nogradS": (1, 4, 1000, torch.float16, True, False),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    for name in args.cases.split(","):
        B, H, N, dtype, init, grad_state = CASES[name]
        ratios = {}
        for seed in range(args.seeds):
            inputs, r64, rl = case(seed, B, H, N, dtype, init, grad_state)
            for sch in args.schemes.split(","):
                dsv, pv, *gk2 = SCHEMES[sch]
                outs = emulate(*inputs, dsv=dsv, pv=pv, gk2=bool(gk2))
                for g, o, a, b in zip(NAMES, outs, r64, rl):
                    if a is None or (sch not in ("kernel", CURRENT) and g in ("dq", "dz0")) or (pv == "kernel" and sch != "kernel"
                                                                                  and g in ("dk", "dv")):
                        continue  # outputs the scheme does not change
                    ratios.setdefault((sch, g), []).append(row_ratios(o, a, b, OUT_DTYPE.get(g, dtype)))
        print(f"== {name} ({args.seeds} seeds): per-row error/bound: max, q99.9, q99, median, rows over 1")
        for (sch, g), rr in ratios.items():
            r = torch.cat(rr)
            qs = torch.quantile(r, torch.tensor([0.999, 0.99, 0.5], dtype=F64)).tolist()
            print(f"  {sch:14s} {g:4s} max {r.max():.3f}  q99.9 {qs[0]:.3f}  q99 {qs[1]:.3f}  med {qs[2]:.3f}"
                  f"  over {int((r > 1).sum())}/{r.numel()}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
