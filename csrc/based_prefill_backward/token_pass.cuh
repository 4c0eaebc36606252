// based_prefill_backward, part of based_prefill_backward.cu (included there only): the per-token work on the
// CUDA cores that the feature map's Jacobian needs (it differs per token, so it is no matrix product). Four
// threads per token, each a compile-time quarter of the features or of the 16 components (tiles.cuh's
// token_part / token_row); a gradient w.r.t. phi is read from a feature-major float tile (gt[f][token]).
#pragma once
#include "tiles.cuh"

namespace attn_kernels {
namespace {

// fn(integral_constant<int, part>) for the (warp-uniform) part 0..3.
template <class Fn>
__device__ __forceinline__ void with_part(int part, Fn&& fn) {
  switch (part) {
    case 0: fn(std::integral_constant<int, 0>{}); break;
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    default: fn(std::integral_constant<int, 3>{}); break;
  }
}

// Quarter P of phi(a).z and phi(a).g (features 40P..40P+39; a = x extended by 1); g(f), z(f) the rows' values.
template <int P, class G, class Z>
__device__ __forceinline__ void phi_dots(const float (&x)[16], G&& g, Z&& z, float& dz, float& dg) {
  static_for<40>([&](auto u) {
    constexpr int F = 40 * P + decltype(u)::value;
    if constexpr (F < kCompactFeatures) {
      const float ph = feature<F>(x, 1.f);
      dz = fmaf(ph, z(F), dz);
      dg = fmaf(ph, g(F), dg);
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

// The sum over the 4 lanes of a quad (lanes 4g..4g+3), the same in each (xor pairs, then xor quads).
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
