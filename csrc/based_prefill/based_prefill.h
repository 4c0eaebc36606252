// Plain launcher for based_prefill (semantics: spec.md). Caller (the binding) guarantees:
// pointers 16-byte aligned, last-dim stride 1, all other strides multiples of 8 elements,
// B*H >= 1, N >= 1, dtype in {kFloat16, kBFloat16}.
// Varlen (cu_seqlens set): B = n sequences packed along the N axis of batch entry 0 (T = `total` rows),
// sequence b = rows [cu_seqlens[b], cu_seqlens[b+1]); N = a bound on the longest sequence (max_seqlen, or
// T): tokens of a sequence beyond N are not computed. S0/z0, S/z are per sequence. Indices are clamped to
// [0, T], so a bad cu_seqlens (only possible under graph capture) never leads outside the tensors.
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
  // Optional state pool instead of S/z: sequence b's final state goes to slot state_indices[b] of
  // (pool_S (P, H, 153, 64), pool_z (P, H, 153)), contiguous, float32 or (pool_bf16) bfloat16. -1: not
  // written; an index outside [-1, P): not written and NaN outputs for all of b's rows.
  const int32_t* state_indices;
  void* pool_S;
  void* pool_z;
  int pool_size;
  bool pool_bf16;
  void* workspace;  // based_prefill_workspace_bytes(...) bytes of scratch, or nullptr if that is 0
  const int32_t* cu_seqlens;  // varlen: (B + 1,) sequence starts, or nullptr (dense)
  int64_t total;              // varlen: T, the packed rows
  int B, H, N;
  float scale, eps;
  bool normalize;
  DType dtype;
  int num_sms;  // multiprocessors of the current device, for the split-sequence decision
};

// Scratch bytes the launcher needs for these sizes (split-sequence partial states, the varlen launch order).
size_t based_prefill_workspace_bytes(int B, int H, int N, int num_sms, bool varlen);

// Enqueues the work on `stream`; no host synchronisation. Returns the launch error, if any.
cudaError_t based_prefill_launch(const BasedPrefillParams& p, cudaStream_t stream);

}  // namespace attn_kernels
