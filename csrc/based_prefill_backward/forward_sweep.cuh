// based_prefill_backward, part of based_prefill_backward.cu (included there only): the forward sweep. One CTA
// per (b, h) walks the chunks in time order from (S0, z0); per chunk:
//   phase 1: phi(K) into its tile; warp w's causal block (m, kt): s = c Q_m K_kt^T and P' = G_m V_kt^T
//     (G = grad_o), kept in registers, with the rows' partial sums of A and of A * P'; g' = G S^T of the
//     warp's 16 features (state before the chunk) into a float tile.
//   phase 2: per token (warps 0-7, 4 threads each, tiles.cuh's token_part): den = sum A + phi(q).z,
//     dot = sum A * P' + phi(q).g', so inv = 1 / (den + eps) and dden = -inv^2 dot (dnum . num = inv dot: num is
//     never formed); dq's feature part sqrt(c) phi'(a)^T (inv g' + dden z). Warp 8: z_next = z + phi(K)^T 1 from
//     the keys' moments K^T K, K^T 1 (tiles.cuh's chunk_moments). Every warp: S += phi(K)^T V.
//   phase 3: ds = causal (inv P' + dden)(1 + s) of warp w's block, its dq part ds K.
//   phase 4: dq = c (sum of the row's block parts) + the feature part.
// Numerator only: inv = 1, dden = 0 (den and dot are skipped). Without dq (normalize only: the backward sweep
// needs inv and dden) phases 3 and 4 and the Jacobian are skipped.
#pragma once
#include "tiles.cuh"
#include "token_pass.cuh"

namespace attn_kernels {
namespace {

template <typename T>
struct FsSmem {
  T phik[BCfg::kPhiElems];  // phi(K), phi_off layout
  T q[BCfg::kChunk][BCfg::kQKP], k[BCfg::kChunk][BCfg::kQKP];
  T v[BCfg::kChunk][BCfg::kVP], go[BCfg::kChunk][BCfg::kVP];
  float gpt[BCfg::kF][BCfg::kTP];      // g'^T = S G^T (feature rows)
  float dqp[BCfg::kWarps][16][BCfg::kRP];  // ds K of each causal block (query rows, components)
  float dqi[BCfg::kChunk][BCfg::kRP];      // dq's feature part, times sqrt(c)
  float2 dd[4][BCfg::kChunk];               // per quarter of the features: phi(q).z, phi(q).g'
  float z[2][BCfg::kF];               // z before the chunk, and after it
  MomentTile mom;                     // the chunk's keys' moments (warp 8)
  float rsp[BCfg::kChunk][4], dpp[BCfg::kChunk][4];  // per query and key block: sum A, sum A * P'
  float inv[BCfg::kChunk], dden[BCfg::kChunk];
};

template <typename T>
__global__ void __launch_bounds__(BCfg::kThreads, 1)
    based_prefill_backward_forward_sweep(const BasedPrefillBackwardParams p, const SegmentArgs sg) {
  constexpr bool kSplit = std::is_same_v<T, __half>;
  extern __shared__ float4 fs_smem_raw[];
  FsSmem<T>& sm = *reinterpret_cast<FsSmem<T>*>(fs_smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5;
  const Lane L(tid & 31);
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H, seg = blockIdx.y;
  const HeadRows<T> rows(p, b, h);
  const T *qg = rows.q, *kg = rows.k, *vg = rows.v, *gog = rows.go;
  T* dqg = rows.dq;
  const int64_t tokens = int64_t(p.B) * p.H * p.N;
  // inv, dden for the backward sweep (where it runs: else the workspace holds only the split's sums, if any)
  float* ws_inv = (p.normalize && backward_sweep_runs(p)) ? p.workspace + int64_t(bh) * p.N : nullptr;
  float* ws_dden = ws_inv ? ws_inv + tokens : nullptr;
  const float sqrt_c = sqrtf(p.scale), c1 = p.scale;
  const PackedGate packed = packed_gate(sqrt_c);  // feature_map.cuh's packed path
  const bool need_dq = dqg != nullptr, norm = p.normalize;

  // Segment seg starts from S0 + the key sums of segments 0..seg-1 (key_sums' prefix slot).
  const float* carry = (seg > 0 && !AK_MUTANT(bwd_split_forward_carry)) ? sg.slot(bh, seg - 1) : nullptr;
  StateFrag s;
  start_state(s, sm.z[0], p.S0, p.z0, carry, bh, warp, L, tid);

  int m, kt;  // this warp's causal block
  intra_block(warp, m, kt);
  const RowTile<BCfg::kQKP> tq{saddr(sm.q)}, tk{saddr(sm.k)};
  const RowTile<BCfg::kVP> tv{saddr(sm.v)}, tgo{saddr(sm.go)};
  const PhiTile tphik{saddr(sm.phik)};

  auto loads = [&](int c, bool qvg, bool k) {  // chunk c's tiles (q, v, grad_o and / or k)
    const int64_t t0 = int64_t(c) * BCfg::kChunk;
    const int n_valid = int(min(int64_t(BCfg::kChunk), int64_t(p.N) - t0));
    if (qvg) {
      load_rows<16>(sm.q, qg, p.q_sn, t0, n_valid, qg, tid);
      load_rows<64>(sm.v, vg, p.v_sn, t0, n_valid, qg, tid);
      load_rows<64>(sm.go, gog, p.go_sn, t0, n_valid, qg, tid);
    }
    if (k) load_rows<16>(sm.k, kg, p.k_sn, t0, n_valid, qg, tid);
    cp_async_commit();
  };

  int c_begin, c_end;
  segment_chunks(sg, seg, p.N, c_begin, c_end);
  if (c_begin < c_end) loads(c_begin, true, true);
  int zb = 0;
  for (int c = c_begin; c < c_end; ++c) {
    const int64_t t0 = int64_t(c) * BCfg::kChunk;
    const int n_valid = int(min(int64_t(BCfg::kChunk), int64_t(p.N) - t0));
    cp_async_wait<0>();
    __syncthreads();  // the chunk's tiles; the previous chunk's readers are done

    // ---- phase 1 ----
    phi_tile(sm.k, tphik.base, n_valid, sqrt_c, packed, tid);  // padding keys: all features 0
    float sc[2][4] = {}, pp[2][4] = {};  // s and P' of block (m, kt): rows 16m + g (+8), columns 16kt + 8i + 2t
    {
      uint32_t a[4], bb[4];
      a_frag(a, tq, 16 * m, 0, L);
      b_frag2(bb, tk, 16 * kt, 0, L);
      mma_16816<T>(sc[0], a, bb[0], bb[1]);
      mma_16816<T>(sc[1], a, bb[2], bb[3]);
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        a_frag(a, tgo, 16 * m, 16 * ks, L);
        b_frag2(bb, tv, 16 * kt, 16 * ks, L);
        mma_16816<T>(pp[0], a, bb[0], bb[1]);
        mma_16816<T>(pp[1], a, bb[2], bb[3]);
      }
      float rs[2] = {0.f, 0.f}, dp[2] = {0.f, 0.f};  // rows g, g + 8
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = 16 * m + L.g + 8 * (e >> 1), j = 16 * kt + 8 * i + 2 * L.t + (e & 1);
          sc[i][e] *= c1;
          const float A = causal(j, r) ? taylor(sc[i][e]) : 0.f;
          rs[e >> 1] += A;
          dp[e >> 1] = fmaf(A, pp[i][e], dp[e >> 1]);
        }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        rs[hf] = quad_sum(rs[hf]);
        dp[hf] = quad_sum(dp[hf]);
      }
      if (L.t == 0) {
        sm.rsp[16 * m + L.g][kt] = rs[0];
        sm.rsp[16 * m + L.g + 8][kt] = rs[1];
        sm.dpp[16 * m + L.g][kt] = dp[0];
        sm.dpp[16 * m + L.g + 8][kt] = dp[1];
      }
    }
    if (need_dq || norm) {  // g'^T = S G^T for this warp's features (m16 tiles: features x tokens)
      uint32_t ah[4][4], al[4][4];
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) state_a<kSplit>(s, ks, ah[ks], al[ks]);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        float acc[2][4] = {};
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
          uint32_t bb[4];
          b_frag2(bb, tgo, 16 * np, 16 * ks, L);
          mma_state<T>(acc[0], ah[ks], al[ks], bb[0], bb[1]);
          mma_state<T>(acc[1], ah[ks], al[ks], bb[2], bb[3]);
        }
        store_c2(sm.gpt, 16 * warp, 16 * np, acc, L);
      }
    }
    __syncthreads();

    // ---- phase 2 ----
    if (tid < BCfg::kTokenThreads) {
      const int part = token_part(warp), r = token_row(warp, tid & 31);
      float x[16];
      load_scaled_row(sm.q[r], sqrt_c, x);
      const float* zr = sm.z[zb];
      auto gr = [&](int f) { return sm.gpt[f][r]; };
      float inv = 1.f, dden = 0.f;
      if (norm) {
        float den = 0.f, dot = 0.f;
        with_part(part, [&](auto P) {
          phi_dots<decltype(P)::value>(x, gr, [&](int f) { return zr[f]; }, den, dot);
        });
        sm.dd[part][r] = make_float2(den, dot);
        token_barrier();
        den = dot = 0.f;
        for (int j = 0; j < 4; ++j) {  // the quarters, then the causal blocks, in order
          den += sm.dd[j][r].x;
          dot += sm.dd[j][r].y;
        }
        for (int j = 0; j <= (r >> 4); ++j) {
          den += sm.rsp[r][j];
          dot += sm.dpp[r][j];
        }
        inv = r < n_valid ? 1.f / (den + p.eps) : 0.f;  // padding rows: dnum = dden = 0
        dden = AK_MUTANT(bwd_dden_dropped) ? 0.f : -inv * inv * dot;
      }
      if (part == 0) {
        sm.inv[r] = inv;
        sm.dden[r] = dden;
        if (ws_inv && r < n_valid) {
          ws_inv[t0 + r] = inv;
          ws_dden[t0 + r] = dden;
        }
      }
      if (need_dq) {
        float jac[4];
        with_part(part, [&](auto P) {
          phi_vjp4<decltype(P)::value>(x, [&](int f) { return fmaf(inv, gr(f), dden * zr[f]); }, jac);
        });
        *reinterpret_cast<float4*>(&sm.dqi[r][4 * part]) =
            make_float4(sqrt_c * jac[0], sqrt_c * jac[1], sqrt_c * jac[2], sqrt_c * jac[3]);
      }
    } else if (warp == 8 && c + 1 < c_end) {  // z after the chunk, from its keys' moments (padding keys: 0)
      if (!AK_MUTANT(bwd_forward_state_frozen)) {
        chunk_moments<T, false>(tk.base, nullptr, float(n_valid), sm.mom, L);
        add_moments(sm.z[zb ^ 1], sm.z[zb], sm.mom, sqrt_c, c1, tid & 31);
      } else {
        for (int f = tid & 31; f < BCfg::kF; f += 32) sm.z[zb ^ 1][f] = sm.z[zb][f];
      }
    }
    if (c + 1 < c_end && !AK_MUTANT(bwd_forward_state_frozen))
      outer_update<T, 1>(s, tphik, {tv}, warp, L);  // S += phi(K)^T V (this warp's features)
    __syncthreads();  // inv, dden, the feature part of dq; every read of q, v, grad_o, phi(K) is done
    if (c + 1 < c_end) loads(c + 1, true, !need_dq);
    if (!need_dq) {
      zb ^= 1;
      continue;
    }

    // ---- phase 3: ds of this warp's block, its part of dq ----
    {
      float ds[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = 16 * m + L.g + 8 * (e >> 1), j = 16 * kt + 8 * i + 2 * L.t + (e & 1);
          ds[i][e] = causal(j, r) ? fmaf(sm.inv[r], pp[i][e], sm.dden[r]) * (1.f + sc[i][e]) : 0.f;
        }
      uint32_t a[4], bb[4];
      c_to_a<T>(ds[0], ds[1], a);
      b_frag2_t(bb, tk, 16 * kt, 0, L);
      float d[2][4] = {};
      mma_16816<T>(d[0], a, bb[0], bb[1]);
      mma_16816<T>(d[1], a, bb[2], bb[3]);
      store_c2(sm.dqp[warp], 0, 0, d, L);
    }
    __syncthreads();
    if (c + 1 < c_end) loads(c + 1, false, true);

    // ---- phase 4: dq = c (the row's block parts, key blocks in order) + the feature part ----
    if (tid < BCfg::kTokenThreads) {
      const int part = token_part(warp), r = token_row(warp, tid & 31), mr = r >> 4;
      float4 intra = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int j = 0; j <= mr; ++j) {
        const float4 x = *reinterpret_cast<const float4*>(&sm.dqp[block_index(mr, j)][r & 15][4 * part]);
        intra = make_float4(intra.x + x.x, intra.y + x.y, intra.z + x.z, intra.w + x.w);
      }
      const float4 fp = *reinterpret_cast<const float4*>(&sm.dqi[r][4 * part]);
      const float jac[4] = {fp.x, fp.y, fp.z, fp.w};
      if (r < n_valid) store_grad4(dqg + (t0 + r) * p.dq_sn + 4 * part, c1, intra, 1.f, jac);
    }
    zb ^= 1;
  }
}

}  // namespace
}  // namespace attn_kernels
