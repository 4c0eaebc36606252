// Plain launcher for based_decode (semantics: spec.md). Caller (the binding) guarantees:
// pointers 16-byte aligned, last-dim stride 1, other strides multiples of 8 elements,
// the state contiguous, state_indices (if given) a device array of B int32. The launcher refuses
// (cudaErrorInvalidValue, nothing launched) a dtype other than kFloat16 / kBFloat16, a state_dtype
// other than kFloat32 / kBFloat16, B, H < 0, or P < 0 with state_indices.
#pragma once
#include "../common/types.h"

namespace attn_kernels {

struct BasedDecodeParams {
  const void* q;  // (B, H, 16)
  const void* k;  // (B, H, 16)
  const void* v;  // (B, H, 64)
  int64_t q_sb, q_sh, k_sb, k_sh, v_sb, v_sh;
  void* S;  // (B, H, 153, 64) contiguous, state_dtype, updated in place; (P, H, 153, 64) with indices
  void* z;  // (B, H, 153) contiguous, state_dtype, updated in place; (P, H, 153) with indices
  void* o;  // (B, H, 64), same dtype as q
  int64_t o_sb, o_sh;
  int B, H;
  float scale, eps;
  bool normalize;
  DType dtype, state_dtype;
  // nullptr: S, z hold B rows. Else a pool of P slots; row b uses slot state_indices[b]: -1 = padding
  // (o = 0), outside [-1, P) = bad (o = NaN); neither reads or writes the pool.
  const int32_t* state_indices;
  int P;
  int num_sms;  // multiprocessors of the current device: sets how far ahead plain grids prefetch
};

cudaError_t based_decode_launch(const BasedDecodeParams& p, cudaStream_t stream);

}  // namespace attn_kernels
