// based_prefill_backward, part of based_prefill_backward.cu (included there only): the CTA's shape, the chunk
// tiles in shared memory, the mma.sync fragments read from them, and where a running state lives in the
// registers. Notation as in the overview (based_prefill_backward.cu).
//
// Tiles are 16-bit row-major with padded pitches (8 consecutive rows on distinct banks for ldmatrix), except
// the feature tiles phi(Q), phi(K), which use the forward's phi_off layout (based_prefill/config.cuh) so that
// the forward's feature map (based_prefill/feature_map.cuh) writes them unchanged.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "../based_prefill/feature_map.cuh"
#include "../common/convert.h"
#include "../common/feature_order.h"
#include "../common/mma.h"
#include "../common/mutants.h"
#include "../common/ptx.h"
#include "based_prefill_backward.h"
#include "split.h"

namespace attn_kernels {
namespace {

struct BCfg {
  static constexpr int kChunk = 64;  // tokens per chunk
  static constexpr int kWarps = 10;  // warp w owns state features 16w..16w+15 and causal block w of the chunk
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTokenThreads = 4 * kChunk;  // the per-token passes: warps 0-7, 4 per token (below)
  static constexpr int kF = 160;                     // 153 compact features padded to 10 blocks of 16
  static constexpr int kQKP = 24;                    // pitches (elements) of 16-wide and 64-wide 16-bit rows
  static constexpr int kVP = 72;
  static constexpr int kTP = 68;  // float feature rows of 64 tokens: conflict-free fragment stores and reads
  static constexpr int kRP = 20;  // float rows of 16 (float4 reads of consecutive rows: conflict-free)
  static constexpr int kPhiElems = kChunk * kF;
};
static_assert(BCfg::kWarps * 16 == BCfg::kF, "one feature block per warp");

__host__ __device__ __forceinline__ bool backward_sweep_runs(const BasedPrefillBackwardParams& p) {
  return p.dk || p.dv || p.dS0 || p.dz0;
}

// A segment launch's arguments (split.h): grid (B*H, nseg), segment blockIdx.y walks chunks [seg seg_chunks, ..);
// sums: the workspace's slots of the segments' key or query sums (null when nseg = 1), one per (b, h) and
// segment but one, each a state in S0's layout then z at kSlotZ.
constexpr int kSlotZ = kCompactFeatures * kValueDim;
struct SegmentArgs {
  int nseg, seg_chunks;
  float* sums;
  __device__ __forceinline__ float* slot(int bh, int j) const {
    return sums + (int64_t(bh) * (nseg - 1) + j) * kBwdSlotFloats;
  }
};

// Head (b, h)'s rows of the inputs and gradients (strided views); null where not given or not wanted.
template <typename T>
struct HeadRows {
  const T *q, *k, *v, *go;
  T *dq, *dk, *dv;
  __device__ __forceinline__ HeadRows(const BasedPrefillBackwardParams& p, int b, int h)
      : q(static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh),
        k(static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh),
        v(static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh),
        go(p.grad_o ? static_cast<const T*>(p.grad_o) + b * p.go_sb + h * p.go_sh : nullptr),
        dq(p.dq ? static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh : nullptr),
        dk(p.dk ? static_cast<T*>(p.dk) + b * p.dk_sb + h * p.dk_sh : nullptr),
        dv(p.dv ? static_cast<T*>(p.dv) + b * p.dv_sb + h * p.dv_sh : nullptr) {}
};

// The chunk's 10 causal 16 x 16 blocks (query block m, key block kt <= m), numbered row by row.
__device__ __forceinline__ void intra_block(int i, int& m, int& kt) {
  m = i >= 6 ? 3 : i >= 3 ? 2 : i >= 1 ? 1 : 0;
  kt = i - m * (m + 1) / 2;
}
__device__ __forceinline__ int block_index(int m, int kt) { return m * (m + 1) / 2 + kt; }

__device__ __forceinline__ float taylor(float s) { return fmaf(s, fmaf(s, 0.5f, 1.f), 1.f); }  // 1 + s + s^2/2
__device__ __forceinline__ bool causal(int key, int query) {
  return AK_MUTANT(bwd_causal_diag) ? key < query : key <= query;
}
__device__ __forceinline__ int bwd_chunks(int N) {
  return AK_MUTANT(bwd_tail_dropped) ? N / BCfg::kChunk : (N + BCfg::kChunk - 1) / BCfg::kChunk;
}
// Segment seg's chunks [c_begin, c_end) of a sequence of N tokens (empty past the last segment).
__device__ __forceinline__ void segment_chunks(const SegmentArgs& sg, int seg, int N, int& c_begin, int& c_end) {
  c_begin = seg * sg.seg_chunks;
  c_end = min(bwd_chunks(N), c_begin + sg.seg_chunks);
}

template <typename T>
__device__ __forceinline__ float ld(const T* p) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(*p);
  else return __bfloat162float(*p);
}

template <int... I, class Fn>
__device__ __forceinline__ void static_for_impl(std::integer_sequence<int, I...>, Fn&& fn) {
  (fn(std::integral_constant<int, I>{}), ...);
}
template <int N, class Fn>
__device__ __forceinline__ void static_for(Fn&& fn) {  // fn(integral_constant<int, 0..N-1>)
  static_for_impl(std::make_integer_sequence<int, N>{}, fn);
}

// The per-token passes (warps 0-7): warp w takes quarter w / 2 of the work of tokens 32(w % 2)..+31, one per
// lane, so that a warp runs one compile-time quarter (no divergence) over consecutive tokens.
__device__ __forceinline__ int token_part(int warp) { return warp >> 1; }
__device__ __forceinline__ int token_row(int warp, int lane) { return 32 * (warp & 1) + lane; }
// Barrier of warps 0-7 only (the per-token threads); barrier 0 is __syncthreads.
__device__ __forceinline__ void token_barrier() { asm volatile("bar.sync 1, %0;" ::"n"(BCfg::kTokenThreads) : "memory"); }

// ---- fragments (common/mma.h's layouts; lane = 4g + t; ldmatrix: lane 8lj + lr gives row lr of matrix lj) --

struct Lane {
  int g, t, lj, lr;
  __device__ __forceinline__ explicit Lane(int lane) : g(lane >> 2), t(lane & 3), lj(lane >> 3), lr(lane & 7) {}
};

// Shared addresses of element (row, col) of a tile: a padded row-major 16-bit tile, or a phi_off feature tile.
template <int kPitch>
struct RowTile {
  uint32_t base;
  __device__ __forceinline__ uint32_t operator()(int r, int c) const { return base + 2u * uint32_t(r * kPitch + c); }
};
struct PhiTile {
  uint32_t base;
  __device__ __forceinline__ uint32_t operator()(int r, int c) const { return base + 2u * uint32_t(phi_off(r, c)); }
};

// A (16 x 16) from a tile holding A (rows m0.., cols k0..).
template <class At>
__device__ __forceinline__ void a_frag(uint32_t (&a)[4], const At& at, int m0, int k0, const Lane& L) {
  ldsm4(a, at(m0 + L.lr + 8 * (L.lj & 1), k0 + 8 * (L.lj >> 1)));
}
// A (16 x 16) from a tile holding A^T (rows k0.., cols m0..).
template <class At>
__device__ __forceinline__ void a_frag_t(uint32_t (&a)[4], const At& at, int k0, int m0, const Lane& L) {
  ldsm4_t(a, at(k0 + L.lr + 8 * (L.lj >> 1), m0 + 8 * (L.lj & 1)));
}
// B of two n-tiles (k 16 x n 16; b[0..1] columns n0.., b[2..3] columns n0 + 8..) from a tile holding B^T
// (rows n0.., cols k0..).
template <class At>
__device__ __forceinline__ void b_frag2(uint32_t (&b)[4], const At& at, int n0, int k0, const Lane& L) {
  ldsm4(b, at(n0 + L.lr + 8 * (L.lj >> 1), k0 + 8 * (L.lj & 1)));
}
// The same from a tile holding B (rows k0.., cols n0..).
template <class At>
__device__ __forceinline__ void b_frag2_t(uint32_t (&b)[4], const At& at, int k0, int n0, const Lane& L) {
  ldsm4_t(b, at(k0 + L.lr + 8 * (L.lj & 1), n0 + 8 * (L.lj >> 1)));
}
// Two 16 x 8 float32 accumulator tiles (columns n0.., n0 + 8..) as the A fragment (16 x 16) of the next product.
template <typename T>
__device__ __forceinline__ void c_to_a(const float (&c0)[4], const float (&c1)[4], uint32_t (&a)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// C of two n-tiles (16 x 16 float32, c[i] columns 8i..) into a float tile at rows r0.., columns c0...
template <class Tile>
__device__ __forceinline__ void store_c2(Tile& t, int r0, int c0, const float (&c)[2][4], const Lane& L) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      *reinterpret_cast<float2*>(&t[r0 + L.g + 8 * hf][c0 + 8 * i + 2 * L.t]) =
          make_float2(c[i][2 * hf], c[i][2 * hf + 1]);
}

// ---- running states (S forward, dS backward) --------------------------------------------------------------

// Warp w holds features 16w..16w+15 x the 64 values as m16n8 float32 accumulators:
//   s[n][e] = S[16w + g + 8(e >> 1)][8n + 2t + (e & 1)],
// so the bf16 pairs of two neighbouring n-tiles are the A fragment of S (features x values) for products over
// the values. A state can exceed fp16's range, so it meets the tensor cores as bf16; with fp16 inputs as bf16
// hi + lo (the forward's v3 split), the other operand split too, hi.hi + hi.lo + lo.hi: ~16-bit operands.
using StateFrag = float[8][4];

// fn(n, hf, f, v) for each float pair s[n][2 hf], s[n][2 hf + 1] of warp's fragment: state row f, columns v, v + 1.
template <typename Fn>
__device__ __forceinline__ void for_each_state_pair(int warp, const Lane& L, Fn&& fn) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) fn(n, hf, 16 * warp + L.g + 8 * hf, 8 * n + 2 * L.t);
}

__device__ __forceinline__ void load_state(StateFrag& s, const float* S, int warp, const Lane& L) {
  for_each_state_pair(warp, L, [&](int n, int hf, int f, int v) {
    float2 x = make_float2(0.f, 0.f);
    if (S && f < kCompactFeatures) x = *reinterpret_cast<const float2*>(S + f * kValueDim + v);
    s[n][2 * hf] = x.x;
    s[n][2 * hf + 1] = x.y;
  });
}

__device__ __forceinline__ void store_state(const StateFrag& s, float* S, int warp, const Lane& L) {
  for_each_state_pair(warp, L, [&](int n, int hf, int f, int v) {
    if (f < kCompactFeatures)
      *reinterpret_cast<float2*>(S + f * kValueDim + v) = make_float2(s[n][2 * hf], s[n][2 * hf + 1]);
  });
}

// s += W, a state in S0's layout (153 x 64 floats): the sums a segment carries in (split.h).
__device__ __forceinline__ void add_state(StateFrag& s, const float* W, int warp, const Lane& L) {
  for_each_state_pair(warp, L, [&](int n, int hf, int f, int v) {
    if (f < kCompactFeatures) {
      const float2 x = *reinterpret_cast<const float2*>(W + f * kValueDim + v);
      s[n][2 * hf] += x.x;
      s[n][2 * hf + 1] += x.y;
    }
  });
}

// A sweep's starting state for head bh: the given one (S: 153 x 64, z: 153 floats per head; null = 0) plus, if
// carry, a segment's carried sums (SegmentArgs::slot): S into the fragment s, z into z_s (shared, BCfg::kF).
__device__ __forceinline__ void start_state(StateFrag& s, float* z_s, const float* S, const float* z,
                                            const float* carry, int bh, int warp, const Lane& L, int tid) {
  load_state(s, S ? S + int64_t(bh) * kCompactFeatures * kValueDim : nullptr, warp, L);
  if (carry) add_state(s, carry, warp, L);
  if (tid < BCfg::kF) {
    const float z0 = (z && tid < kCompactFeatures) ? z[int64_t(bh) * kCompactFeatures + tid] : 0.f;
    z_s[tid] = carry ? z0 + carry[kSlotZ + tid] : z0;
  }
}

// The state's A fragment over values 16ks..16ks+15: bf16 (hi), and lo = bf16(S - hi) when kSplit.
template <bool kSplit>
__device__ __forceinline__ void state_a(const StateFrag& s, int ks, uint32_t (&hi)[4], uint32_t (&lo)[4]) {
  const float* c[4] = {&s[2 * ks][0], &s[2 * ks][2], &s[2 * ks + 1][0], &s[2 * ks + 1][2]};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (kSplit) split_bf16x2(c[j][0], c[j][1], hi[j], lo[j]);
    else hi[j] = pack2<bf16>(c[j][0], c[j][1]);
  }
}

// acc += state (hi [+ lo]) * B, B's fragment (b0, b1) in the input type T (fp16: split exactly into bf16 hi + lo).
// kLo16: bf16 inputs with the state as hi + lo too (B is exact in bf16: 2 mma).
template <typename T, bool kLo16 = false>
__device__ __forceinline__ void mma_state(float (&acc)[4], const uint32_t (&hi)[4], const uint32_t (&lo)[4],
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    uint32_t h0, l0, h1, l1;
    const float2 f0 = unpack2<__half>(b0), f1 = unpack2<__half>(b1);
    split_bf16x2(f0.x, f0.y, h0, l0);
    split_bf16x2(f1.x, f1.y, h1, l1);
    mma_16816<bf16>(acc, hi, h0, h1);
    mma_16816<bf16>(acc, hi, l0, l1);
    mma_16816<bf16>(acc, lo, h0, h1);
  } else {
    mma_16816<bf16>(acc, hi, b0, b1);
    if constexpr (kLo16) mma_16816<bf16>(acc, lo, b0, b1);
  }
}

// s += phi^T (Y_0 + .. + Y_kParts-1), this warp's features, over the chunk's 64 rows: S += phi(K)^T V (kParts 1: the
// forward sweep's update, the key sums), dS += phi(Q)^T dnum with dnum as hi + lo (2: the backward sweep's, the query
// sums).
template <typename T, int kParts>
__device__ __forceinline__ void outer_update(StateFrag& s, const PhiTile& tphi, const RowTile<BCfg::kVP> (&ty)[kParts],
                                             int warp, const Lane& L) {
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    uint32_t a[4];
    a_frag_t(a, tphi, 16 * ks, 16 * warp, L);
#pragma unroll
    for (int np = 0; np < 4; ++np)
#pragma unroll
      for (int part = 0; part < kParts; ++part) {
        uint32_t bb[4];
        b_frag2_t(bb, ty[part], 16 * ks, 16 * np, L);
        mma_16816<T>(s[2 * np], a, bb[0], bb[1]);
        mma_16816<T>(s[2 * np + 1], a, bb[2], bb[3]);
      }
  }
}

// ---- chunk loads ------------------------------------------------------------------------------------------

// cp.async of rows t0..t0+63 (kCols 16-bit values each, src row stride sn) into a tile; rows past n_valid, or
// all rows when src is null, zero-filled (nothing read; `any` is only a valid address for the instruction).
template <int kCols, int kPitch, typename T>
__device__ __forceinline__ void load_rows(T (&dst)[BCfg::kChunk][kPitch], const T* src, int64_t sn, int64_t t0,
                                          int n_valid, const void* any, int tid) {
  constexpr int kUnits = kCols / 8;
  for (int u = tid; u < BCfg::kChunk * kUnits; u += BCfg::kThreads) {
    const int r = u / kUnits, c = (u % kUnits) * 8;
    const bool ok = src != nullptr && r < n_valid;
    cp_async16(saddr(&dst[r][c]), ok ? static_cast<const void*>(src + (t0 + r) * sn + c) : any, ok);
  }
}

// phi of a chunk's 16-wide rows into a phi_off tile: row tid % 64, feature groups 4 (tid / 64)..; rows at or past
// `ones` keep no constant feature (all 0: padding keys), the others all of them.
template <typename T>
__device__ __forceinline__ void phi_tile(const T (&x)[BCfg::kChunk][BCfg::kQKP], uint32_t phi, int ones, float sqrt_c,
                                         const PackedGate& packed, int tid) {
  const int r = tid & 63;
  const PhiRowDst d(phi, r);
  const float one = r < ones ? 1.f : 0.f;
  switch (tid >> 6) {
    case 0: build_phi_row<T, 0, 4>(x[r], d, sqrt_c, one, packed); break;
    case 1: build_phi_row<T, 4, 4>(x[r], d, sqrt_c, one, packed); break;
    case 2: build_phi_row<T, 8, 4>(x[r], d, sqrt_c, one, packed); break;
    case 3: build_phi_row<T, 12, 4>(x[r], d, sqrt_c, one, packed); break;
    default: build_phi_row<T, 16, 4>(x[r], d, sqrt_c, one, packed); break;
  }
}

// dnum = grad_o * inv as T hi + lo into two tiles (lo = fl(dnum - hi)); inv from the forward sweep's workspace
// (rows past n_valid: 0), or 1 without normalize (ws_inv null; grad_o's padding rows are 0).
template <typename T>
__device__ __forceinline__ void build_dnum(T (&dnum)[2][BCfg::kChunk][BCfg::kVP], const T (&go)[BCfg::kChunk][BCfg::kVP],
                                           const float* ws_inv, int64_t t0, int n_valid, int tid) {
  for (int u = tid; u < BCfg::kChunk * 8; u += BCfg::kThreads) {
    const int r = u >> 3, col = 8 * (u & 7);
    const float inv = ws_inv ? (r < n_valid ? ws_inv[t0 + r] : 0.f) : 1.f;
    const uint4 x = *reinterpret_cast<const uint4*>(&go[r][col]);
    const uint32_t xi[4] = {x.x, x.y, x.z, x.w};
    uint32_t hi[4], lo[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = unpack2<T>(xi[j]);
      const float d0 = f.x * inv, d1 = f.y * inv;
      hi[j] = pack2<T>(d0, d1);
      const float2 h = unpack2<T>(hi[j]);
      lo[j] = pack2<T>(d0 - h.x, d1 - h.y);  // exact differences (Sterbenz)
    }
    *reinterpret_cast<uint4*>(&dnum[0][r][col]) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    *reinterpret_cast<uint4*>(&dnum[1][r][col]) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  }
}

// Feature f = a_i a_j w of an extended row a (a_16 the constant): the moment M[i][j] (below) it sums.
struct FeatureTerm {
  int i, j;
  float w;
};
__device__ __forceinline__ FeatureTerm feature_term(int f) {
  if (f == 0) return {kFeatDim, kFeatDim, 1.f};
  if (f < kSquareFeature0) return {f - kLinearFeature0, kFeatDim, 1.f};
  if (f < kPairFeature0) return {f - kSquareFeature0, f - kSquareFeature0, 0.70710678118654752f};
  if (f < kCompactFeatures) {
    const FeaturePair pr = feature_pair(f);
    return {pr.i, pr.j, 1.f};
  }
  return {kFeatDim, kFeatDim, 0.f};  // padding
}

// The chunk's moments of a 64 x 16 tile X (zero rows past the valid ones), rows weighted by w: M = X^T diag(w) X
// (16 x 16), M[i][16] = (X^T w)_i, M[16][16] = sum w, in a float tile. The compact features' sums
// sum_r w_r phi_f(sqrt(c) x_r) are c^(#i,j < 16 / 2) w_f M[i][j] (feature_term): 12-24 mma of one warp instead
// of 153 x 64 scalar products. kWeighted false: w = 1 (the tile's valid rows: wsum = their count); the products
// are exact. kWeighted: w (float, shared) enters through W = diag(w) X as bf16 hi + lo (relative error 2^-17), X
// as bf16 (fp16 inputs: hi + lo, exact; hi.hi + hi.lo + lo.hi); wsum = sum w (lanes' pairs, then a xor tree).
using MomentTile = float[kFeatDim + 1][kFeatDim + 2];

template <typename T, bool kWeighted>
__device__ __forceinline__ void chunk_moments(uint32_t x_tile, const float* w, float wsum, MomentTile& mom,
                                              const Lane& L) {
  constexpr bool kSplit = std::is_same_v<T, __half>;
  const RowTile<BCfg::kQKP> tx{x_tile};
  float acc[2][4] = {}, acc1[4] = {};  // M's columns 0-7, 8-15; X^T w (every column)
#pragma unroll
  for (int kt = 0; kt < 4; ++kt) {
    uint32_t a[4];  // X^T (features x rows 16kt..): a[0..1] rows 2t, 2t + 1 and a[2..3] rows 2t + 8, 2t + 9,
    a_frag_t(a, tx, 16 * kt, 0, L);  // so also X's B fragments: n-tile 0 (a[0], a[2]), n-tile 1 (a[1], a[3])
    if constexpr (!kWeighted) {
      const uint32_t one2 = pack2<T>(1.f, 1.f);
      mma_16816<T>(acc[0], a, a[0], a[2]);
      mma_16816<T>(acc[1], a, a[1], a[3]);
      mma_16816<T>(acc1, a, one2, one2);
    } else {
      const float2 w01 = *reinterpret_cast<const float2*>(&w[16 * kt + 2 * L.t]);
      const float2 w89 = *reinterpret_cast<const float2*>(&w[16 * kt + 2 * L.t + 8]);
      uint32_t ah[4], al[4], wh[5], wl[5];  // W's B registers as a's, and w's pair (rows 2t..) [4] and (2t + 8..) [2]
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 xf = unpack2<T>(a[j]);
        const float2 wf = j < 2 ? w01 : w89;
        split_bf16x2(xf.x * wf.x, xf.y * wf.y, wh[j], wl[j]);
        if constexpr (kSplit) split_bf16x2(xf.x, xf.y, ah[j], al[j]);
        else ah[j] = a[j];
      }
      split_bf16x2(w01.x, w01.y, wh[4], wl[4]);
      uint32_t dh, dl;
      split_bf16x2(w89.x, w89.y, dh, dl);
      auto prod = [&](float(&c)[4], uint32_t h0, uint32_t h1, uint32_t l0, uint32_t l1) {
        mma_16816<bf16>(c, ah, h0, h1);
        mma_16816<bf16>(c, ah, l0, l1);
        if constexpr (kSplit) mma_16816<bf16>(c, al, h0, h1);
      };
      prod(acc[0], wh[0], wh[2], wl[0], wl[2]);
      prod(acc[1], wh[1], wh[3], wl[1], wl[3]);
      prod(acc1, wh[4], dh, wl[4], dl);
    }
  }
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) mom[L.g + 8 * (e >> 1)][8 * n + 2 * L.t + (e & 1)] = acc[n][e];
  if (L.t == 0) {
    mom[L.g][kFeatDim] = acc1[0];
    mom[L.g + 8][kFeatDim] = acc1[2];
  }
  if constexpr (kWeighted) {  // sum w: fixed order
    wsum = w[L.g + 8 * L.t] + w[L.g + 8 * L.t + 32];
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, o);
  }
  if (L.g == 0 && L.t == 0) mom[kFeatDim][kFeatDim] = wsum;
  __syncwarp();
}

// dst[f] = src[f] + the chunk's sum of feature f (chunk_moments' tile), features f = lane, lane + 32, ..
__device__ __forceinline__ void add_moments(float* dst, const float* src, const MomentTile& mom, float sqrt_c,
                                            float c1, int lane) {
  for (int f = lane; f < BCfg::kF; f += 32) {
    const FeatureTerm ft = feature_term(f);
    const float sc = ft.j < kFeatDim ? c1 : ft.i < kFeatDim ? sqrt_c : 1.f;  // i <= j
    dst[f] = src[f] + ft.w * (sc * mom[ft.i][ft.j]);
  }
}

}  // namespace
}  // namespace attn_kernels
