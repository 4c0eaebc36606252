// based_prefill: causal Based linear attention over a whole sequence, chunked (spec.md).
//
// One CTA (4 warps) walks one (b, h, segment) in chunks of 64 tokens. Warp w owns value columns
// [16w, 16w+16): its slice of the running state S^T (16 x 160 float32, in mma accumulator
// registers) and of the output. Per chunk, all on m16n8k16 tensor-core mma:
//   intra  W = causal(1 + cA + (cA)^2/2), A = Q K^T; o = W V; den = rowsum(W)  (input dtype)
//          W is built once per chunk (10 16x16 blocks spread over the warps) in shared memory.
//   inter  o += phi(Q) S, den += phi(Q).z            (bf16 operands: S and z can exceed fp16;
//          fp16 inputs split both sides into bf16 hi + lo, 3 mma per product, ~16-bit operands)
//   state  S^T += V^T phi(K), z += 1^T phi(K)        (input dtype, float32 accumulation)
// phi(Q), phi(K) (153 compact features padded to 160) are built once per chunk in shared memory.
// The accumulator layout of S^T is exactly the B-fragment layout that phi(Q) S needs, so the
// state never leaves registers. z is split by 16-feature blocks kk over the warps (kk % 4 ==
// warp); its accumulator rows are all equal (A = ones), which again is the B fragment of phi(Q) z.
// Partial dens meet in shared memory; den_intra uses the float32 W, before rounding.
//
// Small B*H: the sequence is cut into segments. Pass 1 (kStateOnly) writes each segment's own
// state contribution to the workspace, a scan turns them into prefix sums, and pass 2 starts
// segment s from S0 + prefix[s-1]. The last segment writes the final state.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>
#include <utility>

#include "based_prefill.h"

namespace attn_kernels {
namespace {

struct Cfg {
  static constexpr int kChunk = 64;    // tokens per chunk
  static constexpr int kThreads = 128; // 4 warps
  static constexpr int kF = 160;       // 153 compact features padded to a multiple of 16
  static constexpr int kNT = kF / 8;   // state n-tiles per warp (8 features each)
  // Row pitches (elements) padded so that 8 consecutive rows hit distinct banks for ldmatrix.
  static constexpr int kQKPitch = 24;
  static constexpr int kVPitch = 72;
  static constexpr int kPhiPitch = 168;
  static constexpr int kWPitch = 72;
  // One segment's partial state in the workspace: S^T in fragment order, then z (160).
  static constexpr int kStateFloats = 4 * 32 * kNT * 4;
  static constexpr int kWsFloats = kStateFloats + kF;
  static constexpr int kCtasPerSm = 2;
};

template <typename T>
struct __align__(16) Smem {
  // fp16 inputs: phi(Q) as bf16 hi + lo (two tiles), so the output is staged in W's tile (dead by
  // then) to stay within two CTAs per SM.
  static constexpr bool kSplit = std::is_same_v<T, __half>;
  static constexpr int kO = kSplit ? 0 : 1;  // wo[kO] stages the output
  T q[2][Cfg::kChunk][Cfg::kQKPitch];  // double-buffered chunk inputs (cp.async)
  T k[2][Cfg::kChunk][Cfg::kQKPitch];
  T v[2][Cfg::kChunk][Cfg::kVPitch];
  __nv_bfloat16 phiq[kSplit ? 2 : 1][Cfg::kChunk][Cfg::kPhiPitch];  // [0] bf16 or hi, [1] lo
  T phik[Cfg::kChunk][Cfg::kPhiPitch];
  // [0] causal poly(Q K^T) of the chunk, [kO] output staging for 16-byte global stores
  T wo[kSplit ? 1 : 2][Cfg::kChunk][Cfg::kWPitch];
  // Partial dens per row: [0..3] phi(Q).z over warp w's feature blocks, [4 + kt] rowsum of W's
  // block (m, kt) (only kt <= m is ever written).
  float den[Cfg::kChunk][8];
};

// ---- 16-bit helpers -------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
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
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t u) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
}

// x = hi + lo to ~16 significant bits: hi = bf16(x), lo = bf16(x - hi), for a pair (a, b).
__device__ __forceinline__ void split_bf16x2(float a, float b, uint32_t& hi, uint32_t& lo) {
  hi = pack2<__nv_bfloat16>(a, b);
  lo = pack2<__nv_bfloat16>(a - __uint_as_float(hi << 16), b - __uint_as_float(hi & 0xffff0000u));
}

// c += a * b, m16n8k16, float32 accumulate.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d = a * b + c (the z and den products keep only some of d).
template <typename T>
__device__ __forceinline__ void mma_dc(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1, const float (&c)[4]) {
  d[0] = c[0], d[1] = c[1], d[2] = c[2], d[3] = c[3];
  mma<T>(d, a, b0, b1);
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ float rcp_approx(float x) {  // MUFU.RCP alone, ~1 ulp
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// 16-byte async copy; rows past the end are zero-filled (src-size 0 reads nothing).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ---- the running state's place in the registers -------------------------------------------------

// s[n][e] (S^T as mma accumulators) holds S[f][v]: fn(n, e, f, v) for each of this thread's elements.
template <typename Fn>
__device__ __forceinline__ void for_each_s(int warp, int g, int t, Fn&& fn) {
#pragma unroll
  for (int n = 0; n < Cfg::kNT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) fn(n, e, 8 * n + 2 * t + (e & 1), 16 * warp + g + 8 * (e >> 1));
}

// zc[j][hh][e] holds z[f] of the feature block kk = warp + 4j (< 10): fn(j, hh, e, f).
template <typename Fn>
__device__ __forceinline__ void for_each_z(int warp, int t, Fn&& fn) {
#pragma unroll
  for (int j = 0; j < 3; ++j)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
      for (int e = 0; e < 2; ++e) fn(j, hh, e, 16 * (warp + 4 * j) + 8 * hh + 2 * t + e);
}

// ---- feature map (compact order of common.h), resolved at compile time -----------------------

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

template <typename Out, int G>
__device__ __forceinline__ void store_feature_group(Out* row, const float (&x)[16], float one) {
  uint4 u;
  u.x = pack2<Out>(feature<8 * G + 0>(x, one), feature<8 * G + 1>(x, one));
  u.y = pack2<Out>(feature<8 * G + 2>(x, one), feature<8 * G + 3>(x, one));
  u.z = pack2<Out>(feature<8 * G + 4>(x, one), feature<8 * G + 5>(x, one));
  u.w = pack2<Out>(feature<8 * G + 6>(x, one), feature<8 * G + 7>(x, one));
  *reinterpret_cast<uint4*>(row + 8 * G) = u;
}

template <typename Out, int G0, int... G>
__device__ __forceinline__ void store_feature_groups(Out* row, const float (&x)[16], float one,
                                                     std::integer_sequence<int, G...>) {
  (store_feature_group<Out, G0 + G>(row, x, one), ...);
}

template <int G>
__device__ __forceinline__ void store_feature_group_split(__nv_bfloat16* hi, __nv_bfloat16* lo,
                                                          const float (&x)[16]) {
  uint4 h, l;
  split_bf16x2(feature<8 * G + 0>(x, 1.f), feature<8 * G + 1>(x, 1.f), h.x, l.x);
  split_bf16x2(feature<8 * G + 2>(x, 1.f), feature<8 * G + 3>(x, 1.f), h.y, l.y);
  split_bf16x2(feature<8 * G + 4>(x, 1.f), feature<8 * G + 5>(x, 1.f), h.z, l.z);
  split_bf16x2(feature<8 * G + 6>(x, 1.f), feature<8 * G + 7>(x, 1.f), h.w, l.w);
  *reinterpret_cast<uint4*>(hi + 8 * G) = h;
  *reinterpret_cast<uint4*>(lo + 8 * G) = l;
}

template <int... G>
__device__ __forceinline__ void store_feature_groups_split(__nv_bfloat16* hi, __nv_bfloat16* lo,
                                                           const float (&x)[16],
                                                           std::integer_sequence<int, G...>) {
  (store_feature_group_split<G>(hi, lo, x), ...);
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

// Writes feature groups [G0, G0+NG) (8 features each) of phi(x) for one token row.
// one = 0 zeroes the constant feature of a padding token (x itself is zero-filled).
template <typename Out, int G0, int NG, typename T>
__device__ __forceinline__ void build_phi_row(const T* src, Out* dst, float sqrt_c, float one) {
  float x[16];
  load_scaled_row(src, sqrt_c, x);
  store_feature_groups<Out, G0>(dst, x, one, std::make_integer_sequence<int, NG>{});
}

// All of phi(x) for one query row as bf16 hi + lo rows (features in float, then split).
template <typename T>
__device__ __forceinline__ void build_phi_row_split(const T* src, __nv_bfloat16* hi,
                                                    __nv_bfloat16* lo, float sqrt_c) {
  float x[16];
  load_scaled_row(src, sqrt_c, x);
  store_feature_groups_split(hi, lo, x, std::make_integer_sequence<int, Cfg::kF / 8>{});
}

// Packed variant for Out == T when sqrt(c) is a power of two (the default c = 1/4 among them):
// x' = sqrt(c) x is then exact in T, and a T2 multiply rounds x'_i x'_j once, like the float
// path above, so both give the same features. 53 of the 80 feature pairs are one T2 multiply
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
struct Packed<__nv_bfloat16> {
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
  typename P::T2 xp[8];  // (x'_2k, x'_2k+1)
  typename P::T2 xo[7];  // (x'_2k+1, x'_2k+2)
  typename P::T2 xb[16];  // (x'_i, x'_i)
  float x[16];           // x' in float, for the features that straddle pairs

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
  template <int G>
  __device__ __forceinline__ void store_group(T* row, float one) const {
    uint4 u;
    u.x = word<4 * G + 0>(one);
    u.y = word<4 * G + 1>(one);
    u.z = word<4 * G + 2>(one);
    u.w = word<4 * G + 3>(one);
    *reinterpret_cast<uint4*>(row + 8 * G) = u;
  }
  template <int G0, int... G>
  __device__ __forceinline__ void store_groups(T* row, float one,
                                               std::integer_sequence<int, G...>) const {
    (store_group<G0 + G>(row, one), ...);
  }
};

template <int G0, int NG, typename T>
__device__ __forceinline__ void build_phi_row_packed(const T* src, T* dst, float sqrt_c,
                                                     float one) {
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
  pr.template store_groups<G0>(dst, one, std::make_integer_sequence<int, NG>{});
}

// ---- the kernel -------------------------------------------------------------------------------

template <typename T, bool kStateOnly>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kCtasPerSm)
    based_prefill_kernel(const BasedPrefillParams p, const int nseg, const int seg_chunks) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem<T>& sm = *reinterpret_cast<Smem<T>*>(smem_raw);
  using bf16 = __nv_bfloat16;
  constexpr bool kSplit = Smem<T>::kSplit;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;    // mma fragment coordinates
  const int lj = lane >> 3, lr = lane & 7;  // ldmatrix: which 8x8 matrix, which row of it
  const int bh = blockIdx.x, seg = blockIdx.y;
  const int b = bh / p.H, h = bh % p.H;

  const int64_t t_begin = int64_t(seg) * seg_chunks * Cfg::kChunk;
  const int64_t t_end = min(int64_t(p.N), t_begin + int64_t(seg_chunks) * Cfg::kChunk);
  const int nchunks = int((t_end - t_begin + Cfg::kChunk - 1) / Cfg::kChunk);

  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  T* og = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
  float* ws = static_cast<float*>(p.workspace);
  const float sqrt_c = sqrtf(p.scale), c1 = p.scale, c2 = 0.5f * p.scale * p.scale;
  const bool den_on = !kStateOnly && p.normalize;
  const bool packed_ok = (__float_as_uint(sqrt_c) & 0x7fffffu) == 0;  // sqrt(c) = 2^k

  // Running state, laid out as for_each_s / for_each_z say.
  float s[Cfg::kNT][4];
  float zc[3][2][2];
  {
    const float* S0 = (!kStateOnly && p.S0) ? p.S0 + int64_t(bh) * kCompactFeatures * kValueDim
                                             : nullptr;
    const float* z0 = (!kStateOnly && p.z0) ? p.z0 + int64_t(bh) * kCompactFeatures : nullptr;
    const float* prev = (!kStateOnly && seg > 0)  // inclusive prefix of the earlier segments
                            ? ws + (int64_t(bh) * (nseg - 1) + seg - 1) * Cfg::kWsFloats
                            : nullptr;
    // the workspace holds S^T in fragment order: float4 (warp * kNT + n) * 32 + lane is s[n][0..3]
    const float4* prev_s =
        prev ? reinterpret_cast<const float4*>(prev) + warp * Cfg::kNT * 32 + lane : nullptr;
    for_each_s(warp, g, t, [&](int n, int e, int f, int v) {
      const float4 x = prev_s ? prev_s[n * 32] : make_float4(0.f, 0.f, 0.f, 0.f);  // one load per n
      const float carried = e == 0 ? x.x : e == 1 ? x.y : e == 2 ? x.z : x.w;
      s[n][e] = ((S0 && f < kCompactFeatures) ? S0[f * kValueDim + v] : 0.f) + carried;
    });
    for_each_z(warp, t, [&](int j, int hh, int e, int f) {
      const bool ok = f < kCompactFeatures;
      zc[j][hh][e] = ((z0 && ok) ? z0[f] : 0.f) + ((prev && ok) ? prev[Cfg::kStateFloats + f] : 0.f);
    });
  }

  // Chunk loads into stage c & 1, zero-filled past t_end. Each thread copies the same rows of
  // every chunk: 16 bytes of q and k (row tid/2) and of v (rows tid/8 + 16i); its source
  // pointers advance by one chunk per call, so calls must come in chunk order.
  const int qk_row = tid >> 1, qk_col = 8 * (tid & 1), v_row = tid >> 3, v_col = 8 * (tid & 7);
  const T* qsrc = qg + (t_begin + qk_row) * p.q_sn + qk_col;
  const T* ksrc = kg + (t_begin + qk_row) * p.k_sn + qk_col;
  const T* vsrc = vg + (t_begin + v_row) * p.v_sn + v_col;
  auto issue_loads = [&](int c) {
    const int st = c & 1;
    const int64_t left = t_end - (t_begin + int64_t(c) * Cfg::kChunk);  // valid rows
    const bool ok = qk_row < left;
    if (!kStateOnly) cp_async16(&sm.q[st][qk_row][qk_col], ok ? qsrc : qg, ok);
    cp_async16(&sm.k[st][qk_row][qk_col], ok ? ksrc : kg, ok);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool okv = v_row + 16 * i < left;
      cp_async16(&sm.v[st][v_row + 16 * i][v_col], okv ? vsrc + 16 * i * p.v_sn : vg, okv);
    }
    cp_async_commit();
    qsrc += Cfg::kChunk * p.q_sn;
    ksrc += Cfg::kChunk * p.k_sn;
    vsrc += Cfg::kChunk * p.v_sn;
  };

  issue_loads(0);
  for (int c = 0; c < nchunks; ++c) {
    const int st = c & 1;
    const int64_t t0 = t_begin + int64_t(c) * Cfg::kChunk;
    if (c + 1 < nchunks) {  // stage (c+1)&1 was last read before the previous iteration's end barrier
      issue_loads(c + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // Phase 1: feature maps and W of the chunk.
    if constexpr (kStateOnly) {
      const int r = tid & 63;
      const float one = t0 + r < t_end ? 1.f : 0.f;
      if (packed_ok) {
        if (tid < 64)
          build_phi_row_packed<0, 10>(sm.k[st][r], sm.phik[r], sqrt_c, one);
        else
          build_phi_row_packed<10, 10>(sm.k[st][r], sm.phik[r], sqrt_c, one);
      } else {
        if (tid < 64)
          build_phi_row<T, 0, 10>(sm.k[st][r], sm.phik[r], sqrt_c, one);
        else
          build_phi_row<T, 10, 10>(sm.k[st][r], sm.phik[r], sqrt_c, one);
      }
    } else {
      // phi(Q) meets the bf16 state: bf16, or bf16 hi + lo for fp16 inputs. That split build is
      // the heavier one, so fp16 gives it to warps 2-3 (one W block fewer each below).
      if ((warp < 2) != kSplit) {
        const int r = kSplit ? tid - 64 : tid;
        if constexpr (kSplit)
          build_phi_row_split(sm.q[st][r], sm.phiq[0][r], sm.phiq[1][r], sqrt_c);
        else if (packed_ok)
          build_phi_row_packed<0, 20>(sm.q[st][r], sm.phiq[0][r], sqrt_c, 1.f);
        else
          build_phi_row<bf16, 0, 20>(sm.q[st][r], sm.phiq[0][r], sqrt_c, 1.f);
      } else {
        const int r = kSplit ? tid : tid - 64;
        const float one = t0 + r < t_end ? 1.f : 0.f;
        if (packed_ok)
          build_phi_row_packed<0, 20>(sm.k[st][r], sm.phik[r], sqrt_c, one);
        else
          build_phi_row<T, 0, 20>(sm.k[st][r], sm.phik[r], sqrt_c, one);
      }
      // W block i = (m, kt), kt <= m, blocks numbered row by row; warp w takes i = w, w+4, w+8.
      for (int i = warp; i < 10; i += 4) {
        const int m = i >= 6 ? 3 : i >= 3 ? 2 : i >= 1 ? 1 : 0, kt = i - m * (m + 1) / 2;
        uint32_t qa[4], kb[4];  // kb: keys 16kt..+7 {kb0, kb1}, keys 16kt+8..+15 {kb2, kb3}
        ldsm_x4(qa, &sm.q[st][16 * m + lr + 8 * (lj & 1)][8 * (lj >> 1)]);
        ldsm_x4(kb, &sm.k[st][16 * kt + lr + 8 * (lj >> 1)][8 * (lj & 1)]);
        float ca[4] = {0.f, 0.f, 0.f, 0.f}, cb[4] = {0.f, 0.f, 0.f, 0.f};
        mma<T>(ca, qa, kb[0], kb[1]);
        mma<T>(cb, qa, kb[2], kb[3]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          ca[e] = fmaf(ca[e], fmaf(ca[e], c2, c1), 1.f);
          cb[e] = fmaf(cb[e], fmaf(cb[e], c2, c1), 1.f);
          if (m == kt) {  // diagonal block: key 2t+(e&1) (+8 for cb) vs query g + 8(e>>1)
            const int qrow = g + 8 * (e >> 1), key = 2 * t + (e & 1);
            if (key > qrow) ca[e] = 0.f;
            if (key + 8 > qrow) cb[e] = 0.f;
          }
        }
        const int r0 = 16 * m + g, k0 = 16 * kt + 2 * t;
        *reinterpret_cast<uint32_t*>(&sm.wo[0][r0][k0]) = pack2<T>(ca[0], ca[1]);
        *reinterpret_cast<uint32_t*>(&sm.wo[0][r0 + 8][k0]) = pack2<T>(ca[2], ca[3]);
        *reinterpret_cast<uint32_t*>(&sm.wo[0][r0][k0 + 8]) = pack2<T>(cb[0], cb[1]);
        *reinterpret_cast<uint32_t*>(&sm.wo[0][r0 + 8][k0 + 8]) = pack2<T>(cb[2], cb[3]);
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
    __syncthreads();

    // Phase 2: tensor-core products.
    // V as the B operand of W V (k = token, n = value column): vb[kt] = {B(n0)[0], B(n0)[1],
    // B(n1)[0], B(n1)[1]} for tokens 16kt..16kt+15. The same matrices in the A order of V^T phi(K)
    // come from a second ldmatrix (a register permutation would cost moves at every mma).
    float o[4][2][4];
    if constexpr (!kStateOnly) {
      // Intra-chunk: o = W V over key blocks kt <= query block m.
      uint32_t vb[4][4];
#pragma unroll
      for (int kt = 0; kt < 4; ++kt)
        ldsm_x4_t(vb[kt], &sm.v[st][16 * kt + lr + 8 * (lj & 1)][16 * warp + 8 * (lj >> 1)]);
#pragma unroll
      for (int m = 0; m < 4; ++m) {
#pragma unroll
        for (int nv = 0; nv < 2; ++nv)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[m][nv][e] = 0.f;
#pragma unroll
        for (int kt = 0; kt <= m; ++kt) {
          uint32_t wa[4];
          ldsm_x4(wa, &sm.wo[0][16 * m + lr + 8 * (lj & 1)][16 * kt + 8 * (lj >> 1)]);
          mma<T>(o[m][0], wa, vb[kt][0], vb[kt][1]);
          mma<T>(o[m][1], wa, vb[kt][2], vb[kt][3]);
        }
      }

      // Inter-chunk: o += phi(Q) S, S rounded to bf16 straight from the accumulators. fp16
      // inputs add hi.S_lo + lo.S_hi (lo.lo is below float32 rounding): a bf16 rounding of
      // either side alone is coarser than the fp16 reference.
#pragma unroll
      for (int kk = 0; kk < Cfg::kF / 16; ++kk) {
        uint32_t bh[4], bl[4];  // {b00, b01, b10, b11}: B fragments of n-tiles 2kk, 2kk+1
        const int nt[4] = {2 * kk, 2 * kk + 1, 2 * kk, 2 * kk + 1}, e0[4] = {0, 0, 2, 2};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if constexpr (kSplit)
            split_bf16x2(s[nt[i]][e0[i]], s[nt[i]][e0[i] + 1], bh[i], bl[i]);
          else
            bh[i] = pack2<bf16>(s[nt[i]][e0[i]], s[nt[i]][e0[i] + 1]);
        }
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          uint32_t a[4];
          ldsm_x4(a, &sm.phiq[0][16 * m + lr + 8 * (lj & 1)][16 * kk + 8 * (lj >> 1)]);
          mma<bf16>(o[m][0], a, bh[0], bh[1]);
          mma<bf16>(o[m][1], a, bh[2], bh[3]);
          if constexpr (kSplit) {
            mma<bf16>(o[m][0], a, bl[0], bl[1]);
            mma<bf16>(o[m][1], a, bl[2], bl[3]);
            ldsm_x4(a, &sm.phiq[1][16 * m + lr + 8 * (lj & 1)][16 * kk + 8 * (lj >> 1)]);
            mma<bf16>(o[m][0], a, bh[0], bh[1]);
            mma<bf16>(o[m][1], a, bh[2], bh[3]);
          }
        }
      }

      // den_inter over this warp's z blocks kk = warp + 4j: every column of phi(Q) z is the
      // same, keep column 2t of rows 16m+g, 16m+g+8.
      if (den_on) {
        float dz[4][2] = {{0.f, 0.f}, {0.f, 0.f}, {0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
        for (int j = 0; j < 3; ++j) {
          const int kk = warp + 4 * j;
          if (kk < Cfg::kF / 16) {
            uint32_t bz[2], bzl[2];  // z split like S above
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
              if constexpr (kSplit)
                split_bf16x2(zc[j][hh][0], zc[j][hh][1], bz[hh], bzl[hh]);
              else
                bz[hh] = pack2<bf16>(zc[j][hh][0], zc[j][hh][1]);
            }
#pragma unroll
            for (int m = 0; m < 4; ++m) {
              uint32_t a[4];
              ldsm_x4(a, &sm.phiq[0][16 * m + lr + 8 * (lj & 1)][16 * kk + 8 * (lj >> 1)]);
              float d[4];
              mma_dc<bf16>(d, a, bz[0], bz[1], {dz[m][0], 0.f, dz[m][1], 0.f});
              if constexpr (kSplit) {
                mma<bf16>(d, a, bzl[0], bzl[1]);
                ldsm_x4(a, &sm.phiq[1][16 * m + lr + 8 * (lj & 1)][16 * kk + 8 * (lj >> 1)]);
                mma<bf16>(d, a, bz[0], bz[1]);
              }
              dz[m][0] = d[0];
              dz[m][1] = d[2];
            }
          }
        }
        if (t == 0) {
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            sm.den[16 * m + g][warp] = dz[m][0];
            sm.den[16 * m + g + 8][warp] = dz[m][1];
          }
        }
      }
    }

    // State: S^T += V^T phi(K) (after the inter product used the old state).
#pragma unroll 1  // a rolled token loop keeps ptxas from hoisting 40 ldmatrix (spills)
    for (int kt = 0; kt < 4; ++kt) {
      uint32_t va[4];  // A operand of V^T: value rows g / g+8, tokens 2t / 2t+8
      ldsm_x4_t(va, &sm.v[st][16 * kt + lr + 8 * (lj >> 1)][16 * warp + 8 * (lj & 1)]);
#pragma unroll
      for (int np = 0; np < Cfg::kF / 16; ++np) {
        uint32_t bb[4];
        ldsm_x4_t(bb, &sm.phik[16 * kt + lr + 8 * (lj & 1)][16 * np + 8 * (lj >> 1)]);
        mma<T>(s[2 * np], va, bb[0], bb[1]);
        mma<T>(s[2 * np + 1], va, bb[2], bb[3]);
      }
    }
    // z += 1^T phi(K) over this warp's blocks: the rows of the ones product are all equal,
    // keep row g.
    {
      const uint32_t one2 = pack2<T>(1.f, 1.f);
      const uint32_t ones[4] = {one2, one2, one2, one2};
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        const int kk = warp + 4 * j;
        if (kk < Cfg::kF / 16) {
#pragma unroll
          for (int kt = 0; kt < 4; ++kt) {
            uint32_t bb[4];
            ldsm_x4_t(bb, &sm.phik[16 * kt + lr + 8 * (lj & 1)][16 * kk + 8 * (lj >> 1)]);
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
              float d[4];
              mma_dc<T>(d, ones, bb[2 * hh], bb[2 * hh + 1], {zc[j][hh][0], zc[j][hh][1], 0.f, 0.f});
              zc[j][hh][0] = d[0];
              zc[j][hh][1] = d[1];
            }
          }
        }
      }
    }
    __syncthreads();  // dens ready; every read of this stage, of phi and of W is done

    if constexpr (!kStateOnly) {
      // Epilogue: normalise, stage this warp's 64 x 16 slice, store 32-byte row pieces.
      auto& so = sm.wo[Smem<T>::kO];
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int row = 16 * m + g + 8 * hr;
          float inv = 1.f;
          if (den_on) {
            const float4 di = *reinterpret_cast<const float4*>(&sm.den[row][0]);
            const float4 dw = *reinterpret_cast<const float4*>(&sm.den[row][4]);
            float den = (di.x + di.y) + (di.z + di.w) + dw.x;  // slots 4 + kt, kt <= m only
            if (m >= 1) den += dw.y;
            if (m >= 2) den += dw.z;
            if (m >= 3) den += dw.w;
            inv = rcp_approx(den + p.eps);  // den >= 1/2
          }
#pragma unroll
          for (int nv = 0; nv < 2; ++nv)
            *reinterpret_cast<uint32_t*>(&so[row][16 * warp + 8 * nv + 2 * t]) =
                pack2<T>(o[m][nv][2 * hr] * inv, o[m][nv][2 * hr + 1] * inv);
        }
      __syncwarp();
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int piece = lane + 32 * i, row = piece >> 1, half = piece & 1;
        const int64_t tok = t0 + row;
        if (tok < t_end)
          *reinterpret_cast<uint4*>(og + tok * p.o_sn + 16 * warp + 8 * half) =
              *reinterpret_cast<const uint4*>(&so[row][16 * warp + 8 * half]);
      }
    }
  }

  // z: lanes g == 0 hold this warp's blocks (all rows are equal).
  float* dst_S = nullptr;
  float* dst_z = nullptr;
  if constexpr (kStateOnly) {  // this segment's own contribution: S^T in fragment order, z
    float* dst = ws + (int64_t(bh) * (nseg - 1) + seg) * Cfg::kWsFloats;
#pragma unroll
    for (int n = 0; n < Cfg::kNT; ++n)
      reinterpret_cast<float4*>(dst)[(warp * Cfg::kNT + n) * 32 + lane] =
          make_float4(s[n][0], s[n][1], s[n][2], s[n][3]);
    dst_z = dst + Cfg::kStateFloats;
  } else if (seg == nseg - 1 && p.S) {  // final state
    dst_S = p.S + int64_t(bh) * kCompactFeatures * kValueDim;
    dst_z = p.z + int64_t(bh) * kCompactFeatures;
  }
  if (dst_S) {
    for_each_s(warp, g, t, [&](int n, int e, int f, int v) {
      if (f < kCompactFeatures) dst_S[f * kValueDim + v] = s[n][e];
    });
  }
  if (dst_z && g == 0) {
    for_each_z(warp, t, [&](int j, int hh, int e, int f) {
      // The workspace copy keeps the zero padding too: the scan sums whole float4s.
      if (f < (kStateOnly ? Cfg::kF : kCompactFeatures)) dst_z[f] = zc[j][hh][e];
    });
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
  const int smem = int(sizeof(Smem<T>));
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
    if (sp.nseg > 2) {
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
  if (p.dtype == DType::kBFloat16) return launch_typed<__nv_bfloat16>(p, sp, stream);
  return cudaErrorInvalidValue;
}

}  // namespace attn_kernels
