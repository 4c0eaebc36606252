// sliding_window_prefill: causal sliding-window softmax attention over each sequence (query i attends
// keys [i - W + 1, i] of its own sequence) and the ring-buffer fill of its last min(len, W) keys and
// values (slot p % W), the state sliding_window_decode continues from. The kernel (kernel.cuh) is
// W-aware: each 64-query block reads and multiplies only the keys its window reaches.
//   kernel.cuh   the kernel (tiles, wgmma products, online softmax, output, ring fill)
//   this file    the launcher
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernel.cuh"

namespace attn_kernels {
namespace {

template <typename T, int kE>
cudaError_t launch(const SlidingWindowPrefillParams& p, cudaStream_t stream) {
  using C = SwpCfg<kE>;
  const auto kernel = sliding_window_prefill_kernel<T, kE>;
  const int smem = C::kSmemBytes + C::kAlign;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.max_len + C::kBlockM - 1) / C::kBlockM, p.H, p.nseq);
  kernel<<<grid, C::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const SlidingWindowPrefillParams& p, cudaStream_t stream) {
  return p.e == 64 ? launch<T, 64>(p, stream) : launch<T, 128>(p, stream);
}

}  // namespace

cudaError_t sliding_window_prefill_launch(const SlidingWindowPrefillParams& p, cudaStream_t stream) {
  if (!swd_head_size_ok(p.e) || p.window < 1 || p.window > kSwdMaxWindow || p.nseq < 0 || p.H < 0 ||
      p.N < 0 || p.max_len < 0 || p.rows < 0 || p.nseq > 65535 || p.H > 65535 || !is_io_dtype(p.dtype))
    return cudaErrorInvalidValue;
  if (p.nseq == 0 || p.H == 0 || p.max_len == 0) return cudaSuccess;
  return p.dtype == DType::kBFloat16 ? launch_dtype<__nv_bfloat16>(p, stream)
                                     : launch_dtype<__half>(p, stream);
}

}  // namespace attn_kernels
