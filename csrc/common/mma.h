// The mma.sync m16n8k16 atom (fp16 / bf16 operands, float32 accumulators) and its register fragments,
// for kernels that hold tiles in registers (based_prefill, sliding_window_prefill). Per warp, lane = 4g + t:
//   A (16 x 16, row-major):  a[j] = A[g + 8 (j & 1)][2t + 8 (j >> 1) + {0, 1}]
//   B (16 x 8, k x n):       b[j] = B[2t + 8j + {0, 1}][g]
//   C (16 x 8, float32):     c[e] = C[g + 8 (e >> 1)][2t + (e & 1)]
// so the C fragments of two neighbouring n-tiles, packed in pairs, are the A fragment of the next
// product (FlashAttention's P = softmax(S) feeding P V).
#pragma once
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cute/arch/mma_sm80.hpp>

namespace attn_kernels {

// c += a * b, products in T (exact in float32), float32 accumulate: CuTe's SM80 atoms.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using Op = std::conditional_t<std::is_same_v<T, __half>, cute::SM80_16x8x16_F32F16F16F32_TN,
                                cute::SM80_16x8x16_F32BF16BF16F32_TN>;
  Op::fma(c[0], c[1], c[2], c[3], a[0], a[1], a[2], a[3], b0, b1, c[0], c[1], c[2], c[3]);
}

}  // namespace attn_kernels
