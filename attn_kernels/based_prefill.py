"""based_prefill: causal Based linear attention over a whole sequence (spec.md)."""
from __future__ import annotations

import torch

from . import _validate as check
from . import reference
from ._library import compute_dtype, define_op
from .limits import COMPACT_FEATURES, FEAT_DIM, VALUE_DIM

OP = "based_prefill"


def _empty_outputs(q, v, return_state):
    B, H = q.shape[:2]
    sd = compute_dtype(q.dtype)  # the state keeps the reference's precision: float32, float64 stays
    if return_state:
        return (torch.empty_like(v), q.new_empty(B, H, COMPACT_FEATURES, v.shape[-1], dtype=sd),
                q.new_empty(B, H, COMPACT_FEATURES, dtype=sd))
    return torch.empty_like(v), q.new_empty(0, dtype=sd), q.new_empty(0, dtype=sd)


def _reference_impl(q, k, v, scale, normalize, eps, S0, z0, return_state):
    """The PyTorch reference (chunked form) behind the op: the CPU kernel, in float32 (float64 stays)."""
    ct = compute_dtype(q.dtype)
    init = None if S0 is None else (S0.to(ct), z0.to(ct))
    o_ref, (S_ref, z_ref) = reference.based_chunked(q.to(ct), k.to(ct), v.to(ct), scale=scale,
                                                    normalize=normalize, eps=eps, initial_state=init)
    o, S, z = _empty_outputs(q, v, return_state)
    o.copy_(o_ref)
    if return_state:
        S.copy_(S_ref)
        z.copy_(z_ref)
    return o, S, z


def _fake(q, k, v, scale, normalize, eps, S0, z0, return_state):
    return _empty_outputs(q, v, return_state)


define_op(OP, "(Tensor q, Tensor k, Tensor v, float scale, bool normalize, float eps, Tensor? S0, Tensor? z0, "
              "bool return_state) -> (Tensor, Tensor, Tensor)", cpu=_reference_impl, fake=_fake)


def based_prefill(q, k, v, *, scale=None, normalize=True, eps=1e-6, initial_state=None, return_state=False):
    """Causal Based linear attention with the 2nd-order Taylor feature map.

    Args:
        q, k: (B, H, N, 16) float16/bfloat16 on CUDA (any float dtype on CPU). Only the last dimension
            must be contiguous: a (B, N, H, 16) tensor passed as ``.transpose(1, 2)`` is not copied.
        v: (B, H, N, 64), same dtype and device.
        scale: c in s = c q.k; default 1/sqrt(16). Finite, > 0.
        normalize: divide by the running sum of weights (default) or return the numerator alone.
        eps: added to the denominator; finite, >= 0.
        initial_state: optional (S0 (B, H, 153, 64), z0 (B, H, 153)) float32 (or bfloat16) state to
            continue from, e.g. the state an earlier call returned (chunked prefill).
        return_state: also return the state after the last token.

    Returns:
        o (B, H, N, 64) in the input dtype, laid out like v; with return_state, ``(o, (S, z))`` where
        S (B, H, 153, 64) and z (B, H, 153) are float32 (float64 for float64 CPU inputs), the compact
        state that ``based_decode`` takes.
    """
    check.based_qkv(OP, q, k, v, ndim=4)
    scale = check.positive_float(OP, "scale", scale, default=reference.default_scale(FEAT_DIM))
    check.flag(OP, "normalize", normalize)
    eps = check.positive_float(OP, "eps", eps, allow_zero=True)
    check.flag(OP, "return_state", return_state)
    S0 = z0 = None
    if initial_state is not None:
        B, H = q.shape[:2]
        cuda_dtypes = (torch.float32, torch.bfloat16)
        S0, z0 = check.state_pair(OP, "initial_state", initial_state, B, H, VALUE_DIM, q.device, cuda_dtypes)
    o, S, z = torch.ops.attn_kernels.based_prefill(q, k, v, scale, normalize, eps, S0, z0, return_state)
    return (o, (S, z)) if return_state else o
