// The one torch-facing file: CUDA implementations of the attn_kernels ops (each op's schema, CPU and fake
// implementations are declared once in Python: attn_kernels/<op>.py, through _library.define_op).
// Arguments were validated in Python; the checks here only guard direct torch.ops calls against memory
// errors.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <initializer_list>
#include <limits>

#include "based_decode/based_decode.h"
#include "based_prefill/based_prefill.h"
#include "based_prefill_backward/based_prefill_backward.h"
#include "sliding_window_decode/sliding_window_decode.h"
#include "sliding_window_prefill/sliding_window_prefill.h"

namespace attn_kernels {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default: TORCH_CHECK(false, "attn_kernels: unsupported dtype ", t.scalar_type());
  }
}

// Kernels load 16-byte vectors: the base must be 16-byte aligned and every stride a multiple of 16 bytes.
// A view that breaks this (an odd slice) is copied once rather than rejected: the spec allows any strides.
at::Tensor vector_friendly(const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "attn_kernels: expected a CUDA tensor");
  TORCH_CHECK(t.stride(-1) == 1, "attn_kernels: last dimension must have stride 1");
  const int64_t vec = 16 / t.element_size();
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.stride(d) % vec == 0 || t.size(d) == 1);
  return ok ? t : t.contiguous();
}

// The leading strides of t (elements), one field each, in the order given: the launchers' (b, h[, n / w]).
void copy_strides(const at::Tensor& t, std::initializer_list<int64_t*> fields) {
  int64_t d = 0;
  for (int64_t* f : fields) *f = t.stride(d++);
}

// Output in the layout of `like` when that layout is dense (a (B,N,H,e) view stays (B,N,H,e) in memory).
at::Tensor output_like(const at::Tensor& like) { return at::empty_like(like); }

// Dense: q, k (B, H, N, 16). Varlen (cu_seqlens (n + 1,) int32): n sequences packed in one batch entry,
// q, k (1, H, T, 16); states per sequence. max_seqlen: a bound on the longest sequence, 0 = not given (T).
// A state pool (pool_S, pool_z, state_indices) instead of a returned state: based_prefill_to_pool below.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prefill(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale, bool normalize,
    double eps, const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0, bool return_state,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, const std::optional<at::Tensor>& pool_S,
    const std::optional<at::Tensor>& pool_z, const std::optional<at::Tensor>& state_indices) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(3) == kFeatDim && k_in.sizes() == q_in.sizes(),
              "based_prefill: q, k must be (B, H, N, 16)");
  TORCH_CHECK(v_in.dim() == 4 && v_in.size(3) == kValueDim && v_in.sizes().slice(0, 3) == q_in.sizes().slice(0, 3),
              "based_prefill: v must be (B, H, N, 64)");
  TORCH_CHECK(S0.has_value() == z0.has_value(), "based_prefill: S0 and z0 go together");
  const bool varlen = cu_seqlens.has_value();
  TORCH_CHECK(!varlen || (q_in.size(0) == 1 && cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 1 &&
                          cu_seqlens->scalar_type() == at::kInt && cu_seqlens->device() == q_in.device()),
              "based_prefill: cu_seqlens must be (n + 1,) int32 on q's device, with B = 1");
  const bool pooled = state_indices.has_value();
  TORCH_CHECK(pooled == pool_S.has_value() && pooled == pool_z.has_value() && !(pooled && return_state),
              "based_prefill: a state pool (pool_S, pool_z, state_indices) goes together, without return_state");
  const at::Tensor q = vector_friendly(q_in), k = vector_friendly(k_in), v = vector_friendly(v_in);
  const int64_t T = q.size(2);
  // Sequences (B) and the bound on their length (N; at least 1: a varlen batch may hold no rows at all).
  const int B = varlen ? int(cu_seqlens->numel() - 1) : int(q.size(0)), H = q.size(1);
  const int N = std::max(1, varlen ? int(max_seqlen > 0 ? std::min<int64_t>(max_seqlen, T) : T) : int(T));
  at::Tensor o = output_like(v_in);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor S = return_state ? at::empty({B, H, kCompactFeatures, kValueDim}, f32) : at::empty({0}, f32);
  at::Tensor z = return_state ? at::empty({B, H, kCompactFeatures}, f32) : at::empty({0}, f32);
  at::Tensor S0c, z0c;
  if (S0.has_value()) {
    S0c = (AK_MUTANT(binding_state_dtype) && S0->scalar_type() == at::kBFloat16)
              ? at::zeros(S0->sizes(), S0->options().dtype(at::kFloat))
              : S0->to(at::kFloat).contiguous();
    z0c = z0->to(at::kFloat).contiguous();
    TORCH_CHECK(S0c.numel() == int64_t(B) * H * kCompactFeatures * kValueDim &&
                    z0c.numel() == int64_t(B) * H * kCompactFeatures,
                "based_prefill: initial state must be (B, H, 153, 64) and (B, H, 153) (B = n when varlen)");
  }
  if (pooled) {  // written in place: never copied, so the layout is checked here
    const int64_t P = pool_S->size(0);
    TORCH_CHECK(pool_S->is_contiguous() && pool_z->is_contiguous() && pool_S->dim() == 4 && pool_z->dim() == 3 &&
                    pool_S->sizes() == at::IntArrayRef({P, H, kCompactFeatures, kValueDim}) &&
                    pool_z->sizes() == at::IntArrayRef({P, H, kCompactFeatures}) &&
                    pool_S->scalar_type() == pool_z->scalar_type() &&
                    (pool_S->scalar_type() == at::kFloat || pool_S->scalar_type() == at::kBFloat16),
                "based_prefill: the pool must be contiguous (P, H, 153, 64) and (P, H, 153), float32 or bfloat16");
    TORCH_CHECK(state_indices->scalar_type() == at::kInt && state_indices->dim() == 1 &&
                    state_indices->numel() == B && state_indices->device() == q_in.device(),
                "based_prefill: state_indices must be (B,) int32 on q's device (B = n when varlen)");
  }
  // Nothing to compute: no sequences or no heads; or no rows at all, where only states are returned.
  if (int64_t(B) * H == 0) return {o, S, z};
  if (T == 0 && !varlen) return {o, S, z};
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const size_t ws_bytes = based_prefill_workspace_bytes(B, H, N, num_sms, varlen);
  at::Tensor ws = at::empty({int64_t(ws_bytes)}, q.options().dtype(at::kByte));

  BasedPrefillParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  copy_strides(q, {&p.q_sb, &p.q_sh, &p.q_sn});
  copy_strides(k, {&p.k_sb, &p.k_sh, &p.k_sn});
  copy_strides(v, {&p.v_sb, &p.v_sh, &p.v_sn});
  if (AK_MUTANT(binding_v_stride)) p.v_sh = v.size(2) * v.size(3);
  p.o = o.data_ptr();
  copy_strides(o, {&p.o_sb, &p.o_sh, &p.o_sn});
  p.S0 = S0.has_value() ? S0c.data_ptr<float>() : nullptr;
  p.z0 = S0.has_value() ? z0c.data_ptr<float>() : nullptr;
  p.S = return_state ? S.data_ptr<float>() : nullptr;
  p.z = return_state ? z.data_ptr<float>() : nullptr;
  p.workspace = ws_bytes ? ws.data_ptr() : nullptr;
  p.cu_seqlens = varlen ? cu_seqlens->data_ptr<int32_t>() : nullptr;
  p.state_indices = pooled ? state_indices->data_ptr<int32_t>() : nullptr;
  p.pool_S = pooled ? pool_S->data_ptr() : nullptr;
  p.pool_z = pooled ? pool_z->data_ptr() : nullptr;
  p.pool_size = pooled ? int(pool_S->size(0)) : 0;
  p.pool_bf16 = pooled && pool_S->scalar_type() == at::kBFloat16;
  p.total = T;
  p.B = B; p.H = H; p.N = N;
  p.scale = float(scale); p.eps = float(eps); p.normalize = normalize;
  p.dtype = dtype_of(q);
  p.num_sms = num_sms;
  C10_CUDA_CHECK(based_prefill_launch(p, at::cuda::getCurrentCUDAStream()));
  return {o, S, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> based_prefill_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool normalize, double eps,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0, bool return_state,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  return prefill(q, k, v, scale, normalize, eps, S0, z0, return_state, cu_seqlens, max_seqlen, std::nullopt,
                 std::nullopt, std::nullopt);
}

// The final states go into pool slots (in place): the mutating twin of based_prefill, a separate op so that
// based_prefill stays functional (autograd).
at::Tensor based_prefill_to_pool_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                      bool normalize, double eps, const std::optional<at::Tensor>& S0,
                                      const std::optional<at::Tensor>& z0, const std::optional<at::Tensor>& cu_seqlens,
                                      int64_t max_seqlen, at::Tensor& pool_S, at::Tensor& pool_z,
                                      const at::Tensor& state_indices) {
  return std::get<0>(prefill(q, k, v, scale, normalize, eps, S0, z0, false, cu_seqlens, max_seqlen, pool_S, pool_z,
                             state_indices));
}

// An optional tensor that is absent or empty (autograd's "no gradient") -> undefined.
at::Tensor present(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->numel() > 0) ? *t : at::Tensor();
}

// The backward loads 16-byte vectors (vector_friendly); a last stride other than 1 (autograd's expanded
// gradients have stride 0 everywhere) is copied once first.
at::Tensor vector_input(const at::Tensor& t) { return vector_friendly(t.stride(-1) == 1 ? t : t.contiguous()); }

// A gradient laid out like its input where that layout has a unit last stride, else contiguous.
at::Tensor grad_like(const at::Tensor& t) {
  at::Tensor g = at::empty_like(t);
  return g.stride(-1) == 1 ? g : at::empty(t.sizes(), t.options());
}

// Gradients of based_prefill (dense batches): (dq, dk, dv, dS0, dz0), each in its input's dtype, an empty
// tensor where needs[i] is false or (S0, z0) is absent. grad_o, grad_S, grad_z: absent or empty = zero.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> based_prefill_backward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& S0,
    const std::optional<at::Tensor>& z0, const std::optional<at::Tensor>& grad_o_in,
    const std::optional<at::Tensor>& grad_S_in, const std::optional<at::Tensor>& grad_z_in, double scale,
    bool normalize, double eps, c10::List<bool> needs) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(3) == kFeatDim && k_in.sizes() == q_in.sizes(),
              "based_prefill_backward: q, k must be (B, H, N, 16)");
  TORCH_CHECK(v_in.dim() == 4 && v_in.size(3) == kValueDim && v_in.sizes().slice(0, 3) == q_in.sizes().slice(0, 3),
              "based_prefill_backward: v must be (B, H, N, 64)");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "based_prefill_backward: q, k, v must have one dtype");
  TORCH_CHECK(needs.size() == 5, "based_prefill_backward: needs must be 5 bools (dq, dk, dv, dS0, dz0)");
  TORCH_CHECK(S0.has_value() == z0.has_value(), "based_prefill_backward: S0 and z0 go together");
  const at::Tensor grad_o = present(grad_o_in), grad_S = present(grad_S_in), grad_z = present(grad_z_in);
  TORCH_CHECK(!grad_o.defined() || (grad_o.sizes() == v_in.sizes() && grad_o.scalar_type() == q_in.scalar_type() &&
                                    grad_o.device() == q_in.device()),
              "based_prefill_backward: grad_o must be like v (B, H, N, 64), in q's dtype and device");
  const int B = q_in.size(0), H = q_in.size(1), N = q_in.size(2);
  const int64_t states = int64_t(B) * H;
  const auto f32 = q_in.options().dtype(at::kFloat);
  // States as contiguous float32 (B, H, 153, 64) / (B, H, 153) (a bfloat16 S0 widened, as the forward does).
  auto state32 = [&](const at::Tensor& t, int64_t numel, const char* what) {
    at::Tensor c = t.to(f32).contiguous();
    TORCH_CHECK(c.numel() == numel, "based_prefill_backward: ", what, " must be (B, H, 153, 64) / (B, H, 153)");
    return c;
  };
  const int64_t s_numel = states * kCompactFeatures * kValueDim, z_numel = states * kCompactFeatures;
  const bool init = S0.has_value();
  const at::Tensor S0c = init ? state32(*S0, s_numel, "S0") : at::Tensor();
  const at::Tensor z0c = init ? state32(*z0, z_numel, "z0") : at::Tensor();
  const at::Tensor gSc = grad_S.defined() ? state32(grad_S, s_numel, "grad_S") : at::Tensor();
  const at::Tensor gzc = grad_z.defined() ? state32(grad_z, z_numel, "grad_z") : at::Tensor();

  const bool need_q = needs.get(0), need_k = needs.get(1), need_v = needs.get(2);
  const bool need_S0 = init && needs.get(3), need_z0 = init && needs.get(4);
  auto none = [&]() { return q_in.new_empty({0}); };  // one per output: outputs never alias
  at::Tensor dq = need_q ? grad_like(q_in) : none(), dk = need_k ? grad_like(k_in) : none();
  at::Tensor dv = need_v ? grad_like(v_in) : none();
  at::Tensor dS0 = need_S0 ? at::empty({B, H, kCompactFeatures, kValueDim}, f32) : none();
  at::Tensor dz0 = need_z0 ? at::empty({B, H, kCompactFeatures}, f32) : none();
  auto to_input_dtype = [&](at::Tensor g, const std::optional<at::Tensor>& like) {  // dS0 / dz0 as S0 / z0
    return (g.numel() > 0 && like->scalar_type() != at::kFloat) ? g.to(like->scalar_type()) : g;
  };
  if (states == 0) return {dq, dk, dv, dS0, dz0};
  if (N == 0) {  // no tokens: the initial state's gradient is the returned state's
    if (need_S0) gSc.defined() ? dS0.copy_(gSc.view(dS0.sizes())) : dS0.zero_();
    if (need_z0) gzc.defined() ? dz0.copy_(gzc.view(dz0.sizes())) : dz0.zero_();
    return {dq, dk, dv, to_input_dtype(dS0, S0), to_input_dtype(dz0, z0)};
  }
  const at::Tensor q = vector_input(q_in), k = vector_input(k_in), v = vector_input(v_in);
  at::Tensor go = grad_o.defined() ? vector_input(grad_o) : at::Tensor();

  BasedPrefillBackwardParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  copy_strides(q, {&p.q_sb, &p.q_sh, &p.q_sn});
  copy_strides(k, {&p.k_sb, &p.k_sh, &p.k_sn});
  copy_strides(v, {&p.v_sb, &p.v_sh, &p.v_sn});
  if (go.defined()) {
    p.grad_o = go.data_ptr();
    copy_strides(go, {&p.go_sb, &p.go_sh, &p.go_sn});
    if (AK_MUTANT(binding_bwd_grad_o_strides)) p.go_sb = int64_t(H) * N * kValueDim, p.go_sh = int64_t(N) * kValueDim,
                                                p.go_sn = kValueDim;
  }
  p.S0 = init ? S0c.data_ptr<float>() : nullptr;
  p.z0 = init ? z0c.data_ptr<float>() : nullptr;
  p.grad_S = gSc.defined() ? gSc.data_ptr<float>() : nullptr;
  p.grad_z = gzc.defined() ? gzc.data_ptr<float>() : nullptr;
  p.dq = need_q ? dq.data_ptr() : nullptr;
  p.dk = need_k ? dk.data_ptr() : nullptr;
  p.dv = need_v ? dv.data_ptr() : nullptr;
  if (need_q) copy_strides(dq, {&p.dq_sb, &p.dq_sh, &p.dq_sn});
  if (need_k) copy_strides(dk, {&p.dk_sb, &p.dk_sh, &p.dk_sn});
  if (need_v) copy_strides(dv, {&p.dv_sb, &p.dv_sh, &p.dv_sn});
  p.dS0 = need_S0 ? dS0.data_ptr<float>() : nullptr;
  p.dz0 = need_z0 ? dz0.data_ptr<float>() : nullptr;
  p.B = B; p.H = H; p.N = N;
  p.scale = float(scale); p.eps = float(eps); p.normalize = normalize;
  p.dtype = dtype_of(q);
  p.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const size_t ws_bytes = based_prefill_backward_workspace_bytes(p);
  at::Tensor ws = at::empty({int64_t(ws_bytes / sizeof(float))}, f32);
  p.workspace = ws_bytes ? ws.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(based_prefill_backward_launch(p, at::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv, to_input_dtype(dS0, S0), to_input_dtype(dz0, z0)};
}

at::Tensor based_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                             at::Tensor& S, at::Tensor& z, double scale, bool normalize, double eps,
                             const std::optional<at::Tensor>& state_indices) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  TORCH_CHECK(q_in.dim() == 3 && q_in.size(2) == kFeatDim && k_in.sizes() == q_in.sizes(),
              "based_decode: q, k must be (B, H, 16)");
  const int B = q_in.size(0), H = q_in.size(1);
  TORCH_CHECK(v_in.dim() == 3 && v_in.size(0) == B && v_in.size(1) == H && v_in.size(2) == kValueDim,
              "based_decode: v must be (B, H, 64)");
  // With state_indices the state is a pool of P slots (the kernel refuses indices outside [-1, P)).
  at::Tensor idx;
  int64_t rows = B;
  if (state_indices.has_value()) {
    TORCH_CHECK(state_indices->scalar_type() == at::kInt && state_indices->dim() == 1 &&
                    state_indices->size(0) == B && state_indices->device() == q_in.device(),
                "based_decode: state_indices must be a (B,) int32 tensor on q's device");
    TORCH_CHECK(S.dim() == 4 && S.size(0) <= INT_MAX, "based_decode: a state pool must be (P, H, 153, 64)");
    rows = S.size(0);
    idx = state_indices->contiguous();
  }
  TORCH_CHECK(S.is_contiguous() && z.is_contiguous() && S.scalar_type() == z.scalar_type() &&
                  S.device() == q_in.device() && z.device() == q_in.device() &&
                  S.numel() == rows * H * kCompactFeatures * kValueDim && z.numel() == rows * H * kCompactFeatures,
              "based_decode: state must be contiguous (B or P, H, 153, 64) and (B or P, H, 153) of one dtype");
  const at::Tensor q = vector_friendly(q_in), k = vector_friendly(k_in), v = vector_friendly(v_in);
  at::Tensor o = output_like(v_in);

  BasedDecodeParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  copy_strides(q, {&p.q_sb, &p.q_sh});
  copy_strides(k, {&p.k_sb, &p.k_sh});
  copy_strides(v, {&p.v_sb, &p.v_sh});
  p.S = S.data_ptr(); p.z = z.data_ptr();
  p.o = o.data_ptr();
  copy_strides(o, {&p.o_sb, &p.o_sh});
  p.B = B; p.H = H;
  p.scale = float(scale); p.eps = float(eps); p.normalize = normalize;
  p.dtype = dtype_of(q); p.state_dtype = dtype_of(S);
  p.state_indices = idx.defined() ? idx.data_ptr<int32_t>() : nullptr;
  p.P = int(rows);
  p.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  C10_CUDA_CHECK(based_decode_launch(p, at::cuda::getCurrentCUDAStream()));
  return o;
}

at::Tensor sliding_window_decode_cuda(const at::Tensor& q_in, const at::Tensor& kn_in, const at::Tensor& vn_in,
                                      at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& positions,
                                      double scale, const std::optional<at::Tensor>& cache_indices) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  TORCH_CHECK(q_in.dim() == 3 && kn_in.sizes() == q_in.sizes() && vn_in.sizes() == q_in.sizes(),
              "sliding_window_decode: q, k_new, v_new must be (B, H, e)");
  const int B = q_in.size(0), H = q_in.size(1), e = q_in.size(2);
  const bool pooled = cache_indices.has_value();
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && (pooled || k_cache.size(0) == B) &&
                  k_cache.size(1) == H && k_cache.size(3) == e,
              "sliding_window_decode: caches must be (B, H, window, e), or (P, H, window, e) pools with "
              "cache_indices");
  TORCH_CHECK(positions.scalar_type() == at::kInt && positions.numel() == B && positions.is_cuda(),
              "sliding_window_decode: positions must be a (B,) int32 CUDA tensor");
  TORCH_CHECK(!pooled || (cache_indices->scalar_type() == at::kInt && cache_indices->numel() == B &&
                          cache_indices->device() == q_in.device() && k_cache.size(0) >= 1 &&
                          k_cache.size(0) <= std::numeric_limits<int>::max()),
              "sliding_window_decode: cache_indices must be a (B,) int32 tensor on q's device, the pools "
              "non-empty");
  // The caches are updated in place, so they cannot be copied to fix their alignment.
  TORCH_CHECK(vector_friendly(k_cache).data_ptr() == k_cache.data_ptr() &&
                  vector_friendly(v_cache).data_ptr() == v_cache.data_ptr(),
              "sliding_window_decode: caches must be 16-byte aligned with strides that are multiples of 16 bytes");
  const at::Tensor q = vector_friendly(q_in), kn = vector_friendly(kn_in), vn = vector_friendly(vn_in);
  const at::Tensor pos = positions.contiguous();
  const at::Tensor index = pooled ? cache_indices->contiguous() : at::Tensor();
  at::Tensor o = output_like(q_in);

  SlidingWindowDecodeParams p{};
  p.q = q.data_ptr(); p.k_new = kn.data_ptr(); p.v_new = vn.data_ptr();
  copy_strides(q, {&p.q_sb, &p.q_sh});
  copy_strides(kn, {&p.kn_sb, &p.kn_sh});
  copy_strides(vn, {&p.vn_sb, &p.vn_sh});
  p.k_cache = k_cache.data_ptr(); p.v_cache = v_cache.data_ptr();
  copy_strides(k_cache, {&p.kc_sb, &p.kc_sh, &p.kc_sw});
  copy_strides(v_cache, {&p.vc_sb, &p.vc_sh, &p.vc_sw});
  p.positions = pos.data_ptr<int32_t>();
  p.cache_indices = pooled ? index.data_ptr<int32_t>() : nullptr;
  p.pool_rows = pooled ? int(k_cache.size(0)) : 0;
  p.o = o.data_ptr();
  copy_strides(o, {&p.o_sb, &p.o_sh});
  p.B = B; p.H = H; p.window = k_cache.size(2); p.e = e;
  p.scale = float(scale);
  p.dtype = dtype_of(q);
  C10_CUDA_CHECK(sliding_window_decode_launch(p, at::cuda::getCurrentCUDAStream()));
  return o;
}

at::Tensor sliding_window_prefill_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                       at::Tensor& k_cache, at::Tensor& v_cache, double scale,
                                       const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                       const std::optional<at::Tensor>& cache_indices) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  TORCH_CHECK(q_in.dim() == 4 && k_in.sizes() == q_in.sizes() && v_in.sizes() == q_in.sizes(),
              "sliding_window_prefill: q, k, v must be (B, H, N, e) of one shape");
  const int B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), e = q_in.size(3);
  const int nseq = cu_seqlens.has_value() ? int(cu_seqlens->numel()) - 1 : B;
  TORCH_CHECK(!cu_seqlens.has_value() || (B == 1 && nseq >= 0 && cu_seqlens->scalar_type() == at::kInt &&
                                          cu_seqlens->is_cuda() && cu_seqlens->dim() == 1),
              "sliding_window_prefill: cu_seqlens must be an (n + 1,) int32 CUDA tensor with B = 1");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == H &&
                  k_cache.size(3) == e && k_cache.scalar_type() == q_in.scalar_type() &&
                  v_cache.scalar_type() == q_in.scalar_type(),
              "sliding_window_prefill: caches must be (rows, H, window, e) in q's dtype");
  TORCH_CHECK(cache_indices.has_value() ? (cache_indices->scalar_type() == at::kInt && cache_indices->is_cuda() &&
                                           cache_indices->numel() == nseq)
                                        : k_cache.size(0) == nseq,
              "sliding_window_prefill: cache_indices must be an (n,) int32 CUDA tensor, or the caches have one "
              "row per sequence");
  // The caches are written in place, so they cannot be copied to fix their alignment.
  TORCH_CHECK(vector_friendly(k_cache).data_ptr() == k_cache.data_ptr() &&
                  vector_friendly(v_cache).data_ptr() == v_cache.data_ptr(),
              "sliding_window_prefill: caches must be 16-byte aligned with strides that are multiples of 16 bytes");
  const at::Tensor q = vector_friendly(q_in), k = vector_friendly(k_in), v = vector_friendly(v_in);
  const at::Tensor cu = cu_seqlens.has_value() ? cu_seqlens->contiguous() : at::Tensor();
  const at::Tensor idx = cache_indices.has_value() ? cache_indices->contiguous() : at::Tensor();
  at::Tensor o = output_like(q_in);

  SlidingWindowPrefillParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  copy_strides(q, {&p.q_sb, &p.q_sh, &p.q_sn});
  copy_strides(k, {&p.k_sb, &p.k_sh, &p.k_sn});
  copy_strides(v, {&p.v_sb, &p.v_sh, &p.v_sn});
  p.o = o.data_ptr();
  copy_strides(o, {&p.o_sb, &p.o_sh, &p.o_sn});
  p.k_cache = k_cache.data_ptr(); p.v_cache = v_cache.data_ptr();
  copy_strides(k_cache, {&p.kc_sb, &p.kc_sh, &p.kc_sw});
  copy_strides(v_cache, {&p.vc_sb, &p.vc_sh, &p.vc_sw});
  p.cu_seqlens = cu_seqlens.has_value() ? cu.data_ptr<int32_t>() : nullptr;
  p.cache_indices = cache_indices.has_value() ? idx.data_ptr<int32_t>() : nullptr;
  p.nseq = nseq; p.H = H; p.N = N;
  p.max_len = cu_seqlens.has_value() ? int(std::min<int64_t>(max_seqlen < 0 ? N : max_seqlen, N)) : N;
  p.rows = k_cache.size(0); p.window = k_cache.size(2); p.e = e;
  p.scale = float(scale);
  p.dtype = dtype_of(q);
  C10_CUDA_CHECK(sliding_window_prefill_launch(p, at::cuda::getCurrentCUDAStream()));
  return o;
}

}  // namespace

TORCH_LIBRARY_IMPL(attn_kernels, CUDA, m) {
  m.impl("based_prefill", &based_prefill_cuda);
  m.impl("based_prefill_to_pool", &based_prefill_to_pool_cuda);
  m.impl("based_prefill_backward", &based_prefill_backward_cuda);
  m.impl("based_decode", &based_decode_cuda);
#if !AK_MUTANT(binding_op_missing)
  m.impl("sliding_window_decode", &sliding_window_decode_cuda);
#endif
  m.impl("sliding_window_prefill", &sliding_window_prefill_cuda);
}

}  // namespace attn_kernels

// `import attn_kernels._C` loads this library, which registers the kernels above; it has no Python API.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
