// The order of the 153 compact Based features: one definition for every kernel and every state
// (S: F x e, z: F) in the package. attn_kernels/reference.py builds the same order with
// torch.triu_indices(16, 16, 1); tests/test_feature_order.py compiles this header on the host and
// checks that they agree. With c the scale:
//   feature 0        1
//   feature 1 + i    sqrt(c) x_i              i = 0..15
//   feature 17 + i   c x_i^2 / sqrt(2)        i = 0..15
//   feature 33 + m   c x_i x_j, i < j         pair m of the row-major enumeration (0,1), (0,2), ..., (0,15),
//                                             (1,2), ..., (14,15): m = 0..119
// Plain C++ (no CUDA headers needed), so that a host program can include it.
#pragma once
#include "limits.h"

// Force-inlined in device code: the kernels compile as if the loop were written in place.
#if defined(__CUDACC__)
#define AK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AK_HOST_DEVICE inline
#endif

namespace attn_kernels {

constexpr int kLinearFeature0 = 1;                     // sqrt(c) x_i
constexpr int kSquareFeature0 = 1 + kFeatDim;          // c x_i^2 / sqrt(2)
constexpr int kPairFeature0 = 1 + 2 * kFeatDim;        // c x_i x_j, i < j
constexpr int kPairs = kFeatDim * (kFeatDim - 1) / 2;  // 120
static_assert(kPairFeature0 + kPairs == kCompactFeatures, "the four blocks fill the compact vector");

struct FeaturePair {
  int i, j;
};

// The (i, j) of compact feature f, kPairFeature0 <= f < kCompactFeatures: pair f - kPairFeature0 of
// the row-major i < j enumeration. based_decode runs this loop per thread; based_prefill resolves it
// at compile time.
AK_HOST_DEVICE constexpr FeaturePair feature_pair(int f) {
  int i = 0, r = f - kPairFeature0;
  while (r >= kFeatDim - 1 - i) r -= kFeatDim - 1 - i, ++i;
  return {i, i + 1 + r};
}

// The inverse: the compact index of x_i x_j, i < j.
AK_HOST_DEVICE constexpr int quad_feature(int i, int j) {
  return kPairFeature0 + (kFeatDim - 1) * i - i * (i - 1) / 2 + (j - i - 1);
}

namespace detail {
constexpr bool pair_order_round_trips() {
  for (int f = kPairFeature0; f < kCompactFeatures; ++f) {
    const FeaturePair p = feature_pair(f);
    if (!(0 <= p.i && p.i < p.j && p.j < kFeatDim) || quad_feature(p.i, p.j) != f) return false;
  }
  return true;
}
}  // namespace detail
static_assert(detail::pair_order_round_trips(), "feature_pair and quad_feature are inverses");

}  // namespace attn_kernels
