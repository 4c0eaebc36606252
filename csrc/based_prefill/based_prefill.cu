// based_prefill: causal Based linear attention over a whole sequence, chunked (spec.md), on Hopper
// warpgroup MMA (wgmma, sm_90a).
//
// One CTA = one warpgroup (4 warps) walks one (b, h, segment) in chunks of 64 tokens, 2 CTAs per SM.
// The running state S^T (64 values x 160 features: the 153 compact ones padded) stays in wgmma
// accumulator registers for the whole segment. Per chunk:
//   phase 1 (CUDA cores, mma.sync m16n8k16): phi(Q), phi(K) and W = causal(1 + cA + (cA)^2/2),
//     A = Q K^T, into shared memory in GMMA swizzled layouts; the rowsums of the float32 W (den_intra);
//     den_inter = phi(Q).z from the keys' moments (z is kept as sum k and the Gram matrix sum k k^T, see
//     for_each_g: 2 mma.sync per warp and 12 for the Gram update instead of a 153-wide feature sum).
//   phase 2 (the warpgroup's async wgmma: each shared operand is read once per chunk, not once per warp):
//     o^T  = V^T W^T          m64n64k16 x 4               SS  (input dtype)
//     o^T += S^T phi(Q)^T     m64n64k16 x 10              RS  (bf16: S can exceed fp16's range)
//     S^T += V^T phi(K)       m64n128k16 + m64n32k16, x 4 SS  (input dtype, float32 accumulation)
//     While these run, 1/(den + eps) per token goes to shared memory.
//   epilogue: o^T scaled, written transposed (stmatrix.trans) into a staging tile, then 16-byte
//     global stores.
// Why o^T: the accumulator layout of S^T is, element for element, the register-A layout of m64nNk16,
// so the inter product takes the state straight from its accumulators (one cvt per pair).
// fp16 inputs: a bf16 operand is 3 bits coarser than fp16, so S, G, q and phi(Q) are split into bf16
// hi + lo and hi.hi + hi.lo + lo.hi are accumulated in float32 (~16-bit operands; lo.lo is below the
// float32 rounding).
//
// Small B*H: the sequence is cut into segments. Pass 1 (kStateOnly) writes each segment's own
// state contribution to the workspace, a scan turns them into prefix sums, and pass 2 starts
// segment s from S0 + prefix[s-1]. The last segment writes the final state.
//
// CuTe (nvidia-cutlass) gives the GMMA shared-memory layouts, descriptors and wgmma atoms. TiledMMA is
// not used: its header pulls in every architecture's atoms and triples the compile time, and the
// fragment layouts needed here are the simple ones written out below.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <type_traits>
#include <utility>

#include <cute/arch/mma_sm80.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "based_prefill.h"

namespace attn_kernels {
namespace {

using bf16 = __nv_bfloat16;

struct Cfg {
  static constexpr int kChunk = 64;     // tokens per chunk
  static constexpr int kThreads = 128;  // one warpgroup
  static constexpr int kF = 160;        // 153 compact features padded to a multiple of 32
  static constexpr int kNT = kF / 8;    // state n-tiles of 8 features
  // Row pitches (elements) padded so that 8 consecutive rows hit distinct banks for ldmatrix / stmatrix.
  static constexpr int kQKPitch = 24;  // q, k input rows
  static constexpr int kOPitch = 72;   // output staging rows
  // One segment's partial state in the workspace: S^T in fragment order, then z (160).
  static constexpr int kStateFloats = 4 * 32 * kNT * 4;
  static constexpr int kWsFloats = kStateFloats + kF;
  static constexpr int kCtasPerSm = 2;
};

// ---- shared memory --------------------------------------------------------------------------------

// The wgmma operand tiles (element offsets; each tile's base 1024-byte aligned):
// phi(Q), phi(K): token rows of 160 features in GMMA SW64 atoms of 8 tokens x 32 features (64-byte
//   rows, 16-byte units XOR (tok >> 1) & 3); token blocks inner (512 B), feature blocks outer (4 KB).
//   phi(Q) is the K-major B operand (N = token), phi(K) the MN-major B operand (N = feature) of the
//   same arrangement.
// V (token rows of 64 values) and W (query rows of 64 keys): GMMA SW128, 128-byte rows, 16-byte units
//   XOR row & 7. V is the MN-major A operand (M = value), W the K-major B operand.
// phi_off and row128_off are the offsets the writers use; they equal the CuTe layouts of Tiles.
__host__ __device__ __forceinline__ int phi_off(int tok, int f) {  // f % 8 == 0 for 16-byte accesses
  return (f >> 5) * 2048 + (tok >> 3) * 256 + (tok & 7) * 32 +
         ((((f >> 3) & 3) ^ ((tok >> 1) & 3)) << 3) + (f & 7);
}
__host__ __device__ __forceinline__ int row128_off(int r, int c) {
  return r * 64 + ((((c >> 3) ^ (r & 7))) << 3) + (c & 7);
}

struct Tiles {
  using E = cute::bfloat16_t;  // any 16-bit type: the layouts and descriptors depend on the size only
  using PhiQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW64_Atom<E>{},
                                            cute::Shape<cute::_64, cute::_160>{}));  // (token, feature)
  using PhiK = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW64_Atom<E>{},
                                            cute::Shape<cute::_160, cute::_64>{},
                                            cute::Step<cute::_2, cute::_1>{}));  // (feature, token)
  using V = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<E>{},
                                         cute::Shape<cute::_64, cute::_64>{}));  // (value, token)
  using W = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                         cute::Shape<cute::_64, cute::_64>{}));  // (query, key)
  template <class Layout, class P>
  static __device__ __forceinline__ auto tensor(P* ptr) {
    return cute::make_tensor(cute::make_smem_ptr(reinterpret_cast<E*>(ptr)), Layout{});
  }
};

template <typename T>
struct Smem {
  // fp16 inputs: phi(Q) as bf16 hi + lo (two tiles) for the bf16 state products.
  static constexpr bool kSplit = std::is_same_v<T, __half>;
  bf16 phiq[kSplit ? 2 : 1][Cfg::kChunk * Cfg::kF];  // wgmma tiles first: each a multiple of 1 KB
  T phik[Cfg::kChunk * Cfg::kF];
  T v[2][Cfg::kChunk * kValueDim];  // double-buffered chunk input (cp.async)
  T w[Cfg::kChunk * Cfg::kChunk];
  T q[2][Cfg::kChunk][Cfg::kQKPitch];
  T k[2][Cfg::kChunk][Cfg::kQKPitch];
  T o[Cfg::kChunk][Cfg::kOPitch];  // output staging, token rows; warp w owns columns 16w..16w+15
  float den[Cfg::kChunk][8];  // partial dens: [0] phi(Q).z, [4 + kt] rowsum of W's block kt
  float inv[Cfg::kChunk];     // 1 / (den + eps)
  // G before chunk c as bf16 mma B fragments (fp16: hi, lo) and ks, in buffer c & 1 (warp kZWarp writes
  // the next chunk's while the other warps read this chunk's).
  uint4 gfrag[2][kSplit ? 2 : 1][32];
  float ks[2][16];
};
template <typename T>
constexpr int kSmemBytes = int(sizeof(Smem<T>)) + 1024;  // + slack to align the base to 1 KB
constexpr int kPhiTileBytes = Cfg::kChunk * Cfg::kF * 2;

// ---- 16-bit helpers -------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<bf16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t u) {
  return __half22float2(*reinterpret_cast<__half2*>(&u));
}
template <>
__device__ __forceinline__ float2 unpack2<bf16>(uint32_t u) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
}

// x = hi + lo to ~16 significant bits: hi = bf16(x), lo = bf16(x - hi), for a pair (a, b).
__device__ __forceinline__ void split_bf16x2(float a, float b, uint32_t& hi, uint32_t& lo) {
  hi = pack2<bf16>(a, b);
  lo = pack2<bf16>(a - __uint_as_float(hi << 16), b - __uint_as_float(hi & 0xffff0000u));
}

// c += a * b, m16n8k16 (mma.sync), float32 accumulate: CuTe's SM80 atoms.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using Op = std::conditional_t<std::is_same_v<T, __half>, cute::SM80_16x8x16_F32F16F16F32_TN,
                                cute::SM80_16x8x16_F32BF16BF16F32_TN>;
  Op::fma(c[0], c[1], c[2], c[3], a[0], a[1], a[2], a[3], b0, b1, c[0], c[1], c[2], c[3]);
}

__device__ __forceinline__ float rcp_approx(float x) {  // MUFU.RCP alone, ~1 ulp
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// ---- shared memory by 32-bit address, async copies, proxy fence -----------------------------------

__device__ __forceinline__ uint32_t saddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void sts128(uint32_t a, uint4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1,%2,%3,%4};" ::"r"(a), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}
__device__ __forceinline__ void sts32(uint32_t a, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(a), "r"(v));
}
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldsm4_t(uint32_t (&r)[4], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void stsm4_t(uint32_t a, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};"
               ::"r"(a), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}

// 16-byte async copy; rows past the end are zero-filled (src-size 0 reads nothing).
__device__ __forceinline__ void cp_async16(uint32_t s, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Generic-proxy writes to shared memory (st.shared, cp.async) become visible to wgmma (async proxy).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// ---- wgmma ----------------------------------------------------------------------------------------

// Fragments per thread (warp w, lane = 4g + t), per warp the same as mma.sync m16n8:
//   accumulator m64nN: d[4n + e] = D[16w + g + 8(e >> 1)][8n + 2t + (e & 1)]
//   register A m64k16: a[j] = bf16x2 of A[16w + g + 8(j & 1)][2t + 8(j >> 1) + {0, 1}]
// so the bf16 pairs of the state accumulators, in order, are the A registers of S^T.
namespace GM = cute::SM90::GMMA;
using AtomInter = GM::MMA_64x64x16_F32BF16BF16_RS<GM::Major::K, GM::Major::K>;  // bf16: S exceeds fp16
template <typename T>  // products in the input type: o^T = V^T W^T, S^T += V^T phi(K) (two N pieces)
struct Atoms {
  using Intra = GM::MMA_64x64x16_F32BF16BF16_SS<GM::Major::MN, GM::Major::K>;
  using Upd128 = GM::MMA_64x128x16_F32BF16BF16_SS<GM::Major::MN, GM::Major::MN>;  // features 0..127
  using Upd32 = GM::MMA_64x32x16_F32BF16BF16_SS<GM::Major::MN, GM::Major::MN>;    // features 128..159
};
template <>
struct Atoms<__half> {
  using Intra = GM::MMA_64x64x16_F32F16F16_SS<GM::Major::MN, GM::Major::K>;
  using Upd128 = GM::MMA_64x128x16_F32F16F16_SS<GM::Major::MN, GM::Major::MN>;
  using Upd32 = GM::MMA_64x32x16_F32F16F16_SS<GM::Major::MN, GM::Major::MN>;
};

template <class Atom, size_t... I>
__device__ __forceinline__ void wgmma_ss(uint64_t da, uint64_t db, float* d, GM::ScaleOut scale_d,
                                         std::index_sequence<I...>) {
  Atom::fma(da, db, d[I]..., scale_d);
}
template <class Atom, size_t... I>
__device__ __forceinline__ void wgmma_rs(const uint32_t* a, uint64_t db, float* d,
                                         std::index_sequence<I...>) {
  Atom::fma(a[0], a[1], a[2], a[3], db, d[I]..., GM::ScaleOut::One);
}
// Descriptor of tile (r_tile, kb) of shape R x 16 of a GMMA smem tensor (rows x K).
template <GM::Major kMajor, int R, class Tensor>
__device__ __forceinline__ uint64_t kblock_desc(const Tensor& t, int r_tile, int kb) {
  using namespace cute;
  return GM::make_gmma_desc<kMajor>(local_tile(t, Shape<Int<R>, _16>{}, make_coord(r_tile, kb)));
}
template <class T, int N>
__device__ __forceinline__ void fence_regs(T (&r)[N]) {  // keep the compiler off wgmma operands in flight
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(r[i]);
}

// ---- the running state's place in the registers ---------------------------------------------------

// s[4n + e] (S^T as wgmma accumulators, m64n128 then m64n32) holds S[f][v]: fn(n, e, f, v) for each of
// this thread's elements.
template <typename Fn>
__device__ __forceinline__ void for_each_s(int warp, int g, int t, Fn&& fn) {
#pragma unroll
  for (int n = 0; n < Cfg::kNT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) fn(n, e, 8 * n + 2 * t + (e & 1), 16 * warp + g + 8 * (e >> 1));
}

// z = sum of phi(k) over the past keys is kept as the keys' moments: cnt (the constant feature), ks = sum k
// and the Gram matrix G = sum k k^T, in float32. With x' = sqrt(c) x, the compact z is
//   z[0] = cnt, z[1 + i] = sqrt(c) ks_i, z[17 + i] = c G_ii / sqrt(2), z[quad(i, j)] = c G_ij (i < j),
// and phi(q).z = cnt + c q.ks + (c^2 / 2) q^T G q. G and ks come from 12 mma.sync per chunk instead of
// a 153-wide feature sum, and the products k_i k_j are exact in float32 (phi(K) rounds them).
// Warp kZWarp holds G and ks as m16n8 accumulators: gm[nt][e] = G[i][j], ksa[e] = ks[i] (every column)
// with i = g + 8(e >> 1), j = 8nt + 2t + (e & 1): fn(nt, e, i, j).
constexpr int kZWarp = 3;  // the warp with one W block fewer than warps 0 and 1
template <typename Fn>
__device__ __forceinline__ void for_each_g(int g, int t, Fn&& fn) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) fn(nt, e, g + 8 * (e >> 1), 8 * nt + 2 * t + (e & 1));
}
__device__ __forceinline__ int quad_feature(int i, int j) {  // compact index of x_i x_j, i < j
  return 33 + 15 * i - i * (i - 1) / 2 + (j - i - 1);
}

// ---- feature map (compact order of common.h), resolved at compile time ----------------------------

// Pair m (0..119) of the row-major i<j enumeration.
__host__ __device__ constexpr int pair_i(int m) {
  int i = 0;
  while (m >= 15 - i) m -= 15 - i++;
  return i;
}
__host__ __device__ constexpr int pair_j(int m) {
  int i = 0;
  while (m >= 15 - i) m -= 15 - i++;
  return i + 1 + m;
}

// x is already multiplied by sqrt(c): c*x_i*x_j = x'_i x'_j, c*x_i^2/sqrt(2) = x'_i^2/sqrt(2).
template <int F>
__device__ __forceinline__ float feature(const float (&x)[16], float one) {
  if constexpr (F == 0) {
    return one;
  } else if constexpr (F <= 16) {
    return x[F - 1];
  } else if constexpr (F <= 32) {
    return x[F - 17] * x[F - 17] * 0.70710678118654752f;
  } else if constexpr (F < 153) {
    constexpr int i = pair_i(F - 33), j = pair_j(F - 33);
    return x[i] * x[j];
  } else {
    return 0.f;  // padding 153..159
  }
}

// x = sqrt(c) * src (one 16-element row) in float.
template <typename T>
__device__ __forceinline__ void load_scaled_row(const T* src, float sqrt_c, float (&x)[16]) {
  const uint4 a = *reinterpret_cast<const uint4*>(src);
  const uint4 b = *reinterpret_cast<const uint4*>(src + 8);
  const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 f = unpack2<T>(w[i]);
    x[2 * i] = f.x * sqrt_c;
    x[2 * i + 1] = f.y * sqrt_c;
  }
}

// Packed path for Out == T when sqrt(c) is a power of two (the default c = 1/4 among them):
// x' = sqrt(c) x is then exact in T, and a T2 multiply rounds x'_i x'_j once, like the float
// path, so both give the same features. 53 of the 80 feature pairs are one T2 multiply
// (x'_i, x'_i) * (x'_j, x'_j+1); the others go through float.
template <typename T>
struct Packed;
template <>
struct Packed<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ T2 mul(T2 a, T2 b) { return __hmul2(a, b); }
  static __device__ __forceinline__ T2 lo(T2 a) { return __low2half2(a); }
  static __device__ __forceinline__ T2 hi(T2 a) { return __high2half2(a); }
  static __device__ __forceinline__ T2 odd(T2 a, T2 b) {  // (a.y, b.x)
    return __halves2half2(__high2half(a), __low2half(b));
  }
};
template <>
struct Packed<bf16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ T2 mul(T2 a, T2 b) { return __hmul2(a, b); }
  static __device__ __forceinline__ T2 lo(T2 a) { return __low2bfloat162(a); }
  static __device__ __forceinline__ T2 hi(T2 a) { return __high2bfloat162(a); }
  static __device__ __forceinline__ T2 odd(T2 a, T2 b) {
    return __halves2bfloat162(__high2bfloat16(a), __low2bfloat16(b));
  }
};

__host__ __device__ constexpr int feature_kind(int f) {  // 0 one, 1 linear, 2 square, 3 pair, 4 pad
  return f == 0 ? 0 : f <= 16 ? 1 : f <= 32 ? 2 : f < 153 ? 3 : 4;
}

template <typename T>
struct PackedRow {
  using P = Packed<T>;
  typename P::T2 xp[8];   // (x'_2k, x'_2k+1)
  typename P::T2 xo[7];   // (x'_2k+1, x'_2k+2)
  typename P::T2 xb[16];  // (x'_i, x'_i)
  float x[16];            // x' in float, for the features that straddle pairs

  template <int J>
  __device__ __forceinline__ typename P::T2 pair_at() const {  // (x'_J, x'_J+1)
    if constexpr (J % 2 == 0) return xp[J / 2];
    else return xo[J / 2];
  }
  template <int W>
  __device__ __forceinline__ uint32_t word(float one) const {  // features 2W, 2W+1
    constexpr int f0 = 2 * W, f1 = 2 * W + 1, k0 = feature_kind(f0), k1 = feature_kind(f1);
    if constexpr (k0 == 3 && k1 == 3 && pair_i(f0 - 33) == pair_i(f1 - 33)) {
      constexpr int i = pair_i(f0 - 33), j = pair_j(f0 - 33);
      return as_u32(P::mul(xb[i], pair_at<j>()));
    } else if constexpr (k0 == 1 && k1 == 1) {
      return as_u32(pair_at<f0 - 1>());
    } else {
      return pack2<T>(feature<f0>(x, one), feature<f1>(x, one));
    }
  }
  static __device__ __forceinline__ uint32_t as_u32(typename P::T2 v) {
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

// Destination of one token row in a phi tile: group G (features 8G..8G+7) is 16 contiguous bytes at
// a[G & 3] + (G >> 2) * 4096.
struct PhiRowDst {
  uint32_t a[4];
  __device__ __forceinline__ PhiRowDst(uint32_t tile, int tok) {
#pragma unroll
    for (int j = 0; j < 4; ++j) a[j] = tile + 2 * phi_off(tok, 8 * j);
  }
  template <int G>
  __device__ __forceinline__ uint32_t at() const { return a[G & 3] + (G >> 2) * 4096; }
};

template <typename Out, int G0, int... G>
__device__ __forceinline__ void store_groups_float(const PhiRowDst& d, const float (&x)[16], float one,
                                                   std::integer_sequence<int, G...>) {
  auto one_group = [&](auto gc) {
    constexpr int g = decltype(gc)::value;
    uint4 u;
    u.x = pack2<Out>(feature<8 * g + 0>(x, one), feature<8 * g + 1>(x, one));
    u.y = pack2<Out>(feature<8 * g + 2>(x, one), feature<8 * g + 3>(x, one));
    u.z = pack2<Out>(feature<8 * g + 4>(x, one), feature<8 * g + 5>(x, one));
    u.w = pack2<Out>(feature<8 * g + 6>(x, one), feature<8 * g + 7>(x, one));
    sts128(d.template at<g>(), u);
  };
  (one_group(std::integral_constant<int, G0 + G>{}), ...);
}

// fp16 phi(Q): every feature as bf16 hi (tile at d) + lo (the next tile), computed in float.
template <int... G>
__device__ __forceinline__ void store_groups_split(const PhiRowDst& d, const float (&x)[16],
                                                   std::integer_sequence<int, G...>) {
  auto one_group = [&](auto gc) {
    constexpr int g = decltype(gc)::value;
    uint4 h, l;
    split_bf16x2(feature<8 * g + 0>(x, 1.f), feature<8 * g + 1>(x, 1.f), h.x, l.x);
    split_bf16x2(feature<8 * g + 2>(x, 1.f), feature<8 * g + 3>(x, 1.f), h.y, l.y);
    split_bf16x2(feature<8 * g + 4>(x, 1.f), feature<8 * g + 5>(x, 1.f), h.z, l.z);
    split_bf16x2(feature<8 * g + 6>(x, 1.f), feature<8 * g + 7>(x, 1.f), h.w, l.w);
    sts128(d.template at<g>(), h);
    sts128(d.template at<g>() + kPhiTileBytes, l);
  };
  (one_group(std::integral_constant<int, G>{}), ...);
}

template <typename T, int G0, int... G>
__device__ __forceinline__ void store_groups_packed(const PhiRowDst& d, const PackedRow<T>& pr,
                                                    float one, std::integer_sequence<int, G...>) {
  auto one_group = [&](auto gc) {
    constexpr int g = decltype(gc)::value;
    uint4 u;
    u.x = pr.template word<4 * g + 0>(one);
    u.y = pr.template word<4 * g + 1>(one);
    u.z = pr.template word<4 * g + 2>(one);
    u.w = pr.template word<4 * g + 3>(one);
    sts128(d.template at<g>(), u);
  };
  (one_group(std::integral_constant<int, G0 + G>{}), ...);
}

// Feature groups [G0, G0 + NG) (8 features each) of phi(src row) into a phi tile, in T.
// one = 0 zeroes the constant feature of a padding token (x itself is zero-filled).
template <typename T, int G0, int NG>
__device__ __forceinline__ void build_phi_row(const T* src, const PhiRowDst& d, float sqrt_c, float one,
                                              bool packed_ok) {
  if (packed_ok) {
    using P = Packed<T>;
    PackedRow<T> pr;
    const uint4 a = *reinterpret_cast<const uint4*>(src);
    const uint4 b = *reinterpret_cast<const uint4*>(src + 8);
    const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    typename P::T2 sc;
    *reinterpret_cast<uint32_t*>(&sc) = pack2<T>(sqrt_c, sqrt_c);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      pr.xp[i] = P::mul(*reinterpret_cast<const typename P::T2*>(&w[i]), sc);
      const float2 f = unpack2<T>(*reinterpret_cast<const uint32_t*>(&pr.xp[i]));
      pr.x[2 * i] = f.x;
      pr.x[2 * i + 1] = f.y;
    }
#pragma unroll
    for (int i = 0; i < 7; ++i) pr.xo[i] = P::odd(pr.xp[i], pr.xp[i + 1]);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      pr.xb[2 * i] = P::lo(pr.xp[i]);
      pr.xb[2 * i + 1] = P::hi(pr.xp[i]);
    }
    store_groups_packed<T, G0>(d, pr, one, std::make_integer_sequence<int, NG>{});
  } else {
    float x[16];
    load_scaled_row(src, sqrt_c, x);
    store_groups_float<T, G0>(d, x, one, std::make_integer_sequence<int, NG>{});
  }
}

// ---- the kernel -----------------------------------------------------------------------------------

template <typename T, bool kStateOnly>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kCtasPerSm)
    based_prefill_kernel(const BasedPrefillParams p, const int nseg, const int seg_chunks) {
  using namespace cute;
  using A = Atoms<T>;
  constexpr bool kSplit = Smem<T>::kSplit;
  static_assert(offsetof(Smem<T>, q) % 1024 == 0, "every wgmma tile starts 1 KB-aligned");
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_s = saddr(smem_raw);
  Smem<T>& sm = *reinterpret_cast<Smem<T>*>(smem_raw + ((1024u - (raw_s & 1023u)) & 1023u));
  const uint32_t s_phiq = saddr(sm.phiq), s_phik = saddr(sm.phik), s_w = saddr(sm.w);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;    // mma fragment coordinates
  const int lj = lane >> 3, lr = lane & 7;  // ldmatrix / stmatrix: which 8x8 matrix, which row of it
  const int bh = blockIdx.x, seg = blockIdx.y;
  const int b = bh / p.H, h = bh % p.H;

  const int64_t t_begin = int64_t(seg) * seg_chunks * Cfg::kChunk;
  const int64_t t_end = min(int64_t(p.N), t_begin + int64_t(seg_chunks) * Cfg::kChunk);
  const int nchunks = AK_MUTANT(prefill_tail_dropped) ? int((t_end - t_begin) / Cfg::kChunk)
                                                     : int((t_end - t_begin + Cfg::kChunk - 1) / Cfg::kChunk);

  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  T* og = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
  float* ws = static_cast<float*>(p.workspace);
  const float sqrt_c = sqrtf(p.scale), c1 = p.scale;
  const float c2 = (AK_MUTANT(prefill_quad_scale) ? 1.f : 0.5f) * p.scale * p.scale;
  const float c1k = AK_MUTANT(prefill_den_inter_ks) ? 0.f : c1;  // c of den_inter's c q.ks term
  const bool den_on = !kStateOnly && p.normalize;
  const bool packed_ok = (__float_as_uint(sqrt_c) & 0x7fffffu) == 0;  // sqrt(c) = 2^k

  // Running state, laid out as for_each_s / for_each_g say (gm, ksa: warp kZWarp only).
  float s[4 * Cfg::kNT];
  float gm[2][4], ksa[4], cnt;
  {
    const float* S0 = (!kStateOnly && p.S0 && !(AK_MUTANT(prefill_init_ignored_num) && !p.normalize)) ? p.S0 + int64_t(bh) * kCompactFeatures * kValueDim
                                             : nullptr;
    const float* z0 = (!kStateOnly && p.z0) ? p.z0 + int64_t(bh) * kCompactFeatures : nullptr;
    const float* prev = (!kStateOnly && seg > 0 && !AK_MUTANT(prefill_split_carry))  // earlier segments' prefix
                            ? ws + (int64_t(bh) * (nseg - 1) + seg - 1) * Cfg::kWsFloats
                            : nullptr;
    // The workspace holds S^T in fragment order: float4 (warp * kNT + n) * 32 + lane is s[4n..4n+3],
    // loaded whole (for_each_s's per-element form would load it as four scalars).
#pragma unroll
    for (int n = 0; n < Cfg::kNT; ++n) {
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (prev) x = reinterpret_cast<const float4*>(prev)[(warp * Cfg::kNT + n) * 32 + lane];
      const float carried[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int f = 8 * n + 2 * t + (e & 1), v = 16 * warp + g + 8 * (e >> 1);
        s[4 * n + e] = ((S0 && f < kCompactFeatures) ? S0[f * kValueDim + v] : 0.f) + carried[e];
      }
    }
    auto z_in = [&](int f) {
      return (z0 ? z0[f] : 0.f) + (prev ? prev[Cfg::kStateFloats + f] : 0.f);
    };
    cnt = z_in(0);
    if (warp == kZWarp) {  // divided, not multiplied by 1/c: 1/c overflows for a subnormal scale
      for_each_g(g, t, [&](int nt, int e, int i, int j) {
        gm[nt][e] = (i == j ? 1.41421356237309515f * z_in(17 + i)
                            : z_in(quad_feature(min(i, j), max(i, j)))) / p.scale;
      });
#pragma unroll
      for (int e = 0; e < 4; ++e) ksa[e] = z_in(1 + g + 8 * (e >> 1)) / sqrt_c;
    }
  }
  // G's fragments for the den products (bf16 hi, fp16 inputs also lo) and ks, into buffer `buf`.
  auto publish_g = [&](int buf) {
    uint4 hi, lo;
    if constexpr (kSplit) {
      split_bf16x2(gm[0][0], gm[0][1], hi.x, lo.x);
      split_bf16x2(gm[1][0], gm[1][1], hi.y, lo.y);
      split_bf16x2(gm[0][2], gm[0][3], hi.z, lo.z);
      split_bf16x2(gm[1][2], gm[1][3], hi.w, lo.w);
      sm.gfrag[buf][1][lane] = lo;
    } else {
      hi = make_uint4(pack2<bf16>(gm[0][0], gm[0][1]), pack2<bf16>(gm[1][0], gm[1][1]),
                      pack2<bf16>(gm[0][2], gm[0][3]), pack2<bf16>(gm[1][2], gm[1][3]));
    }
    sm.gfrag[buf][0][lane] = hi;
    if (t == 0) {
      sm.ks[buf][g] = ksa[0];
      sm.ks[buf][g + 8] = ksa[2];
    }
  };
  if (!kStateOnly && warp == kZWarp) publish_g(0);  // chunk 0's barrier publishes it

  // Chunk loads into stage c & 1, zero-filled past t_end. Each thread copies the same rows of
  // every chunk: 16 bytes of q and k (row tid/2) and of v (rows tid/8 + 16i, into V's swizzled
  // tile: + 2 KB per 16 rows); its source pointers advance by one chunk per call, so calls must come
  // in chunk order.
  const int qk_row = tid >> 1, qk_col = 8 * (tid & 1), v_row = tid >> 3, v_col = 8 * (tid & 7);
  const T* qsrc = qg + (t_begin + qk_row) * p.q_sn + qk_col;
  const T* ksrc = kg + (t_begin + qk_row) * p.k_sn + qk_col;
  const T* vsrc = vg + (t_begin + v_row) * p.v_sn + v_col;
  const uint32_t v_dst = saddr(sm.v[0]) + 2 * row128_off(v_row, v_col);
  auto issue_loads = [&](int c) {
    const int st = c & 1;
    const int64_t left = t_end - (t_begin + int64_t(c) * Cfg::kChunk);  // valid rows
    const bool ok = qk_row < left;
    if (!kStateOnly) cp_async16(saddr(&sm.q[st][qk_row][qk_col]), ok ? qsrc : qg, ok);
    cp_async16(saddr(&sm.k[st][qk_row][qk_col]), ok ? ksrc : kg, ok);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool okv = v_row + 16 * i < left;
      cp_async16(v_dst + st * int(sizeof(sm.v[0])) + i * 2048, okv ? vsrc + 16 * i * p.v_sn : vg, okv);
    }
    cp_async_commit();
    qsrc += Cfg::kChunk * p.q_sn;
    ksrc += Cfg::kChunk * p.k_sn;
    vsrc += Cfg::kChunk * p.v_sn;
  };

  // wgmma operands in shared memory (CuTe tensors, for the descriptors).
  Tensor sW = Tiles::tensor<Tiles::W>(sm.w);
  Tensor sPQ = Tiles::tensor<Tiles::PhiQ>(sm.phiq[0]);
  Tensor sPQlo = Tiles::tensor<Tiles::PhiQ>(sm.phiq[kSplit ? 1 : 0]);  // fp16: the lo tile
  Tensor sPK = Tiles::tensor<Tiles::PhiK>(sm.phik);
  uint32_t xa[2 * Cfg::kNT];  // S^T as bf16 A registers: xa[4kb + j] for features 16kb..16kb+15
  float o[32] = {};           // o^T: o[4n + e] = out[token 8n + 2t + (e & 1)][value 16w + g + 8(e >> 1)]

  if (!kStateOnly && !den_on && tid < Cfg::kChunk) sm.inv[tid] = 1.f;  // numerator only: scale 1
  // W's blocks above the diagonal (key block > query block) are never built, but o^T = V^T W^T reads
  // all 64 x 64 of W: they must hold zeros, not whatever an earlier CTA left there (0 * NaN = NaN).
  // Written once: nothing else writes them. The fence of chunk 0's phase 1 covers these stores.
  if constexpr (!kStateOnly) {
    for (int i = tid; i < Cfg::kChunk * 8; i += Cfg::kThreads) {  // 16-byte units: row r, columns c..c+7
      const int r = i >> 3, c = 8 * (i & 7);
      if ((c >> 4) > (r >> 4)) sts128(s_w + 2 * row128_off(r, c), make_uint4(0u, 0u, 0u, 0u));
    }
  }
  issue_loads(0);
  for (int c = 0; c < nchunks; ++c) {
    const int st = c & 1;
    const int64_t t0 = t_begin + int64_t(c) * Cfg::kChunk;
    if (c + 1 < nchunks) {  // stage (c+1)&1 was last read (wgmma, waited) before the previous end barrier
      issue_loads(c + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // Phase 1: feature maps and W of the chunk.
    uint32_t qd[4];  // this warp's 16 query rows (den_inter)
    if constexpr (kStateOnly) {
      const int r = tid & 63;
      const PhiRowDst d(s_phik, r);
      const float one = t0 + r < t_end ? 1.f : 0.f;
      if (tid < 64)
        build_phi_row<T, 0, 10>(sm.k[st][r], d, sqrt_c, one, packed_ok);
      else
        build_phi_row<T, 10, 10>(sm.k[st][r], d, sqrt_c, one, packed_ok);
    } else {
      // phi(Q) meets the bf16 state: bf16, or bf16 hi + lo for fp16 inputs. That split build is the
      // heavier one, so fp16 gives it to warps 2-3 (one W block fewer each below).
      if ((warp < 2) != kSplit) {
        const int r = kSplit ? tid - 64 : tid;
        if constexpr (kSplit) {
          float x[16];
          load_scaled_row(sm.q[st][r], sqrt_c, x);
          store_groups_split(PhiRowDst(s_phiq, r), x, std::make_integer_sequence<int, Cfg::kF / 8>{});
        } else {
          build_phi_row<T, 0, 20>(sm.q[st][r], PhiRowDst(s_phiq, r), sqrt_c, 1.f, packed_ok);
        }
      } else {
        const int r = kSplit ? tid : tid - 64;
        build_phi_row<T, 0, 20>(sm.k[st][r], PhiRowDst(s_phik, r), sqrt_c, t0 + r < t_end ? 1.f : 0.f,
                                packed_ok);
      }
      // W block i = (m, kt), kt <= m, numbered row by row; warp w takes i = w, w+4, w+8 (< 10). The
      // fragments of all three are loaded first: one shared-memory round trip instead of three.
      auto block_mk = [](int i, int& m, int& kt) {
        m = i >= 6 ? 3 : i >= 3 ? 2 : i >= 1 ? 1 : 0;
        kt = i - m * (m + 1) / 2;
      };
      uint32_t qa3[3][4], kb3[3][4];  // kb: keys 16kt..+7 {kb0, kb1}, keys 16kt+8..+15 {kb2, kb3}
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        int m, kt;
        block_mk(min(warp + 4 * j, 9), m, kt);
        ldsm4(qa3[j], saddr(&sm.q[st][16 * m + lr + 8 * (lj & 1)][8 * (lj >> 1)]));
        ldsm4(kb3[j], saddr(&sm.k[st][16 * kt + lr + 8 * (lj >> 1)][8 * (lj & 1)]));
      }
      if (den_on) ldsm4(qd, saddr(&sm.q[st][16 * warp + lr + 8 * (lj & 1)][8 * (lj >> 1)]));
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        const int i = warp + 4 * j;
        if (i >= 10) break;
        int m, kt;
        block_mk(i, m, kt);
        const uint32_t(&qa)[4] = qa3[j];
        const uint32_t(&kb)[4] = kb3[j];
        float ca[4] = {0.f, 0.f, 0.f, 0.f}, cb[4] = {0.f, 0.f, 0.f, 0.f};
        mma<T>(ca, qa, kb[0], kb[1]);
        mma<T>(cb, qa, kb[2], kb[3]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          ca[e] = fmaf(ca[e], fmaf(ca[e], c2, c1), 1.f);
          cb[e] = fmaf(cb[e], fmaf(cb[e], c2, c1), 1.f);
          if (m == kt) {  // diagonal block: key 2t+(e&1) (+8 for cb) vs query g + 8(e>>1)
            const int qrow = g + 8 * (e >> 1), key = 2 * t + (e & 1);
            if (AK_MUTANT(prefill_causal_diag) ? key >= qrow : key > qrow) ca[e] = 0.f;
            if (key + 8 > qrow) cb[e] = 0.f;
          }
        }
        const int r0 = 16 * m + g, k0 = 16 * kt + 2 * t;
        sts32(s_w + 2 * row128_off(r0, k0), pack2<T>(ca[0], ca[1]));
        sts32(s_w + 2 * row128_off(r0 + 8, k0), pack2<T>(ca[2], ca[3]));
        sts32(s_w + 2 * row128_off(r0, k0 + 8), pack2<T>(cb[0], cb[1]));
        sts32(s_w + 2 * row128_off(r0 + 8, k0 + 8), pack2<T>(cb[2], cb[3]));
        if (den_on) {
          float d0 = (ca[0] + ca[1]) + (cb[0] + cb[1]), d1 = (ca[2] + ca[3]) + (cb[2] + cb[3]);
          d0 += __shfl_xor_sync(0xffffffffu, d0, 1);
          d1 += __shfl_xor_sync(0xffffffffu, d1, 1);
          d0 += __shfl_xor_sync(0xffffffffu, d0, 2);
          d1 += __shfl_xor_sync(0xffffffffu, d1, 2);
          if (t == 0) {
            sm.den[r0][4 + kt] = d0;
            sm.den[r0 + 8][4 + kt] = d1;
          }
        }
      }
    }
    // den_inter of this warp's 16 queries with z before the chunk: Y = Q G (fp16: Q and G as bf16
    // hi + lo), then cnt + sum_i q_i (c ks_i + (c^2 / 2) Y_i) over this lane's 4 columns and its quad.
    if (den_on) {
      const uint32_t(&qa)[4] = qd;
      const uint4 gh = sm.gfrag[st][0][lane];
      float y0[4] = {0.f, 0.f, 0.f, 0.f}, y1[4] = {0.f, 0.f, 0.f, 0.f};  // columns 2t, 2t + 8 (+1)
      if constexpr (kSplit) {
        const uint4 gl = sm.gfrag[st][1][lane];
        uint32_t qh[4], ql[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = unpack2<T>(qa[j]);
          split_bf16x2(f.x, f.y, qh[j], ql[j]);
        }
        mma<bf16>(y0, qh, gh.x, gh.y);
        mma<bf16>(y0, qh, gl.x, gl.y);
        mma<bf16>(y0, ql, gh.x, gh.y);
        mma<bf16>(y1, qh, gh.z, gh.w);
        mma<bf16>(y1, qh, gl.z, gl.w);
        mma<bf16>(y1, ql, gh.z, gh.w);
      } else {
        mma<bf16>(y0, qa, gh.x, gh.y);
        mma<bf16>(y1, qa, gh.z, gh.w);
      }
      const float2 ka = *reinterpret_cast<const float2*>(&sm.ks[st][2 * t]);
      const float2 kb = *reinterpret_cast<const float2*>(&sm.ks[st][2 * t + 8]);
      auto part = [&](uint32_t q_lo, uint32_t q_hi, float y00, float y01, float y10, float y11) {
        const float2 a = unpack2<T>(q_lo), b = unpack2<T>(q_hi);
        return (a.x * fmaf(c2, y00, c1k * ka.x) + a.y * fmaf(c2, y01, c1k * ka.y)) +
               (b.x * fmaf(c2, y10, c1k * kb.x) + b.y * fmaf(c2, y11, c1k * kb.y));
      };
      float d0 = part(qa[0], qa[2], y0[0], y0[1], y1[0], y1[1]);  // query 16w + g
      float d1 = part(qa[1], qa[3], y0[2], y0[3], y1[2], y1[3]);  // query 16w + g + 8
      d0 += __shfl_xor_sync(0xffffffffu, d0, 1);
      d1 += __shfl_xor_sync(0xffffffffu, d1, 1);
      d0 += __shfl_xor_sync(0xffffffffu, d0, 2);
      d1 += __shfl_xor_sync(0xffffffffu, d1, 2);
      if (t == 0) {
        const float cnt_c = cnt + float(t0 - t_begin);
        sm.den[16 * warp + g][0] = cnt_c + d0;
        sm.den[16 * warp + g + 8][0] = cnt_c + d1;
      }
    }
    if (warp == kZWarp && !(AK_MUTANT(prefill_z_last_chunk) && c + 1 == nchunks)) {  // G += K^T K, ks += K^T 1
      // over the chunk (padding rows are zero)
      const uint32_t one2 = pack2<T>(1.f, 1.f);
#pragma unroll
      for (int kt = 0; kt < 4; ++kt) {
        uint32_t a[4];  // K^T (rows i, tokens 16kt..): G is symmetric, so also K's B fragments
        ldsm4_t(a, saddr(&sm.k[st][16 * kt + lr + 8 * (lj >> 1)][8 * (lj & 1)]));
        mma<T>(gm[0], a, a[0], a[2]);
        mma<T>(gm[1], a, a[1], a[3]);
        mma<T>(ksa, a, one2, one2);
      }
      if (!kStateOnly) publish_g(st ^ 1);
    }
    fence_proxy_async_smem();  // this thread's phi / W stores and V copies, for wgmma
    if constexpr (!AK_MUTANT(prefill_missing_barrier)) __syncthreads();

    // Phase 2: wgmma products, issued asynchronously; 1/den meanwhile.
    Tensor sV = Tiles::tensor<Tiles::V>(sm.v[st]);

    // 1 / (den + eps) of each query, while the wgmma products run.
    auto den_to_inv = [&]() {
      if (den_on && tid < Cfg::kChunk) {  // slots 4 + kt exist for kt <= m only
        const float4 dw = *reinterpret_cast<const float4*>(&sm.den[tid][4]);
        const int m = tid >> 4;
        float den = sm.den[tid][0] + dw.x;
        if (m >= 1) den += dw.y;
        if (m >= 2) den += dw.z;
        if (m >= 3) den += dw.w;
        sm.inv[tid] = rcp_approx(den + (AK_MUTANT(prefill_eps_dropped) ? 0.f : p.eps));  // den >= 1/2
      }
    };
    auto inter = [&](const auto& sB) {  // o^T += S^T(xa) phi(Q)^T (sB: a phi(Q) tile), 10 k-blocks
#pragma unroll
      for (int kb = 0; kb < Cfg::kF / 16; ++kb)
        wgmma_rs<AtomInter>(&xa[4 * kb], kblock_desc<GM::Major::K, 64>(sB, 0, kb), o,
                            std::make_index_sequence<32>{});
    };

    if constexpr (!kStateOnly) {
      // S^T as the bf16 A operand (the old state: the update below is issued after); fp16: its hi part.
#pragma unroll
      for (int i = 0; i < 2 * Cfg::kNT; ++i) xa[i] = pack2<bf16>(s[2 * i], s[2 * i + 1]);
      fence_regs(xa);
      fence_regs(o);
      fence_regs(s);
      warpgroup_arrive();
#pragma unroll
      for (int kb = 0; kb < Cfg::kChunk / 16; ++kb)  // o^T = V^T W^T (from 0 each chunk)
        wgmma_ss<typename A::Intra>(kblock_desc<GM::Major::MN, 64>(sV, 0, kb),
                                    kblock_desc<GM::Major::K, 64>(sW, 0, kb), o,
                                    kb == 0 ? GM::ScaleOut::Zero : GM::ScaleOut::One,
                                    std::make_index_sequence<32>{});
      inter(sPQ);
      if constexpr (kSplit) inter(sPQlo);  // S_hi phi(Q)_lo
      warpgroup_commit_batch();
      if constexpr (kSplit) {  // S_lo phi(Q)_hi: xa is reused once the hi products are done
        den_to_inv();
        warpgroup_wait<0>();
        fence_regs(xa);
        fence_regs(o);
#pragma unroll
        for (int i = 0; i < 2 * Cfg::kNT; ++i) {
          uint32_t hi;
          split_bf16x2(s[2 * i], s[2 * i + 1], hi, xa[i]);
        }
        fence_regs(xa);
        fence_regs(o);
        warpgroup_arrive();
        inter(sPQ);
        warpgroup_commit_batch();
      }
    } else {
      fence_regs(s);
      warpgroup_arrive();
    }
#pragma unroll
    for (int kb = 0; kb < Cfg::kChunk / 16; ++kb) {  // S^T += V^T phi(K)
      const uint64_t da = kblock_desc<GM::Major::MN, 64>(sV, 0, kb);
      wgmma_ss<typename A::Upd128>(da, kblock_desc<GM::Major::MN, 128>(sPK, 0, kb), s,
                                   GM::ScaleOut::One, std::make_index_sequence<64>{});
      wgmma_ss<typename A::Upd32>(da, kblock_desc<GM::Major::MN, 32>(sPK, 4, kb), s + 64,
                                  GM::ScaleOut::One, std::make_index_sequence<16>{});
    }
    warpgroup_commit_batch();
    if constexpr (!kSplit) den_to_inv();
    warpgroup_wait<0>();
    fence_regs(s);
    if constexpr (AK_MUTANT(prefill_state_bf16)) {
#pragma unroll
      for (int i = 0; i < 4 * Cfg::kNT; ++i) s[i] = __bfloat162float(__float2bfloat16_rn(s[i]));
    }
    if constexpr (!kStateOnly) {
      fence_regs(o);
      fence_regs(xa);
    }
    __syncthreads();  // 1/den ready; every read of this stage, of phi and of W is done

    if constexpr (!kStateOnly) {
      // Epilogue: this thread holds o^T for values 16w+g(+8) and tokens 8n+2t(+1), n = 0..7.
      // stmatrix.trans writes the 8x8 blocks as token rows of 8 values into the staging tile.
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t r[4];  // matrix i: tokens 8(2np + (i >> 1)) + 0..7, values 16w + 8(i & 1) + 0..7
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int n = 2 * np + (i >> 1), e0 = 2 * (i & 1);
          const float2 iv = *reinterpret_cast<const float2*>(&sm.inv[8 * n + 2 * t]);
          r[i] = pack2<T>(o[4 * n + e0] * iv.x, o[4 * n + e0 + 1] * iv.y);
        }
        stsm4_t(saddr(&sm.o[16 * np + 8 * (lj >> 1) + lr][16 * warp + 8 * (lj & 1)]), r);
      }
      __syncwarp();
      // This warp's 16 values of 64 token rows: piece lane + 32i is row piece / 2, half piece % 2. All
      // four loads are issued before the first store (one shared-memory round trip, not four).
      uint4 piece[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        piece[i] = *reinterpret_cast<const uint4*>(&sm.o[(lane >> 1) + 16 * i][16 * warp + 8 * (lane & 1)]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t tok = t0 + (lane >> 1) + 16 * i;
        if (tok < t_end) *reinterpret_cast<uint4*>(og + tok * p.o_sn + 16 * warp + 8 * (lane & 1)) = piece[i];
      }
    }
  }

  float* dst_S = nullptr;
  float* dst_z = nullptr;
  if constexpr (kStateOnly) {  // this segment's own contribution: S^T in fragment order, z
    float* dst = ws + (int64_t(bh) * (nseg - 1) + seg) * Cfg::kWsFloats;
#pragma unroll
    for (int n = 0; n < Cfg::kNT; ++n)
      reinterpret_cast<float4*>(dst)[(warp * Cfg::kNT + n) * 32 + lane] =
          make_float4(s[4 * n], s[4 * n + 1], s[4 * n + 2], s[4 * n + 3]);
    dst_z = dst + Cfg::kStateFloats;
  } else if (seg == nseg - 1 && p.S) {  // final state
    dst_S = p.S + int64_t(bh) * kCompactFeatures * kValueDim;
    dst_z = p.z + int64_t(bh) * kCompactFeatures;
  }
  if (dst_S) {
    for_each_s(warp, g, t, [&](int n, int e, int f, int v) {
      if (f < kCompactFeatures) dst_S[f * kValueDim + v] = s[4 * n + e];
    });
  }
  if (dst_z && warp == kZWarp) {
    for_each_g(g, t, [&](int nt, int e, int i, int j) {
      if (i < j) dst_z[quad_feature(i, j)] = p.scale * gm[nt][e];
      if (i == j) dst_z[17 + i] = p.scale * 0.70710678118654752f * gm[nt][e];
    });
    if (t == 0) {
      dst_z[1 + g] = sqrt_c * ksa[0];
      dst_z[9 + g] = sqrt_c * ksa[2];
    }
    if (lane == 0) dst_z[0] = cnt + float(t_end - t_begin);
    // The workspace copy keeps the zero padding too: the scan sums whole float4s.
    if (kStateOnly && lane < Cfg::kF - kCompactFeatures) dst_z[kCompactFeatures + lane] = 0.f;
  }
}

// In-place inclusive prefix sum over the nparts partial states of each (b, h).
__global__ void based_prefill_scan_kernel(float4* ws, int64_t bh_count, int nparts) {
  constexpr int kPer = Cfg::kWsFloats / 4;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= bh_count * kPer) return;
  float4* x = ws + (i / kPer) * nparts * kPer + (i % kPer);
  float4 acc = x[0];
  for (int s = 1; s < nparts; ++s) {
    const float4 y = x[int64_t(s) * kPer];
    acc = make_float4(acc.x + y.x, acc.y + y.y, acc.z + y.z, acc.w + y.w);
    x[int64_t(s) * kPer] = acc;
  }
}

// Segments per (b, h): enough CTAs to fill every SM twice, each segment at least 4 chunks.
struct Split {
  int nseg, seg_chunks;
};
Split choose_split(int B, int H, int N, int num_sms) {
  const int64_t bh = int64_t(B) * H;
  const int nchunks = (N + Cfg::kChunk - 1) / Cfg::kChunk;
  const int64_t target = int64_t(Cfg::kCtasPerSm) * (num_sms > 0 ? num_sms : 1);
  int nseg = bh >= target ? 1 : int(target / bh);
  nseg = nseg < nchunks / 4 ? nseg : nchunks / 4;
  if (nseg < 1) nseg = 1;
  const int seg_chunks = (nchunks + nseg - 1) / nseg;
  return {(nchunks + seg_chunks - 1) / seg_chunks, seg_chunks};  // no empty segment
}

template <typename T>
cudaError_t launch_typed(const BasedPrefillParams& p, Split sp, cudaStream_t stream) {
  constexpr int smem = kSmemBytes<T>;
  const int64_t bh = int64_t(p.B) * p.H;
  auto full = based_prefill_kernel<T, false>;
  cudaError_t err = cudaFuncSetAttribute(full, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  if (sp.nseg > 1) {
    auto part = based_prefill_kernel<T, true>;
    err = cudaFuncSetAttribute(part, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    part<<<dim3(unsigned(bh), sp.nseg - 1), Cfg::kThreads, smem, stream>>>(p, sp.nseg,
                                                                           sp.seg_chunks);
    if (sp.nseg > 2 && !AK_MUTANT(prefill_scan_skipped)) {
      const int64_t n = bh * (Cfg::kWsFloats / 4);
      based_prefill_scan_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(
          static_cast<float4*>(p.workspace), bh, sp.nseg - 1);
    }
  }
  full<<<dim3(unsigned(bh), sp.nseg), Cfg::kThreads, smem, stream>>>(p, sp.nseg, sp.seg_chunks);
  return cudaGetLastError();
}

}  // namespace

size_t based_prefill_workspace_bytes(int B, int H, int N, int num_sms) {
  const Split sp = choose_split(B, H, N, num_sms);
  return sp.nseg > 1 ? size_t(B) * H * (sp.nseg - 1) * Cfg::kWsFloats * sizeof(float) : 0;
}

cudaError_t based_prefill_launch(const BasedPrefillParams& p, cudaStream_t stream) {
  Split sp = choose_split(p.B, p.H, p.N, p.num_sms);
  if (p.workspace == nullptr) sp = {1, (p.N + Cfg::kChunk - 1) / Cfg::kChunk};  // unsplit fallback
  if (p.dtype == DType::kFloat16) return launch_typed<__half>(p, sp, stream);
  if (p.dtype == DType::kBFloat16) return launch_typed<bf16>(p, sp, stream);
  return cudaErrorInvalidValue;
}

}  // namespace attn_kernels
