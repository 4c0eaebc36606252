// based_prefill, part of based_prefill.cu (included there only): the matrix-multiply atoms (mma.sync
// m16n8k16 and wgmma through CuTe), their register fragments, and where the running state lives in
// those registers.
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

#include <cute/arch/mma_sm80.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "../common/convert.h"
#include "../common/mma.h"
#include "../common/wgmma.h"
#include "config.cuh"

namespace attn_kernels {
namespace {

// x = hi + lo to ~16 significant bits: hi = bf16(x), lo = bf16(x - hi), for a pair (a, b).
__device__ __forceinline__ void split_bf16x2(float a, float b, uint32_t& hi, uint32_t& lo) {
  hi = pack2<bf16>(a, b);
  lo = pack2<bf16>(a - __uint_as_float(hi << 16), b - __uint_as_float(hi & 0xffff0000u));
}

// ---- wgmma (common/wgmma.h: fragments, issue helpers, descriptors) --------------------------------

using AtomInter = GM::MMA_64x64x16_F32BF16BF16_RS<GM::Major::K, GM::Major::K>;  // bf16: S exceeds fp16
template <typename T>  // products in the input type: o^T = V^T W^T, S^T += V^T phi(K) (two N pieces)
struct Atoms {
  using Intra = GM::MMA_64x64x16_F32BF16BF16_SS<GM::Major::MN, GM::Major::K>;
  using Upd128 = GM::MMA_64x128x16_F32BF16BF16_SS<GM::Major::MN, GM::Major::MN>;  // features 0..127
  using Upd32 = GM::MMA_64x32x16_F32BF16BF16_SS<GM::Major::MN, GM::Major::MN>;    // features 128..159
};
template <>
struct Atoms<__half> {
  using Intra = GM::MMA_64x64x16_F32F16F16_SS<GM::Major::MN, GM::Major::K>;
  using Upd128 = GM::MMA_64x128x16_F32F16F16_SS<GM::Major::MN, GM::Major::MN>;
  using Upd32 = GM::MMA_64x32x16_F32F16F16_SS<GM::Major::MN, GM::Major::MN>;
};

// ---- the running state's place in the registers ---------------------------------------------------

// s[4n + e] (S^T as wgmma accumulators, m64n128 then m64n32) holds S[f][v]: fn(n, e, f, v) for each of
// this thread's elements.
template <typename Fn>
__device__ __forceinline__ void for_each_s(int warp, int g, int t, Fn&& fn) {
#pragma unroll
  for (int n = 0; n < Cfg::kNT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) fn(n, e, 8 * n + 2 * t + (e & 1), 16 * warp + g + 8 * (e >> 1));
}

// z = sum of phi(k) over the past keys is kept as the keys' moments: cnt (the constant feature), ks = sum k
// and the Gram matrix G = sum k k^T, in float32. With x' = sqrt(c) x, the compact z is
//   z[0] = cnt, z[1 + i] = sqrt(c) ks_i, z[17 + i] = c G_ii / sqrt(2), z[quad(i, j)] = c G_ij (i < j),
// and phi(q).z = cnt + c q.ks + (c^2 / 2) q^T G q. G and ks come from 12 mma.sync per chunk instead of
// a 153-wide feature sum, and the products k_i k_j are exact in float32 (phi(K) rounds them).
// Warp kZWarp holds G and ks as m16n8 accumulators: gm[nt][e] = G[i][j], ksa[e] = ks[i] (every column)
// with i = g + 8(e >> 1), j = 8nt + 2t + (e & 1): fn(nt, e, i, j). quad(i, j) is feature_order.h's
// quad_feature.
constexpr int kZWarp = 3;  // the warp with one W block fewer than warps 0 and 1
template <typename Fn>
__device__ __forceinline__ void for_each_g(int g, int t, Fn&& fn) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) fn(nt, e, g + 8 * (e >> 1), 8 * nt + 2 * t + (e & 1));
}

}  // namespace
}  // namespace attn_kernels
