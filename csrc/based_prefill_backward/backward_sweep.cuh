// based_prefill_backward, part of based_prefill_backward.cu (included there only): the backward sweep. One CTA
// per (b, h) walks the chunks last to first from (grad_S, grad_z); dS, dz are the gradients that the later
// chunks' queries send back through the state. Per chunk (the causal blocks transposed: key rows):
//   phase 0: dnum = grad_o * inv (inv, dden from the forward sweep's workspace) as T hi + lo into two tiles;
//     phi(Q), and for dv phi(K), into their tiles.
//   phase 1: warp w's block (key block kt, query block m): s^T = c K_kt Q_m^T, P^T = V_kt dnum_m^T, so
//     A^T = causal(1 + s + s^2/2) (kept in a tile for dv) and ds^T = causal (P^T + dden)(1 + s^T), its part
//     ds^T Q of dk; gk^T = dS V^T + dz of the warp's 16 features (dS, dz before this chunk's update) into a
//     float tile;
//     dS += phi(Q)^T dnum; warps 0-7, dv = phi(K) dS (keys 16(w/2).., values 32(w%2)..) against the copy of dS
//     before the update (the stash: bf16, fp16 inputs hi + lo); warp 8, dz_next = dz + phi(Q)^T dden from the
//     queries' moments Q^T diag(dden) Q, Q^T dden (tiles.cuh's chunk_moments: diag(dden) Q as bf16 hi + lo).
//   phase 2: warps 0-7 add A^T dnum of their key block's rows and store dv; per key (4 threads each, tiles.cuh's
//     token_part) dk = c (the column's block parts) + sqrt(c) phi'(a)^T gk; the updated dS into the stash.
// After the first chunk, dS, dz are dS0, dz0.
// dnum meets the tensor cores as hi + lo (2 mma per product: P^T, dS, A^T dnum), and dS in gk = dS V^T as bf16
// hi + lo for bf16 inputs too: one rounding of dnum (of dS) made the kernel's error on dS0 (float32) and on dk of
// a chunk's last keys (P^T = V dnum^T and dS V^T cancel) as large as the input-dtype comparator's, whose double
// is the tests' bound (tests/bwd_emulation.py; perf/notes/based_prefill_backward.md).
#pragma once
#include "tiles.cuh"
#include "token_pass.cuh"

namespace attn_kernels {
namespace {

template <typename T>
struct BsSmem {
  static constexpr int kParts = std::is_same_v<T, __half> ? 2 : 1;  // bf16 hi [, lo] of the state products
  T phiq[BCfg::kPhiElems];                  // phi(Q), phi_off layout
  bf16 phik[kParts][BCfg::kPhiElems];       // phi(K) (hi, lo: lo right after hi, as feature_map.cuh writes it)
  bf16 stash[kParts][BCfg::kF][BCfg::kVP];  // dS of the later chunks (feature rows)
  T q[BCfg::kChunk][BCfg::kQKP];
  T k[2][BCfg::kChunk][BCfg::kQKP];  // chunk c in k[c & 1]: phase 2 reads it while the next chunk's loads
  T v[BCfg::kChunk][BCfg::kVP], go[BCfg::kChunk][BCfg::kVP];
  T dnum[2][BCfg::kChunk][BCfg::kVP];  // hi, lo = fl(dnum - hi)
  T at[BCfg::kWarps][16][BCfg::kQKP];  // A^T of each causal block (key rows, query columns)
  float gpt[BCfg::kF][BCfg::kTP];          // gk^T = dS V^T (feature rows)
  float dkp[BCfg::kWarps][16][BCfg::kRP];  // ds^T Q of each causal block
  float dz[2][BCfg::kF];              // dz of the later chunks, and with this chunk's queries
  MomentTile mom;                     // the chunk's queries' moments (warp 8)
  alignas(8) float dden[BCfg::kChunk];
};

// phi(Q) feature groups G0..G0+3 of row r, and with_k, phi(K)'s (fp16 inputs: bf16 hi + lo from float).
// Padding keys keep the constant feature: their dv rows are never stored.
template <typename T, int G0>
__device__ __forceinline__ void phi_groups(const T* q_row, const T* k_row, uint32_t phiq, uint32_t phik, int r,
                                           float sqrt_c, const PackedGate& packed, bool with_k) {
  build_phi_row<T, G0, 4>(q_row, PhiRowDst(phiq, r), sqrt_c, 1.f, packed);
  if (with_k) {
    if constexpr (std::is_same_v<T, __half>) {
      float x[16];
      load_scaled_row(k_row, sqrt_c, x);
      store_groups_split(PhiRowDst(phik, r), x, std::integer_sequence<int, G0, G0 + 1, G0 + 2, G0 + 3>{});
    } else {
      build_phi_row<T, G0, 4>(k_row, PhiRowDst(phik, r), sqrt_c, 1.f, packed);
    }
  }
}

template <int kParts>
__device__ __forceinline__ void write_stash(bf16 (&stash)[kParts][BCfg::kF][BCfg::kVP], const StateFrag& s,
                                            int warp, const Lane& L) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int f = 16 * warp + L.g + 8 * hf, v = 8 * n + 2 * L.t;
      uint32_t hi, lo;
      if constexpr (kParts == 2) {
        split_bf16x2(s[n][2 * hf], s[n][2 * hf + 1], hi, lo);
        *reinterpret_cast<uint32_t*>(&stash[1][f][v]) = lo;
      } else {
        hi = pack2<bf16>(s[n][2 * hf], s[n][2 * hf + 1]);
      }
      *reinterpret_cast<uint32_t*>(&stash[0][f][v]) = hi;
    }
}

template <typename T>
__global__ void __launch_bounds__(BCfg::kThreads, 1)
    based_prefill_backward_backward_sweep(const BasedPrefillBackwardParams p, const SegmentArgs sg) {
  constexpr bool kSplit = std::is_same_v<T, __half>;
  constexpr int kParts = BsSmem<T>::kParts;
  extern __shared__ float4 bs_smem_raw[];
  BsSmem<T>& sm = *reinterpret_cast<BsSmem<T>*>(bs_smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5;
  const Lane L(tid & 31);
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H, seg = blockIdx.y;
  const HeadRows<T> rows(p, b, h);
  const T *qg = rows.q, *kg = rows.k, *vg = rows.v, *gog = rows.go;
  T *dkg = rows.dk, *dvg = rows.dv;
  const int64_t tokens = int64_t(p.B) * p.H * p.N;
  const float* ws_inv = p.normalize ? p.workspace + int64_t(bh) * p.N : nullptr;
  const float* ws_dden = ws_inv ? ws_inv + tokens : nullptr;
  const float sqrt_c = sqrtf(p.scale), c1 = p.scale;
  const PackedGate packed = packed_gate(sqrt_c);
  const bool need_dk = dkg != nullptr, need_dv = dvg != nullptr;
  if (seg > 0 && !need_dk && !need_dv) return;  // only dS0 / dz0 needed: segment 0 gets them from the query sums

  // Segment seg starts from grad_S + the query sums of segments seg+1.. (query_sums' suffix slot).
  const float* carry =
      (seg + 1 < sg.nseg && !AK_MUTANT(bwd_split_backward_carry)) ? sg.slot(bh, seg) : nullptr;
  StateFrag ds;
  start_state(ds, sm.dz[0], AK_MUTANT(bwd_grad_state_ignored) ? nullptr : p.grad_S, p.grad_z, carry, bh, warp, L,
              tid);
  write_stash(sm.stash, ds, warp, L);

  int m, kt;  // this warp's causal block
  intra_block(warp, m, kt);
  const int kb = warp >> 1, vh = warp & 1;  // warps 0-7: the dv tile (keys 16kb.., values 32vh..)
  const RowTile<BCfg::kQKP> tq{saddr(sm.q)};
  const RowTile<BCfg::kVP> tv{saddr(sm.v)}, tdn[2] = {{saddr(sm.dnum[0])}, {saddr(sm.dnum[1])}};
  const RowTile<BCfg::kVP> tst[2] = {{saddr(sm.stash[0])}, {saddr(sm.stash[kParts - 1])}};
  const PhiTile tphiq{saddr(sm.phiq)}, tphik[2] = {{saddr(sm.phik[0])}, {saddr(sm.phik[kParts - 1])}};

  auto loads = [&](int c, bool go, bool qkv) {
    const int64_t t0 = int64_t(c) * BCfg::kChunk;
    const int n_valid = int(min(int64_t(BCfg::kChunk), int64_t(p.N) - t0));
    if (go) load_rows<64>(sm.go, gog, p.go_sn, t0, n_valid, qg, tid);
    if (qkv) {
      load_rows<16>(sm.q, qg, p.q_sn, t0, n_valid, qg, tid);
      load_rows<16>(sm.k[c & 1], kg, p.k_sn, t0, n_valid, qg, tid);
      load_rows<64>(sm.v, vg, p.v_sn, t0, n_valid, qg, tid);
    }
    cp_async_commit();
  };

  int c_begin, c_end;
  segment_chunks(sg, seg, p.N, c_begin, c_end);
  if (c_begin < c_end) loads(c_end - 1, true, true);
  int zb = 0;
  for (int c = c_end - 1; c >= c_begin; --c) {
    const int64_t t0 = int64_t(c) * BCfg::kChunk;
    const int n_valid = int(min(int64_t(BCfg::kChunk), int64_t(p.N) - t0));
    const auto& kc = sm.k[c & 1];
    const RowTile<BCfg::kQKP> tk{saddr(kc)};
    cp_async_wait<0>();
    __syncthreads();  // the chunk's tiles; the stash; the previous chunk's readers are done

    // ---- phase 0: dden, dnum, phi(Q), phi(K) ----
    if (tid < BCfg::kChunk) sm.dden[tid] = (ws_dden && tid < n_valid) ? ws_dden[t0 + tid] : 0.f;
    build_dnum(sm.dnum, sm.go, ws_inv, t0, n_valid, tid);
    {
      const int r = tid & 63;
      const uint32_t pq = tphiq.base, pk = tphik[0].base;
      switch (tid >> 6) {
        case 0: phi_groups<T, 0>(sm.q[r], kc[r], pq, pk, r, sqrt_c, packed, need_dv); break;
        case 1: phi_groups<T, 4>(sm.q[r], kc[r], pq, pk, r, sqrt_c, packed, need_dv); break;
        case 2: phi_groups<T, 8>(sm.q[r], kc[r], pq, pk, r, sqrt_c, packed, need_dv); break;
        case 3: phi_groups<T, 12>(sm.q[r], kc[r], pq, pk, r, sqrt_c, packed, need_dv); break;
        default: phi_groups<T, 16>(sm.q[r], kc[r], pq, pk, r, sqrt_c, packed, need_dv); break;
      }
    }
    __syncthreads();
    if (c > c_begin) loads(c - 1, true, false);  // grad_o's tile was read in phase 0 only

    // ---- phase 1 ----
    if (need_dk || need_dv) {  // block (m, kt) transposed: key rows 16kt + g (+8), query columns 16m + 8i + 2t
      float st[2][4] = {}, pt[2][4] = {};
      uint32_t a[4], bb[4];
      a_frag(a, tk, 16 * kt, 0, L);
      b_frag2(bb, tq, 16 * m, 0, L);
      mma_16816<T>(st[0], a, bb[0], bb[1]);
      mma_16816<T>(st[1], a, bb[2], bb[3]);
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        a_frag(a, tv, 16 * kt, 16 * ks, L);
#pragma unroll
        for (int part = 0; part < 2; ++part) {
          b_frag2(bb, tdn[part], 16 * m, 16 * ks, L);
          mma_16816<T>(pt[0], a, bb[0], bb[1]);
          mma_16816<T>(pt[1], a, bb[2], bb[3]);
        }
      }
      float dst[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = 16 * kt + L.g + 8 * (e >> 1), r = 16 * m + 8 * i + 2 * L.t + (e & 1);
          const float sv = c1 * st[i][e];
          const bool ok = causal(j, r);
          st[i][e] = ok ? taylor(sv) : 0.f;  // A^T
          dst[i][e] = ok ? (pt[i][e] + sm.dden[r]) * (1.f + sv) : 0.f;
        }
      if (need_dv) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
            *reinterpret_cast<uint32_t*>(&sm.at[warp][L.g + 8 * hf][8 * i + 2 * L.t]) =
                pack2<T>(st[i][2 * hf], st[i][2 * hf + 1]);
      }
      if (need_dk) {
        c_to_a<T>(dst[0], dst[1], a);
        b_frag2_t(bb, tq, 16 * m, 0, L);
        float d[2][4] = {};
        mma_16816<T>(d[0], a, bb[0], bb[1]);
        mma_16816<T>(d[1], a, bb[2], bb[3]);
        store_c2(sm.dkp[warp], 0, 0, d, L);
      }
    }
    if (need_dk) {  // gk^T = dS V^T + dz for this warp's features (m16 tiles: features x keys); dS as bf16 hi + lo
      const float zf[2] = {sm.dz[zb][16 * warp + L.g], sm.dz[zb][16 * warp + L.g + 8]};  // dz of the later chunks
      uint32_t ah[4][4], al[4][4];
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) state_a<true>(ds, ks, ah[ks], al[ks]);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        float acc[2][4] = {};
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
          uint32_t bb[4];
          b_frag2(bb, tv, 16 * np, 16 * ks, L);
          mma_state<T, true>(acc[0], ah[ks], al[ks], bb[0], bb[1]);
          mma_state<T, true>(acc[1], ah[ks], al[ks], bb[2], bb[3]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
            *reinterpret_cast<float2*>(&sm.gpt[16 * warp + L.g + 8 * hf][16 * np + 8 * i + 2 * L.t]) =
                make_float2(acc[i][2 * hf] + zf[hf], acc[i][2 * hf + 1] + zf[hf]);
      }
    }
    if (!AK_MUTANT(bwd_dstate_frozen)) outer_update<T>(ds, tphiq, tdn, warp, L);  // dS += phi(Q)^T dnum
    if (warp == 8) {  // dz += phi(Q)^T dden from the queries' dden-weighted moments (while warps 0-7 run dv)
      if (!AK_MUTANT(bwd_dstate_frozen)) {
        chunk_moments<T, true>(tq.base, sm.dden, 0.f, sm.mom, L);
        add_moments(sm.dz[zb ^ 1], sm.dz[zb], sm.mom, sqrt_c, c1, tid & 31);
      } else {
        for (int f = tid & 31; f < BCfg::kF; f += 32) sm.dz[zb ^ 1][f] = sm.dz[zb][f];
      }
    }
    float dv[4][4] = {};  // warps 0-7: keys 16kb + g (+8), values 32vh + 8i + 2t
    if (need_dv && warp < 8) {  // phi(K) dS against the stash, features in order (unrolled: ldmatrix ahead)
#pragma unroll
      for (int ks = 0; ks < BCfg::kF / 16; ++ks) {
        uint32_t ah[4], al[4];
        a_frag(ah, tphik[0], 16 * kb, 16 * ks, L);
        if constexpr (kSplit) a_frag(al, tphik[1], 16 * kb, 16 * ks, L);
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          uint32_t bh_[4], bl_[4];
          b_frag2_t(bh_, tst[0], 16 * ks, 32 * vh + 16 * np, L);
          mma_16816<bf16>(dv[2 * np], ah, bh_[0], bh_[1]);
          mma_16816<bf16>(dv[2 * np + 1], ah, bh_[2], bh_[3]);
          if constexpr (kSplit) {
            b_frag2_t(bl_, tst[1], 16 * ks, 32 * vh + 16 * np, L);
            mma_16816<bf16>(dv[2 * np], ah, bl_[0], bl_[1]);
            mma_16816<bf16>(dv[2 * np + 1], ah, bl_[2], bl_[3]);
            mma_16816<bf16>(dv[2 * np], al, bh_[0], bh_[1]);
            mma_16816<bf16>(dv[2 * np + 1], al, bh_[2], bh_[3]);
          }
        }
      }
    }
    __syncthreads();  // A^T, ds^T Q, gk, dz_next; every read of the stash, q, v is done
    if (c > c_begin) loads(c - 1, false, true);

    // ---- phase 2 ----
    if (need_dv && warp < 8) {  // + A^T dnum over the query blocks m >= kb, in order; store dv
      for (int m2 = kb; m2 < 4; ++m2) {
        uint32_t a[4];
        a_frag(a, RowTile<BCfg::kQKP>{saddr(sm.at[block_index(m2, kb)])}, 0, 0, L);
#pragma unroll
        for (int np = 0; np < 2; ++np)
#pragma unroll
          for (int part = 0; part < 2; ++part) {
            uint32_t bb[4];
            b_frag2_t(bb, tdn[part], 16 * m2, 32 * vh + 16 * np, L);
            mma_16816<T>(dv[2 * np], a, bb[0], bb[1]);
            mma_16816<T>(dv[2 * np + 1], a, bb[2], bb[3]);
          }
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int key = 16 * kb + L.g + 8 * hf;
        if (key < n_valid) {
          T* row = dvg + (t0 + key) * p.dv_sn + 32 * vh + 2 * L.t;
#pragma unroll
          for (int i = 0; i < 4; ++i)
            *reinterpret_cast<uint32_t*>(row + 8 * i) = pack2<T>(dv[i][2 * hf], dv[i][2 * hf + 1]);
        }
      }
    }
    if (need_dk && tid < BCfg::kTokenThreads) {  // dk = c (column's block parts, m in order) + feature part
      const int part = token_part(warp), r = token_row(warp, tid & 31), kr = r >> 4;
      float4 intra = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int m2 = kr; m2 < 4; ++m2) {
        const float4 x = *reinterpret_cast<const float4*>(&sm.dkp[block_index(m2, kr)][r & 15][4 * part]);
        intra = make_float4(intra.x + x.x, intra.y + x.y, intra.z + x.z, intra.w + x.w);
      }
      float xk[16], jac[4];
      load_scaled_row(kc[r], sqrt_c, xk);
      with_part(part, [&](auto P) { phi_vjp4<decltype(P)::value>(xk, [&](int f) { return sm.gpt[f][r]; }, jac); });
      if (r < n_valid) store_grad4(dkg + (t0 + r) * p.dk_sn + 4 * part, c1, intra, sqrt_c, jac);
    }
    write_stash(sm.stash, ds, warp, L);  // its readers (dv above) finished before the barrier
    zb ^= 1;
  }
  if (seg > 0) return;  // dS0, dz0: what segment 0 holds after the first chunk
  if (p.dS0) store_state(ds, p.dS0 + int64_t(bh) * kCompactFeatures * kValueDim, warp, L);
  if (p.dz0 && tid < kCompactFeatures) p.dz0[int64_t(bh) * kCompactFeatures + tid] = sm.dz[zb][tid];
}

}  // namespace
}  // namespace attn_kernels
