"""based_prefill's expected outputs, as far as a correct kernel's rounding depends on its arithmetic (derived in
tests/README.md):

- ``lowp_prefill``: the comparator of the output rule: what a correct kernel may do (tensor-core operands in the
  input dtype, float32 accumulation, float32 running state, output rounded once), chunked, on the inputs'
  device, never a low-precision running state.
- ``prefill_state_model``: the returned S, z as a float64 model of what docs/spec.md promises, with an
  elementwise float32-level bound derived from the accumulation structure, N and the magnitudes of the terms
  summed (checked by tests/state_model.py's ``assert_state_close``).
- ``check_prefill`` (``prefill_expectation``, ``prefill_checks``, ``assert_prefill_close``): o by the rule, S and
  z by their bounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from harness import KERNEL_DTYPES, RuleCheck, assert_close_rule, fp32_scale, rule_check
from state_model import TINY32, U32, StateCheck, StateModel, assert_state_close, state_check

from attn_kernels import reference as ref

CHUNK = 64  # the prefill kernel's chunk (csrc/based_prefill: Cfg::kChunk)

# The per-chunk coefficients of the accumulation bound (tests/README.md, "The returned state"): groups of
# g in [4, 16] exact products added to a float32 accumulator with alignment to the largest addend and
# truncation cost at most 2u(g+1)(|C| + sum|p|) per group, over the 64 / g groups of a chunk.
K_CARRY = 160  # 2 (64/g)(g+1) <= 160: on the accumulator at the chunk start
K_TERMS = 194  # 160 + 2(g+1) <= 194: on the chunk's own terms
K_SCAN = 2  # the segment scan's and the S0 + prefix float32 adds, one per chunk at most
K_ZCONV = 8  # z carried as moments: z -> (G, ks) -> z conversions at a segment start (float32, ~6u)


# ---- the prefill kernel's arithmetic, as far as a correct kernel's rounding depends on it -------------------

def kernel_features(x: torch.Tensor, scale: float) -> torch.Tensor:
    """phi(x) in float32, before the one rounding to the input dtype, computed as the prefill kernel does
    (csrc/based_prefill, ``feature<F>``): x' = fl32(sqrt_c x); x'_i; fl32(fl32(x'_i x'_i) * fl32(1/sqrt 2));
    fl32(x'_i x'_j). (Its packed bf16/fp16 path, taken when sqrt_c is a power of two <= 1, rounds the same values
    once: x' is then exact and x'_i x'_j is exact in float32; fp16 rows with an x' below fp16's normal range, where
    x' would not be exact, take the float path: test_fp16_inputs_near_zero.) Every operation is IEEE float32 on any
    device."""
    c, sqrt_c = fp32_scale(scale)
    xs = x.float() * sqrt_c.to(x.device)
    i, j, _, _ = ref._indices_on(x.device)
    inv_sqrt2 = torch.tensor(0.70710678118654752, dtype=torch.float32, device=x.device)
    return torch.cat([torch.ones_like(xs[..., :1]), xs, (xs * xs) * inv_sqrt2, xs[..., i] * xs[..., j]], -1)


def rounding_flip(x32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far fl_dtype(x) can move if x were computed 2 float32 ulps off: 0 unless x32 sits within 2 ulps of
    a rounding boundary of `dtype` (the allowance for a 1-ulp difference in the float32 feature arithmetic)."""
    up = torch.nextafter(torch.nextafter(x32, x32.new_tensor(math.inf)), x32.new_tensor(math.inf))
    dn = torch.nextafter(torch.nextafter(x32, x32.new_tensor(-math.inf)), x32.new_tensor(-math.inf))
    r = x32.to(dtype).double()
    return torch.maximum((up.to(dtype).double() - r).abs(), (dn.to(dtype).double() - r).abs())


def _split_bf16(x32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = hi + lo with hi = bf16(x), lo = bf16(x - hi) (the kernel's split_bf16x2), as float64."""
    hi = x32.to(torch.bfloat16)
    lo = (x32 - hi.float()).to(torch.bfloat16)
    return hi.double(), lo.double()


def moments_from_z(z: torch.Tensor, scale: float):
    """z (float32) -> the prefill kernel's moments (cnt, ks = sum k, G = sum k k^T), float32 as it converts them:
    G_ij = z_quad / c, G_ii = fl(sqrt2 z_sq) / c, ks = z_lin / sqrt_c, cnt = z_0."""
    c32, sqrt_c32 = (t.to(z.device) for t in fp32_scale(scale))
    i, j, _, _ = ref._indices_on(z.device)
    z = z.float()
    G = torch.zeros(*z.shape[:-1], 16, 16, dtype=torch.float32, device=z.device)
    G[..., i, j] = z[..., 33:] / c32
    G[..., j, i] = G[..., i, j]
    sqrt2 = torch.tensor(1.41421356237309515, dtype=torch.float32, device=z.device)
    G.diagonal(dim1=-2, dim2=-1).copy_((sqrt2 * z[..., 17:33]) / c32)
    return z[..., 0].clone(), z[..., 1:17] / sqrt_c32, G


def z_from_moments(cnt: torch.Tensor, ks: torch.Tensor, G: torch.Tensor, scale: float) -> torch.Tensor:
    """The prefill kernel's z from its float32 moments: c G_ij, fl(c / sqrt2) G_ii, sqrt_c ks, cnt (float32)."""
    c32, sqrt_c32 = (t.to(G.device) for t in fp32_scale(scale))
    i, j, _, _ = ref._indices_on(G.device)
    inv_sqrt2 = torch.tensor(0.70710678118654752, dtype=torch.float32, device=G.device)
    return torch.cat([cnt.float()[..., None], sqrt_c32 * ks, (c32 * inv_sqrt2) * G.diagonal(dim1=-2, dim2=-1),
                      c32 * G[..., i, j]], -1)


def prefill_chunk_output(qc, kc, vc, S, G, ks, cnt, *, scale, normalize, eps) -> torch.Tensor:
    """One chunk's o as a correct prefill kernel computes it from the float32 state (S, moments G, ks, cnt)
    before the chunk: see lowp_prefill. Returns o (chunk, in the input dtype)."""
    dtype = qc.dtype
    split = dtype == torch.float16
    c = float(fp32_scale(scale)[0])
    c2 = 0.5 * c * c
    n = qc.shape[-2]
    q64, k64, v64 = qc.double(), kc.double(), vc.double()
    A = (q64 @ k64.transpose(-1, -2)).float().double()
    causal = torch.ones(n, n, dtype=torch.bool, device=qc.device).tril()
    W32 = (1 + A * (c + c2 * A)).masked_fill(~causal, 0).float()
    num = W32.to(dtype).double() @ v64
    phi_q = kernel_features(qc, scale)
    if split:  # fp16: S and phi(Q) as bf16 hi + lo, hi.hi + hi.lo + lo.hi
        qh, ql = _split_bf16(phi_q)
        sh, sl = _split_bf16(S)
        num = num + qh @ sh + ql @ sh + qh @ sl
    else:
        num = num + phi_q.to(torch.bfloat16).double() @ S.to(torch.bfloat16).double()
    num = num.float()
    if not normalize:
        return num.to(dtype)
    if split:
        gh, gl = _split_bf16(G)
        qh, ql = _split_bf16(qc.float())
        Y = qh @ gh + qh @ gl + ql @ gh
    else:
        Y = q64 @ G.to(torch.bfloat16).double()
    den_inter = cnt.double()[..., None] + (q64 * (c * ks.double()[..., None, :] + c2 * Y)).sum(-1)
    den = (den_inter.float().double() + W32.double().sum(-1)).float()
    return (num * (1.0 / (den + eps))[..., None]).to(dtype)


def lowp_prefill(q, k, v, *, scale=None, normalize=True, eps=1e-6, initial_state=None):
    """The low-precision comparator of the rule for based_prefill: what a CORRECT kernel may do.

    fp16/bf16 inputs (the kernel's model; csrc/based_prefill/based_prefill.cu, header), chunks of 64:
      W = causal(1 + c A + c^2 A^2 / 2), A = Q K^T: float32, rounded to the input dtype for o_intra = W V;
      den_intra = the rowsums of the float32 W;
      o_inter = phi(Q) S with phi(Q) (kernel_features) and the float32 state S rounded to bf16 (bf16 inputs),
        or both split into bf16 hi + lo and summed hi.hi + hi.lo + lo.hi (fp16 inputs: ~16-bit operands);
      den_inter = cnt + c q.ks + (c^2 / 2) q^T G q from the key moments (count, sum k, Gram matrix G, float32)
        with G rounded to bf16 (fp16: hi + lo, with q split too);
      o = (o_intra + o_inter) / (den + eps) in float32 (or the numerator alone), rounded once to the input dtype;
      then S += fl_in(phi(K))^T V, G += K^T K, ks += sum K in float32: the running state is never rounded.
    Products are formed in float64 and the float32 values rounded where the kernel holds float32, so the
    comparator's own accumulation error is below the kernel's. O(B H chunk (153 + chunk)) memory, on the
    inputs' device. Any other dtype: the reference in that dtype (as the CPU op computes).
    Returns (o in q's dtype, (S, z) float32)."""
    if q.dtype not in KERNEL_DTYPES:
        return ref.based_chunked(q, k, v, scale=scale, normalize=normalize, eps=eps, initial_state=initial_state)
    scale = ref.default_scale(q.shape[-1]) if scale is None else scale
    B, H, N, _ = q.shape
    dev, f32 = q.device, torch.float32
    if initial_state is None:
        S = torch.zeros(B, H, ref.COMPACT_FEATURES, v.shape[-1], dtype=f32, device=dev)
        cnt, ks, G = (torch.zeros(B, H, *s, dtype=f32, device=dev) for s in ((), (16,), (16, 16)))
    else:
        S = initial_state[0].to(f32).clone()
        cnt, ks, G = moments_from_z(initial_state[1], scale)
    outs = []
    for start in range(0, N, CHUNK):
        qc, kc, vc = (t[..., start:start + CHUNK, :] for t in (q, k, v))
        outs.append(prefill_chunk_output(qc, kc, vc, S, G, ks, cnt, scale=scale, normalize=normalize, eps=eps))
        k64 = kc.double()
        S = (S.double() + kernel_features(kc, scale).to(q.dtype).double().transpose(-1, -2) @ vc.double()).float()
        G = (G.double() + k64.transpose(-1, -2) @ k64).float()
        ks = (ks.double() + k64.sum(-2)).float()
        cnt = cnt + kc.shape[-2]
    return torch.cat(outs, -2), (S, z_from_moments(cnt, ks, G, scale))


# ---- the returned state: the promise (docs/spec.md) and its bound ------------------------------------------

def prefill_state_model(k, v, *, scale=None, initial_state=None, features: str = "kernel") -> StateModel:
    """The state based_prefill promises (docs/spec.md) for keys k, values v (input dtype) and initial state:

        S = S0 + sum_j fl_in(phi(k_j)) v_j^T,   z = z0 + sum_j phi(k_j),   accumulated in float32,

    features="kernel" (CUDA): fl_in rounds each feature once, to nearest, to the input dtype (kernel_features
    gives the float32 value it rounds); features="fp32" (the CPU op): S from float32 features, not rounded.
    The bound (tests/README.md derives each term; C = number of 64-token chunks, u = 2^-24):
        bound_S = 1.01 u sum_c [160 |P_c| + 162 M_c + 194 A_c] + flips + 2^-126 (sum_j |v_j| + C)
    with P_c the exact partial sum at chunk c's start (S0 included), M_c = max_{c' <= c} |P_c'|, A_c the sum
    of |fl_in(phi(k_j)) v_j^T| over the chunk, flips = sum_j |v_j| x (how far fl_in(phi(k_j)) moves for a
    2-ulp change of its float32 value). z: the same with |phi(k_j)|, plus 8 M_c per chunk (moment
    conversions), 4 u |z| (final scaling) and 8 u |z0|; its constant feature is a count: exact up to
    (C + 2) u (|z0[0]| + N). Everything on k's device, chunk by chunk (no O(N^2) and no per-token state)."""
    scale = ref.default_scale(k.shape[-1]) if scale is None else scale
    B, H, N, _ = k.shape
    e = v.shape[-1]
    dev, dtype = k.device, k.dtype
    f64 = torch.float64
    c = float(fp32_scale(scale)[0])  # the kernels compute with the float32 scale (a subnormal one is coarse)
    F = ref.COMPACT_FEATURES
    if initial_state is None:
        S0 = torch.zeros(B, H, F, e, dtype=f64, device=dev)
        z0 = torch.zeros(B, H, F, dtype=f64, device=dev)
    else:
        S0, z0 = (t.to(dev, f64) for t in initial_state)
    kernel = features == "kernel" and dtype in KERNEL_DTYPES
    P_S, P_z = S0.clone(), z0.clone()
    M_S, M_z = S0.abs(), z0.abs()
    acc_S, acc_z = torch.zeros_like(S0), torch.zeros_like(z0)
    flips = torch.zeros_like(S0)
    v_abs_sum = torch.zeros(B, H, e, dtype=f64, device=dev)
    chunks = 0
    for start in range(0, N, CHUNK):
        kc, vc = k[..., start:start + CHUNK, :], v[..., start:start + CHUNK, :].double()
        exact = ref.feature_map_compact(kc.double(), c)
        if kernel:
            phi32 = kernel_features(kc, scale)
            f = phi32.to(dtype).double()
            flips += rounding_flip(phi32, dtype).transpose(-1, -2) @ vc.abs()
        else:  # float32 features: each within 3 roundings (<= 4u relative) of the exact one
            f = exact
            flips += 4 * U32 * exact.abs().transpose(-1, -2) @ vc.abs()
        M_S = torch.maximum(M_S, P_S.abs())
        M_z = torch.maximum(M_z, P_z.abs())
        A_S = f.abs().transpose(-1, -2) @ vc.abs()
        A_z = exact.abs().sum(-2)
        acc_S += K_CARRY * P_S.abs() + (K_CARRY + K_SCAN) * M_S + K_TERMS * A_S
        acc_z += K_CARRY * P_z.abs() + (K_CARRY + K_SCAN + K_ZCONV) * M_z + K_TERMS * A_z
        P_S += f.transpose(-1, -2) @ vc
        P_z += exact.sum(-2)
        v_abs_sum += vc.abs().sum(-2)
        chunks += 1
    bound_S = 1.01 * U32 * acc_S + flips + TINY32 * (v_abs_sum[..., None, :] + chunks)
    bound_z = 1.01 * U32 * (acc_z + 4 * P_z.abs() + 8 * z0.abs()) + TINY32 * 16 * (chunks + 2)
    bound_z[..., 0] = (chunks + 2) * U32 * (z0[..., 0].abs() + N)
    return StateModel(P_S, P_z, bound_S, bound_z)


# ---- the whole verdict: o by the rule, S and z by their bounds -------------------------------------------

@dataclass
class PrefillExpectation:
    """Everything based_prefill's outputs are checked against (computed once, reusable for many outputs)."""
    o64: torch.Tensor
    o_lowp: torch.Tensor
    state: StateModel


def prefill_expectation(q, k, v, *, scale=None, normalize=True, eps=1e-6, initial_state=None,
                        features: str | None = None) -> PrefillExpectation:
    """float64 o, the comparator's o and the state model; features: "kernel" (default on CUDA) or "fp32"
    (default on the CPU, whose op computes the features in float32 without rounding them)."""
    kw = dict(scale=scale, normalize=normalize, eps=eps)
    init64 = None if initial_state is None else tuple(t.double() for t in initial_state)
    o64, _ = ref.based_chunked(q.double(), k.double(), v.double(), initial_state=init64, **kw)
    o_lp, _ = lowp_prefill(q, k, v, initial_state=initial_state, **kw)
    features = features or ("kernel" if q.is_cuda else "fp32")
    model = prefill_state_model(k, v, scale=scale, initial_state=initial_state, features=features)
    return PrefillExpectation(o64, o_lp, model)


def prefill_checks(o, S, z, expected: PrefillExpectation) -> tuple[RuleCheck, StateCheck, StateCheck]:
    """The three verdicts, without asserting (ratio <= 1 passes)."""
    st = expected.state
    return (rule_check(o, expected.o64, expected.o_lowp, o.dtype), state_check("S", S, st.S, st.bound_S),
            state_check("z", z, st.z, st.bound_z))


def assert_prefill_close(o, S, z, expected: PrefillExpectation):
    """o by the rule (row by row, lowp_prefill as the comparator); S and z within their derived bounds."""
    rule = assert_close_rule("o", o, expected.o64, expected.o_lowp)
    return (rule, *assert_state_close(S, z, expected.state))


def check_prefill(o, S, z, q, k, v, *, scale=None, normalize=True, eps=1e-6, initial_state=None,
                  features: str | None = None):
    """based_prefill's outputs against float64: o by the rule with lowp_prefill as the comparator, the state
    against its promise (kernel features on CUDA, float32 features on the CPU op). Returns the checks."""
    expected = prefill_expectation(q, k, v, scale=scale, normalize=normalize, eps=eps, initial_state=initial_state,
                                   features=features)
    return assert_prefill_close(o, S, z, expected)
