// based_prefill: causal Based linear attention over a whole sequence, chunked (spec.md), on Hopper
// warpgroup MMA (wgmma, sm_90a).
//
// One CTA = one warpgroup (4 warps) walks one (b, h, segment) in chunks of 64 tokens, 2 CTAs per SM.
// The running state S^T (64 values x 160 features: the 153 compact ones padded) stays in wgmma
// accumulator registers for the whole segment. Per chunk:
//   phase 1 (CUDA cores, mma.sync m16n8k16): phi(Q), phi(K) and W = causal(1 + cA + (cA)^2/2),
//     A = Q K^T, into shared memory in GMMA swizzled layouts; the rowsums of the float32 W (den_intra);
//     den_inter = phi(Q).z from the keys' moments (z is kept as sum k and the Gram matrix sum k k^T, see
//     for_each_g: 2 mma.sync per warp and 12 for the Gram update instead of a 153-wide feature sum).
//   phase 2 (the warpgroup's async wgmma: each shared operand is read once per chunk, not once per warp):
//     o^T  = V^T W^T          m64n64k16 x 4               SS  (input dtype)
//     o^T += S^T phi(Q)^T     m64n64k16 x 10              RS  (bf16: S can exceed fp16's range)
//     S^T += V^T phi(K)       m64n128k16 + m64n32k16, x 4 SS  (input dtype, float32 accumulation)
//     While these run, 1/(den + eps) per token goes to shared memory.
//   epilogue: o^T scaled, written transposed (stmatrix.trans) into a staging tile, then 16-byte
//     global stores.
// Why o^T: the accumulator layout of S^T is, element for element, the register-A layout of m64nNk16,
// so the inter product takes the state straight from its accumulators (one cvt per pair).
// fp16 inputs: a bf16 operand is 3 bits coarser than fp16, so S, G, q and phi(Q) are split into bf16
// hi + lo and hi.hi + hi.lo + lo.hi are accumulated in float32 (~16-bit operands; lo.lo is below the
// float32 rounding).
//
// Varlen (cu_seqlens): a CTA per (sequence, head), the longest sequences launched first (sequences.cuh);
// segments are cut from the bound N on every sequence's length, and the empty ones do no work.
//
// Small B*H: the sequence is cut into segments. Pass 1 (kStateOnly) writes each segment's own
// state contribution to the workspace, a scan turns them into prefix sums, and pass 2 starts
// segment s from S0 + prefix[s-1]. The last segment writes the final state.
//
// CuTe (nvidia-cutlass) gives the GMMA shared-memory layouts, descriptors and wgmma atoms. TiledMMA is
// not used: its header pulls in every architecture's atoms and triples the compile time, and the
// fragment layouts needed here are the simple ones written out in fragments.cuh.
//
// The pieces, in the order they build on each other:
//   config.cuh       Cfg, the wgmma operand tiles and the shared-memory layout
//   fragments.cuh    mma.sync / wgmma atoms, their register fragments, where the state lives in them
//   feature_map.cuh  phi of one token row into a phi tile (the compact order of common/feature_order.h)
//   intra_chunk.cuh  W, the chunk's causal Taylor-kernel matrix, and the denominator's intra-chunk sums
//   sequences.cuh    which rows a CTA walks (dense or varlen), the varlen launch order, where the final
//                    state goes (returned, a pool slot or nowhere)
//   epilogue.cuh     a chunk's output: scaled, transposed through shared memory, 16-byte stores
//   kernel.cuh       based_prefill_kernel (the phases above, top to bottom)
//   heuristics.h     the split-sequence decision and its workspace
//   this file        the launcher
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/slot_scan.cuh"
#include "based_prefill.h"
#include "config.cuh"
#include "heuristics.h"
#include "kernel.cuh"
#include "sequences.cuh"

namespace attn_kernels {
namespace {

template <typename T>
cudaError_t launch_typed(const BasedPrefillParams& p, Split sp, const int32_t* order, cudaStream_t stream) {
  constexpr int smem = kSmemBytes<T>;
  const int64_t bh = int64_t(p.B) * p.H;
  auto full = based_prefill_kernel<T, false>;
  cudaError_t err = cudaFuncSetAttribute(full, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  if (sp.nseg > 1) {
    auto part = based_prefill_kernel<T, true>;
    err = cudaFuncSetAttribute(part, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    part<<<dim3(unsigned(bh), sp.nseg - 1), Cfg::kThreads, smem, stream>>>(p, sp.nseg, sp.seg_chunks, order);
    if (sp.nseg > 2 && !AK_MUTANT(prefill_scan_skipped)) {
      enqueue_slot_scan<Cfg::kWsFloats / 4, false>(static_cast<float4*>(p.workspace), bh, sp.nseg - 1, stream);
    }
  }
  full<<<dim3(unsigned(bh), sp.nseg), Cfg::kThreads, smem, stream>>>(p, sp.nseg, sp.seg_chunks, order);
  return cudaGetLastError();
}

// The varlen launch order (B ints) follows the split's partial states in the workspace.
size_t order_bytes(int B, bool varlen) { return varlen ? size_t(B) * sizeof(int32_t) : 0; }

}  // namespace

size_t based_prefill_workspace_bytes(int B, int H, int N, int num_sms, bool varlen) {
  return workspace_bytes(B, H, choose_split(B, H, N, num_sms)) + order_bytes(B, varlen);
}

cudaError_t based_prefill_launch(const BasedPrefillParams& p, cudaStream_t stream) {
  if (!is_io_dtype(p.dtype) || p.B < 1 || p.H < 1 || p.N < 1) return cudaErrorInvalidValue;
  const bool varlen = p.cu_seqlens != nullptr;
  if (varlen && p.workspace == nullptr) return cudaErrorInvalidValue;  // the order lives there
  Split sp = choose_split(p.B, p.H, p.N, p.num_sms);
  if (p.workspace == nullptr) sp = {1, (p.N + Cfg::kChunk - 1) / Cfg::kChunk};  // unsplit fallback
  const size_t split_bytes = sp.nseg > 1 ? workspace_bytes(p.B, p.H, sp) : 0;
  int32_t* order = nullptr;
  BasedPrefillParams kp = p;
  if (varlen) {  // one packed batch entry: b indexes sequences, whose rows start at cu_seqlens[b]
    kp.q_sb = kp.k_sb = kp.v_sb = kp.o_sb = 0;
    order = reinterpret_cast<int32_t*>(static_cast<char*>(p.workspace) + split_bytes);
    based_prefill_order_kernel<<<unsigned((p.B + kOrderThreads - 1) / kOrderThreads), kOrderThreads, 0, stream>>>(
        p.cu_seqlens, p.B, p.total, order);
  }
  return p.dtype == DType::kFloat16 ? launch_typed<__half>(kp, sp, order, stream)
                                    : launch_typed<bf16>(kp, sp, order, stream);
}

}  // namespace attn_kernels
