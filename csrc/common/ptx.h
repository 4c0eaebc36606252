// Inline-PTX wrappers shared by the kernels (sm_90a device code). Each is one instruction, or a short
// fixed sequence, that CUDA's intrinsics do not give with the needed ordering or cache hints.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace attn_kernels {

// ---- programmatic dependent launch (PDL) ----------------------------------------------------------

// cudaGridDependencySynchronize(): the previous kernel in the stream has completed and its writes are
// visible.
__device__ __forceinline__ void griddep_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// The same wait, predicated on `any` != 0: passing an OR of every address computed before the wait
// (never 0) keeps ptxas from hoisting the wait to the kernel's first instruction.
__device__ __forceinline__ void griddep_wait_after(uint64_t any) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b64 p, %0, 0;\n @p griddepcontrol.wait;\n}" ::"l"(any)
               : "memory");
}

// cudaTriggerProgrammaticLaunchCompletion(): lets the next kernel in the stream launch (its CTAs then
// wait in griddepcontrol.wait until this grid has completed and its writes are visible).
__device__ __forceinline__ void griddep_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// ---- thread-block cluster barrier, split into its two halves --------------------------------------

__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait_acquire() {
  asm volatile("barrier.cluster.wait.acquire;" ::: "memory");
}

// ---- global memory: volatile 16-byte loads and stores ---------------------------------------------

// Loads and stores as volatile asm, so that the front end keeps them in program order instead of
// sinking each load toward its first use (which would serialize DRAM round trips). Not ld.global.nc:
// ptxas moves read-only loads above griddepcontrol.wait. kNoAllocate: L1::no_allocate + L2::256B
// prefetch, for data read once.
template <bool kNoAllocate>
__device__ __forceinline__ uint4 ld_global16(const void* ptr) {
  uint4 v;
  if constexpr (kNoAllocate) {
    asm volatile("ld.global.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
  } else {
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
  }
  return v;
}

// A hint: fetch the 128-byte line at ptr (an address inside an allocation) into L2; no register, no
// effect on any value.
__device__ __forceinline__ void prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
}

__device__ __forceinline__ int ld_global_b32(const int32_t* ptr) {
  int v;
  asm volatile("ld.global.b32 %0, [%1];" : "=r"(v) : "l"(ptr));
  return v;
}

// A gpu-scope load: served by L2, never by a stale L1 line, and defined when it races with a write by
// the previous grid (sliding_window_decode's guess of the pool row, read before griddepcontrol.wait).
__device__ __forceinline__ int ld_relaxed_gpu_b32(const int32_t* ptr) {
  int v;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(ptr));
  return v;
}

__device__ __forceinline__ void st_global16(void* ptr, const uint4& v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}

// ---- shared memory by 32-bit address, async copies, proxy fence -----------------------------------

__device__ __forceinline__ uint32_t saddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void sts128(uint32_t a, uint4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1,%2,%3,%4};" ::"r"(a), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}
__device__ __forceinline__ void sts32(uint32_t a, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(a), "r"(v));
}
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldsm4_t(uint32_t (&r)[4], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void stsm4_t(uint32_t a, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};"
               ::"r"(a), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}

// 16-byte async copy; rows past the end are zero-filled (src-size 0 reads nothing).
__device__ __forceinline__ void cp_async16(uint32_t s, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Generic-proxy writes to shared memory (st.shared, cp.async) become visible to wgmma (async proxy).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// ---- math -----------------------------------------------------------------------------------------

__device__ __forceinline__ float rcp_approx(float x) {  // MUFU.RCP alone, ~1 ulp
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

}  // namespace attn_kernels
