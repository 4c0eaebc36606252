// based_prefill, part of based_prefill.cu (included there only): the scan of split sequences. Each segment
// CTA of the state pass leaves its own partial state in the workspace; this kernel turns them into the
// states carried into each segment of the second pass.
#pragma once
#include <cstdint>

#include "config.cuh"

namespace attn_kernels {
namespace {

// In-place inclusive prefix sum over the nparts partial states of each (b, h).
__global__ void based_prefill_scan_kernel(float4* ws, int64_t bh_count, int nparts) {
  constexpr int kPer = Cfg::kWsFloats / 4;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= bh_count * kPer) return;
  float4* x = ws + (i / kPer) * nparts * kPer + (i % kPer);
  float4 acc = x[0];
  for (int s = 1; s < nparts; ++s) {
    const float4 y = x[int64_t(s) * kPer];
    acc = make_float4(acc.x + y.x, acc.y + y.y, acc.z + y.z, acc.w + y.w);
    x[int64_t(s) * kPer] = acc;
  }
}

}  // namespace
}  // namespace attn_kernels
