// based_prefill_backward, part of based_prefill_backward.cu (included there only): the per-token work on the
// CUDA cores that the feature map's Jacobian needs (it differs per token, so it is no matrix product). Four
// threads per token (threads 4r..4r+3 of warps 0-7: token r); each feature's formula resolved at compile time.
#pragma once
#include "tiles.cuh"

namespace attn_kernels {
namespace {

// fn(integral_constant<int, part>) for the runtime part 0..3 (the thread's quarter of a token's work).
template <class Fn>
__device__ __forceinline__ void with_part(int part, Fn&& fn) {
  switch (part) {
    case 0: fn(std::integral_constant<int, 0>{}); break;
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    default: fn(std::integral_constant<int, 3>{}); break;
  }
}

// Quarter P of phi(a).z and phi(a).g (features 40P..40P+39; a = x extended by 1), g and z float rows in shared
// memory (16-byte aligned). The caller adds the four quarters.
template <int P>
__device__ __forceinline__ void phi_dots(const float (&x)[16], const float* g, const float* z, float& dz,
                                         float& dg) {
  static_for<10>([&](auto u) {
    constexpr int F0 = 40 * P + 4 * decltype(u)::value;
    if constexpr (F0 < kCompactFeatures) {
      const float4 g4 = *reinterpret_cast<const float4*>(g + F0);
      const float4 z4 = *reinterpret_cast<const float4*>(z + F0);
      const float gv[4] = {g4.x, g4.y, g4.z, g4.w}, zv[4] = {z4.x, z4.y, z4.z, z4.w};
      static_for<4>([&](auto e) {
        constexpr int F = F0 + decltype(e)::value;
        if constexpr (F < kCompactFeatures) {
          const float ph = feature<F>(x, 1.f);
          dz = fmaf(ph, zv[decltype(e)::value], dz);
          dg = fmaf(ph, gv[decltype(e)::value], dg);
        }
      });
    }
  });
}

// Quarter P of the gradient w.r.t. a = sqrt(c) x of phi(a).gphi (gphi(f): a compact feature's gradient; a_16 = 1):
// out[i] for component 4P + i, sum over the 17 features that contain it.
template <int P, class G>
__device__ __forceinline__ void phi_vjp4(const float (&x)[16], G&& gphi, float (&out)[4]) {
  constexpr float kSq = AK_MUTANT(bwd_square_vjp) ? 0.70710678118654752f  // d(a^2 / sqrt2) / da
                                                  : 1.41421356237309515f;
  static_for<4>([&](auto mi) {
    constexpr int M = 4 * P + decltype(mi)::value;
    float acc = gphi(kLinearFeature0 + M) + gphi(kSquareFeature0 + M) * (kSq * x[M]);
    static_for<kFeatDim>([&](auto ji) {
      constexpr int J = decltype(ji)::value;
      if constexpr (J != M) acc = fmaf(gphi(quad_feature(J < M ? J : M, J < M ? M : J)), x[J], acc);
    });
    out[decltype(mi)::value] = acc;
  });
}

// The four parts' sum, the same in each of the four lanes (xor pairs, then xor quads: a fixed order).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// c (the sum of the causal blocks' partials, blocks[b][row][4P..4P+3] for the blocks b of this token's row or
// column, in order) + jac, as 4 values of T at dst.
template <typename T>
__device__ __forceinline__ void store_grad4(T* dst, float c, const float4& intra, float sc, const float (&jac)[4]) {
  const uint2 u = make_uint2(pack2<T>(fmaf(c, intra.x, sc * jac[0]), fmaf(c, intra.y, sc * jac[1])),
                             pack2<T>(fmaf(c, intra.z, sc * jac[2]), fmaf(c, intra.w, sc * jac[3])));
  *reinterpret_cast<uint2*>(dst) = u;
}

}  // namespace
}  // namespace attn_kernels
