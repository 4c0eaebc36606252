// wgmma (sm_90a warpgroup matrix multiply) through CuTe's atoms, for the kernels that use it
// (based_prefill, sliding_window_prefill): issue helpers, smem operand descriptors, register fences.
// Fragments per thread (warp w of the warpgroup, lane = 4g + t), per warp those of mma.sync m16n8:
//   accumulator m64nN: d[4n + e] = D[16w + g + 8(e >> 1)][8n + 2t + (e & 1)]
//   register A m64k16: a[j] = 16-bit pair of A[16w + g + 8(j & 1)][2t + 8(j >> 1) + {0, 1}]
// so an accumulator's pairs, packed in order, are the A registers of the next product.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

namespace attn_kernels {

namespace GM = cute::SM90::GMMA;

template <class Atom, size_t... I>
__device__ __forceinline__ void wgmma_ss(uint64_t da, uint64_t db, float* d, GM::ScaleOut scale_d,
                                         std::index_sequence<I...>) {
  Atom::fma(da, db, d[I]..., scale_d);
}
template <class Atom, size_t... I>
__device__ __forceinline__ void wgmma_rs(const uint32_t* a, uint64_t db, float* d,
                                         std::index_sequence<I...>) {
  Atom::fma(a[0], a[1], a[2], a[3], db, d[I]..., GM::ScaleOut::One);
}
// Descriptor of tile (r_tile, kb) of shape R x 16 of a GMMA smem tensor (rows x K).
template <GM::Major kMajor, int R, class Tensor>
__device__ __forceinline__ uint64_t kblock_desc(const Tensor& t, int r_tile, int kb) {
  using namespace cute;
  return GM::make_gmma_desc<kMajor>(local_tile(t, Shape<Int<R>, _16>{}, make_coord(r_tile, kb)));
}
template <class T, int N>
__device__ __forceinline__ void fence_regs(T (&r)[N]) {  // keep the compiler off wgmma operands in flight
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(r[i]);
}

}  // namespace attn_kernels
