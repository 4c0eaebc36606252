// based_prefill, part of based_prefill.cu (included there only): the feature map. phi(x) of one token
// row, in feature_order.h's order, written as 16-bit rows into a phi tile (config.cuh's phi_off); each
// feature's formula is resolved at compile time.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>
#include <utility>

#include "../common/convert.h"
#include "../common/feature_order.h"
#include "../common/mutants.h"
#include "../common/ptx.h"
#include "config.cuh"
#include "fragments.cuh"

namespace attn_kernels {
namespace {

// x is already multiplied by sqrt(c): c*x_i*x_j = x'_i x'_j, c*x_i^2/sqrt(2) = x'_i^2/sqrt(2).
template <int F>
__device__ __forceinline__ float feature(const float (&x)[16], float one) {
  if constexpr (F == 0) {
    return one;
  } else if constexpr (F < kSquareFeature0) {
    return x[F - kLinearFeature0];
  } else if constexpr (F < kPairFeature0) {
    return x[F - kSquareFeature0] * x[F - kSquareFeature0] * 0.70710678118654752f;
  } else if constexpr (F < kCompactFeatures) {
    constexpr FeaturePair ij = feature_pair(F);
    return x[ij.i] * x[ij.j];
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

// Packed path for Out == T when sqrt(c) is a power of two <= 1 (the default c = 1/4 among them):
// x' = sqrt(c) x is then exact in T, and a T2 multiply rounds x'_i x'_j once, like the float
// path, so both give the same features. 53 of the 80 feature pairs are one T2 multiply
// (x'_i, x'_i) * (x'_j, x'_j+1); the others go through float.
// Not exact in fp16 once x' falls below fp16's normal range (bf16 has float's): a row with such an
// entry takes the float path, or x' would be rounded before its features are (PackedGate).
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

// Which rows may take the packed path; built once per kernel from sqrt(c) (packed_gate).
struct PackedGate {
  bool ok;       // sqrt(c) = 2^k, k <= 0
  uint32_t lim;  // fp16 x2: 2^-14 / sqrt(c), the smallest |x| whose x' is still a normal fp16

  // The row's 16 inputs (8 words of T2); for fp16, no nonzero |x| below lim.
  template <typename T>
  __device__ __forceinline__ bool takes(const uint32_t (&w)[8]) const {
    if (!ok) return false;
    if constexpr (std::is_same_v<T, __half>) {
      if (AK_MUTANT(prefill_fp16_tiny_packed)) return true;
      const __half2 lim2 = *reinterpret_cast<const __half2*>(&lim), zero2 = __float2half2_rn(0.f);
      uint32_t below = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const __half2 a = __habs2(*reinterpret_cast<const __half2*>(&w[i]));
        below |= __hlt2_mask(a, lim2) & __hne2_mask(a, zero2);
      }
      return below == 0;
    }
    return true;
  }
};

__device__ __forceinline__ PackedGate packed_gate(float sqrt_c) {
  const float lim = 6.103515625e-05f / sqrt_c;
  return {(__float_as_uint(sqrt_c) & 0x7fffffu) == 0 && sqrt_c <= 1.f, pack2<__half>(lim, lim)};
}

__host__ __device__ constexpr int feature_kind(int f) {  // 0 one, 1 linear, 2 square, 3 pair, 4 pad
  return f == 0 ? 0 : f < kSquareFeature0 ? 1 : f < kPairFeature0 ? 2 : f < kCompactFeatures ? 3 : 4;
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
    if constexpr (k0 == 3 && k1 == 3 && feature_pair(f0).i == feature_pair(f1).i) {
      constexpr FeaturePair ij = feature_pair(f0);
      return as_u32(P::mul(xb[ij.i], pair_at<ij.j>()));
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
                                              const PackedGate& gate) {
  const uint4 a = *reinterpret_cast<const uint4*>(src);
  const uint4 b = *reinterpret_cast<const uint4*>(src + 8);
  const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  if (gate.takes<T>(w)) {
    using P = Packed<T>;
    PackedRow<T> pr;
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

}  // namespace
}  // namespace attn_kernels
