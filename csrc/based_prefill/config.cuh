// based_prefill, part of based_prefill.cu (included there only): the CTA's configuration, the wgmma
// operand tiles and the shared-memory layout.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "../common/types.h"

namespace attn_kernels {
namespace {

using bf16 = __nv_bfloat16;

struct Cfg {
  static constexpr int kChunk = 64;     // tokens per chunk
  static constexpr int kThreads = 128;  // one warpgroup
  static constexpr int kF = 160;        // 153 compact features padded to a multiple of 32
  static constexpr int kNT = kF / 8;    // state n-tiles of 8 features
  // Row pitches (elements) padded so that 8 consecutive rows hit distinct banks for ldmatrix / stmatrix.
  static constexpr int kQKPitch = 24;  // q, k input rows
  static constexpr int kOPitch = 72;   // output staging rows
  // One segment's partial state in the workspace: S^T in fragment order, then z (160).
  static constexpr int kStateFloats = 4 * 32 * kNT * 4;
  static constexpr int kWsFloats = kStateFloats + kF;
  static constexpr int kCtasPerSm = 2;
};

// The wgmma operand tiles (element offsets; each tile's base 1024-byte aligned):
// phi(Q), phi(K): token rows of 160 features in GMMA SW64 atoms of 8 tokens x 32 features (64-byte
//   rows, 16-byte units XOR (tok >> 1) & 3); token blocks inner (512 B), feature blocks outer (4 KB).
//   phi(Q) is the K-major B operand (N = token), phi(K) the MN-major B operand (N = feature) of the
//   same arrangement.
// V (token rows of 64 values) and W (query rows of 64 keys): GMMA SW128, 128-byte rows, 16-byte units
//   XOR row & 7. V is the MN-major A operand (M = value), W the K-major B operand.
// phi_off and row128_off are the offsets the writers use; they equal the CuTe layouts of Tiles.
__host__ __device__ __forceinline__ int phi_off(int tok, int f) {  // f % 8 == 0 for 16-byte accesses
  return (f >> 5) * 2048 + (tok >> 3) * 256 + (tok & 7) * 32 +
         ((((f >> 3) & 3) ^ ((tok >> 1) & 3)) << 3) + (f & 7);
}
__host__ __device__ __forceinline__ int row128_off(int r, int c) {
  return r * 64 + ((((c >> 3) ^ (r & 7))) << 3) + (c & 7);
}

struct Tiles {
  using E = cute::bfloat16_t;  // any 16-bit type: the layouts and descriptors depend on the size only
  using PhiQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW64_Atom<E>{},
                                            cute::Shape<cute::_64, cute::_160>{}));  // (token, feature)
  using PhiK = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW64_Atom<E>{},
                                            cute::Shape<cute::_160, cute::_64>{},
                                            cute::Step<cute::_2, cute::_1>{}));  // (feature, token)
  using V = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<E>{},
                                         cute::Shape<cute::_64, cute::_64>{}));  // (value, token)
  using W = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                         cute::Shape<cute::_64, cute::_64>{}));  // (query, key)
  template <class Layout, class P>
  static __device__ __forceinline__ auto tensor(P* ptr) {
    return cute::make_tensor(cute::make_smem_ptr(reinterpret_cast<E*>(ptr)), Layout{});
  }
};

template <typename T>
struct Smem {
  // fp16 inputs: phi(Q) as bf16 hi + lo (two tiles) for the bf16 state products.
  static constexpr bool kSplit = std::is_same_v<T, __half>;
  bf16 phiq[kSplit ? 2 : 1][Cfg::kChunk * Cfg::kF];  // wgmma tiles first: each a multiple of 1 KB
  T phik[Cfg::kChunk * Cfg::kF];
  T v[2][Cfg::kChunk * kValueDim];  // double-buffered chunk input (cp.async)
  T w[Cfg::kChunk * Cfg::kChunk];
  T q[2][Cfg::kChunk][Cfg::kQKPitch];
  T k[2][Cfg::kChunk][Cfg::kQKPitch];
  T o[Cfg::kChunk][Cfg::kOPitch];  // output staging, token rows; warp w owns columns 16w..16w+15
  float den[Cfg::kChunk][8];  // partial dens: [0] phi(Q).z, [4 + kt] rowsum of W's block kt
  float inv[Cfg::kChunk];     // 1 / (den + eps)
  // G before chunk c as bf16 mma B fragments (fp16: hi, lo) and ks, in buffer c & 1 (warp kZWarp writes
  // the next chunk's while the other warps read this chunk's).
  uint4 gfrag[2][kSplit ? 2 : 1][32];
  float ks[2][16];
};
template <typename T>
constexpr int kSmemBytes = int(sizeof(Smem<T>)) + 1024;  // + slack to align the base to 1 KB
constexpr int kPhiTileBytes = Cfg::kChunk * Cfg::kF * 2;

}  // namespace
}  // namespace attn_kernels
