// based_prefill, part of based_prefill.cu (included there only): the kernel. based_prefill_kernel walks one
// (b, h, segment) chunk by chunk (the phases are the overview's of based_prefill.cu); common/slot_scan.cuh's
// kernel turns the segments' partial states into prefix sums (split sequences only).
//
// The chunk loop reads top to bottom: phase 1 calls the feature map (feature_map.cuh) and the W builder
// (intra_chunk.cuh); the epilogue is epilogue.cuh's; the other phases are named lambdas of the kernel body
// (den_inter_of_chunk, update_moments, products; write_state after the loop). Lambdas, not __forceinline__
// functions with parameters: written as functions, those phases cost a register (pass 1 217 -> 218;
// -Xptxas -v), while the W builder and the epilogue as functions cost none.
#pragma once
#include <cstddef>

#include <cute/tensor.hpp>

#include "../common/convert.h"
#include "../common/feature_order.h"
#include "../common/ptx.h"
#include "based_prefill.h"
#include "config.cuh"
#include "feature_map.cuh"
#include "fragments.cuh"
#include "epilogue.cuh"
#include "intra_chunk.cuh"
#include "sequences.cuh"

namespace attn_kernels {
namespace {

template <typename T, bool kStateOnly>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kCtasPerSm)
    based_prefill_kernel(const BasedPrefillParams p, const int nseg, const int seg_chunks, const int32_t* order) {
  using namespace cute;
  using A = Atoms<T>;
  constexpr bool kSplit = Smem<T>::kSplit;
  static_assert(offsetof(Smem<T>, q) % 1024 == 0, "every wgmma tile starts 1 KB-aligned");
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_s = saddr(smem_raw);
  Smem<T>& sm = *reinterpret_cast<Smem<T>*>(smem_raw + ((1024u - (raw_s & 1023u)) & 1023u));
  const uint32_t s_phiq = saddr(sm.phiq), s_phik = saddr(sm.phik), s_w = saddr(sm.w);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;    // mma fragment coordinates
  const int lj = lane >> 3, lr = lane & 7;  // ldmatrix / stmatrix: which 8x8 matrix, which row of it
  const CtaRows rows = cta_rows(p, order);  // varlen: this CTA's sequence, longest first
  const int b = rows.b, h = rows.h, bh = b * p.H + h, seg = blockIdx.y;

  // Tokens [t_begin, t_end) of the sequence (an empty range where a varlen sequence ends before seg).
  const int64_t t_begin = int64_t(seg) * seg_chunks * Cfg::kChunk;
  const int64_t t_end = max(t_begin, min(rows.len, t_begin + int64_t(seg_chunks) * Cfg::kChunk));
  const int nchunks = AK_MUTANT(prefill_tail_dropped) ? int((t_end - t_begin) / Cfg::kChunk)
                                                     : int((t_end - t_begin + Cfg::kChunk - 1) / Cfg::kChunk);

  // Varlen: the launcher zeroes the batch strides (one packed batch entry) and rows.row0 is the start.
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + rows.row0 * p.q_sn;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + rows.row0 * p.k_sn;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + rows.row0 * p.v_sn;
  const int64_t o_row0 = AK_MUTANT(prefill_varlen_out_row) ? 0 : rows.row0;
  T* og = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh + o_row0 * p.o_sn;
  float* ws = static_cast<float*>(p.workspace);
  const float sqrt_c = sqrtf(p.scale), c1 = p.scale;
  const float c2 = (AK_MUTANT(prefill_quad_scale) ? 1.f : 0.5f) * p.scale * p.scale;
  const float c1k = AK_MUTANT(prefill_den_inter_ks) ? 0.f : c1;  // c of den_inter's c q.ks term
  const bool den_on = !kStateOnly && p.normalize;
  const PackedGate packed = packed_gate(sqrt_c);

  // Running state, laid out as for_each_s / for_each_g say (gm, ksa: warp kZWarp only).
  float s[4 * Cfg::kNT];
  float gm[2][4], ksa[4], cnt;
  {
    const bool s0_used = !kStateOnly && p.S0 && !(AK_MUTANT(prefill_init_ignored_num) && !p.normalize);
    const float* S0 = s0_used ? p.S0 + int64_t(bh) * kCompactFeatures * kValueDim : nullptr;
    const float* z0 = (!kStateOnly && p.z0) ? p.z0 + int64_t(bh) * kCompactFeatures : nullptr;
    const float* prev = (!kStateOnly && seg > 0 && !AK_MUTANT(prefill_split_carry))  // earlier segments'
                            ? ws + (int64_t(bh) * (nseg - 1) + seg - 1) * Cfg::kWsFloats
                            : nullptr;
    // The workspace holds S^T in fragment order: float4 (warp * kNT + n) * 32 + lane is s[4n..4n+3],
    // loaded whole (for_each_s's per-element form would load it as four scalars).
#pragma unroll
    for (int n = 0; n < Cfg::kNT; ++n) {
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (prev) x = reinterpret_cast<const float4*>(prev)[(warp * Cfg::kNT + n) * 32 + lane];
      const float carried[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int f = 8 * n + 2 * t + (e & 1), v = 16 * warp + g + 8 * (e >> 1);
        s[4 * n + e] = ((S0 && f < kCompactFeatures) ? S0[f * kValueDim + v] : 0.f) + carried[e];
      }
    }
    auto z_in = [&](int f) {
      return (z0 ? z0[f] : 0.f) + (prev ? prev[Cfg::kStateFloats + f] : 0.f);
    };
    cnt = z_in(0);
    if (warp == kZWarp) {  // divided, not multiplied by 1/c: 1/c overflows for a subnormal scale
      for_each_g(g, t, [&](int nt, int e, int i, int j) {
        gm[nt][e] = (i == j ? 1.41421356237309515f * z_in(kSquareFeature0 + i)
                            : z_in(quad_feature(min(i, j), max(i, j)))) / p.scale;
      });
#pragma unroll
      for (int e = 0; e < 4; ++e) ksa[e] = z_in(kLinearFeature0 + g + 8 * (e >> 1)) / sqrt_c;
    }
  }
  // G's fragments for the den products (bf16 hi, fp16 inputs also lo) and ks, into buffer `buf`.
  auto publish_g = [&](int buf) {
    uint4 hi, lo;
    if constexpr (kSplit) {
      split_bf16x2(gm[0][0], gm[0][1], hi.x, lo.x);
      split_bf16x2(gm[1][0], gm[1][1], hi.y, lo.y);
      split_bf16x2(gm[0][2], gm[0][3], hi.z, lo.z);
      split_bf16x2(gm[1][2], gm[1][3], hi.w, lo.w);
      sm.gfrag[buf][1][lane] = lo;
    } else {
      hi = make_uint4(pack2<bf16>(gm[0][0], gm[0][1]), pack2<bf16>(gm[1][0], gm[1][1]),
                      pack2<bf16>(gm[0][2], gm[0][3]), pack2<bf16>(gm[1][2], gm[1][3]));
    }
    sm.gfrag[buf][0][lane] = hi;
    if (t == 0) {
      sm.ks[buf][g] = ksa[0];
      sm.ks[buf][g + 8] = ksa[2];
    }
  };
  if (!kStateOnly && warp == kZWarp) publish_g(0);  // chunk 0's barrier publishes it

  // Chunk loads into stage c & 1, zero-filled past t_end. Each thread copies the same rows of
  // every chunk: 16 bytes of q and k (row tid/2) and of v (rows tid/8 + 16i, into V's swizzled
  // tile: + 2 KB per 16 rows); its source pointers advance by one chunk per call, so calls must come
  // in chunk order.
  const int qk_row = tid >> 1, qk_col = 8 * (tid & 1), v_row = tid >> 3, v_col = 8 * (tid & 7);
  const T* qsrc = qg + (t_begin + qk_row) * p.q_sn + qk_col;
  const T* ksrc = kg + (t_begin + qk_row) * p.k_sn + qk_col;
  const T* vsrc = vg + (t_begin + v_row) * p.v_sn + v_col;
  const uint32_t v_dst = saddr(sm.v[0]) + 2 * row128_off(v_row, v_col);
  auto issue_loads = [&](int c) {
    const int st = c & 1;
    const int64_t left = t_end - (t_begin + int64_t(c) * Cfg::kChunk);  // valid rows
    const bool ok = qk_row < left;
    if (!kStateOnly) cp_async16(saddr(&sm.q[st][qk_row][qk_col]), ok ? qsrc : qg, ok);
    cp_async16(saddr(&sm.k[st][qk_row][qk_col]), ok ? ksrc : kg, ok);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool okv = v_row + 16 * i < left;
      cp_async16(v_dst + st * int(sizeof(sm.v[0])) + i * 2048, okv ? vsrc + 16 * i * p.v_sn : vg, okv);
    }
    cp_async_commit();
    qsrc += Cfg::kChunk * p.q_sn;
    ksrc += Cfg::kChunk * p.k_sn;
    vsrc += Cfg::kChunk * p.v_sn;
  };

  // wgmma operands in shared memory (CuTe tensors, for the descriptors).
  Tensor sW = Tiles::tensor<Tiles::W>(sm.w);
  Tensor sPQ = Tiles::tensor<Tiles::PhiQ>(sm.phiq[0]);
  Tensor sPQlo = Tiles::tensor<Tiles::PhiQ>(sm.phiq[kSplit ? 1 : 0]);  // fp16: the lo tile
  Tensor sPK = Tiles::tensor<Tiles::PhiK>(sm.phik);
  uint32_t xa[2 * Cfg::kNT];  // S^T as bf16 A registers: xa[4kb + j] for features 16kb..16kb+15
  float o[32] = {};           // o^T: o[4n + e] = out[token 8n + 2t + (e & 1)][value 16w + g + 8(e >> 1)]

  if (!kStateOnly && !den_on && tid < Cfg::kChunk) sm.inv[tid] = 1.f;  // numerator only: scale 1
  // W's blocks above the diagonal (key block > query block) are never built, but o^T = V^T W^T reads
  // all 64 x 64 of W: they must hold zeros, not whatever an earlier CTA left there (0 * NaN = NaN).
  // Written once: nothing else writes them. The fence of chunk 0's phase 1 covers these stores.
  if constexpr (!kStateOnly) {
    for (int i = tid; i < Cfg::kChunk * 8; i += Cfg::kThreads) {  // 16-byte units: row r, columns c..c+7
      const int r = i >> 3, c = 8 * (i & 7);
      if ((c >> 4) > (r >> 4)) sts128(s_w + 2 * row128_off(r, c), make_uint4(0u, 0u, 0u, 0u));
    }
  }
  // The phases of one chunk (stage st, first token t0) that the loop below runs after phase 1.
  auto den_inter_of_chunk = [&](int st, int64_t t0, const uint32_t(&qd)[4]) {
    // den_inter of this warp's 16 queries with z before the chunk: Y = Q G (fp16: Q and G as bf16
    // hi + lo), then cnt + sum_i q_i (c ks_i + (c^2 / 2) Y_i) over this lane's 4 columns and its quad.
    if (den_on) {
      const uint32_t(&qa)[4] = qd;
      const uint4 gh = sm.gfrag[st][0][lane];
      float y0[4] = {0.f, 0.f, 0.f, 0.f}, y1[4] = {0.f, 0.f, 0.f, 0.f};  // columns 2t, 2t + 8 (+1)
      if constexpr (kSplit) {
        const uint4 gl = sm.gfrag[st][1][lane];
        uint32_t qh[4], ql[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = unpack2<T>(qa[j]);
          split_bf16x2(f.x, f.y, qh[j], ql[j]);
        }
        mma_16816<bf16>(y0, qh, gh.x, gh.y);
        mma_16816<bf16>(y0, qh, gl.x, gl.y);
        mma_16816<bf16>(y0, ql, gh.x, gh.y);
        mma_16816<bf16>(y1, qh, gh.z, gh.w);
        mma_16816<bf16>(y1, qh, gl.z, gl.w);
        mma_16816<bf16>(y1, ql, gh.z, gh.w);
      } else {
        mma_16816<bf16>(y0, qa, gh.x, gh.y);
        mma_16816<bf16>(y1, qa, gh.z, gh.w);
      }
      const float2 ka = *reinterpret_cast<const float2*>(&sm.ks[st][2 * t]);
      const float2 kb = *reinterpret_cast<const float2*>(&sm.ks[st][2 * t + 8]);
      auto part = [&](uint32_t q_lo, uint32_t q_hi, float y00, float y01, float y10, float y11) {
        const float2 a = unpack2<T>(q_lo), b = unpack2<T>(q_hi);
        return (a.x * fmaf(c2, y00, c1k * ka.x) + a.y * fmaf(c2, y01, c1k * ka.y)) +
               (b.x * fmaf(c2, y10, c1k * kb.x) + b.y * fmaf(c2, y11, c1k * kb.y));
      };
      float d0 = part(qa[0], qa[2], y0[0], y0[1], y1[0], y1[1]);  // query 16w + g
      float d1 = part(qa[1], qa[3], y0[2], y0[3], y1[2], y1[3]);  // query 16w + g + 8
      d0 += __shfl_xor_sync(0xffffffffu, d0, 1);
      d1 += __shfl_xor_sync(0xffffffffu, d1, 1);
      d0 += __shfl_xor_sync(0xffffffffu, d0, 2);
      d1 += __shfl_xor_sync(0xffffffffu, d1, 2);
      if (t == 0) {
        const float cnt_c = cnt + float(t0 - t_begin);
        sm.den[16 * warp + g][0] = cnt_c + d0;
        sm.den[16 * warp + g + 8][0] = cnt_c + d1;
      }
    }
  };
  auto update_moments = [&](int c, int st) {
    // G += K^T K, ks += K^T 1 over the chunk (padding rows are zero)
    if (warp == kZWarp && !(AK_MUTANT(prefill_z_last_chunk) && c + 1 == nchunks)) {
      const uint32_t one2 = pack2<T>(1.f, 1.f);
#pragma unroll
      for (int kt = 0; kt < 4; ++kt) {
        uint32_t a[4];  // K^T (rows i, tokens 16kt..): G is symmetric, so also K's B fragments
        ldsm4_t(a, saddr(&sm.k[st][16 * kt + lr + 8 * (lj >> 1)][8 * (lj & 1)]));
        mma_16816<T>(gm[0], a, a[0], a[2]);
        mma_16816<T>(gm[1], a, a[1], a[3]);
        mma_16816<T>(ksa, a, one2, one2);
      }
      if (!kStateOnly) publish_g(st ^ 1);
    }
  };
  auto products = [&](int st) {
    // Phase 2: wgmma products, issued asynchronously; 1/den meanwhile.
    Tensor sV = Tiles::tensor<Tiles::V>(sm.v[st]);

    // 1 / (den + eps) of each query, while the wgmma products run.
    auto den_to_inv = [&]() {
      if (den_on && tid < Cfg::kChunk) {  // slots 4 + kt exist for kt <= m only
        const float4 dw = *reinterpret_cast<const float4*>(&sm.den[tid][4]);
        const int m = tid >> 4;
        float den = sm.den[tid][0] + dw.x;
        if (m >= 1) den += dw.y;
        if (m >= 2) den += dw.z;
        if (m >= 3) den += dw.w;
        sm.inv[tid] = rcp_approx(den + (AK_MUTANT(prefill_eps_dropped) ? 0.f : p.eps));  // den >= 1/2
      }
    };
    auto inter = [&](const auto& sB) {  // o^T += S^T(xa) phi(Q)^T (sB: a phi(Q) tile), 10 k-blocks
#pragma unroll
      for (int kb = 0; kb < Cfg::kF / 16; ++kb)
        wgmma_rs<AtomInter>(&xa[4 * kb], kblock_desc<GM::Major::K, 64>(sB, 0, kb), o,
                            std::make_index_sequence<32>{});
    };

    if constexpr (!kStateOnly) {
      // S^T as the bf16 A operand (the old state: the update below is issued after); fp16: its hi part.
#pragma unroll
      for (int i = 0; i < 2 * Cfg::kNT; ++i) xa[i] = pack2<bf16>(s[2 * i], s[2 * i + 1]);
      fence_regs(xa);
      fence_regs(o);
      fence_regs(s);
      warpgroup_arrive();
#pragma unroll
      for (int kb = 0; kb < Cfg::kChunk / 16; ++kb)  // o^T = V^T W^T (from 0 each chunk)
        wgmma_ss<typename A::Intra>(kblock_desc<GM::Major::MN, 64>(sV, 0, kb),
                                    kblock_desc<GM::Major::K, 64>(sW, 0, kb), o,
                                    kb == 0 ? GM::ScaleOut::Zero : GM::ScaleOut::One,
                                    std::make_index_sequence<32>{});
      inter(sPQ);
      if constexpr (kSplit) inter(sPQlo);  // S_hi phi(Q)_lo
      warpgroup_commit_batch();
      if constexpr (kSplit) {  // S_lo phi(Q)_hi: xa is reused once the hi products are done
        den_to_inv();
        warpgroup_wait<0>();
        fence_regs(xa);
        fence_regs(o);
#pragma unroll
        for (int i = 0; i < 2 * Cfg::kNT; ++i) {
          uint32_t hi;
          split_bf16x2(s[2 * i], s[2 * i + 1], hi, xa[i]);
        }
        fence_regs(xa);
        fence_regs(o);
        warpgroup_arrive();
        inter(sPQ);
        warpgroup_commit_batch();
      }
    } else {
      fence_regs(s);
      warpgroup_arrive();
    }
#pragma unroll
    for (int kb = 0; kb < Cfg::kChunk / 16; ++kb) {  // S^T += V^T phi(K)
      const uint64_t da = kblock_desc<GM::Major::MN, 64>(sV, 0, kb);
      wgmma_ss<typename A::Upd128>(da, kblock_desc<GM::Major::MN, 128>(sPK, 0, kb), s,
                                   GM::ScaleOut::One, std::make_index_sequence<64>{});
      wgmma_ss<typename A::Upd32>(da, kblock_desc<GM::Major::MN, 32>(sPK, 4, kb), s + 64,
                                  GM::ScaleOut::One, std::make_index_sequence<16>{});
    }
    warpgroup_commit_batch();
    if constexpr (!kSplit) den_to_inv();
    warpgroup_wait<0>();
    fence_regs(s);
    if constexpr (AK_MUTANT(prefill_state_bf16)) {
#pragma unroll
      for (int i = 0; i < 4 * Cfg::kNT; ++i) s[i] = __bfloat162float(__float2bfloat16_rn(s[i]));
    }
    if constexpr (!kStateOnly) {
      fence_regs(o);
      fence_regs(xa);
    }
  };
  auto epilogue = [&](int64_t t0) {
    if constexpr (!kStateOnly) store_output_chunk<T>(sm, o, og, t0, t_end, p, b, warp, lane);
  };
  auto write_state = [&]() {
    StateDst dst{nullptr, nullptr, false};
    if constexpr (kStateOnly) {  // this segment's own contribution: S^T in fragment order, z
      float* part = ws + (int64_t(bh) * (nseg - 1) + seg) * Cfg::kWsFloats;
#pragma unroll
      for (int n = 0; n < Cfg::kNT; ++n)
        reinterpret_cast<float4*>(part)[(warp * Cfg::kNT + n) * 32 + lane] =
            make_float4(s[4 * n], s[4 * n + 1], s[4 * n + 2], s[4 * n + 3]);
      dst.z = part + Cfg::kStateFloats;
    } else if (seg == nseg - 1) {  // the final state: returned, into a pool slot, or nowhere
      dst = final_state_dst(p, b, bh);
    }
    auto put = [&](void* base, int i, float x) {  // float32, or a bfloat16 pool
      if (dst.bf16)
        static_cast<bf16*>(base)[i] = __float2bfloat16_rn(x);
      else
        static_cast<float*>(base)[i] = x;
    };
    if (dst.S) {
      for_each_s(warp, g, t, [&](int n, int e, int f, int v) {
        if (f < kCompactFeatures) put(dst.S, f * kValueDim + v, s[4 * n + e]);
      });
    }
    if (dst.z && warp == kZWarp) {
      for_each_g(g, t, [&](int nt, int e, int i, int j) {
        if (i < j) put(dst.z, quad_feature(i, j), p.scale * gm[nt][e]);
        if (i == j) put(dst.z, kSquareFeature0 + i, p.scale * 0.70710678118654752f * gm[nt][e]);
      });
      if (t == 0) {
        put(dst.z, kLinearFeature0 + g, sqrt_c * ksa[0]);
        put(dst.z, kLinearFeature0 + 8 + g, sqrt_c * ksa[2]);
      }
      if (lane == 0) put(dst.z, 0, cnt + float(t_end - t_begin));
      // The workspace copy keeps the zero padding too: the scan sums whole float4s.
      if (kStateOnly && lane < Cfg::kF - kCompactFeatures) put(dst.z, kCompactFeatures + lane, 0.f);
    }
  };

  if (nchunks > 0) issue_loads(0);  // an empty varlen segment leaves no copy in flight at exit
  for (int c = 0; c < nchunks; ++c) {
    const int st = c & 1;
    const int64_t t0 = t_begin + int64_t(c) * Cfg::kChunk;
    if (c + 1 < nchunks) {  // stage (c+1)&1 was last read (wgmma, waited) before the previous end barrier
      issue_loads(c + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    uint32_t qd[4];  // this warp's 16 query rows (den_inter)
    // Phase 1: feature maps and W of the chunk.
    if constexpr (kStateOnly) {
      const int r = tid & 63;
      const PhiRowDst d(s_phik, r);
      const float one = t0 + r < t_end ? 1.f : 0.f;
      if (tid < 64)
        build_phi_row<T, 0, 10>(sm.k[st][r], d, sqrt_c, one, packed);
      else
        build_phi_row<T, 10, 10>(sm.k[st][r], d, sqrt_c, one, packed);
    } else {
      // phi(Q) meets the bf16 state: bf16, or bf16 hi + lo for fp16 inputs. That split build is the
      // heavier one, so fp16 gives it to warps 2-3 (one W block fewer each below).
      if ((warp < 2) != kSplit) {
        const int r = kSplit ? tid - 64 : tid;
        if constexpr (kSplit) {
          float x[16];
          load_scaled_row(sm.q[st][r], sqrt_c, x);
          store_groups_split(PhiRowDst(s_phiq, r), x, std::make_integer_sequence<int, Cfg::kF / 8>{});
        } else {
          build_phi_row<T, 0, 20>(sm.q[st][r], PhiRowDst(s_phiq, r), sqrt_c, 1.f, packed);
        }
      } else {
        const int r = kSplit ? tid : tid - 64;
        build_phi_row<T, 0, 20>(sm.k[st][r], PhiRowDst(s_phik, r), sqrt_c, t0 + r < t_end ? 1.f : 0.f,
                                packed);
      }
      build_w_blocks<T>(sm.q[st], sm.k[st], s_w, sm.den, c1, c2, den_on, warp, lane);
      if (den_on) ldsm4(qd, saddr(&sm.q[st][16 * warp + lr + 8 * (lj & 1)][8 * (lj >> 1)]));
    }
    den_inter_of_chunk(st, t0, qd);
    update_moments(c, st);
    fence_proxy_async_smem();  // this thread's phi / W stores and V copies, for wgmma
    if constexpr (!AK_MUTANT(prefill_missing_barrier)) __syncthreads();
    products(st);
    __syncthreads();  // 1/den ready; every read of this stage, of phi and of W is done
    epilogue(t0);
  }
  write_state();
}

}  // namespace
}  // namespace attn_kernels
