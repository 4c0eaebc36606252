// based_prefill, part of based_prefill.cu (included there only): how a sequence is cut into segments
// (the split-sequence path for small B*H) and the workspace that needs.
#pragma once
#include <cstddef>
#include <cstdint>

#include "config.cuh"

namespace attn_kernels {
namespace {

// Segments per (b, h): enough CTAs to fill every SM twice, each segment at least 4 chunks.
struct Split {
  int nseg, seg_chunks;
};
Split choose_split(int B, int H, int N, int num_sms) {
  const int64_t bh = int64_t(B) * H;
  const int nchunks = (N + Cfg::kChunk - 1) / Cfg::kChunk;
  const int64_t target = int64_t(Cfg::kCtasPerSm) * (num_sms > 0 ? num_sms : 1);
  int nseg = bh >= target ? 1 : int(target / bh);
  nseg = nseg < nchunks / 4 ? nseg : nchunks / 4;
  if (nseg < 1) nseg = 1;
  const int seg_chunks = (nchunks + nseg - 1) / nseg;
  return {(nchunks + seg_chunks - 1) / seg_chunks, seg_chunks};  // no empty segment
}

// Pass 1 writes each segment but the last one's partial state (Cfg::kWsFloats floats) to the workspace.
size_t workspace_bytes(int B, int H, Split sp) {
  return sp.nseg > 1 ? size_t(B) * H * (sp.nseg - 1) * Cfg::kWsFloats * sizeof(float) : 0;
}

}  // namespace
}  // namespace attn_kernels
