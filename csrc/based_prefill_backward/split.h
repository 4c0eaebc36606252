// based_prefill_backward, part of based_prefill_backward.cu: how a sequence is cut into segments where B*H is
// small (the sequence-parallel path, the forward's split mirrored: based_prefill/heuristics.h), and the
// workspace that needs. Plain C++ (no CUDA): a CPU test compiles it against its Python mirror.
#pragma once
#include <cstddef>
#include <cstdint>

#include "../common/limits.h"

namespace attn_kernels {

constexpr int kBwdChunk = 64;          // tokens per chunk (BCfg::kChunk)
constexpr int kBwdCtasPerSm = 2;       // CTAs to aim for per SM: two waves of the sweeps (1 CTA per SM each)
constexpr int kBwdMinSegChunks = 8;    // a segment's sweep amortises its carried state's load over >= 8 chunks
// A segment's sums in the workspace: S (153 x 64, S0's layout), then z (160: the padded features).
constexpr int kBwdSlotFloats = kCompactFeatures * kValueDim + 160;
static_assert(kBwdSlotFloats % 4 == 0, "slots of whole float4");

struct BwdSplit {
  int nseg, seg_chunks;  // segment s: chunks [s seg_chunks, min((s + 1) seg_chunks, chunks))
};

// Segments per (b, h): enough CTAs for two waves over every SM, each segment at least kBwdMinSegChunks chunks;
// 1 (the unsplit sweeps) when B*H alone gives that.
inline BwdSplit bwd_choose_split(int B, int H, int N, int num_sms) {
  const int64_t bh = int64_t(B) * H;
  const int nchunks = int((int64_t(N) + kBwdChunk - 1) / kBwdChunk);
  const int64_t target = int64_t(kBwdCtasPerSm) * (num_sms > 0 ? num_sms : 1);
  int nseg = bh >= target ? 1 : int(target / bh);
  nseg = nseg < nchunks / kBwdMinSegChunks ? nseg : nchunks / kBwdMinSegChunks;
  if (nseg < 1) nseg = 1;
  const int seg_chunks = (nchunks + nseg - 1) / nseg;
  return {(nchunks + seg_chunks - 1) / seg_chunks, seg_chunks};  // no empty segment
}

// Floats of the segments' sums: a slot per (b, h) and segment but one (the key sums, later the query sums).
inline size_t bwd_sums_floats(int B, int H, BwdSplit sp) {
  return sp.nseg > 1 ? size_t(B) * size_t(H) * size_t(sp.nseg - 1) * kBwdSlotFloats : 0;
}

}  // namespace attn_kernels
