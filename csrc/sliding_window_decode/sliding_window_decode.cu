// sliding_window_decode: for each (b, h), append the new token's key and value to the ring-buffer
// caches at slot p % window, then attend the new query over positions [max(0, p - window + 1), p]
// (softmax in float32). Memory-bound: every cache byte is read once with 16-byte loads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
};

// 8 packed fp16 / bf16 values <-> 8 floats.
template <typename T>
struct Pack8;

template <>
struct Pack8<__nv_bfloat16> {
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

template <>
struct Pack8<__half> {
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

// Loads and stores as volatile asm, so that the front end keeps them in program order instead of
// sinking each load toward its first use (which would serialize DRAM round trips).
__device__ __forceinline__ uint4 ld16(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

__device__ __forceinline__ void st16(void* ptr, const uint4& v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}

__device__ __forceinline__ float dot8(const float (&a)[8], const float (&b)[8]) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) s = fmaf(a[k], b[k], s);
  return s;
}

template <typename T, int kE, int kSteps>
__global__ void __launch_bounds__(SwdTile<kE, kSteps>::kThreads, SwdTile<kE, kSteps>::kMinBlocks)
    sliding_window_decode_kernel(const SlidingWindowDecodeParams p) {
  using Tile = SwdTile<kE, kSteps>;
  using P = Pack8<T>;
  constexpr int kChunks = Tile::kChunks;

  const int b = blockIdx.x / p.H;
  const int h = blockIdx.x - b * p.H;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int chunk = lane % kChunks;                                    // elements [8c, 8c + 8)
  const int row = warp * Tile::kRowsPerWarp + lane / kChunks;         // slot offset within a step
  const int window = p.window;

  const T* kc = static_cast<const T*>(p.k_cache) + b * p.kc_sb + h * p.kc_sh + chunk * 8;
  const T* vc = static_cast<const T*>(p.v_cache) + b * p.vc_sb + h * p.vc_sh + chunk * 8;
  uint4 kr[kSteps], vr[kSteps];
  auto load_pass = [&](int first) {
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      // Rows past the window re-read the last row (masked later) instead of branching, so the
      // compiler issues every load up front.
      const int slot = min(first + i * Tile::kRows + row, window - 1);
      kr[i] = ld16(kc + slot * p.kc_sw);
      vr[i] = ld16(vc + slot * p.vc_sw);
    }
  };

  // Issue every load that does not depend on the position before waiting on it: the position,
  // this thread's chunk of q / k_new / v_new, and the first pass of the cache (every slot is in
  // bounds whatever the position; slots outside the window are masked after the loads land).
  const int pos = p.positions[b];
  const uint4 qv = ld16(static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + chunk * 8);
  const uint4 knv = ld16(static_cast<const T*>(p.k_new) + b * p.kn_sb + h * p.kn_sh + chunk * 8);
  const uint4 vnv = ld16(static_cast<const T*>(p.v_new) + b * p.vn_sb + h * p.vn_sh + chunk * 8);
  load_pass(0);
  // A memory-ordering point that ptxas does not sink loads below: with it, every load above of the
  // 4-step tile (W in 33..64) is in flight before the first instruction that waits on one (SASS).
  __syncwarp();

  // A negative position (bad input) writes nothing to the cache and NaN to the output.
  const bool ok = pos >= 0;
  const int newest = ok ? int(unsigned(pos) % unsigned(window)) : -1;  // slot of the new token
  const int filled = pos >= window - 1 ? window : pos + 1;  // slots [0, filled) are in the window

  // The new token is its own row: its key / value come from k_new / v_new (the cache copy at
  // slot `newest` is masked), so the append below needs no ordering against the cache reads.
  // Every score is in log2 units (scale * log2(e) folded into q).
  float qf[8], tmp[8];
  P::unpack(qv, qf);
#pragma unroll
  for (int k = 0; k < 8; ++k) qf[k] *= p.scale * 1.4426950408889634f;
  P::unpack(knv, tmp);
  float s_new = dot8(qf, tmp);
#pragma unroll
  for (int off = 1; off < kChunks; off *= 2) s_new += __shfl_xor_sync(0xffffffffu, s_new, off);

  if (ok && threadIdx.x < kChunks) {
    st16(static_cast<T*>(p.k_cache) + b * p.kc_sb + h * p.kc_sh + newest * p.kc_sw + chunk * 8, knv);
    st16(static_cast<T*>(p.v_cache) + b * p.vc_sb + h * p.vc_sh + newest * p.vc_sw + chunk * 8, vnv);
  }

  // Online softmax per warp. Every warp starts from the new token's score as its running max
  // (a finite value, so no -inf arithmetic); the new token's weight 1 and value are counted once,
  // by the lanes of warp 0's first row.
  float m = s_new, l = 0.f, acc[8];
  P::unpack(vnv, acc);
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
      P::unpack(kr[i], tmp);
      s[i] = dot8(qf, tmp);
#pragma unroll
      for (int off = 1; off < kChunks; off *= 2) s[i] += __shfl_xor_sync(0xffffffffu, s[i], off);
      valid[i] = slot < filled && slot != newest;
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
        P::unpack(vr[i], tmp);
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
      load_pass(first);
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
  __shared__ float4 sm_acc[Tile::kWarps][kE / 4];
  __shared__ float2 sm_ml[Tile::kWarps];
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
  out.x = P::pack2(o[0] * inv, o[1] * inv);
  out.y = P::pack2(o[2] * inv, o[3] * inv);
  out.z = P::pack2(o[4] * inv, o[5] * inv);
  out.w = P::pack2(o[6] * inv, o[7] * inv);
  st16(static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh + chunk * 8, out);
}

template <typename T, int kE, int kSteps>
cudaError_t launch(const SlidingWindowDecodeParams& p, cudaStream_t stream) {
  using Tile = SwdTile<kE, kSteps>;
  sliding_window_decode_kernel<T, kE, kSteps><<<p.B * p.H, Tile::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
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
  if ((p.e != 64 && p.e != 128) || p.window < 1 || p.window > 256 || p.B < 0 || p.H < 0 ||
      (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16))
    return cudaErrorInvalidValue;
  if (p.B == 0 || p.H == 0) return cudaSuccess;
  return p.dtype == DType::kBFloat16 ? launch_dtype<__nv_bfloat16>(p, stream)
                                     : launch_dtype<__half>(p, stream);
}

}  // namespace attn_kernels
