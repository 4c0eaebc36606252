// based_prefill_backward, part of based_prefill_backward.cu (included there only): the two sweeps over a
// head's chunks (one CTA per (b, h), 256 threads, one CTA per SM for its ~197 KB of tiles; see the overview in
// based_prefill_backward.cu).
#pragma once
#include <cstdint>

#include "../common/mutants.h"
#include "based_prefill_backward.h"
#include "tiles.cuh"

namespace attn_kernels {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// acc[i] (value column part + 4i) of one chunk row: sum over the other rows m of A x_m, then + phi_row . st.
// A query row (num = A V + phi S) takes A_row,m over the keys m; a key row (dv = A^T dnum + phi dS) takes
// A_m,row over the queries m. One loop for both, so the two sums run in the same order.
template <bool kKeyRow>
__device__ __forceinline__ void a_rows_plus_phi_state(const BwdSmem& sm, const float (&x)[BCfg::kChunk][BCfg::kP],
                                                      int row, int part, float (&acc)[kValueDim / 4]) {
#pragma unroll
  for (int i = 0; i < kValueDim / 4; ++i) acc[i] = 0.f;
  for (int m = 0; m < BCfg::kChunk; ++m) {
    const int query = kKeyRow ? m : row, key = kKeyRow ? row : m;
    const float a = causal(key, query) ? taylor(sm.s[query][key]) : 0.f;
#pragma unroll
    for (int i = 0; i < kValueDim / 4; ++i) acc[i] = fmaf(a, x[m][part + 4 * i], acc[i]);
  }
  for (int f = 0; f < BCfg::kF; ++f) {
    const float ph = sm.phi[row][f];
#pragma unroll
    for (int i = 0; i < kValueDim / 4; ++i) acc[i] = fmaf(ph, sm.st[f][part + 4 * i], acc[i]);
  }
}

// The chunk's den, dnum and dden (normalize): den_r = sum_{j<=r} A_rj + phi_r . z, num_r = sum_{j<=r} A_rj v_j
// + phi_r S (phi: the queries', st, zt: the state before the chunk); dnum = grad_o / (den + eps) replaces
// grad_o in sm.g, dden_r = -(dnum_r . num_r) / (den + eps). The real rows' 1 / (den + eps) and dden also go
// to the workspace (ws_inv, ws_dden: this chunk's first token; nullptr: not kept). Thread: row tid / 4, value
// columns and partial sums tid % 4 + 4i, the 4 threads of a row reduce with shuffles (fixed order).
__device__ __forceinline__ void normalize_chunk(BwdSmem& sm, float eps, int n_valid, float* ws_inv,
                                                float* ws_dden, int tid) {
  const int r = tid >> 2, part = tid & 3;
  float den = 0.f;
#pragma unroll
  for (int i = 0; i < BCfg::kChunk / 4; ++i) {
    const int j = part + 4 * i;
    if (causal(j, r)) den += taylor(sm.s[r][j]);
  }
#pragma unroll 8
  for (int i = 0; i < BCfg::kFPerThread; ++i) den = fmaf(sm.phi[r][part + 4 * i], sm.zt[part + 4 * i], den);
  den += __shfl_xor_sync(kFull, den, 1);
  den += __shfl_xor_sync(kFull, den, 2);
  const float inv = r < n_valid ? 1.f / (den + eps) : 0.f;  // rows past the end: dnum = dden = 0

  float num[kValueDim / 4];
  a_rows_plus_phi_state<false>(sm, sm.v, r, part, num);
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < kValueDim / 4; ++i) {
    const float dn = sm.g[r][part + 4 * i] * inv;
    sm.g[r][part + 4 * i] = dn;
    dot = fmaf(dn, num[i], dot);
  }
  dot += __shfl_xor_sync(kFull, dot, 1);
  dot += __shfl_xor_sync(kFull, dot, 2);
  const float dd = AK_MUTANT(bwd_dden_dropped) ? 0.f : -dot * inv;
  if (part == 0) {
    sm.dden[r] = dd;
    if (ws_inv && r < n_valid) {
      ws_inv[r] = inv;
      ws_dden[r] = dd;
    }
  }
}

// dv_j = sum_{r >= j} A_rj dnum_r + phi_j . dS (phi: the keys', st: dS of the later chunks), real rows to dst.
// Thread: key row tid / 4, value columns tid % 4 + 4i.
template <typename T>
__device__ __forceinline__ void store_dv(const BwdSmem& sm, T* dst, int64_t sn, int64_t t0, int n_valid, int tid) {
  const int j = tid >> 2, part = tid & 3;
  float acc[kValueDim / 4];
  a_rows_plus_phi_state<true>(sm, sm.g, j, part, acc);
  if (j < n_valid) {
#pragma unroll
    for (int i = 0; i < kValueDim / 4; ++i) st_out(dst + (t0 + j) * sn + part + 4 * i, acc[i]);
  }
}

__device__ __forceinline__ BwdSmem& bwd_smem() {
  extern __shared__ float4 bwd_smem_raw[];  // float4: 16-byte aligned
  return *reinterpret_cast<BwdSmem*>(bwd_smem_raw);
}

__device__ __forceinline__ int bwd_chunks(int N) {
  return AK_MUTANT(bwd_tail_dropped) ? N / BCfg::kChunk : (N + BCfg::kChunk - 1) / BCfg::kChunk;
}

// Forward in time, from (S0, z0): per chunk den and num against the state before it (-> dnum, dden, kept per
// token in the workspace for the backward sweep), then dq = sqrt(c) (ds a_k + phi'(a_q)^T (dnum S^T + dden
// z^T)); then S += phi(K)^T V, z += phi(K)^T 1.
template <typename T>
__global__ void __launch_bounds__(BCfg::kThreads, 1)
    based_prefill_backward_forward_sweep(const BasedPrefillBackwardParams p) {
  BwdSmem& sm = bwd_smem();
  const int tid = threadIdx.x;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const T* gog = p.grad_o ? static_cast<const T*>(p.grad_o) + b * p.go_sb + h * p.go_sh : nullptr;
  T* dqg = p.dq ? static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh : nullptr;
  const int64_t tokens = int64_t(p.B) * p.H * p.N;
  float* ws_inv = (p.workspace && p.normalize) ? p.workspace + int64_t(bh) * p.N : nullptr;
  float* ws_dden = ws_inv ? ws_inv + tokens : nullptr;
  const float sqrt_c = sqrtf(p.scale);

  init_feature_table(sm, tid);
  load_state(sm, p.S0, p.z0, bh, tid);
  const int nchunks = bwd_chunks(p.N);
  for (int c = 0; c < nchunks; ++c) {
    const int64_t t0 = int64_t(c) * BCfg::kChunk;
    const int n_valid = int(min(int64_t(BCfg::kChunk), int64_t(p.N) - t0));
    __syncthreads();  // the previous chunk's readers (and the table / state loads) are done
    load_a(qg, p.q_sn, t0, n_valid, sqrt_c, 1.f, sm.aq, tid);
    load_a(kg, p.k_sn, t0, n_valid, sqrt_c, 0.f, sm.ak, tid);
    load_64(vg, p.v_sn, t0, n_valid, nullptr, sm.v, tid);
    load_64(gog, p.go_sn, t0, n_valid, nullptr, sm.g, tid);  // dnum = grad_o without normalize
    if (tid < BCfg::kChunk) sm.dden[tid] = 0.f;
    __syncthreads();
    build_s(sm, tid);
    if (p.normalize) build_phi(sm, sm.aq, tid);
    __syncthreads();
    if (p.normalize) {
      normalize_chunk(sm, p.eps, n_valid, ws_inv ? ws_inv + t0 : nullptr, ws_dden ? ws_dden + t0 : nullptr, tid);
      __syncthreads();
    }
    if (dqg) {
      build_ds(sm, tid);
      build_gphi(sm, sm.g, sm.dden, tid);  // against the state before this chunk
      __syncthreads();
      store_grad16<true>(sm, sm.aq, sm.ak, dqg, p.dq_sn, t0, n_valid, sqrt_c, tid);
    }
    build_phi(sm, sm.ak, tid);  // phi(q)'s last reader was normalize_chunk
    __syncthreads();
    if (!AK_MUTANT(bwd_forward_state_frozen)) update_state(sm, sm.v, nullptr, tid);
  }
}

// Backward in time, from (grad_S, grad_z): per chunk (last first) dnum and dden from the workspace, then
// dk = sqrt(c) (ds^T a_q + phi'(a_k)^T (V dS^T + 1 dz^T)) and dv = A^T dnum + phi(K) dS against dS, dz of
// the later chunks; then dS += phi(Q)^T dnum, dz += phi(Q)^T dden. dS0, dz0 are the sums after the first chunk.
template <typename T>
__global__ void __launch_bounds__(BCfg::kThreads, 1)
    based_prefill_backward_backward_sweep(const BasedPrefillBackwardParams p) {
  BwdSmem& sm = bwd_smem();
  const int tid = threadIdx.x;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const T* gog = p.grad_o ? static_cast<const T*>(p.grad_o) + b * p.go_sb + h * p.go_sh : nullptr;
  T* dkg = p.dk ? static_cast<T*>(p.dk) + b * p.dk_sb + h * p.dk_sh : nullptr;
  T* dvg = p.dv ? static_cast<T*>(p.dv) + b * p.dv_sb + h * p.dv_sh : nullptr;
  const int64_t tokens = int64_t(p.B) * p.H * p.N;
  const float* ws_inv = p.normalize ? p.workspace + int64_t(bh) * p.N : nullptr;
  const float* ws_dden = ws_inv ? ws_inv + tokens : nullptr;
  const float sqrt_c = sqrtf(p.scale);

  init_feature_table(sm, tid);
  load_state(sm, AK_MUTANT(bwd_grad_state_ignored) ? nullptr : p.grad_S, p.grad_z, bh, tid);
  for (int c = bwd_chunks(p.N) - 1; c >= 0; --c) {
    const int64_t t0 = int64_t(c) * BCfg::kChunk;
    const int n_valid = int(min(int64_t(BCfg::kChunk), int64_t(p.N) - t0));
    __syncthreads();
    load_a(qg, p.q_sn, t0, n_valid, sqrt_c, 1.f, sm.aq, tid);
    load_a(kg, p.k_sn, t0, n_valid, sqrt_c, 0.f, sm.ak, tid);
    load_64(vg, p.v_sn, t0, n_valid, nullptr, sm.v, tid);
    load_64(gog, p.go_sn, t0, n_valid, ws_inv ? ws_inv + t0 : nullptr, sm.g, tid);  // dnum
    if (tid < BCfg::kChunk) sm.dden[tid] = (ws_dden && tid < n_valid) ? ws_dden[t0 + tid] : 0.f;
    __syncthreads();
    if (dkg || dvg) build_s(sm, tid);
    if (dvg) build_phi(sm, sm.ak, tid);
    __syncthreads();
    if (dkg) {
      build_ds(sm, tid);
      build_gphi(sm, sm.v, nullptr, tid);  // against dS, dz of the later chunks
    }
    if (dvg) store_dv(sm, dvg, p.dv_sn, t0, n_valid, tid);
    __syncthreads();
    if (dkg) store_grad16<false>(sm, sm.ak, sm.aq, dkg, p.dk_sn, t0, n_valid, sqrt_c, tid);
    build_phi(sm, sm.aq, tid);  // phi(k)'s last reader was store_dv
    __syncthreads();
    if (!AK_MUTANT(bwd_dstate_frozen)) update_state(sm, sm.g, sm.dden, tid);
  }
  __syncthreads();
  if (p.dS0) {
    for (int idx = tid; idx < kCompactFeatures * kValueDim; idx += BCfg::kThreads)
      p.dS0[int64_t(bh) * kCompactFeatures * kValueDim + idx] = sm.st[idx >> 6][idx & 63];
  }
  if (p.dz0 && tid < kCompactFeatures) p.dz0[int64_t(bh) * kCompactFeatures + tid] = sm.zt[tid];
}

}  // namespace
}  // namespace attn_kernels
