"""based_decode: one generation step of Based linear attention, state updated in place (spec.md)."""
from __future__ import annotations

import torch

from . import _validate as check
from . import reference
from ._library import compute_dtype, define_op
from .limits import FEAT_DIM, VALUE_DIM

OP = "based_decode"


def _reference_impl(q, k, v, S, z, scale, normalize, eps, state_indices=None):
    """The PyTorch reference behind the op: the CPU kernel, in float32 (float64 stays). With state_indices,
    S and z are a pool whose slots the rows update (reference.based_decode_pooled), written back in place."""
    ct = compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    kw = dict(scale=scale, normalize=normalize, eps=eps)
    if state_indices is None:
        o_ref, (S_new, z_new) = reference.based_decode_step(qc, kc, vc, (S.to(ct), z.to(ct)), **kw)
    else:
        o_ref, (S_new, z_new) = reference.based_decode_pooled(qc, kc, vc, (S, z), state_indices, **kw)
    S.copy_(S_new)
    z.copy_(z_new)
    return torch.empty_like(v).copy_(o_ref)


def _fake(q, k, v, S, z, scale, normalize, eps, state_indices=None):
    return torch.empty_like(v)


define_op(OP, "(Tensor q, Tensor k, Tensor v, Tensor(a!) S, Tensor(b!) z, float scale, bool normalize, "
              "float eps, Tensor? state_indices=None) -> Tensor", cpu=_reference_impl, fake=_fake)


def empty_state(B: int, H: int, *, dtype=torch.float32, device=None):
    """A zero Based state (S (B, H, 153, 64), z (B, H, 153)) for based_decode: float32 (default) or bfloat16
    (half the bytes per step; see the README for its accuracy cost)."""
    for name, n in (("B", B), ("H", H)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"empty_state: {name} must be a positive int, got {n!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise TypeError(f"empty_state: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return reference.zero_state(B, H, dtype=dtype, device=device)


def based_decode(q, k, v, state, *, state_indices=None, scale=None, normalize=True, eps=1e-6):
    """One decode step: S += phi(k) v^T; z += phi(k); o = phi(q)^T S / (phi(q).z + eps).

    Args:
        q, k: (B, H, 16) float16/bfloat16 on CUDA (any float dtype on CPU), last dim contiguous.
        v: (B, H, 64), same dtype and device.
        state: (S (B, H, 153, 64), z (B, H, 153)), contiguous, float32 or bfloat16 (both one dtype),
            updated in place — e.g. from ``empty_state`` or ``based_prefill(..., return_state=True)``.
            With ``state_indices``: a pool (S (P, H, 153, 64), z (P, H, 153)) of P slots, any P.
        state_indices: None, or (B,) int32 on the inputs' device: row b updates and reads pool slot
            state_indices[b] in place (as row b of a contiguous state); -1 = a padding row (o = 0, no slot
            read or written; may repeat). The other slots are untouched. Checked on the host (-1 <= i < P,
            slots distinct) except under CUDA-graph capture or torch.compile, where an index outside
            [-1, P) gives a NaN row and writes nothing (a repeated slot there is unspecified).
        scale: c in s = c q.k; default 1/sqrt(16). Finite, > 0.
        normalize: divide by phi(q).z + eps (default) or return the numerator alone.
        eps: finite, >= 0.

    Returns:
        o (B, H, 64) in the input dtype.
    """
    check.based_qkv(OP, q, k, v, ndim=3)
    B, H = q.shape[:2]
    pooled = state_indices is not None
    S, z = check.writable_state(OP, "state", state, None if pooled else B, H, VALUE_DIM, q.device,
                                (torch.float32, torch.bfloat16))
    if pooled:
        check.index_tensor(OP, "state_indices", state_indices, B, q.device)
    scale = check.positive_float(OP, "scale", scale, default=reference.default_scale(FEAT_DIM))
    check.flag(OP, "normalize", normalize)
    eps = check.positive_float(OP, "eps", eps, allow_zero=True)
    if pooled:  # last: the one check that reads device data (a sync)
        check.pool_indices(OP, "state_indices", state_indices, B, S.shape[0], q.device)
    return torch.ops.attn_kernels.based_decode(q, k, v, S, z, scale, normalize, eps, state_indices)
