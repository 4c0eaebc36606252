// One decode step of Based linear attention (spec.md, based_decode), state updated in place:
//   S += phi(k) v^T;   z += phi(k);   o = phi(q)^T S / (phi(q).z + eps)   (numerator alone if !normalize)
// The op is memory-bound: every state byte is read once and written once, with 16-byte streaming
// accesses, all of a thread's loads in flight before the first use.
//
// A block owns one head and kCols = 64 / kSplit of its value columns (numerator columns are
// independent), so a small batch spreads each head over several blocks to fill the GPU. Every block
// computes phi(q), phi(k) and the denominator phi(q).z_new from the 153 z values itself; the block of
// split 0 alone writes z back. The split blocks of one head form a thread-block cluster, and the z
// write waits on a cluster barrier that every block arrives at after reading z, so no block can read
// an already-updated z.
//
// Steps run back to back (one launch per layer and token), so the launch itself is a large part of a
// small step. Grids of up to ~2 waves are launched with programmatic dependent launch (PDL): their
// blocks may be scheduled while the previous kernel in the stream still runs, and wait
// (griddepcontrol.wait) for that kernel to finish before the first global access, since q/k/v and the
// in-place state may be its outputs.
//
// With a state pool (p.state_indices, a separate instantiation: the contiguous kernels are unchanged),
// row b's state is pool slot state_indices[b]: every block reads that index after the wait (it is
// device data a previous kernel may write) and takes the slot's S and z; a small batch's blocks also
// guess it before the wait (kGuess, below). A padding row (-1)
// writes zeros and an out-of-range index NaN to its output and nothing else; the index depends on b
// alone, so all blocks of a cluster leave together and none waits at the cluster barrier.
//
// Grids of more than ~2 waves (launched without PDL) run several waves of blocks, each fetching its state
// only once it starts. There each block also prefetches into L2 the state of a block a few hundred places
// later in launch order, which has not started yet: more requests in flight let DRAM schedule them better
// (H100, perf/notes/based_decode.md "Prefetch": 1.4-3.1 % off pooled steps, 0.7-2 % off contiguous fp32 ones).
#include "based_decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/convert.h"
#include "../common/feature_order.h"
#include "../common/ptx.h"

namespace attn_kernels {
namespace {

// State elements: a 16-byte access holds kVec of them; math is float32 either way. The bf16 conversions
// here and in load_in_vec are convert.h's written-out form on purpose: the same step built with
// cuda_bf16's pair intrinsics (__bfloat1622float2, __floats2bfloat162_rn) measured up to 19 % slower
// (perf/notes/based_decode.md, "Conversions").
template <typename T>
struct StateElem;
template <>
struct StateElem<float> {
  static constexpr int kVec = 4;
  static __device__ void unpack(uint4 u, float (&x)[4]) {
    x[0] = __uint_as_float(u.x), x[1] = __uint_as_float(u.y);
    x[2] = __uint_as_float(u.z), x[3] = __uint_as_float(u.w);
  }
  static __device__ uint4 pack(const float (&x)[4]) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]),
                      __float_as_uint(x[3]));
  }
  static __device__ float load1(const float* p) { return *p; }
  static __device__ void store1(float* p, float x) { *p = x; }
};
template <>
struct StateElem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  static __device__ void unpack(uint4 u, float (&x)[8]) { unpack8<__nv_bfloat16>(u, x); }
  static __device__ uint4 pack(const float (&x)[8]) {
    return make_uint4(bf16x2_pack_each(x[0], x[1]), bf16x2_pack_each(x[2], x[3]),
                      bf16x2_pack_each(x[4], x[5]), bf16x2_pack_each(x[6], x[7]));
  }
  static __device__ float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ void store1(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
};

template <typename In, typename St, int kSplit>
struct DecodeTile {
  static constexpr int kThreads = 256;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kF = kCompactFeatures;                   // state rows (153)
  static constexpr int kVec = StateElem<St>::kVec;              // state elements per access
  static constexpr int kCols = kValueDim / kSplit;              // value columns of one block
  static constexpr int kVecsPerRow = kCols / kVec;              // accesses per row slice
  static constexpr int kRowsPerPass = kThreads / kVecsPerRow;   // rows the block covers at once
  static constexpr int kIters = (kF + kRowsPerPass - 1) / kRowsPerPass;  // accesses per thread
  static constexpr int kFeatWarps = (kF + 31) / 32;  // warps whose threads own one feature each
  static_assert(kValueDim % (kSplit * kVec) == 0 && 32 % kVecsPerRow == 0, "tile shape");
  static_assert(kSplit <= 8, "portable cluster size");
};

template <typename In>
__device__ float load_in(const In* p) {
  return Half16<In>::to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

// kN consecutive 16-bit inputs (8 or 16 bytes, aligned) as floats.
template <typename In, int kN>
__device__ void load_in_vec(const In* p, float (&x)[kN]) {
  static_assert(kN == 4 || kN == 8, "8- or 16-byte load");
  uint32_t w[kN / 2];
  if constexpr (kN == 8) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
  } else {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = u.x, w[1] = u.y;
  }
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) {
    x[2 * i] = Half16<In>::to_float(uint16_t(w[i] & 0xffffu));
    x[2 * i + 1] = Half16<In>::to_float(uint16_t(w[i] >> 16));
  }
}

// How far ahead a block launched without PDL prefetches, in blocks per SM (0: no prefetch): the best of the
// distances measured on H100 at B*H = 4096 and 16384 (perf/notes/based_decode.md, "Prefetch"); 8 per SM lost
// 5-10 % against none (lines evicted from L2 before their block started). The contiguous kernel with a bf16
// state gained 2.5 % at B*H = 16384 but lost 0.6 % at 4096, so it does not prefetch.
template <typename St, bool kPooled>
constexpr int kAheadPerSm = kPooled ? (sizeof(St) == 2 ? 3 : 2) : (sizeof(St) == 2 ? 0 : 2);

// PDL: at most 64 registers (4 blocks per SM), so a step's blocks and the next step's early-scheduled
// ones fit on an SM together at B*H = 256 (2 + 2 blocks per SM). No minimum otherwise. The pooled kernel
// takes the contiguous one's bounds, division and z store: with its own (4 blocks per SM always, a 32-bit
// division, z stored early) it lost 2-4 % to the contiguous kernel even with identity indices, which these
// choices alone explain (perf/notes/based_decode.md, "The pooled kernel's own cost").
template <typename In, typename St, int kSplit, bool kPdl, bool kPooled>
__global__ void __launch_bounds__(256, kPdl ? 4 : 0)
    based_decode_kernel(const BasedDecodeParams p) {
  using T = DecodeTile<In, St, kSplit>;
  constexpr int kF = T::kF, kVec = T::kVec;
  __shared__ float phik_s[kF], phiq_s[kF];
  __shared__ float den_s[T::kFeatWarps];
  __shared__ float red_s[T::kWarps][T::kCols];

  const int64_t head = blockIdx.x / kSplit;  // flat b * H + h
  const int split = blockIdx.x % kSplit;
  const int64_t b = head / p.H;
  const int64_t h = head % p.H;
  const int col0 = split * T::kCols;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int cv = tid % T::kVecsPerRow;  // which 16-byte column slice of a row
  const int row0 = tid / T::kVecsPerRow;

  // kGuess (pooled, PDL, a head split over blocks: the small, latency-bound batches): the slot is guessed
  // before the wait (the previous grid may still be writing state_indices) and the state loads are aimed
  // at the guess, so they go out right after the wait as in the contiguous kernel; the index read after
  // the wait decides, and a missed guess reloads. Measured on H100 (perf/notes/based_decode.md): 3 % off
  // B = 1; with one block per head it cost up to 3 % (fp32 state, B = 16 and 64), so there the index is
  // read after the wait alone.
  constexpr bool kGuess = kPooled && kPdl && kSplit > 1;
  int guess = 0;
  bool guessed = false;
  if constexpr (kGuess) {
    guess = ld_relaxed_gpu_b32(p.state_indices + b);
    guessed = unsigned(guess) < unsigned(p.P);
  }
  int64_t state_head = kGuess ? int64_t(guessed ? guess : 0) * p.H + h : head;  // flat slot * H + h
  // This thread's first state element of (row or pool slot) * H + h = sh.
  const auto state_at = [&](int64_t sh) {
    return static_cast<St*>(p.S) + sh * (kF * kValueDim) + col0 + cv * kVec;
  };
  St* S = state_at(state_head);

  // cudaGridDependencySynchronize(): the previous kernel (maybe the previous step on this very state)
  // has completed and its writes are visible. The pooled kernel computes the address it loads first
  // (the wait is predicated on it, else ptxas hoists the wait above that arithmetic).
  if constexpr (kPdl && kPooled)
    griddep_wait_after(kGuess ? reinterpret_cast<uint64_t>(S)
                              : reinterpret_cast<uint64_t>(p.state_indices + b));
  if constexpr (kPdl && !kPooled) griddep_wait();

  // Issue every state load first; nothing below the barrier depends on them until the update.
  uint4 s_raw[T::kIters];
  const auto load_state = [&] {
#pragma unroll
    for (int i = 0; i < T::kIters; ++i) {
      const int row = row0 + i * T::kRowsPerPass;
      s_raw[i] = row < kF ? __ldcs(reinterpret_cast<const uint4*>(S + row * kValueDim))
                          : make_uint4(0, 0, 0, 0);
    }
  };
  if constexpr (kPooled) {
    // A volatile load (ptx.h), so it stays below the wait.
    int slot = AK_MUTANT(decode_pool_index_ignored) ? int(b) : ld_global_b32(p.state_indices + b);
    if (guessed) load_state();
    if (AK_MUTANT(decode_pool_padding_written) && slot == -1) slot = p.P - 1;
    if (AK_MUTANT(decode_pool_bad_index_written) && slot != -1) slot = min(max(slot, 0), p.P - 1);
    if (unsigned(slot) >= unsigned(p.P)) {  // -1: padding, o = 0; anything else out of range: NaN
      if (tid < T::kCols)
        *reinterpret_cast<uint16_t*>(static_cast<In*>(p.o) + b * p.o_sb + h * p.o_sh + col0 + tid) =
            slot == -1 ? uint16_t(0) : uint16_t(0x7fff);  // 0x7fff: NaN in fp16 and bf16
      return;
    }
    if (!guessed || (slot != guess && !AK_MUTANT(decode_pool_stale_guess))) {
      state_head = int64_t(slot) * p.H + h;
      S = state_at(state_head);
      load_state();
    }
  } else {
    load_state();
  }
  // cudaTriggerProgrammaticLaunchCompletion(): the next kernel's blocks may now be scheduled; they wait
  // above for this whole grid to finish. Placed after the wait, so at most two steps are resident.
  if constexpr (kPdl) griddep_launch_dependents();
  // Thread f < 153 prefetches row f (every 128-byte line of it) of the later block's state.
  if constexpr (!kPdl && kAheadPerSm<St, kPooled> > 0) {
    const int64_t later = int64_t(blockIdx.x) + int64_t(kAheadPerSm<St, kPooled>) * p.num_sms;
    if (later < int64_t(gridDim.x) && tid < kF) {
      const int slot = kPooled ? ld_global_b32(p.state_indices + later / p.H) : int(later / p.H);
      if (!kPooled || unsigned(slot) < unsigned(p.P)) {
        const char* row = reinterpret_cast<const char*>(
            static_cast<const St*>(p.S) + (int64_t(slot) * p.H + later % p.H) * (kF * kValueDim) + tid * kValueDim);
#pragma unroll
        for (int l = 0; l < int(kValueDim * sizeof(St)) / 128; ++l) prefetch_l2(row + 128 * l);
      }
    }
  }
  float v[kVec];
  load_in_vec<In, kVec>(static_cast<const In*>(p.v) + b * p.v_sb + h * p.v_sh + col0 + cv * kVec, v);

  // Thread f < 153 owns feature f: phi_f(k), phi_f(q) and its term of phi(q).z_new.
  St* z = static_cast<St*>(p.z) + state_head * kF;
  float z_new = 0.f, den_part = 0.f;
  if (tid < kF) {
    const In* q = static_cast<const In*>(p.q) + b * p.q_sb + h * p.q_sh;
    const In* k = static_cast<const In*>(p.k) + b * p.k_sb + h * p.k_sh;
    float fq, fk;
    if (tid == 0) {
      fq = fk = 1.f;
    } else if (tid < kSquareFeature0) {
      const float rc = sqrtf(p.scale);
      fq = rc * load_in(q + tid - kLinearFeature0), fk = rc * load_in(k + tid - kLinearFeature0);
    } else if (tid < kPairFeature0) {
      const float c2 = p.scale * 0.70710678118654752f;  // c / sqrt(2)
      const float xq = load_in(q + tid - kSquareFeature0), xk = load_in(k + tid - kSquareFeature0);
      fq = c2 * xq * xq, fk = c2 * xk * xk;
    } else {  // pair (i, j), i < j, in feature_order.h's order
      FeaturePair ij;
      if constexpr (AK_MUTANT(decode_pair_order)) {  // (0,1), (0,2), (1,2), (0,3), ...
        int r = tid - kPairFeature0;
        ij.j = 1;
        while (r >= ij.j) r -= ij.j, ++ij.j;
        ij.i = r;
      } else {
        ij = feature_pair(tid);
      }
      fq = p.scale * load_in(q + ij.i) * load_in(q + ij.j);
      fk = p.scale * load_in(k + ij.i) * load_in(k + ij.j);
    }
    phik_s[tid] = fk, phiq_s[tid] = fq;
    z_new = StateElem<St>::load1(z + tid) + fk;
    den_part = fq * z_new;
  }
  if constexpr (kSplit > 1) {
    // This block has read z (its value is used above); split 0 may overwrite it after the wait.
    cluster_arrive_release();
  }
  if (warp < T::kFeatWarps) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) den_part += __shfl_xor_sync(0xffffffffu, den_part, off);
    if (lane == 0) den_s[warp] = den_part;
  }
  __syncthreads();

  // S_new = S + phi_f(k) v (float32, stored back streaming); numerator partial sums phi_f(q) S_new.
  float acc[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
#pragma unroll
  for (int i = 0; i < T::kIters; ++i) {
    const int row = row0 + i * T::kRowsPerPass;
    if (row < kF) {
      float s[kVec];
      StateElem<St>::unpack(s_raw[i], s);
      const float fk = phik_s[row], fq = phiq_s[row];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float s_old = s[e];
        s[e] = fmaf(fk, v[e], s[e]);
        acc[e] = fmaf(fq, AK_MUTANT(decode_read_before_update) ? s_old : s[e], acc[e]);
      }
      __stcs(reinterpret_cast<uint4*>(S + row * kValueDim), StateElem<St>::pack(s));
    }
  }

  // Sum the numerator over rows: lanes of one column slice within the warp, then across warps.
#pragma unroll
  for (int off = T::kVecsPerRow; off < 32; off *= 2) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], off);
  }
  if (lane < T::kVecsPerRow) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) red_s[warp][lane * kVec + e] = acc[e];
  }
  __syncthreads();
  if (tid < T::kCols) {
    float num = 0.f;
#pragma unroll
    for (int w = 0; w < T::kWarps; ++w) num += red_s[w][tid];
    if (p.normalize || AK_MUTANT(decode_normalize_ignored)) {
      float den = 0.f;
#pragma unroll
      for (int w = 0; w < T::kFeatWarps; ++w) den += den_s[w];
      num = num / (den + p.eps);
    }
    In* o = static_cast<In*>(p.o) + b * p.o_sb + h * p.o_sh + col0 + tid;
    *reinterpret_cast<uint16_t*>(o) = Half16<In>::from_float(num);
  }

  if constexpr (kSplit > 1) cluster_wait_acquire();
  if (split == 0 && tid < kF && !AK_MUTANT(decode_z_not_updated))
    StateElem<St>::store1(z + tid, z_new);
}

template <typename In, typename St, int kSplit, bool kPdl, bool kPooled>
cudaError_t launch_split(const BasedDecodeParams& p, int64_t heads, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>((heads - (AK_MUTANT(decode_last_head) ? 1 : 0)) * kSplit));
  cfg.blockDim = dim3(DecodeTile<In, St, kSplit>::kThreads);
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2];
  attrs[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[0].val.programmaticStreamSerializationAllowed = 1;
  attrs[1].id = cudaLaunchAttributeClusterDimension;
  attrs[1].val.clusterDim.x = kSplit;
  attrs[1].val.clusterDim.y = 1;
  attrs[1].val.clusterDim.z = 1;
  cfg.attrs = kPdl ? attrs : attrs + 1;
  cfg.numAttrs = int(kPdl) + int(kSplit > 1);
  return cudaLaunchKernelEx(&cfg, based_decode_kernel<In, St, kSplit, kPdl, kPooled>, p);
}

// PDL takes 0.3-0.5 us of launch latency off a back-to-back step whose grid fits in about two waves
// (H200: -5 to -16% at B*H <= 256, -1% at 1024). Longer grids gained nothing measurable (-0.6% to +1.4%
// at B*H = 2048..16384), so they launch plainly. Splits > 1 only ever serve small grids.
constexpr int64_t kPdlMaxBlocks = 1024;

template <typename In, typename St, bool kPooled>
cudaError_t launch_pooled(const BasedDecodeParams& p, int64_t heads, int split, cudaStream_t stream) {
  if (split == 1 && heads > kPdlMaxBlocks) return launch_split<In, St, 1, false, kPooled>(p, heads, stream);
  switch (split) {
    case 1: return launch_split<In, St, 1, true, kPooled>(p, heads, stream);
    case 2: return launch_split<In, St, 2, true, kPooled>(p, heads, stream);
    case 4: return launch_split<In, St, 4, true, kPooled>(p, heads, stream);
    default: return launch_split<In, St, 8, true, kPooled>(p, heads, stream);
  }
}

template <typename In, typename St>
cudaError_t launch_typed(const BasedDecodeParams& p, int64_t heads, int split, cudaStream_t stream) {
  return p.state_indices ? launch_pooled<In, St, true>(p, heads, split, stream)
                         : launch_pooled<In, St, false>(p, heads, split, stream);
}

// Launch with an explicit column split (1, 2, 4 or 8 blocks per head).
cudaError_t based_decode_launch_split(const BasedDecodeParams& p, int split, cudaStream_t stream) {
  const int64_t heads = int64_t(p.B) * p.H;
  if (heads == 0) return cudaSuccess;
  const bool in_bf16 = p.dtype == DType::kBFloat16;
  const bool st_bf16 = p.state_dtype == DType::kBFloat16;
  cudaError_t err;
  if (in_bf16) {
    err = st_bf16 ? launch_typed<__nv_bfloat16, __nv_bfloat16>(p, heads, split, stream)
                  : launch_typed<__nv_bfloat16, float>(p, heads, split, stream);
  } else {
    err = st_bf16 ? launch_typed<__half, __nv_bfloat16>(p, heads, split, stream)
                  : launch_typed<__half, float>(p, heads, split, stream);
  }
  return err != cudaSuccess ? err : cudaGetLastError();
}

// A small batch is latency-bound: splitting heads until there are ~64 blocks helps; more splits only
// add redundant feature/z work and cluster scheduling (measured on H200: at B*H = 16, 4 blocks per head
// beat 8; from B*H = 256 on, 1 block per head is fastest).
constexpr int64_t kMinBlocks = 64;

}  // namespace

cudaError_t based_decode_launch(const BasedDecodeParams& p, cudaStream_t stream) {
  if (!is_io_dtype(p.dtype) || !is_state_dtype(p.state_dtype) || p.B < 0 || p.H < 0 ||
      (p.state_indices && p.P < 0))
    return cudaErrorInvalidValue;
  const int64_t heads = int64_t(p.B) * p.H;
  int split = 1;
  while (split < 8 && heads * split < kMinBlocks) split *= 2;
  return based_decode_launch_split(p, split, stream);
}

}  // namespace attn_kernels
