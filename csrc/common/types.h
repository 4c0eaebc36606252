// Shared by every kernel and the binding: no torch headers here, so .cu files build fast.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "limits.h"
#include "mutants.h"

namespace attn_kernels {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// q, k, v and o of every op.
constexpr bool is_io_dtype(DType d) { return d == DType::kFloat16 || d == DType::kBFloat16; }
// based_decode's state, updated in place.
constexpr bool is_state_dtype(DType d) { return d == DType::kFloat32 || d == DType::kBFloat16; }

}  // namespace attn_kernels
