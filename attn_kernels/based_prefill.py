"""based_prefill: causal Based linear attention over a whole sequence (spec.md)."""
from __future__ import annotations

import torch

from . import _validate as check
from . import reference
from ._library import compute_dtype, define_op
from .limits import COMPACT_FEATURES, FEAT_DIM, VALUE_DIM

OP = "based_prefill"


def _empty_outputs(q, v, return_state, cu_seqlens=None):
    B = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1  # sequences
    H = q.shape[1]
    sd = compute_dtype(q.dtype)  # the state keeps the reference's precision: float32, float64 stays
    if return_state:
        return (torch.empty_like(v), q.new_empty(B, H, COMPACT_FEATURES, v.shape[-1], dtype=sd),
                q.new_empty(B, H, COMPACT_FEATURES, dtype=sd))
    return torch.empty_like(v), q.new_empty(0, dtype=sd), q.new_empty(0, dtype=sd)


def _reference_impl(q, k, v, scale, normalize, eps, S0, z0, return_state, cu_seqlens=None, max_seqlen=0):
    """The PyTorch reference (chunked form) behind the op: the CPU kernel, in float32 (float64 stays)."""
    ct = compute_dtype(q.dtype)
    init = None if S0 is None else (S0.to(ct), z0.to(ct))
    if cu_seqlens is None:
        o_ref, (S_ref, z_ref) = reference.based_chunked(q.to(ct), k.to(ct), v.to(ct), scale=scale,
                                                        normalize=normalize, eps=eps, initial_state=init)
    else:
        o_ref, (S_ref, z_ref) = reference.based_varlen(q.to(ct), k.to(ct), v.to(ct), cu_seqlens, scale=scale,
                                                       normalize=normalize, eps=eps, initial_state=init)
    o, S, z = _empty_outputs(q, v, return_state, cu_seqlens)
    o.copy_(o_ref)
    if return_state:
        S.copy_(S_ref)
        z.copy_(z_ref)
    return o, S, z


def _fake(q, k, v, scale, normalize, eps, S0, z0, return_state, cu_seqlens=None, max_seqlen=0):
    return _empty_outputs(q, v, return_state, cu_seqlens)


define_op(OP, "(Tensor q, Tensor k, Tensor v, float scale, bool normalize, float eps, Tensor? S0, Tensor? z0, "
              "bool return_state, Tensor? cu_seqlens=None, int max_seqlen=0) -> (Tensor, Tensor, Tensor)",
          cpu=_reference_impl, fake=_fake)


def _to_pool_reference_impl(q, k, v, scale, normalize, eps, S0, z0, cu_seqlens, max_seqlen, pool_S, pool_z,
                            state_indices):
    """based_prefill whose final states go into pool slots, in place (the reference, as _reference_impl)."""
    ct = compute_dtype(q.dtype)
    init = None if S0 is None else (S0.to(ct), z0.to(ct))
    o_ref, (S_new, z_new) = reference.based_prefill_to_pool(
        q.to(ct), k.to(ct), v.to(ct), (pool_S.to(ct), pool_z.to(ct)), state_indices, cu_seqlens=cu_seqlens,
        scale=scale, normalize=normalize, eps=eps, initial_state=init)
    pool_S.copy_(S_new)
    pool_z.copy_(z_new)
    return o_ref.to(q.dtype)


def _to_pool_fake(q, k, v, scale, normalize, eps, S0, z0, cu_seqlens, max_seqlen, pool_S, pool_z, state_indices):
    return torch.empty_like(v)


# The pool variant is its own op: it mutates the pool, and based_prefill stays functional.
define_op(OP + "_to_pool", "(Tensor q, Tensor k, Tensor v, float scale, bool normalize, float eps, Tensor? S0, "
                           "Tensor? z0, Tensor? cu_seqlens, int max_seqlen, Tensor(a!) pool_S, Tensor(b!) pool_z, "
                           "Tensor state_indices) -> Tensor",
          cpu=_to_pool_reference_impl, fake=_to_pool_fake)


def based_prefill(q, k, v, *, scale=None, normalize=True, eps=1e-6, initial_state=None, return_state=False,
                  cu_seqlens=None, max_seqlen=None, state=None, state_indices=None):
    """Causal Based linear attention with the 2nd-order Taylor feature map.

    Args:
        q, k: (B, H, N, 16) float16/bfloat16 on CUDA (any float dtype on CPU). Only the last dimension
            must be contiguous: a (B, N, H, 16) tensor passed as ``.transpose(1, 2)`` is not copied.
        v: (B, H, N, 64), same dtype and device.
        scale: c in s = c q.k; default 1/sqrt(16). Finite, > 0.
        normalize: divide by the running sum of weights (default) or return the numerator alone.
        eps: added to the denominator; finite, >= 0.
        initial_state: optional (S0 (B, H, 153, 64), z0 (B, H, 153)) float32 (or bfloat16) state to
            continue from, e.g. the state an earlier call returned (chunked prefill); (n, ...) with cu_seqlens.
        return_state: also return the state after the last token.
        cu_seqlens: varlen batches: (n + 1,) int32 on the inputs' device, 0 = cu_seqlens[0] <= ... <=
            cu_seqlens[n] = T. q, k, v are then (1, H, T, .): n sequences packed along the token axis,
            sequence i = tokens [cu_seqlens[i], cu_seqlens[i+1]) (empty ones allowed), each computed as if
            alone (FlashAttention's and fla's convention; a (T, H, D) tensor as a (1, H, T, D) view is read
            in place). Its values are checked on the host except under CUDA-graph capture or torch.compile.
        max_seqlen: with cu_seqlens, optional: an int >= the longest sequence (helps the launch: without
            it the kernel plans for T). Under capture a smaller value leaves later tokens uncomputed.
        state, state_indices: write the final states into a state pool instead of returning them (serving:
            prefill -> based_decode(..., state_indices=) with no copy). state = (S (P, H, 153, 64),
            z (P, H, 153)) contiguous float32 or bfloat16, the pool based_decode takes; state_indices (B,)
            (n with cu_seqlens) int32: sequence i's state goes to slot state_indices[i], -1 = not written.
            Only written, never read (initial_state stays per sequence). Slots in [-1, P) and distinct
            (checked on the host except under graph capture / torch.compile, where an out-of-range index
            writes nothing and makes that sequence's outputs NaN). Not with return_state.

    Returns:
        o (B, H, N, 64) in the input dtype, laid out like v; with return_state, ``(o, (S, z))`` where
        S (B, H, 153, 64) and z (B, H, 153) are float32 (float64 for float64 CPU inputs), the compact
        state that ``based_decode`` takes; (n, H, 153, 64) and (n, H, 153) with cu_seqlens.
    """
    check.based_qkv(OP, q, k, v, ndim=4, allow_empty=cu_seqlens is not None)
    scale = check.positive_float(OP, "scale", scale, default=reference.default_scale(FEAT_DIM))
    check.flag(OP, "normalize", normalize)
    eps = check.positive_float(OP, "eps", eps, allow_zero=True)
    check.flag(OP, "return_state", return_state)
    H = q.shape[1]
    B, _, bound = check.varlen_batch(OP, q, cu_seqlens, max_seqlen)  # B: sequences
    bound = bound or 0  # the op's "not given"
    cuda_dtypes = (torch.float32, torch.bfloat16)
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = check.state_pair(OP, "initial_state", initial_state, B, H, VALUE_DIM, q.device, cuda_dtypes)
    if (state is None) != (state_indices is None):
        raise ValueError(f"{OP}: state (a pool) and state_indices go together, got "
                         f"{'state' if state is not None else 'state_indices'} alone")
    if state is not None:
        if return_state:
            raise ValueError(f"{OP}: with a state pool the final states go into it: pass return_state=False")
        pool_S, pool_z = check.writable_state(OP, "state", state, None, H, VALUE_DIM, q.device, cuda_dtypes)
        check.pool_indices(OP, "state_indices", state_indices, B, pool_S.shape[0], q.device)
        return torch.ops.attn_kernels.based_prefill_to_pool(q, k, v, scale, normalize, eps, S0, z0, cu_seqlens, bound,
                                                            pool_S, pool_z, state_indices)
    o, S, z = torch.ops.attn_kernels.based_prefill(q, k, v, scale, normalize, eps, S0, z0, return_state,
                                                   cu_seqlens, bound)
    return (o, (S, z)) if return_state else o
