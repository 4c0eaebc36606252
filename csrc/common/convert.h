// 16-bit (fp16 / bf16) <-> float conversions of the kernels, in two forms that compile differently:
//  - the paired form: cuda_fp16 / cuda_bf16's pair intrinsics (based_prefill, sliding_window_decode);
//  - the written-out form: shifts to unpack a bf16, one cvt per value to pack (based_decode; also
//    sliding_window_decode's bf16 unpack). based_decode keeps it on purpose: the same step built with
//    the pair intrinsics (__bfloat1622float2, __floats2bfloat162_rn) measured up to 19 % slower
//    (perf/notes/based_decode.md, "Conversions").
// Each kernel keeps the form it was measured with; do not swap one for the other without measuring.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <type_traits>

namespace attn_kernels {

// ---- paired form ----------------------------------------------------------------------------------

// (a, b) rounded to a T pair, a in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t u) {
  return __half22float2(*reinterpret_cast<__half2*>(&u));
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t u) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
}

// ---- written-out form -----------------------------------------------------------------------------

// The bf16 in the low / high half of w, as float (a bf16 is the top half of a float).
__device__ __forceinline__ float bf16_lo_to_float(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi_to_float(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// One 16-bit element, given as its bits, <-> float.
template <typename T>
struct Half16;
template <>
struct Half16<__half> {
  static __device__ float to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static __device__ uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};
template <>
struct Half16<__nv_bfloat16> {
  static __device__ float to_float(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }
  static __device__ uint16_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

// (lo, hi) as a bf16 pair: one cvt per value.
__device__ __forceinline__ uint32_t bf16x2_pack_each(float lo, float hi) {
  return uint32_t(Half16<__nv_bfloat16>::from_float(lo)) |
         (uint32_t(Half16<__nv_bfloat16>::from_float(hi)) << 16);
}

// ---- 8 values in 16 bytes -------------------------------------------------------------------------

// bf16 written out (shifts), fp16 through the pair intrinsic.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      f[2 * i] = bf16_lo_to_float(w[i]);
      f[2 * i + 1] = bf16_hi_to_float(w[i]);
    } else {
      const float2 t = unpack2<__half>(w[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
}

}  // namespace attn_kernels
