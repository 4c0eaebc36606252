// sliding_window_decode: for each (b, h), append the new token's key and value to the ring-buffer
// caches at slot p % window, then attend the new query over positions [max(0, p - window + 1), p]
// (softmax in float32). Memory-bound: every cache byte is read once with 16-byte loads.
// Launched with programmatic dependent launch (PDL): in a stream or CUDA graph of back-to-back calls
// a CTA starts while the previous grid drains and waits (griddepcontrol.wait) before its first
// global access, so the launch latency overlaps the previous kernel.
// Cache pools (cache_indices, kPooled): the pool row is read twice. Before the wait, as a guess (the
// previous grid may still be writing cache_indices) at which the first cache loads are aimed, so they
// go out right after the wait as in the contiguous kernel; after it, the value that decides
// (take_row), reloading the cache rows when the guess missed. Reading the index only after the wait
// would put one more memory round trip (~0.2-0.5 us, estimated) on every call's critical path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/convert.h"
#include "../common/ptx.h"
#include "sliding_window_decode.h"

namespace attn_kernels {
namespace {

constexpr int kMaxSteps = 8;

// One CTA per (b, h). A row of e elements is split into 16-byte chunks of 8 elements held by
// kChunks consecutive lanes, so one warp load covers 32 / kChunks whole rows and the CTA covers
// kRows = 16 rows per step. A pass is kSteps steps: each thread issues all its K and V loads of
// a pass before using any of them, so a CTA has 16 * kSteps rows of K and V in flight (16 KB for
// W = 64, e = 64), held in registers.
template <int kE, int kSteps>
struct SwdTile {
  static constexpr int kChunks = kE / 8;
  static constexpr int kRowsPerWarp = 32 / kChunks;
  static constexpr int kWarps = kE / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = kWarps * kRowsPerWarp;
  // Up to 4 steps fit in 64 registers: 1024 threads per SM stay resident, so a B*H = 1024
  // launch at e = 64 is one wave; 8 steps need more registers and already keep enough in flight.
  static constexpr int kMinBlocks = (kSteps < kMaxSteps ? 1024 : 512) / kThreads;
  // L1::no_allocate + L2::256B prefetch on the loads: measured 0.5-3% faster for single-pass tiles,
  // ~1% slower for the multi-pass one (W = 256, e = 128), which keeps plain loads.
  static constexpr bool kStreamHint = kSteps < kMaxSteps;
};

__device__ __forceinline__ float dot8(const float (&a)[8], const float (&b)[8]) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) s = fmaf(a[k], b[k], s);
  return s;
}

// Everything one (b, h) item needs from memory for one pass: issued together, used later. Rows past
// the window re-read the last row (masked later) instead of branching, so every load is issued up
// front; every slot is in bounds whatever the position, so no load waits on it.
template <int kSteps>
struct ItemLoads {
  int index;  // the pool row read after the wait (pooled kernel only)
  int pos;
  uint4 q, kn, vn;
  uint4 k[kSteps], v[kSteps];
};

template <typename T, int kE, int kSteps, bool kPooled>
struct Item {
  using Tile = SwdTile<kE, kSteps>;
  static constexpr int kChunks = Tile::kChunks;

  int b, h, chunk, row, warp, lane;
  int cache_row;  // the caches' first index: b, or b's pool row

  __device__ __forceinline__ Item(const SlidingWindowDecodeParams& p, int item) {
    b = item / p.H;
    h = item - b * p.H;
    cache_row = b;
    warp = threadIdx.x / 32;
    lane = threadIdx.x % 32;
    chunk = lane % kChunks;
    row = warp * Tile::kRowsPerWarp + lane / kChunks;
  }

  // This thread's 8 values of the cache rows read at step i of the pass starting at slot `first`.
  __device__ __forceinline__ const T* k_row(const SlidingWindowDecodeParams& p, int first, int i) const {
    return static_cast<const T*>(p.k_cache) + cache_row * p.kc_sb + h * p.kc_sh + chunk * 8 +
           slot(p, first, i) * p.kc_sw;
  }
  __device__ __forceinline__ const T* v_row(const SlidingWindowDecodeParams& p, int first, int i) const {
    return static_cast<const T*>(p.v_cache) + cache_row * p.vc_sb + h * p.vc_sh + chunk * 8 +
           slot(p, first, i) * p.vc_sw;
  }
  __device__ __forceinline__ int slot(const SlidingWindowDecodeParams& p, int first, int i) const {
    return min(first + i * Tile::kRows + row, p.window - 1);
  }

  __device__ __forceinline__ void load_pass(const SlidingWindowDecodeParams& p, int first,
                                            ItemLoads<kSteps>& L) const {
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      L.k[i] = ld_global16<Tile::kStreamHint>(k_row(p, first, i));
      L.v[i] = ld_global16<Tile::kStreamHint>(v_row(p, first, i));
    }
  }

  // The addresses of an item's first loads, computed apart from the loads so that a PDL launch can
  // do this arithmetic (a division and 64-bit strides) before it waits on the previous grid.
  struct Addrs {
    const int32_t* index;  // pooled kernel only
    const int32_t* pos;
    const T *q, *kn, *vn;
    const T *k[kSteps], *v[kSteps];
    // Waits on the previous grid (PDL) only once every address is computed: the wait is predicated
    // on an OR of all of them (never 0), else ptxas hoists it to the kernel's first instruction.
    __device__ __forceinline__ void wait_after() const {
      uint64_t any = reinterpret_cast<uint64_t>(index) | reinterpret_cast<uint64_t>(pos) |
                     reinterpret_cast<uint64_t>(q) | reinterpret_cast<uint64_t>(kn) |
                     reinterpret_cast<uint64_t>(vn);
#pragma unroll
      for (int i = 0; i < kSteps; ++i)
        any |= reinterpret_cast<uint64_t>(k[i]) | reinterpret_cast<uint64_t>(v[i]);
      griddep_wait_after(any);
    }
  };

  __device__ __forceinline__ Addrs first_addrs(const SlidingWindowDecodeParams& p) const {
    Addrs a;
    a.index = kPooled ? p.cache_indices + b : nullptr;
    a.pos = p.positions + b;
    a.q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + chunk * 8;
    a.kn = static_cast<const T*>(p.k_new) + b * p.kn_sb + h * p.kn_sh + chunk * 8;
    a.vn = static_cast<const T*>(p.v_new) + b * p.vn_sb + h * p.vn_sh + chunk * 8;
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      a.k[i] = k_row(p, 0, i);
      a.v[i] = v_row(p, 0, i);
    }
    return a;
  }

  // cache_loads false (the pooled kernel's guess was no pool row): no cache loads yet.
  static __device__ __forceinline__ void load_first(const Addrs& a, bool cache_loads, ItemLoads<kSteps>& L) {
    if constexpr (kPooled) L.index = ld_relaxed_gpu_b32(a.index);
    L.pos = ld_global_b32(a.pos);
    L.q = ld_global16<Tile::kStreamHint>(a.q);
    L.kn = ld_global16<Tile::kStreamHint>(a.kn);
    L.vn = ld_global16<Tile::kStreamHint>(a.vn);
    if (cache_loads) {
#pragma unroll
      for (int i = 0; i < kSteps; ++i) {
        L.k[i] = ld_global16<Tile::kStreamHint>(a.k[i]);
        L.v[i] = ld_global16<Tile::kStreamHint>(a.v[i]);
      }
    }
  }

  // Pooled: aims cache_row at the guess of b's pool row, read before the wait. Returns whether the
  // guess is a pool row (else nothing is loaded from the caches until take_row). Contiguous: true.
  __device__ __forceinline__ bool guess_row(const SlidingWindowDecodeParams& p) {
    if constexpr (kPooled) {
      const int guess = ld_relaxed_gpu_b32(p.cache_indices + b);
      const bool in_pool = unsigned(guess) < unsigned(p.pool_rows);
      cache_row = in_pool ? guess : 0;
      return in_pool;
    } else {
      return true;
    }
  }

  // Pooled: the index read after the wait decides. A pool row: attend over it (true), reloading the
  // first pass when the guess was another row. Padding (-1): o = 0. Any other value (the host refuses
  // it outside graph capture and torch.compile): o = NaN, as for a negative position. Neither of those
  // two reads or writes the pool (false).
  __device__ __forceinline__ bool take_row(const SlidingWindowDecodeParams& p, bool guessed,
                                           ItemLoads<kSteps>& L) {
    if constexpr (kPooled) {
      const int index = AK_MUTANT(swd_pool_index_ignored) ? b : L.index;
      const bool in_pool = unsigned(index) < unsigned(p.pool_rows);
      const bool pad = index == -1;
      if (!in_pool &&
          !(pad ? AK_MUTANT(swd_pool_padding_written) : AK_MUTANT(swd_pool_bad_index_written))) {
        if (threadIdx.x < kChunks) {
          const uint32_t fill = pad ? 0u : pack2<T>(__int_as_float(0x7fffffff), __int_as_float(0x7fffffff));
          store_o(p, make_uint4(fill, fill, fill, fill));
        }
        return false;
      }
      const int pool_row = in_pool ? index : 0;
      if (!guessed || (pool_row != cache_row && !AK_MUTANT(swd_pool_stale_guess))) {
        cache_row = pool_row;
        load_pass(p, 0, L);
      }
    }
    return true;
  }

  __device__ __forceinline__ void store_o(const SlidingWindowDecodeParams& p, const uint4& out) const {
    st_global16(static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh + chunk * 8, out);
  }

  // Append, attend, write o (sm_acc, sm_ml: the CTA's cross-warp reduction buffers).
  __device__ __forceinline__ void finish(const SlidingWindowDecodeParams& p, ItemLoads<kSteps>& L,
                                         float4 (&sm_acc)[Tile::kWarps][kE / 4],
                                         float2 (&sm_ml)[Tile::kWarps]) const {
    const int window = p.window;
    const int pos = L.pos;
    // A negative position (bad input) writes nothing to the cache and NaN to the output.
    const bool ok = pos >= 0 || AK_MUTANT(swd_negative_position);
    const int newest = !ok ? -1  // slot of the new token
                       : AK_MUTANT(swd_position_wrap) ? pos & (window - 1)
                                                      : int(unsigned(pos) % unsigned(window));
    // slots [0, filled) are in the window
    const int filled = (pos >= window - 1 || AK_MUTANT(swd_unwritten_slots)) ? window : pos + 1;

    // The new token is its own row: its key / value come from k_new / v_new (the cache copy at
    // slot `newest` is masked), so the append below needs no ordering against the cache reads.
    // Every score is in log2 units (scale * log2(e) folded into q).
    float qf[8], tmp[8];
    unpack8<T>(L.q, qf);
#pragma unroll
    for (int k = 0; k < 8; ++k) qf[k] *= (AK_MUTANT(swd_scale_ignored) ? 1.f : p.scale) * 1.4426950408889634f;
    unpack8<T>(L.kn, tmp);
    float s_new = dot8(qf, tmp);
#pragma unroll
    for (int off = 1; off < kChunks; off *= 2) s_new += __shfl_xor_sync(0xffffffffu, s_new, off);

    if (ok && threadIdx.x < kChunks) {
      st_global16(static_cast<T*>(p.k_cache) + cache_row * p.kc_sb + h * p.kc_sh + newest * p.kc_sw +
                      chunk * 8,
                  L.kn);
      st_global16(static_cast<T*>(p.v_cache) + cache_row * p.vc_sb + h * p.vc_sh + newest * p.vc_sw +
                      chunk * 8,
                  L.vn);
    }

    // Online softmax per warp. Every warp starts from the new token's score as its running max
    // (a finite value, so no -inf arithmetic); the new token's weight 1 and value are counted once,
    // by the lanes of warp 0's first row.
    float m = s_new, l = 0.f, acc[8];
    unpack8<T>(L.vn, acc);
    if (threadIdx.x < kChunks) {
      l = 1.f;
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] = 0.f;
    }

    auto process_pass = [&](int first) {
      float s[kSteps];
      bool valid[kSteps];
      float pass_max = m;
#pragma unroll
      for (int i = 0; i < kSteps; ++i) {
        const int slot = first + i * Tile::kRows + row;
        unpack8<T>(L.k[i], tmp);
        s[i] = dot8(qf, tmp);
#pragma unroll
        for (int off = 1; off < kChunks; off *= 2) s[i] += __shfl_xor_sync(0xffffffffu, s[i], off);
        valid[i] = slot < filled && (slot != newest || AK_MUTANT(swd_window_off_by_one));
        if (valid[i]) pass_max = fmaxf(pass_max, s[i]);
      }
#pragma unroll
      for (int off = kChunks; off < 32; off *= 2)
        pass_max = fmaxf(pass_max, __shfl_xor_sync(0xffffffffu, pass_max, off));
      const float rescale = exp2f(m - pass_max);
      m = pass_max;
      l *= rescale;
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] *= rescale;
#pragma unroll
      for (int i = 0; i < kSteps; ++i) {
        // Masked slots may hold anything (even NaN): skip them rather than multiply by 0.
        if (valid[i]) {
          const float w = exp2f(s[i] - m);
          l += w;
          unpack8<T>(L.v[i], tmp);
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[k] = fmaf(w, tmp[k], acc[k]);
        }
      }
    };
    process_pass(0);
    // Only the widest tile makes more than one pass (the launcher picks the fewest steps that
    // cover the window), so the others keep no loop state alive.
    if constexpr (kSteps == kMaxSteps) {
      constexpr int kRowsPerPass = Tile::kRows * kSteps;
      for (int first = kRowsPerPass; first < window; first += kRowsPerPass) {
        load_pass(p, first, L);
        process_pass(first);
      }
    }

    // Sum each chunk's partials over the warp's rows, then combine the warps through shared memory.
#pragma unroll
    for (int off = kChunks; off < 32; off *= 2) {
      l += __shfl_xor_sync(0xffffffffu, l, off);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], off);
    }
    if (lane < kChunks) {
      sm_acc[warp][2 * lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      sm_acc[warp][2 * lane + 1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      if (lane == 0) sm_ml[warp] = make_float2(m, l);
    }
    __syncthreads();
    if (threadIdx.x >= kChunks) return;

    float m_all = sm_ml[0].x;
#pragma unroll
    for (int w = 1; w < Tile::kWarps; ++w) m_all = fmaxf(m_all, sm_ml[w].x);
    float l_all = 0.f, o[8] = {};
#pragma unroll
    for (int w = 0; w < Tile::kWarps; ++w) {
      const float f = exp2f(sm_ml[w].x - m_all);
      l_all = fmaf(sm_ml[w].y, f, l_all);
      const float4 a = sm_acc[w][2 * chunk], c = sm_acc[w][2 * chunk + 1];
      o[0] = fmaf(a.x, f, o[0]);
      o[1] = fmaf(a.y, f, o[1]);
      o[2] = fmaf(a.z, f, o[2]);
      o[3] = fmaf(a.w, f, o[3]);
      o[4] = fmaf(c.x, f, o[4]);
      o[5] = fmaf(c.y, f, o[5]);
      o[6] = fmaf(c.z, f, o[6]);
      o[7] = fmaf(c.w, f, o[7]);
    }
    const float inv = ok ? 1.f / l_all : __int_as_float(0x7fffffff);  // NaN * anything = NaN
    uint4 out;
    out.x = pack2<T>(o[0] * inv, o[1] * inv);
    out.y = pack2<T>(o[2] * inv, o[3] * inv);
    out.z = pack2<T>(o[4] * inv, o[5] * inv);
    out.w = pack2<T>(o[6] * inv, o[7] * inv);
    store_o(p, out);
  }
};

// One CTA per (b, h); kPooled: the caches are pools addressed through cache_indices.
template <typename T, int kE, int kSteps, bool kPooled>
__global__ void __launch_bounds__(SwdTile<kE, kSteps>::kThreads, SwdTile<kE, kSteps>::kMinBlocks)
    sliding_window_decode_kernel(const SlidingWindowDecodeParams p) {
  using Tile = SwdTile<kE, kSteps>;
  __shared__ float4 sm_acc[Tile::kWarps][kE / 4];
  __shared__ float2 sm_ml[Tile::kWarps];
  Item<T, kE, kSteps, kPooled> it(p, blockIdx.x);
  const bool guessed = it.guess_row(p);
  const auto addrs = it.first_addrs(p);
  addrs.wait_after();
  // The next grid may be scheduled once this one is past its wait (it waits for this whole grid before
  // touching memory). Pooled: trigger before the loads; placed after them, ptxas hoists the first use of
  // the after-wait pool row (an L2 round trip) above the trigger and each step's successor launches that
  // much later (SASS; H100 probe: 0.965x at B16 and B64). Contiguous: after the loads, where the early
  // trigger measured 1.036x slower at B64 (perf/notes/sliding_window_decode.md).
  if constexpr (kPooled) griddep_launch_dependents();
  ItemLoads<kSteps> L;
  it.load_first(addrs, guessed, L);
  // A memory-ordering point that ptxas does not sink loads below: every load above is in flight
  // before the first instruction that waits on one (SASS).
  __syncwarp();
  if constexpr (!kPooled) griddep_launch_dependents();
  // Uniform over the CTA: every thread read the same index after the wait.
  if (!it.take_row(p, guessed, L)) return;
  it.finish(p, L, sm_acc, sm_ml);
}

// Launch with the PDL attribute (also captured into CUDA graphs as a programmatic edge); the kernel
// waits on the previous grid before touching memory (the pooled kernel's guess of its pool row aside,
// which it checks after the wait), so any predecessor is safe.
template <typename K>
cudaError_t launch_kernel(K kernel, int grid, int threads, const SlidingWindowDecodeParams& p,
                          cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

template <typename T, int kE, int kSteps>
cudaError_t launch(const SlidingWindowDecodeParams& p, cudaStream_t stream) {
  using Tile = SwdTile<kE, kSteps>;
  const int grid = p.B * p.H;
  if (p.cache_indices)
    return launch_kernel(sliding_window_decode_kernel<T, kE, kSteps, true>, grid, Tile::kThreads, p, stream);
  return launch_kernel(sliding_window_decode_kernel<T, kE, kSteps, false>, grid, Tile::kThreads, p, stream);
}

// The fewest steps (1, 2, 4 or 8) whose pass covers the window; wider windows take several
// passes of 8 steps.
template <typename T, int kE>
cudaError_t launch_steps(const SlidingWindowDecodeParams& p, cudaStream_t stream) {
  const int steps = (p.window + SwdTile<kE, 1>::kRows - 1) / SwdTile<kE, 1>::kRows;
  if (steps <= 1) return launch<T, kE, 1>(p, stream);
  if (steps <= 2) return launch<T, kE, 2>(p, stream);
  if (steps <= 4) return launch<T, kE, 4>(p, stream);
  return launch<T, kE, kMaxSteps>(p, stream);
}

template <typename T>
cudaError_t launch_dtype(const SlidingWindowDecodeParams& p, cudaStream_t stream) {
  return p.e == 64 ? launch_steps<T, 64>(p, stream) : launch_steps<T, 128>(p, stream);
}

}  // namespace

cudaError_t sliding_window_decode_launch(const SlidingWindowDecodeParams& p, cudaStream_t stream) {
  if (!swd_head_size_ok(p.e) || p.window < 1 || p.window > kSwdMaxWindow || p.B < 0 || p.H < 0 ||
      !is_io_dtype(p.dtype) || (p.cache_indices && p.pool_rows < 1))
    return cudaErrorInvalidValue;
  if (p.B == 0 || p.H == 0) return cudaSuccess;
  return p.dtype == DType::kBFloat16 ? launch_dtype<__nv_bfloat16>(p, stream)
                                     : launch_dtype<__half>(p, stream);
}

}  // namespace attn_kernels
