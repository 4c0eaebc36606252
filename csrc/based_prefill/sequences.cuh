// based_prefill, part of based_prefill.cu (included there only): a CTA's sequence. Which rows it walks
// (dense: batch entry b, rows [0, N); varlen: sequence b of the packed batch, rows [cu_seqlens[b],
// cu_seqlens[b+1]), in a launch order that starts the longest sequences first) and where the sequence's
// final state goes (the returned state, a pool slot, or nowhere).
#pragma once
#include <cstdint>

#include "../common/mutants.h"
#include "../common/limits.h"
#include "based_prefill.h"

namespace attn_kernels {
namespace {

// Sequence b's rows of the packed batch, clamped to [0, T]: under graph capture cu_seqlens is not checked
// on the host, and a bad one must not lead outside the tensors.
struct SeqRows {
  int64_t row0, len;
};
__device__ __forceinline__ SeqRows varlen_rows(const int32_t* cu, int b, int64_t T) {
  const int64_t a = min(max(int64_t(cu[b]), int64_t(0)), T);
  const int64_t e = min(max(int64_t(cu[b + 1]), a), T);
  return {a, e - a};
}

// This CTA's sequence b, head h and rows: blockIdx.x = r * H + h, r = the sequence's rank in launch order.
struct CtaRows {
  int b, h;
  int64_t row0, len;
};
__device__ __forceinline__ CtaRows cta_rows(const BasedPrefillParams& p, const int32_t* order) {
  const int r = blockIdx.x / p.H, h = blockIdx.x % p.H;
  if (!p.cu_seqlens) return {r, h, 0, p.N};
  const int b = order[r];
  const SeqRows s = varlen_rows(p.cu_seqlens, b, p.total);
  if (AK_MUTANT(prefill_varlen_len)) return {b, h, s.row0, min(int64_t(p.N), p.total - s.row0)};
  return {b, h, s.row0, s.len};
}

// Where sequence b's final state goes: the returned state (S, z), its pool slot, or nowhere (nullptrs).
struct StateDst {
  void* S;
  void* z;
  bool bf16;
};
__device__ __forceinline__ StateDst final_state_dst(const BasedPrefillParams& p, int b, int bh) {
  if (!p.state_indices) {
    if (!p.S) return {nullptr, nullptr, false};
    return {p.S + int64_t(bh) * kCompactFeatures * kValueDim, p.z + int64_t(bh) * kCompactFeatures, false};
  }
  const int slot = p.state_indices[b];
  if (slot < 0 || slot >= p.pool_size) return {nullptr, nullptr, false};  // -1 (padding) or out of range
  const int64_t row = int64_t(AK_MUTANT(prefill_pool_slot_ignored) ? b : slot) * p.H + bh % p.H;
  const int64_t es = p.pool_bf16 ? 2 : 4;
  return {static_cast<char*>(p.pool_S) + row * kCompactFeatures * kValueDim * es,
          static_cast<char*>(p.pool_z) + row * kCompactFeatures * es, p.pool_bf16};
}

// An out-of-range pool index (possible only under graph capture): the sequence's outputs become NaN.
__device__ __forceinline__ bool pool_index_bad(const BasedPrefillParams& p, int b) {
  if (!p.state_indices || AK_MUTANT(prefill_pool_bad_index_computed)) return false;
  const int slot = p.state_indices[b];
  return slot < -1 || slot >= p.pool_size;
}

// order[r] = the sequence of rank r by length, longest first (ties: lower index first). Blocks start
// roughly in blockIdx order, so the long sequences start first and the short ones fill in behind them
// (longest processing time first); a long sequence started last would run alone at the end. O(n^2)
// comparisons, so above kMaxSorted sequences (many short ones, where it matters least) the order is kept.
constexpr int kOrderThreads = 256;
constexpr int kMaxSorted = 4096;
__global__ void __launch_bounds__(kOrderThreads) based_prefill_order_kernel(const int32_t* cu, int n, int64_t T,
                                                                            int32_t* order) {
  __shared__ int64_t lens[kOrderThreads];
  const int i = blockIdx.x * kOrderThreads + threadIdx.x;
  const int64_t mine = i < n ? varlen_rows(cu, i, T).len : 0;
  int rank = i;
  if (n <= kMaxSorted) {
    rank = 0;
    for (int j0 = 0; j0 < n; j0 += kOrderThreads) {
      __syncthreads();
      if (j0 + int(threadIdx.x) < n) lens[threadIdx.x] = varlen_rows(cu, j0 + threadIdx.x, T).len;
      __syncthreads();
      const int m = min(kOrderThreads, n - j0);
      for (int jj = 0; jj < m; ++jj) rank += lens[jj] > mine || (lens[jj] == mine && j0 + jj < i);
    }
  }
  if (i < n) order[rank] = i;
}

}  // namespace
}  // namespace attn_kernels
