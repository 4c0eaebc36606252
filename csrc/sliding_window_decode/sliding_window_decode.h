// Plain launcher for sliding_window_decode (semantics: spec.md). Caller (the binding) guarantees:
// pointers 16-byte aligned, last-dim stride 1, other strides multiples of 8 elements,
// positions >= 0 (checked on the host before the call when they are on the host; on the device they
// are trusted). The launcher refuses (cudaErrorInvalidValue, nothing launched) e outside {64, 128},
// a window outside [1, kSwdMaxWindow = 256] (common/limits.h), a dtype other than kFloat16 /
// kBFloat16, B, H < 0, or cache_indices with pool_rows < 1.
// With cache_indices the caches are pools of pool_rows rows and row b uses pool row cache_indices[b]:
// -1 = padding (o = 0, the pool untouched); any other value outside [0, pool_rows) touches no
// memory (o = NaN, the pool untouched). Rows naming one pool row twice race on it (the caller's bug).
#pragma once
#include "../common/types.h"

namespace attn_kernels {

struct SlidingWindowDecodeParams {
  const void* q;      // (B, H, e)
  const void* k_new;  // (B, H, e)
  const void* v_new;  // (B, H, e)
  int64_t q_sb, q_sh, kn_sb, kn_sh, vn_sb, vn_sh;
  void* k_cache;  // (B, H, window, e) ring buffer, updated in place at slot p % window; a pool:
  void* v_cache;  // (pool_rows, H, window, e), same layout rules
  int64_t kc_sb, kc_sh, kc_sw, vc_sb, vc_sh, vc_sw;
  const int32_t* positions;      // (B,) on the device: 0-based position of the new token
  const int32_t* cache_indices;  // (B,) on the device: each row's pool row; nullptr: cache row b
  int pool_rows;                 // the caches' first dimension when cache_indices is set
  void* o;                       // (B, H, e), same dtype as q
  int64_t o_sb, o_sh;
  int B, H, window, e;
  float scale;
  DType dtype;
};

cudaError_t sliding_window_decode_launch(const SlidingWindowDecodeParams& p, cudaStream_t stream);

}  // namespace attn_kernels
