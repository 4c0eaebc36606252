// The sizes the kernels support, in one place: the launchers refuse anything else and the binding
// shapes its tensors from them. Plain C++ (no CUDA headers).
#pragma once

namespace attn_kernels {

// Based (based_prefill, based_decode): d = 16 query/key features, e = 64 value columns, and the
// compact feature vector of F = 1 + d + d + d(d - 1)/2 = 153 features (their order: feature_order.h).
// Every state (S: F x e, z: F) in the package is in that compact form.
constexpr int kFeatDim = 16;
constexpr int kValueDim = 64;
constexpr int kCompactFeatures = 1 + 2 * kFeatDim + kFeatDim * (kFeatDim - 1) / 2;
static_assert(kCompactFeatures == 153, "the compact Based feature count");

// sliding_window_decode: head size e in {64, 128}, 1 <= window <= 256.
constexpr int kSwdMaxWindow = 256;
constexpr bool swd_head_size_ok(int e) { return e == 64 || e == 128; }

}  // namespace attn_kernels
