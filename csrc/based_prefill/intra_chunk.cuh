// based_prefill, part of based_prefill.cu (included there only): the intra-chunk matrix W of one chunk,
// W[r][j] = 1 + c q_r.k_j + (c^2 / 2)(q_r.k_j)^2 for keys j <= r (the Taylor kernel phi(q_r).phi(k_j) taken
// as a polynomial of q.k, never through the 153-wide features), 0 above the diagonal; its row sums are the
// denominator's intra-chunk part.
#pragma once
#include <cstdint>

#include "../common/convert.h"
#include "../common/mutants.h"
#include "../common/ptx.h"
#include "config.cuh"
#include "fragments.cuh"

namespace attn_kernels {
namespace {

// Warp `warp`'s blocks of W (16 x 16, on and below the diagonal) from the chunk's q and k rows, stored
// into the W tile at s_w (row128_off layout); with den_on, each block's row sums go to den[row][4 + kt].
// q, k: the chunk's 64 token rows of 16 values (padding rows are zero).
template <typename T>
__device__ __forceinline__ void build_w_blocks(const T (&q)[Cfg::kChunk][Cfg::kQKPitch],
                                               const T (&k)[Cfg::kChunk][Cfg::kQKPitch], uint32_t s_w,
                                               float (&den)[Cfg::kChunk][8], float c1, float c2, bool den_on,
                                               int warp, int lane) {
  const int g = lane >> 2, t = lane & 3;    // mma fragment coordinates
  const int lj = lane >> 3, lr = lane & 7;  // ldmatrix: which 8x8 matrix, which row of it
  // W block i = (m, kt), kt <= m, numbered row by row; warp w takes i = w, w+4, w+8 (< 10). The
  // fragments of all three are loaded first: one shared-memory round trip instead of three.
  auto block_mk = [](int i, int& m, int& kt) {
    m = i >= 6 ? 3 : i >= 3 ? 2 : i >= 1 ? 1 : 0;
    kt = i - m * (m + 1) / 2;
  };
  uint32_t qa3[3][4], kb3[3][4];  // kb: keys 16kt..+7 {kb0, kb1}, keys 16kt+8..+15 {kb2, kb3}
#pragma unroll
  for (int j = 0; j < 3; ++j) {
    int m, kt;
    block_mk(min(warp + 4 * j, 9), m, kt);
    ldsm4(qa3[j], saddr(&q[16 * m + lr + 8 * (lj & 1)][8 * (lj >> 1)]));
    ldsm4(kb3[j], saddr(&k[16 * kt + lr + 8 * (lj >> 1)][8 * (lj & 1)]));
  }
#pragma unroll
  for (int j = 0; j < 3; ++j) {
    const int i = warp + 4 * j;
    if (i >= 10) break;
    int m, kt;
    block_mk(i, m, kt);
    const uint32_t(&qa)[4] = qa3[j];
    const uint32_t(&kb)[4] = kb3[j];
    float ca[4] = {0.f, 0.f, 0.f, 0.f}, cb[4] = {0.f, 0.f, 0.f, 0.f};
    mma_16816<T>(ca, qa, kb[0], kb[1]);
    mma_16816<T>(cb, qa, kb[2], kb[3]);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      ca[e] = fmaf(ca[e], fmaf(ca[e], c2, c1), 1.f);
      cb[e] = fmaf(cb[e], fmaf(cb[e], c2, c1), 1.f);
      if (m == kt) {  // diagonal block: key 2t+(e&1) (+8 for cb) vs query g + 8(e>>1)
        const int qrow = g + 8 * (e >> 1), key = 2 * t + (e & 1);
        if (AK_MUTANT(prefill_causal_diag) ? key >= qrow : key > qrow) ca[e] = 0.f;
        if (key + 8 > qrow) cb[e] = 0.f;
      }
    }
    const int r0 = 16 * m + g, k0 = 16 * kt + 2 * t;
    sts32(s_w + 2 * row128_off(r0, k0), pack2<T>(ca[0], ca[1]));
    sts32(s_w + 2 * row128_off(r0 + 8, k0), pack2<T>(ca[2], ca[3]));
    sts32(s_w + 2 * row128_off(r0, k0 + 8), pack2<T>(cb[0], cb[1]));
    sts32(s_w + 2 * row128_off(r0 + 8, k0 + 8), pack2<T>(cb[2], cb[3]));
    if (den_on) {
      float d0 = (ca[0] + ca[1]) + (cb[0] + cb[1]), d1 = (ca[2] + ca[3]) + (cb[2] + cb[3]);
      d0 += __shfl_xor_sync(0xffffffffu, d0, 1);
      d1 += __shfl_xor_sync(0xffffffffu, d1, 1);
      d0 += __shfl_xor_sync(0xffffffffu, d0, 2);
      d1 += __shfl_xor_sync(0xffffffffu, d1, 2);
      if (t == 0) {
        den[r0][4 + kt] = d0;
        den[r0 + 8][4 + kt] = d1;
      }
    }
  }
}

}  // namespace
}  // namespace attn_kernels
