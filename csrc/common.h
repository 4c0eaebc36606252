// Shared by every kernel and the binding: no torch headers here, so .cu files build fast.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "common/mutants.h"

namespace attn_kernels {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Based feature map sizes: d = 16 (query/key), e = 64 (value). The compact feature vector is
//   [1, sqrt(c)*x_i (16), c*x_i^2/sqrt(2) (16), c*x_i*x_j for i<j (120, row-major over i then j)]
// so F = 1 + 16 + 16 + 120 = 153. Every state (S: F x e, z: F) in the package uses this order.
constexpr int kFeatDim = 16;
constexpr int kValueDim = 64;
constexpr int kCompactFeatures = 153;

}  // namespace attn_kernels
