// Plain launcher for based_prefill_backward: the gradients of based_prefill (spec.md, "Backward of
// based_prefill"; the formulas are attn_kernels/reference_backward.py's). Caller (the binding) guarantees:
// last-dim stride 1 for q, k, v, grad_o, dq, dk, dv (other strides: any), B*H >= 1, N >= 1, dtype in
// {kFloat16, kBFloat16}; the float32 states contiguous; `workspace` of
// based_prefill_backward_workspace_bytes(...) bytes.
#pragma once
#include <cstddef>

#include "../common/types.h"

namespace attn_kernels {

struct BasedPrefillBackwardParams {
  const void* q;  // (B, H, N, 16), element strides below
  const void* k;  // (B, H, N, 16)
  const void* v;  // (B, H, N, 64)
  const void* grad_o;  // (B, H, N, 64), or nullptr: a zero gradient
  int64_t q_sb, q_sh, q_sn;
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
  int64_t go_sb, go_sh, go_sn;
  const float* S0;      // optional initial state (B, H, 153, 64) float32, or nullptr
  const float* z0;      // optional (B, H, 153), or nullptr (both or neither)
  const float* grad_S;  // optional gradient into the returned S (B, H, 153, 64), or nullptr (zero)
  const float* grad_z;  // optional (B, H, 153), or nullptr (zero); independent of grad_S
  // Outputs, each nullptr when not needed (no work is done for it). dq, dk, dv in q's dtype.
  void* dq;  // (B, H, N, 16)
  void* dk;  // (B, H, N, 16)
  void* dv;  // (B, H, N, 64)
  int64_t dq_sb, dq_sh, dq_sn;
  int64_t dk_sb, dk_sh, dk_sn;
  int64_t dv_sb, dv_sh, dv_sn;
  float* dS0;  // (B, H, 153, 64) float32
  float* dz0;  // (B, H, 153) float32
  // Scratch: per token 1 / (den + eps) and dden, from the forward sweep to the backward sweep; then, where the
  // sequence is split (split.h), each (b, h)'s segments' key sums (later their query sums).
  float* workspace;
  int B, H, N;
  float scale, eps;
  bool normalize;
  DType dtype;
  int num_sms;  // multiprocessors of the current device, for the split-sequence decision (split.h)
};

// Scratch bytes the launcher needs: 2 floats per token when normalize and the backward sweep runs, and
// split.h's bwd_sums_floats past them (at a 16-byte boundary) when the sequence is split; 0 if neither.
size_t based_prefill_backward_workspace_bytes(const BasedPrefillBackwardParams& p);

// Enqueues the work on `stream`; no host synchronisation. Returns the launch error, if any.
cudaError_t based_prefill_backward_launch(const BasedPrefillBackwardParams& p, cudaStream_t stream);

}  // namespace attn_kernels
