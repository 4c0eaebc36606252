// sliding_window_prefill, part of sliding_window_prefill.cu (included there only): the kernel.
//
// One CTA per (query block of 64, head, sequence), one warpgroup (4 warps of 16 query rows):
// FlashAttention-2's forward with wgmma, S = Q K^T (m64n64k16, both operands in shared memory) and
// O += P V (m64n{e}k16, P from registers). Query block [i0, i0 + 63] of a sequence starting at `start`
// needs keys [k_lo, i0 + 63] with k_lo = max(start, i0 - W + 1): the CTA visits exactly those keys, in
// tiles of 64 starting at k_lo (at most ceil((W + 63) / 64) tiles), so work and reads per query are O(W).
// wgmma multiplies whole tiles; each warp then skips, in a tile, the mask and exp2 of every 16-key
// sub-block masked for all 16 of its rows (3 of 20 sub-blocks at W = 256, 3 of 8 at W = 64), which enter
// P V as zeros, and masks element by element only the sub-blocks that straddle its diagonal or its
// window's trailing edge.
// K / V tiles go through shared memory with cp.async (double-buffered) in GMMA's 128-byte swizzle (K-major
// for Q and K, MN-major for V). Softmax is online, in float32, in log2 units (scale * log2(e) folded
// into one multiply before exp2f). Masked scores are -inf; a row whose keys so far are all masked
// exponentiates against 0 instead of its -inf running max (exp2(-inf - -inf) would be NaN).
// The output tile is staged in shared memory and written with 16-byte stores, rows past the end of
// the sequence never. The CTAs whose queries include the sequence's last W positions then copy those
// keys and values (L2-resident: just loaded) into the ring buffers at slot p % W.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../common/convert.h"
#include "../common/ptx.h"
#include "../common/wgmma.h"
#include "sliding_window_prefill.h"

namespace attn_kernels {
namespace {

template <int kE>
struct SwpCfg {
  static constexpr int kBlockM = 64;  // queries per CTA, 16 per warp
  static constexpr int kBlockN = 64;  // keys per tile
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kChunks = kE / 8;                   // 16-byte chunks per row
  static constexpr int kTileBytes = kBlockN * kE * 2;      // one 64-row tile of fp16 / bf16
  static constexpr int kSmemBytes = 5 * kTileBytes;        // Q (then O), K x 2, V x 2
  static constexpr int kLoadsPerThread = kBlockN * kChunks / kThreads;
  static constexpr int kMinBlocks = kE == 64 ? 4 : 2;      // by shared memory (41 / 81 KB a CTA)
  static constexpr int kAlign = 1024;  // extra dynamic smem: the swizzled tiles start 1 KB-aligned
};

// The tiles' layouts as CuTe sees them (for the descriptors), over tile_off's bytes, and the atoms (fp16 /
// bf16 products, float32 accumulators). e = 128 rows are two 128-byte atoms: columns 64-127 of all 64 rows
// follow columns 0-63 (8 KB on).
template <typename T, int kE>
struct SwpWgmma {
  using E = cute::bfloat16_t;  // layouts and descriptors depend on the element size only
  // (query or key, e), and (e, key) with the key blocks inner:
  using RowTile = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                               cute::Shape<cute::_64, cute::Int<kE>>{}));
  using VTile = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<E>{},
                                             cute::Shape<cute::Int<kE>, cute::_64>{},
                                             cute::Step<cute::_2, cute::_1>{}));
  static constexpr bool kHalf = std::is_same_v<T, __half>;
  using QK = std::conditional_t<kHalf, GM::MMA_64x64x16_F32F16F16_SS<GM::Major::K, GM::Major::K>,
                                GM::MMA_64x64x16_F32BF16BF16_SS<GM::Major::K, GM::Major::K>>;
  using PV64 = std::conditional_t<kHalf, GM::MMA_64x64x16_F32F16F16_RS<GM::Major::K, GM::Major::MN>,
                                  GM::MMA_64x64x16_F32BF16BF16_RS<GM::Major::K, GM::Major::MN>>;
  using PV128 = std::conditional_t<kHalf, GM::MMA_64x128x16_F32F16F16_RS<GM::Major::K, GM::Major::MN>,
                                   GM::MMA_64x128x16_F32BF16BF16_RS<GM::Major::K, GM::Major::MN>>;
  using PV = std::conditional_t<kE == 64, PV64, PV128>;
  template <class Layout>
  static __device__ __forceinline__ auto tensor(uint8_t* p) {
    return cute::make_tensor(cute::make_smem_ptr(reinterpret_cast<E*>(p)), Layout{});
  }
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a 64-row tile: 128-byte rows of 8 chunks, the
// chunk index XORed with row & 7 (GMMA's 128-byte swizzle); chunks 8-15 (e = 128) in a second 8 KB half.
template <int kE>
__device__ __forceinline__ uint32_t tile_off(int row, int chunk) {
  if constexpr (kE == 64) return uint32_t(row * 128 + ((chunk ^ (row & 7)) << 4));
  return uint32_t((chunk >> 3) * 8192 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// Rows [r0, r0 + 64) of a (., e) matrix (row stride sn) into a swizzled tile; rows from `hi` on (past
// the sequence's end) are zero-filled and not read. r0 < hi, and r0 is never before the sequence.
template <typename T, int kE>
__device__ __forceinline__ void load_tile(uint32_t tile, const T* g, int64_t sn, int r0, int hi) {
  using C = SwpCfg<kE>;
#pragma unroll
  for (int i = 0; i < C::kLoadsPerThread; ++i) {
    const int c = threadIdx.x + i * C::kThreads;
    const int r = c / C::kChunks, ch = c % C::kChunks;
    const int n = r0 + r;
    const bool ok = n < hi;
    cp_async16(tile + tile_off<kE>(r, ch), g + int64_t(ok ? n : r0) * sn + ch * 8, ok);
  }
}

template <typename T, int kE>
__global__ void __launch_bounds__(SwpCfg<kE>::kThreads, SwpCfg<kE>::kMinBlocks)
    sliding_window_prefill_kernel(const SlidingWindowPrefillParams p) {
  using C = SwpCfg<kE>;
  using G = SwpWgmma<T, kE>;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  // Dynamic shared memory is requested C::kAlign bytes larger, so the tiles start 1 KB-aligned.
  uint8_t* const smem = smem_raw + ((C::kAlign - (saddr(smem_raw) & (C::kAlign - 1))) & (C::kAlign - 1));
  const int seq = blockIdx.z, h = blockIdx.y;
  int start = 0, end = p.N;
  if (p.cu_seqlens != nullptr) {
    start = p.cu_seqlens[seq];
    end = p.cu_seqlens[seq + 1];
  }
  const int i0 = start + int(blockIdx.x) * C::kBlockM;  // this CTA's first query
  if (i0 >= end) return;                                 // past this sequence (varlen grid, max_len)
  const int q_hi = min(i0 + C::kBlockM, end);            // one past its last query
  const int b = p.cu_seqlens != nullptr ? 0 : seq;
  const int cache_row = p.cache_indices != nullptr ? p.cache_indices[seq] : seq;
  // An index outside [-1, rows) (only possible under graph capture): no fill, NaN outputs.
  const bool bad_row = (cache_row < -1 || cache_row >= p.rows) && !AK_MUTANT(swp_bad_index_computed);

  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  T* og = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
  // The warp index through a shuffle: ptxas then knows it is warp-uniform, and the sub-block branches
  // below need no reconvergence barriers.
  const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x) / 32, 0);
  const int lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const uint32_t sQ = saddr(smem), sK = sQ + C::kTileBytes, sV = sK + 2 * C::kTileBytes;

  // Output staging (the Q tile's place; each warp reuses only its own 16 rows) and the 16-byte stores.
  uint8_t* sO = smem;
  auto store_rows = [&]() {
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 16 * C::kChunks / 32; ++i) {
      const int c = lane + 32 * i;
      const int r = 16 * warp + c / C::kChunks, ch = c % C::kChunks;
      const int n = i0 + r;
      if (n < q_hi)
        *reinterpret_cast<uint4*>(og + int64_t(n) * p.o_sn + ch * 8) =
            *reinterpret_cast<const uint4*>(sO + tile_off<kE>(r, ch));
    }
  };

  if (bad_row) {
    for (int c = lane; c < 16 * C::kChunks; c += 32)
      *reinterpret_cast<uint4*>(sO + tile_off<kE>(16 * warp + c / C::kChunks, c % C::kChunks)) =
          make_uint4(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu);  // NaN in fp16 and bf16
    store_rows();
    return;
  }

  const int W = p.window;
  // Keys before the sequence's start belong to an earlier sequence (varlen): no tile reaches them.
  const int first_key = AK_MUTANT(swp_varlen_boundary) ? 0 : start;
  const int reach = AK_MUTANT(swp_window_off_by_one) ? W + 1 : W;  // keys per query, itself included
  const int k_lo = max(first_key, i0 - reach + 1);
  const int ntiles = (q_hi - k_lo + C::kBlockN - 1) / C::kBlockN;
  // Tiles are visited last (the diagonal) to first; tile 0 holds the window's oldest keys.
  const int t_end = (AK_MUTANT(swp_tile_skipped) && ntiles > 1) ? 1 : 0;

  load_tile<T, kE>(sQ, qg, p.q_sn, i0, end);
  {
    const int r0 = k_lo + (ntiles - 1) * C::kBlockN;
    load_tile<T, kE>(sK, kg, p.k_sn, r0, end);
    load_tile<T, kE>(sV, vg, p.v_sn, r0, end);
  }
  cp_async_commit();

  const float sl = p.scale * 1.4426950408889634f;  // scores in log2 units
  float oacc[kE / 8][4] = {};
  float(&of)[kE / 2] = reinterpret_cast<float(&)[kE / 2]>(oacc);  // the same, as wgmma accumulators
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8 of the warp

  // This warp's rows [qw, qw + 15] attend keys [key_lo, key_hi] at most (rows past the end none: keys
  // are >= 0, so key_hi = -1 skips everything). A 16-key sub-block outside that range is masked for all
  // 16 rows: its mask and exp2 are skipped and it enters P V as zeros, which is what computing it would
  // give (max with -inf, l + 0, P = 0), so the output is bitwise the same. A sub-block inside for every
  // row ("full") needs no per-element mask.
  const int qw = i0 + 16 * warp;
  const int key_lo = qw - reach + 1 + (AK_MUTANT(swp_subblock_skip_off_by_one) ? 16 : 0);
  const int key_hi = qw < q_hi ? min(qw + 15, q_hi - 1) : -1;

  for (int t = ntiles - 1, buf = 0; t >= t_end; --t, buf ^= 1) {
    if (t > t_end) {  // prefetch the next tile (one key block lower) into the other buffer
      const int r0 = k_lo + (t - 1) * C::kBlockN;
      load_tile<T, kE>(sK + (buf ^ 1) * C::kTileBytes, kg, p.k_sn, r0, end);
      load_tile<T, kE>(sV + (buf ^ 1) * C::kTileBytes, vg, p.v_sn, r0, end);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this tile (and Q) landed; the prefetch may still be in flight
    fence_proxy_async_smem();  // cp.async's writes, visible to wgmma's reads
    __syncthreads();
    const uint32_t tK = sK + buf * C::kTileBytes, tV = sV + buf * C::kTileBytes;
    uint8_t* const pK = smem + (tK - sQ);
    uint8_t* const pV = smem + (tV - sQ);
    const int kt0 = k_lo + t * C::kBlockN;  // every key of a tile is >= k_lo >= start
    // Warp-uniform: sub-block pp (keys kt0 + 16 pp + [0, 15]) is needed / needs no mask.
    auto needed = [&](int pp) { return kt0 + 16 * pp + 15 >= key_lo && kt0 + 16 * pp <= key_hi; };
    auto full = [&](int pp) { return kt0 + 16 * pp + 15 <= qw && kt0 + 16 * pp > qw + 15 - reach; };
    float s[8][4] = {};  // S for this warp's 16 rows: 8 n-tiles of 8 keys, two per sub-block
    float(&sf)[32] = reinterpret_cast<float(&)[32]>(s);  // the same, as wgmma accumulators
    {  // S = Q K^T over the whole 64 x 64 tile, for all four warps
      const auto tq_ = G::template tensor<typename G::RowTile>(smem);
      const auto tk_ = G::template tensor<typename G::RowTile>(pK);
      fence_regs(sf);
      cute::warpgroup_arrive();
#pragma unroll
      for (int kb = 0; kb < (AK_MUTANT(swp_e128_qk_first_atom_only) ? 4 : kE / 16); ++kb)
        wgmma_ss<typename G::QK>(kblock_desc<GM::Major::K, 64>(tq_, 0, kb),
                                 kblock_desc<GM::Major::K, 64>(tk_, 0, kb), sf,
                                 kb == 0 ? GM::ScaleOut::Zero : GM::ScaleOut::One,
                                 std::make_index_sequence<32>{});
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
      fence_regs(sf);
    }
    const bool any = needed(0) || needed(1) || needed(2) || needed(3);
    if (any) {  // else: alpha = 1 (or 0 on zeros), no change
      // Mask (causality, window), scale, running max of rows g and g + 8.
      float mx[2] = {m[0], m[1]};
#pragma unroll
      for (int pp = 0; pp < 4; ++pp) {
        if (!needed(pp)) continue;
        if (full(pp)) {
#pragma unroll
          for (int j = 2 * pp; j < 2 * pp + 2; ++j) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              s[j][i] *= sl;
              mx[i / 2] = fmaxf(mx[i / 2], s[j][i]);
            }
          }
        } else {
#pragma unroll
          for (int j = 2 * pp; j < 2 * pp + 2; ++j) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int qi = qw + g + 8 * (i / 2), kj = kt0 + 8 * j + 2 * tq + i % 2;
              s[j][i] = kj <= qi && kj > qi - reach ? s[j][i] * sl : -INFINITY;
              mx[i / 2] = fmaxf(mx[i / 2], s[j][i]);
            }
          }
        }
      }
      float base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        base[r] = (mx[r] == -INFINITY && !AK_MUTANT(swp_fully_masked_nan)) ? 0.f : mx[r];
        const float alpha = exp2f(m[r] - base[r]);
        m[r] = mx[r];
        l[r] *= alpha;
#pragma unroll
        for (int n = 0; n < kE / 8; ++n) {
          oacc[n][2 * r] *= alpha;
          oacc[n][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (int pp = 0; pp < 4; ++pp) {
        if (!needed(pp)) continue;
#pragma unroll
        for (int j = 2 * pp; j < 2 * pp + 2; ++j) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            s[j][i] = exp2f(s[j][i] - base[i / 2]);
            l[i / 2] += s[j][i];
          }
        }
      }
    }
    {  // O += P V over the whole tile; a skipped sub-block (or warp) enters as P = 0
      uint32_t pa[16];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const bool on = (any && needed(kk)) || AK_MUTANT(swp_wgmma_skip_not_zeroed);
        pa[4 * kk + 0] = on ? pack2<T>(s[2 * kk][0], s[2 * kk][1]) : 0u;
        pa[4 * kk + 1] = on ? pack2<T>(s[2 * kk][2], s[2 * kk][3]) : 0u;
        pa[4 * kk + 2] = on ? pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]) : 0u;
        pa[4 * kk + 3] = on ? pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]) : 0u;
      }
      const auto tv_ = G::template tensor<typename G::VTile>(pV);
      fence_regs(pa);
      fence_regs(of);
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_rs<typename G::PV>(&pa[4 * kk], kblock_desc<GM::Major::MN, kE>(tv_, 0, kk), of,
                                 std::make_index_sequence<kE / 2>{});
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
      fence_regs(of);
    }
    __syncthreads();  // every warp is done with this buffer before the next prefetch overwrites it
  }

  // o = O / l (rows past the end have l = 0 and are not stored).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    const int row = 16 * warp + g + 8 * r;
#pragma unroll
    for (int n = 0; n < kE / 8; ++n)
      sts32(sQ + tile_off<kE>(row, n) + 4 * tq, pack2<T>(oacc[n][2 * r] * inv, oacc[n][2 * r + 1] * inv));
  }
  store_rows();

  // The ring fill: positions p in [max(0, len - W), len) of this block, into slot p % W.
  if (cache_row < 0 || cache_row >= p.rows) return;  // -1 (or, under a mutant, out of range): no fill
  const int f_lo = max(i0, end - W);
  const int nfill = (q_hi - f_lo) * C::kChunks;
  T* kc = static_cast<T*>(p.k_cache) + cache_row * p.kc_sb + h * p.kc_sh;
  T* vc = static_cast<T*>(p.v_cache) + cache_row * p.vc_sb + h * p.vc_sh;
  for (int c = threadIdx.x; c < nfill; c += C::kThreads) {
    const int n = f_lo + c / C::kChunks, ch = c % C::kChunks;
    const int slot = (n - start + (AK_MUTANT(swp_ring_slot) ? 1 : 0)) % W;
    const uint4 kx = *reinterpret_cast<const uint4*>(kg + int64_t(n) * p.k_sn + ch * 8);
    const uint4 vx = *reinterpret_cast<const uint4*>(vg + int64_t(n) * p.v_sn + ch * 8);
    *reinterpret_cast<uint4*>(kc + int64_t(slot) * p.kc_sw + ch * 8) = kx;
    *reinterpret_cast<uint4*>(vc + int64_t(slot) * p.vc_sw + ch * 8) = vx;
  }
}

}  // namespace
}  // namespace attn_kernels
