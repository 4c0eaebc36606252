// based_prefill, part of based_prefill.cu (included there only): the epilogue of a chunk. The warpgroup holds
// o^T in wgmma accumulators; each thread scales its values by 1/(den + eps), the warps transpose them through
// a staging tile (stmatrix.trans) and write token rows to global memory with 16-byte stores.
#pragma once
#include <cstdint>

#include "../common/convert.h"
#include "../common/ptx.h"
#include "based_prefill.h"
#include "config.cuh"
#include "sequences.cuh"

namespace attn_kernels {
namespace {

// o: this thread's o^T, o[4n + e] = out[token 8n + 2t + (e & 1)][value 16 warp + g + 8(e >> 1)]; sm.inv the
// chunk's 1/(den + eps) (1 for the numerator alone). Writes tokens [t0, t_end) of the chunk to og (sequence b's
// rows), or NaN rows where b's pool index is out of range.
template <typename T>
__device__ __forceinline__ void store_output_chunk(Smem<T>& sm, const float (&o)[32], T* og, int64_t t0,
                                                   int64_t t_end, const BasedPrefillParams& p, int b, int warp,
                                                   int lane) {
  const int t = lane & 3, lj = lane >> 3, lr = lane & 7;
  // stmatrix.trans writes the 8x8 blocks as token rows of 8 values into the staging tile.
#pragma unroll
  for (int np = 0; np < 4; ++np) {
    uint32_t r[4];  // matrix i: tokens 8(2np + (i >> 1)) + 0..7, values 16w + 8(i & 1) + 0..7
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = 2 * np + (i >> 1), e0 = 2 * (i & 1);
      const float2 iv = *reinterpret_cast<const float2*>(&sm.inv[8 * n + 2 * t]);
      r[i] = pack2<T>(o[4 * n + e0] * iv.x, o[4 * n + e0 + 1] * iv.y);
    }
    stsm4_t(saddr(&sm.o[16 * np + 8 * (lj >> 1) + lr][16 * warp + 8 * (lj & 1)]), r);
  }
  __syncwarp();
  // This warp's 16 values of 64 token rows: piece lane + 32i is row piece / 2, half piece % 2. All four
  // loads are issued before the first store (one shared-memory round trip, not four).
  uint4 piece[4];
  // An out-of-range pool index: NaN outputs (read here, not kept live across the chunk loop: a register).
  const bool poison = pool_index_bad(p, b);
  const uint4 nan8 = make_uint4(0x7fff7fffu, 0x7fff7fffu, 0x7fff7fffu, 0x7fff7fffu);  // fp16 / bf16 NaNs
#pragma unroll
  for (int i = 0; i < 4; ++i)
    piece[i] = *reinterpret_cast<const uint4*>(&sm.o[(lane >> 1) + 16 * i][16 * warp + 8 * (lane & 1)]);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t tok = t0 + (lane >> 1) + 16 * i;
    if (tok < t_end)
      *reinterpret_cast<uint4*>(og + tok * p.o_sn + 16 * warp + 8 * (lane & 1)) = poison ? nan8 : piece[i];
  }
}

}  // namespace
}  // namespace attn_kernels
