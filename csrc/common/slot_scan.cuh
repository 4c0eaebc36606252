// The scan of split sequences (based_prefill's partial states, based_prefill_backward's key and query sums):
// each (b, h) owns nparts consecutive slots of kPer float4, one per segment; in place, the inclusive prefix sums
// (slot 0 first) or, kReverse, the inclusive suffix sums (slot nparts - 1 first). One thread per float4 of a
// slot, adding the slots in a fixed order: deterministic.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace attn_kernels {
namespace {

template <int kPer, bool kReverse>
__global__ void slot_scan_kernel(float4* sums, int64_t bh_count, int nparts) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= bh_count * kPer) return;
  const int64_t step = kReverse ? -int64_t(kPer) : int64_t(kPer);
  float4* x = sums + (i / kPer) * nparts * kPer + (i % kPer) + (kReverse ? int64_t(nparts - 1) * kPer : 0);
  float4 acc = x[0];
  for (int s = 1; s < nparts; ++s) {
    const float4 y = x[s * step];
    acc = make_float4(acc.x + y.x, acc.y + y.y, acc.z + y.z, acc.w + y.w);
    x[s * step] = acc;
  }
}

// Enqueues the scan of bh_count heads' slots on `stream` (the caller reads cudaGetLastError).
template <int kPer, bool kReverse>
void enqueue_slot_scan(float4* sums, int64_t bh_count, int nparts, cudaStream_t stream) {
  const int64_t n = bh_count * kPer;
  slot_scan_kernel<kPer, kReverse><<<unsigned((n + 255) / 256), 256, 0, stream>>>(sums, bh_count, nparts);
}

}  // namespace
}  // namespace attn_kernels
