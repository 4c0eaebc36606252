// Plain launcher for based_prefill (semantics: spec.md). Caller (the binding) guarantees:
// pointers 16-byte aligned, last-dim stride 1, all other strides multiples of 8 elements,
// B*H*N >= 1, dtype in {kFloat16, kBFloat16}.
#pragma once
#include "../common/types.h"

namespace attn_kernels {

struct BasedPrefillParams {
  const void* q;  // (B, H, N, 16), element strides below
  const void* k;  // (B, H, N, 16)
  const void* v;  // (B, H, N, 64)
  int64_t q_sb, q_sh, q_sn;
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
  void* o;  // (B, H, N, 64), same dtype as q
  int64_t o_sb, o_sh, o_sn;
  const float* S0;  // optional initial state (B, H, 153, 64) contiguous float32, or nullptr
  const float* z0;  // optional (B, H, 153) contiguous float32, or nullptr (both or neither)
  float* S;         // optional final state out (B, H, 153, 64) contiguous, or nullptr
  float* z;         // optional (B, H, 153), or nullptr (both or neither)
  void* workspace;  // based_prefill_workspace_bytes(...) bytes of scratch, or nullptr if that is 0
  int B, H, N;
  float scale, eps;
  bool normalize;
  DType dtype;
  int num_sms;  // multiprocessors of the current device, for the split-sequence decision
};

// Scratch bytes the launcher needs for these sizes (split-sequence partial states etc.).
size_t based_prefill_workspace_bytes(int B, int H, int N, int num_sms);

// Enqueues the work on `stream`; no host synchronisation. Returns the launch error, if any.
cudaError_t based_prefill_launch(const BasedPrefillParams& p, cudaStream_t stream);

}  // namespace attn_kernels
