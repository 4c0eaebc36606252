// based_prefill_backward: the gradients of based_prefill (spec.md, "Backward of based_prefill"), chunked like
// the forward (64 tokens), O(N) memory, deterministic (no atomics: every sum has one owner and a fixed order).
//
// What the forward saves: q, k, v and the initial state (S0, z0); everything else is recomputed. Two kernels,
// one CTA of 10 warps per (b, h) (or per segment of it, below) each, walking the head's chunks with a float32 running state (160 features,
// the 153 compact ones padded, x 64 values) in registers: warp w owns features 16w..16w+15 as mma.sync
// accumulators, and the chunk's causal block w (the 10 blocks of 16 x 16 on and below the diagonal).
//   forward sweep  (c = 0, 1, ...; S, z from S0, z0): per chunk den = rowsum A + phi(Q) z and
//     dnum . num = inv (sum A * (G V^T) + phi(Q) . (G S^T)) (G = grad_o, inv = 1 / (den + eps)), so
//     dnum = inv G and dden = -inv dnum . num without forming num; dq against the state before the chunk; then
//     S += phi(K)^T V, z += phi(K)^T 1. Runs when dq is needed, or with normalize (the backward sweep needs
//     dnum, dden), then writing inv and dden per token (2 floats: the workspace).
//   backward sweep (c = last, ..., 0; dS, dz from grad_S, grad_z): dk and dv against dS, dz of the later
//     chunks (the gradient the later queries send to this chunk's keys through the state), the intra-chunk
//     parts from ds = (dnum V^T + dden)(1 + s) and A; then dS += phi(Q)^T dnum, dz += phi(Q)^T dden. After
//     the first chunk dS, dz are dS0, dz0. Runs when dk, dv, dS0 or dz0 is needed.
// The `needs` mask arrives as null output pointers: no sweep, and no step inside one, runs for a gradient
// nobody needs.
//
// Sequence-parallel split (small B*H, split.h; like the forward's): each (b, h)'s chunks are cut into nseg
// segments and each sweep runs one CTA per (b, h, segment). No decay, so the carried states are plain sums:
//   key sums (segment_sums.cuh, segments 0..nseg-2): a segment's own S, z sums; scanned to prefixes, the forward
//     sweep of segment s starts from S0 + segments 0..s-1 (then writes inv, dden of its tokens);
//   query sums (after the forward sweep: dnum needs inv; segments 1..nseg-1): a segment's own dS, dz sums;
//     scanned to suffixes, the backward sweep of segment s starts from grad_S + segments s+1..; dS0, dz0 are
//     segment 0's. The forward sweep has neither phi(Q) as a tile nor dnum as hi + lo, and 32 more accumulators
//     would spill it (168 registers): a separate pass, with the backward sweep's own update code, is cheaper.
// Every sum has one owner and a fixed order (no atomics); nseg = 1 is the unsplit sweeps, unchanged. The sums
// share one workspace region (the query sums overwrite the key sums, read before).
//
// Products: mma.sync m16n8k16, float32 accumulators. Chunk operands (q, k, v, grad_o, phi, A, ds) in the input
// dtype, dnum as input-dtype hi + lo; a state operand (S, dS) as bf16 (it can exceed fp16's range), for fp16
// inputs bf16 hi + lo with the other operand split too (~16-bit operands, the forward's v3 scheme), and dS in
// dk's product dS V^T as bf16 hi + lo for bf16 inputs too (backward_sweep.cuh says why); states stay float32.
// z, dz are float32 feature vectors advanced from each chunk's moments (one warp's mma: tiles.cuh's
// chunk_moments); the feature map's Jacobian (per token, not a matrix product) runs on the CUDA cores in float32.
//
//   tiles.cuh          the CTA's shape, tiles, fragments, where a state lives in the registers
//   token_pass.cuh     the per-token feature sums and Jacobian
//   forward_sweep.cuh  the forward sweep
//   backward_sweep.cuh the backward sweep
//   segment_sums.cuh   the split path's segment sums (their scan: common/slot_scan.cuh)
//   split.h            the split decision and the workspace's sums (plain C++)
//   this file          the launcher
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/slot_scan.cuh"
#include "backward_sweep.cuh"
#include "based_prefill_backward.h"
#include "forward_sweep.cuh"
#include "segment_sums.cuh"

namespace attn_kernels {
namespace {

static_assert(kBwdChunk == BCfg::kChunk && kBwdSlotFloats == kSlotZ + BCfg::kF, "split.h's sizes");

bool forward_sweep_runs(const BasedPrefillBackwardParams& p) {
  return p.dq || (p.normalize && backward_sweep_runs(p));
}

// The forward sweep's inv and dden (2 floats per token), then the segments' sums at a float4 boundary.
size_t inv_floats(const BasedPrefillBackwardParams& p) {
  return (p.normalize && backward_sweep_runs(p)) ? 2 * size_t(p.B) * size_t(p.H) * size_t(p.N) : 0;
}
size_t sums_offset(const BasedPrefillBackwardParams& p) { return (inv_floats(p) + 3) / 4 * 4; }

template <class Kernel>
cudaError_t launch_one(Kernel kernel, int smem, int nseg, const BasedPrefillBackwardParams& p, const SegmentArgs& sg,
                       cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(unsigned(int64_t(p.B) * p.H), unsigned(nseg)), BCfg::kThreads, smem, stream>>>(p, sg);
  return cudaGetLastError();
}

// A segment's own sums into its slot, then (3 segments or more) the slots scanned into the carries.
template <typename T, bool kQueries>
cudaError_t launch_sums(const BasedPrefillBackwardParams& p, const SegmentArgs& sg, cudaStream_t stream) {
  cudaError_t err = launch_one(based_prefill_backward_segment_sums<T, kQueries>, int(sizeof(SumsSmem<T, kQueries>)),
                               sg.nseg - 1, p, sg, stream);
  if (err != cudaSuccess || sg.nseg < 3 || AK_MUTANT(bwd_split_scan_skipped)) return err;
  enqueue_slot_scan<kBwdSlotFloats / 4, kQueries>(reinterpret_cast<float4*>(sg.sums), int64_t(p.B) * p.H, sg.nseg - 1,
                                                  stream);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const BasedPrefillBackwardParams& p, const SegmentArgs& sg, cudaStream_t stream) {
  // One stream: each launch reads what the ones before it wrote (the key sums' slots are reused for the
  // query sums once the forward sweep has read them).
  cudaError_t err = cudaSuccess;
  if (forward_sweep_runs(p)) {
    if (sg.nseg > 1 && (err = launch_sums<T, false>(p, sg, stream)) != cudaSuccess) return err;
    err = launch_one(based_prefill_backward_forward_sweep<T>, int(sizeof(FsSmem<T>)), sg.nseg, p, sg, stream);
    if (err != cudaSuccess) return err;
  }
  if (backward_sweep_runs(p)) {
    if (sg.nseg > 1 && (err = launch_sums<T, true>(p, sg, stream)) != cudaSuccess) return err;
    err = launch_one(based_prefill_backward_backward_sweep<T>, int(sizeof(BsSmem<T>)), sg.nseg, p, sg, stream);
  }
  return err;
}

}  // namespace

size_t based_prefill_backward_workspace_bytes(const BasedPrefillBackwardParams& p) {
  const size_t sums = bwd_sums_floats(p.B, p.H, bwd_choose_split(p.B, p.H, p.N, p.num_sms));
  const bool runs = forward_sweep_runs(p) || backward_sweep_runs(p);
  return ((runs && sums > 0) ? sums_offset(p) + sums : inv_floats(p)) * sizeof(float);
}

cudaError_t based_prefill_backward_launch(const BasedPrefillBackwardParams& p, cudaStream_t stream) {
  if (!is_io_dtype(p.dtype) || p.B < 1 || p.H < 1 || p.N < 1) return cudaErrorInvalidValue;
  if (int64_t(p.B) * p.H > int64_t(0x7fffffff)) return cudaErrorInvalidValue;  // grid.x
  if (based_prefill_backward_workspace_bytes(p) > 0 && p.workspace == nullptr) return cudaErrorInvalidValue;
  const BwdSplit sp = bwd_choose_split(p.B, p.H, p.N, p.num_sms);
  const SegmentArgs sg{sp.nseg, sp.seg_chunks, sp.nseg > 1 ? p.workspace + sums_offset(p) : nullptr};
  return p.dtype == DType::kFloat16 ? launch_typed<__half>(p, sg, stream) : launch_typed<__nv_bfloat16>(p, sg, stream);
}

}  // namespace attn_kernels
