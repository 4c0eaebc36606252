// based_prefill_backward, part of based_prefill_backward.cu (included there only): the sequence-parallel path's
// extra passes (split.h). The sums of one segment's chunks, one CTA of 10 warps per (b, h, segment), from 0 and
// with the sweeps' own update code (tiles.cuh), so that they round as the unsplit sweeps' updates do:
//   key sums   (before the forward sweep; segments 0..nseg-2): S += phi(K)^T V, z += phi(K)^T 1;
//   query sums (after the forward sweep, which wrote inv and dden; segments 1..nseg-1): dS += phi(Q)^T dnum,
//              dz += phi(Q)^T dden;
// then common/slot_scan.cuh turns each (b, h)'s slots into the carries, in a fixed order: the key sums' prefix
// (slot j: segments 0..j, carried into segment j + 1) and the query sums' suffix (slot j: segments j+1..nseg-1,
// carried into segment j).
#pragma once
#include "tiles.cuh"

namespace attn_kernels {
namespace {

template <typename T, bool kQueries>
struct SumsSmem {
  T phi[BCfg::kPhiElems];                 // phi(K) or phi(Q), phi_off layout
  T x[2][BCfg::kChunk][BCfg::kQKP];       // k or q, chunk c in x[c & 1] (the next chunk loads meanwhile)
  T y[2][BCfg::kChunk][BCfg::kVP];        // v or grad_o, likewise
  T dnum[kQueries ? 2 : 1][BCfg::kChunk][BCfg::kVP];  // queries: hi, lo
  float z[BCfg::kF];                      // z or dz
  MomentTile mom;                         // the chunk's moments (warp 8)
  alignas(8) float dden[BCfg::kChunk];
};

template <typename T, bool kQueries>
__global__ void __launch_bounds__(BCfg::kThreads, 1)
    based_prefill_backward_segment_sums(const BasedPrefillBackwardParams p, const SegmentArgs sg) {
  extern __shared__ float4 ss_smem_raw[];
  SumsSmem<T, kQueries>& sm = *reinterpret_cast<SumsSmem<T, kQueries>*>(ss_smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5;
  const Lane L(tid & 31);
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H, seg = blockIdx.y + (kQueries ? 1 : 0);
  const HeadRows<T> rows(p, b, h);
  const T* xg = kQueries ? rows.q : rows.k;
  const int64_t x_sn = kQueries ? p.q_sn : p.k_sn;
  const T* yg = kQueries ? rows.go : rows.v;
  const int64_t y_sn = kQueries ? p.go_sn : p.v_sn;
  const float* ws_inv = (kQueries && p.normalize) ? p.workspace + int64_t(bh) * p.N : nullptr;
  const float* ws_dden = ws_inv ? ws_inv + int64_t(p.B) * p.H * p.N : nullptr;
  const float sqrt_c = sqrtf(p.scale), c1 = p.scale;
  const PackedGate packed = packed_gate(sqrt_c);

  StateFrag s = {};
  if (tid < BCfg::kF) sm.z[tid] = 0.f;
  const PhiTile tphi{saddr(sm.phi)};
  const RowTile<BCfg::kVP> tdn[2] = {{saddr(sm.dnum[0])}, {saddr(sm.dnum[kQueries ? 1 : 0])}};

  auto loads = [&](int c) {
    const int64_t t0 = int64_t(c) * BCfg::kChunk;
    const int n_valid = int(min(int64_t(BCfg::kChunk), int64_t(p.N) - t0));
    load_rows<16>(sm.x[c & 1], xg, x_sn, t0, n_valid, xg, tid);
    load_rows<64>(sm.y[c & 1], yg, y_sn, t0, n_valid, xg, tid);
    cp_async_commit();
  };

  int c_begin, c_end;
  segment_chunks(sg, seg, p.N, c_begin, c_end);
  if (c_begin < c_end) loads(c_begin);
  for (int c = c_begin; c < c_end; ++c) {
    const int64_t t0 = int64_t(c) * BCfg::kChunk;
    const int n_valid = int(min(int64_t(BCfg::kChunk), int64_t(p.N) - t0)), buf = c & 1;
    cp_async_wait<0>();
    __syncthreads();  // chunk c's tiles; chunk c - 1's readers (phi, dnum, dden, the other buffers) are done
    if (c + 1 < c_end) loads(c + 1);
    if constexpr (kQueries) {  // as the backward sweep's phase 0
      if (tid < BCfg::kChunk) sm.dden[tid] = (ws_dden && tid < n_valid) ? ws_dden[t0 + tid] : 0.f;
      build_dnum(sm.dnum, sm.y[buf], ws_inv, t0, n_valid, tid);
      phi_tile(sm.x[buf], tphi.base, BCfg::kChunk, sqrt_c, packed, tid);
    } else {  // as the forward sweep's phase 1 (padding keys: all features 0)
      phi_tile(sm.x[buf], tphi.base, n_valid, sqrt_c, packed, tid);
    }
    __syncthreads();
    if constexpr (kQueries) outer_update<T>(s, tphi, tdn, warp, L);
    else outer_update<T, 1>(s, tphi, {RowTile<BCfg::kVP>{saddr(sm.y[buf])}}, warp, L);
    if (warp == 8) {
      if constexpr (kQueries) chunk_moments<T, true>(saddr(sm.x[buf]), sm.dden, 0.f, sm.mom, L);
      else chunk_moments<T, false>(saddr(sm.x[buf]), nullptr, float(n_valid), sm.mom, L);
      add_moments(sm.z, sm.z, sm.mom, sqrt_c, c1, tid & 31);  // in place: lane f reads and writes only z[f]
    }
  }
  __syncthreads();  // warp 8's z
  float* out = sg.slot(bh, blockIdx.y);
  store_state(s, out, warp, L);
  if (tid < BCfg::kF) out[kSlotZ + tid] = sm.z[tid];
}

}  // namespace
}  // namespace attn_kernels
