// Plain launcher for sliding_window_prefill (semantics: spec.md). Caller (the binding) guarantees:
// pointers 16-byte aligned, last-dim stride 1, other strides multiples of 8 elements; q, k, v, o and
// the caches of one dtype; cu_seqlens, when given, (n + 1,) int32 on the device, starting at 0,
// non-decreasing, ending at T (checked on the host outside graph capture; on the device trusted);
// max_len >= every sequence's length. cache_indices (n,) int32 on the device: -1 = no fill, any other
// value outside [0, P) = no fill and NaN outputs for that sequence (the kernel checks this itself).
// The launcher refuses (cudaErrorInvalidValue, nothing launched) e outside {64, 128}, a window outside
// [1, kSwdMaxWindow = 256] (common/limits.h), a dtype other than kFloat16 / kBFloat16, negative sizes,
// or more than 65535 sequences or heads (the grid's y and z).
#pragma once
#include "../common/types.h"

namespace attn_kernels {

struct SlidingWindowPrefillParams {
  const void* q;  // (B, H, N, e); varlen: (1, H, T, e)
  const void* k;
  const void* v;
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn;
  void* o;  // q's shape and dtype
  int64_t o_sb, o_sh, o_sn;
  void* k_cache;  // (rows, H, window, e) ring buffers, only written: slot p % window
  void* v_cache;
  int64_t kc_sb, kc_sh, kc_sw, vc_sb, vc_sh, vc_sw;
  const int32_t* cu_seqlens;     // (nseq + 1,) or nullptr: dense, every sequence of length N
  const int32_t* cache_indices;  // (nseq,) or nullptr: sequence i uses cache row i
  int nseq;     // B (dense) or n (varlen)
  int H;
  int N;        // dense: the sequence length; varlen: T
  int max_len;  // varlen: an upper bound of the sequence lengths (sizes the grid); dense: N
  int rows;     // the caches' first dimension (P with cache_indices)
  int window, e;
  float scale;
  DType dtype;
};

cudaError_t sliding_window_prefill_launch(const SlidingWindowPrefillParams& p, cudaStream_t stream);

}  // namespace attn_kernels
