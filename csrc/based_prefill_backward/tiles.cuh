// based_prefill_backward, part of based_prefill_backward.cu (included there only): the shared-memory tiles
// of one chunk and the steps both sweeps build from them. Every quantity is float32 (inputs widened on load),
// every product a float32 FMA on the CUDA cores, every sum in a fixed order: a first, clear and deterministic
// version (tensor-core products are the next step: the tiles below are the operands they would take).
//
// Notation (per (b, h); reference_backward.py's): a = sqrt(c) x for a query or key row x, extended by
// a[16] = 1 (0 for a key past the sequence end, so its features are all zero); s_rj = a_r . a_j = c q_r.k_j;
// A_rj = 1 + s + s^2/2 for j <= r (else 0); compact feature f = a_i a_j w with (i, j, w) from the feature
// table (feature_order.h's order: 1 = a_16 a_16, sqrt(c) x_i = a_i a_16, c x_i^2/sqrt(2) = a_i a_i / sqrt(2),
// c x_i x_j = a_i a_j; the padding features 153..159 have w = 0).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../common/feature_order.h"
#include "../common/mutants.h"
#include "based_prefill_backward.h"

namespace attn_kernels {
namespace {

struct BCfg {
  static constexpr int kChunk = 64;    // tokens per chunk
  static constexpr int kThreads = 256;
  static constexpr int kF = 160;       // 153 compact features padded (the forward's padding)
  static constexpr int kA = 17;        // a row: sqrt(c) x, then the constant
  static constexpr int kP = 65;        // pitch of 64-wide tiles: rows r and r + 1 on different banks
  static constexpr int kFP = 161;      // pitch of 160-wide tiles
  static constexpr int kFPerThread = kF * kChunk / kThreads;  // 40
};

struct BwdSmem {
  float aq[BCfg::kChunk][BCfg::kA];
  float ak[BCfg::kChunk][BCfg::kA];
  float v[BCfg::kChunk][BCfg::kP];
  float g[BCfg::kChunk][BCfg::kP];         // grad_o, then dnum = grad_o / (den + eps)
  float s[BCfg::kChunk][BCfg::kP];         // s[r][j], unmasked
  float ds[BCfg::kChunk][BCfg::kP];        // ds[r][j] = (j <= r)(dnum_r . v_j + dden_r)(1 + s_rj)
  float phi[BCfg::kChunk][BCfg::kFP];      // phi of the chunk's queries or keys
  float gphi[BCfg::kChunk][BCfg::kFP];     // a gradient w.r.t. phi (dq's or dk's inter-chunk part)
  float st[BCfg::kF][BCfg::kP];            // the running state: S (forward sweep) or dS (backward sweep)
  float zt[BCfg::kF];                      // z or dz
  float dden[BCfg::kChunk];                // -(dnum . num) / (den + eps); 0 with normalize=False
  uint32_t fij[BCfg::kF];                  // feature f = a_i a_j w: i | j << 8
  float fw[BCfg::kF];
};
constexpr int kBwdSmemBytes = int(sizeof(BwdSmem));
static_assert(kBwdSmemBytes <= 227 * 1024, "one CTA's shared memory on sm_90");

__device__ __forceinline__ float taylor(float s) { return fmaf(s, fmaf(s, 0.5f, 1.f), 1.f); }  // 1 + s + s^2/2
__device__ __forceinline__ bool causal(int key, int query) {
  return AK_MUTANT(bwd_causal_diag) ? key < query : key <= query;
}

template <typename T>
__device__ __forceinline__ float ld(const T* p) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(*p);
  else return __bfloat162float(*p);
}
template <typename T>
__device__ __forceinline__ void st_out(T* p, float x) {
  if constexpr (std::is_same_v<T, __half>) *p = __float2half_rn(x);
  else *p = __float2bfloat16_rn(x);
}

__device__ __forceinline__ void init_feature_table(BwdSmem& sm, int tid) {
  if (tid < BCfg::kF) {
    const int f = tid;
    int i = 16, j = 16;
    float w = 1.f;
    if (f == 0) {
    } else if (f < kSquareFeature0) {
      i = f - kLinearFeature0;
    } else if (f < kPairFeature0) {
      i = j = f - kSquareFeature0;
      w = 0.70710678118654752f;
    } else if (f < kCompactFeatures) {
      const FeaturePair pr = feature_pair(f);
      i = pr.i;
      j = pr.j;
    } else {
      w = 0.f;
    }
    sm.fij[f] = uint32_t(i) | uint32_t(j) << 8;
    sm.fw[f] = w;
  }
}

// a rows of a chunk (rows t0.. of src, n_valid of them real): sqrt(c) x, and the constant `one` (rows past
// the end: x = 0 and the constant `pad_one`).
template <typename T>
__device__ __forceinline__ void load_a(const T* src, int64_t sn, int64_t t0, int n_valid, float sqrt_c,
                                       float pad_one, float (&dst)[BCfg::kChunk][BCfg::kA], int tid) {
  for (int idx = tid; idx < BCfg::kChunk * kFeatDim; idx += BCfg::kThreads) {
    const int r = idx >> 4, d = idx & 15;
    dst[r][d] = r < n_valid ? sqrt_c * ld(src + (t0 + r) * sn + d) : 0.f;
  }
  if (tid < BCfg::kChunk) dst[tid][kFeatDim] = tid < n_valid ? 1.f : pad_one;
}

// 64-wide rows (v or grad_o), each real row r times row_scale[r] (nullptr: 1); src nullptr: zeros.
template <typename T>
__device__ __forceinline__ void load_64(const T* src, int64_t sn, int64_t t0, int n_valid, const float* row_scale,
                                        float (&dst)[BCfg::kChunk][BCfg::kP], int tid) {
  for (int idx = tid; idx < BCfg::kChunk * kValueDim; idx += BCfg::kThreads) {
    const int r = idx >> 6, e = idx & 63;
    float x = 0.f;
    if (src && r < n_valid) x = ld(src + (t0 + r) * sn + e) * (row_scale ? row_scale[r] : 1.f);
    dst[r][e] = x;
  }
}

// s[r][j] = a_r . a_j over the 16 real components. Thread: row tid / 4, columns tid % 4 + 4i.
__device__ __forceinline__ void build_s(BwdSmem& sm, int tid) {
  const int r = tid >> 2;
#pragma unroll 4
  for (int i = 0; i < BCfg::kChunk / 4; ++i) {
    const int j = (tid & 3) + 4 * i;
    float acc = 0.f;
#pragma unroll
    for (int d = 0; d < kFeatDim; ++d) acc = fmaf(sm.aq[r][d], sm.ak[j][d], acc);
    sm.s[r][j] = acc;
  }
}

// phi[r][f] of the rows a. Thread: row tid / 4, features tid % 4 + 4i.
__device__ __forceinline__ void build_phi(BwdSmem& sm, const float (&a)[BCfg::kChunk][BCfg::kA], int tid) {
  const int r = tid >> 2;
#pragma unroll 8
  for (int i = 0; i < BCfg::kFPerThread; ++i) {
    const int f = (tid & 3) + 4 * i;
    const uint32_t u = sm.fij[f];
    sm.phi[r][f] = a[r][u & 255u] * a[r][u >> 8] * sm.fw[f];
  }
}

// ds[r][j] = (j <= r)(dnum_r . v_j + dden_r)(1 + s_rj) (dnum in sm.g). Thread: row tid / 4, keys tid % 4 + 4i.
__device__ __forceinline__ void build_ds(BwdSmem& sm, int tid) {
  const int r = tid >> 2;
  for (int i = 0; i < BCfg::kChunk / 4; ++i) {
    const int j = (tid & 3) + 4 * i;
    float acc = sm.dden[r];
#pragma unroll 16
    for (int e = 0; e < kValueDim; ++e) acc = fmaf(sm.g[r][e], sm.v[j][e], acc);
    sm.ds[r][j] = causal(j, r) ? acc * (1.f + sm.s[r][j]) : 0.f;
  }
}

// gphi[r][f] = x_r . st[f] + w_r zt[f] (w nullptr: 1): the gradient w.r.t. phi of a row whose partner is the
// state (forward sweep: x = dnum, w = dden against S, z; backward sweep: x = v, w = 1 against dS, dz).
// Thread: row tid / 4, features tid % 4 + 4i.
__device__ __forceinline__ void build_gphi(BwdSmem& sm, const float (&x)[BCfg::kChunk][BCfg::kP], const float* w,
                                           int tid) {
  const int r = tid >> 2, f0 = tid & 3;
  float acc[BCfg::kFPerThread];
  const float wr = w ? w[r] : 1.f;
#pragma unroll
  for (int i = 0; i < BCfg::kFPerThread; ++i) acc[i] = wr * sm.zt[f0 + 4 * i];
  for (int e = 0; e < kValueDim; ++e) {
    const float xe = x[r][e];
#pragma unroll
    for (int i = 0; i < BCfg::kFPerThread; ++i) acc[i] = fmaf(xe, sm.st[f0 + 4 * i][e], acc[i]);
  }
#pragma unroll
  for (int i = 0; i < BCfg::kFPerThread; ++i) sm.gphi[r][f0 + 4 * i] = acc[i];
}

// The gradient w.r.t. a_m of phi(a) . gp (gp: one gphi row): sum over the features that contain a_m.
__device__ __forceinline__ float phi_vjp(const float* gp, const float* a, int m) {
  const float sq = AK_MUTANT(bwd_square_vjp) ? 0.70710678118654752f : 1.41421356237309515f;  // d(a^2/sqrt2)/da
  float acc = gp[kLinearFeature0 + m] * a[kFeatDim] + gp[kSquareFeature0 + m] * (sq * a[m]);
#pragma unroll
  for (int j = 0; j < kFeatDim; ++j)
    if (j != m) acc = fmaf(gp[quad_feature(min(m, j), max(m, j))], a[j], acc);
  return acc;
}

// The 16-wide gradient of the chunk's rows (dq: x = a_q, other = a_k, by_row = true, ds[r][.] over keys;
// dk: x = a_k, other = a_q, ds[.][j] over queries): sqrt(c) (sum ds * other + phi_vjp(gphi row, x row)),
// written to rows t0.. of dst (real rows only). Thread: row tid / 4, components tid % 4 + 4i.
template <bool kByRow, typename T>
__device__ __forceinline__ void store_grad16(const BwdSmem& sm, const float (&x)[BCfg::kChunk][BCfg::kA],
                                             const float (&other)[BCfg::kChunk][BCfg::kA], T* dst, int64_t sn,
                                             int64_t t0, int n_valid, float sqrt_c, int tid) {
  const int r = tid >> 2;
#pragma unroll
  for (int i = 0; i < kFeatDim / 4; ++i) {
    const int d = (tid & 3) + 4 * i;
    float acc = phi_vjp(sm.gphi[r], x[r], d);
#pragma unroll 16
    for (int j = 0; j < BCfg::kChunk; ++j) acc = fmaf(kByRow ? sm.ds[r][j] : sm.ds[j][r], other[j][d], acc);
    if (r < n_valid) st_out(dst + (t0 + r) * sn + d, sqrt_c * acc);
  }
}

// st[f][e] += sum_j phi[j][f] y[j][e], zt[f] += sum_j phi[j][f] w_j (w nullptr: 1), over the chunk's rows
// in order. Thread: value column tid % 64, features tid / 64 + 4i; z: feature tid.
__device__ __forceinline__ void update_state(BwdSmem& sm, const float (&y)[BCfg::kChunk][BCfg::kP], const float* w,
                                             int tid) {
  const int e = tid & 63, f0 = tid >> 6;
  float acc[BCfg::kFPerThread];
#pragma unroll
  for (int i = 0; i < BCfg::kFPerThread; ++i) acc[i] = sm.st[f0 + 4 * i][e];
  for (int j = 0; j < BCfg::kChunk; ++j) {
    const float yj = y[j][e];
#pragma unroll
    for (int i = 0; i < BCfg::kFPerThread; ++i) acc[i] = fmaf(sm.phi[j][f0 + 4 * i], yj, acc[i]);
  }
#pragma unroll
  for (int i = 0; i < BCfg::kFPerThread; ++i) sm.st[f0 + 4 * i][e] = acc[i];
  if (tid < BCfg::kF) {
    float z = sm.zt[tid];
    for (int j = 0; j < BCfg::kChunk; ++j) z = fmaf(sm.phi[j][tid], w ? w[j] : 1.f, z);
    sm.zt[tid] = z;
  }
}

// st, zt from a (B, H, 153, 64) / (B, H, 153) float32 pair at head bh (nullptr: zeros); padding features zero.
__device__ __forceinline__ void load_state(BwdSmem& sm, const float* S, const float* z, int64_t bh, int tid) {
  for (int idx = tid; idx < BCfg::kF * kValueDim; idx += BCfg::kThreads) {
    const int f = idx >> 6, e = idx & 63;
    sm.st[f][e] = (S && f < kCompactFeatures) ? S[(bh * kCompactFeatures + f) * kValueDim + e] : 0.f;
  }
  if (tid < BCfg::kF) sm.zt[tid] = (z && tid < kCompactFeatures) ? z[bh * kCompactFeatures + tid] : 0.f;
}

}  // namespace
}  // namespace attn_kernels
