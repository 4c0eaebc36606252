// based_prefill_backward: the gradients of based_prefill (spec.md, "Backward of based_prefill"), chunked like
// the forward (64 tokens), O(N) memory, deterministic (no atomics: every sum has one owner and a fixed order).
//
// What the forward saves: q, k, v and the initial state (S0, z0); everything else is recomputed. Two kernels,
// one CTA per (b, h) each, walking the head's chunks with a float32 running state (160 x 64, the 153 compact
// features padded, plus z) in shared memory:
//   forward sweep  (c = 0, 1, ...; state S, z from S0, z0): the chunk's den and num against the state before
//     it, so dnum = grad_o / (den + eps) and dden = -(dnum . num) / (den + eps); dq, whose inter-chunk part
//     needs that same state; then S += phi(K)^T V, z += phi(K)^T 1. Runs when dq is needed, or with normalize
//     (dnum, dden need den and num), then writing 1 / (den + eps) and dden per token (2 floats: the workspace).
//   backward sweep (c = last, ..., 0; dS, dz from grad_S, grad_z): dk and dv against dS, dz of the later
//     chunks (the gradient the later queries send to this chunk's keys through the state), the intra-chunk
//     parts from ds = (dnum v^T + dden)(1 + s) and A; then dS += phi(Q)^T dnum, dz += phi(Q)^T dden. After
//     the first chunk dS, dz are dS0, dz0. Runs when dk, dv, dS0 or dz0 is needed.
// The `needs` mask arrives as null output pointers: no sweep, and no step inside one, runs for a gradient
// nobody needs.
//
// This first version computes every product in float32 on the CUDA cores (tiles.cuh): correct and clear
// first; tensor-core products (mma.sync, then wgmma as in the forward) are the next step.
//
//   tiles.cuh   the shared-memory tiles and the steps both sweeps use
//   sweeps.cuh  the two kernels
//   this file   the launcher
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "based_prefill_backward.h"
#include "sweeps.cuh"

namespace attn_kernels {
namespace {

bool backward_sweep_runs(const BasedPrefillBackwardParams& p) { return p.dk || p.dv || p.dS0 || p.dz0; }
bool forward_sweep_runs(const BasedPrefillBackwardParams& p) {
  return p.dq || (p.normalize && backward_sweep_runs(p));
}

template <typename T>
cudaError_t launch_typed(const BasedPrefillBackwardParams& p, cudaStream_t stream) {
  const unsigned grid = unsigned(int64_t(p.B) * p.H);
  if (forward_sweep_runs(p)) {
    auto fwd = based_prefill_backward_forward_sweep<T>;
    cudaError_t err = cudaFuncSetAttribute(fwd, cudaFuncAttributeMaxDynamicSharedMemorySize, kBwdSmemBytes);
    if (err != cudaSuccess) return err;
    fwd<<<grid, BCfg::kThreads, kBwdSmemBytes, stream>>>(p);
  }
  if (backward_sweep_runs(p)) {  // same stream: reads the forward sweep's workspace after it
    auto bwd = based_prefill_backward_backward_sweep<T>;
    cudaError_t err = cudaFuncSetAttribute(bwd, cudaFuncAttributeMaxDynamicSharedMemorySize, kBwdSmemBytes);
    if (err != cudaSuccess) return err;
    bwd<<<grid, BCfg::kThreads, kBwdSmemBytes, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

size_t based_prefill_backward_workspace_bytes(const BasedPrefillBackwardParams& p) {
  return (p.normalize && backward_sweep_runs(p)) ? 2 * size_t(p.B) * size_t(p.H) * size_t(p.N) * sizeof(float) : 0;
}

cudaError_t based_prefill_backward_launch(const BasedPrefillBackwardParams& p, cudaStream_t stream) {
  if (!is_io_dtype(p.dtype) || p.B < 1 || p.H < 1 || p.N < 1) return cudaErrorInvalidValue;
  if (int64_t(p.B) * p.H > int64_t(0x7fffffff)) return cudaErrorInvalidValue;  // grid.x
  if (based_prefill_backward_workspace_bytes(p) > 0 && p.workspace == nullptr) return cudaErrorInvalidValue;
  return p.dtype == DType::kFloat16 ? launch_typed<__half>(p, stream) : launch_typed<__nv_bfloat16>(p, stream);
}

}  // namespace attn_kernels
