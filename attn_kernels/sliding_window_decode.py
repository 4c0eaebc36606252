"""sliding_window_decode: softmax attention of one new token over its last `window` keys, with the k/v
caches kept as per-sequence ring buffers, or as rows of cache pools named by cache_indices (spec.md)."""
from __future__ import annotations

import torch

from . import _validate as check
from . import reference
from ._library import compute_dtype, define_op
from .limits import SWD_HEAD_DIMS

OP = "sliding_window_decode"


def _reference_impl(q, k_new, v_new, k_cache, v_cache, positions, scale, cache_indices=None):
    """The PyTorch reference behind the op: the CPU kernel, in float32 (float64 stays); the caches (or pools)
    are updated in place, as the kernel does."""
    ct = compute_dtype(q.dtype)
    o_ref, k_out, v_out = reference.sliding_window_decode(
        q.to(ct), k_new.to(ct), v_new.to(ct), k_cache, v_cache, positions, window=k_cache.shape[2],
        scale=scale, cache_indices=cache_indices)
    k_cache.copy_(k_out)
    v_cache.copy_(v_out)
    return torch.empty_like(q).copy_(o_ref)


def _fake(q, k_new, v_new, k_cache, v_cache, positions, scale, cache_indices=None):
    return torch.empty_like(q)


define_op(OP, "(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, "
              "float scale, Tensor? cache_indices=None) -> Tensor", cpu=_reference_impl, fake=_fake)


def sliding_window_decode(q, k_new, v_new, k_cache, v_cache, positions, *, window=64, scale=None,
                          cache_indices=None):
    """Append the new token to each sequence's ring buffer, then attend over its last `window` tokens.

    Args:
        q, k_new, v_new: (B, H, e), e in {64, 128}, float16/bfloat16 on CUDA (any float dtype on CPU).
        k_cache, v_cache: (B, H, window, e) ring buffers, same dtype; position p lives in slot p % window.
            Updated in place (the new token is written to slot positions[b] % window). With cache_indices:
            pools (P, H, window, e) of P >= 1 rows, the same P for both.
        positions: (B,) int32 on the same device: the 0-based position of the new token of each sequence
            (sequences may be at different positions). Not advanced by the op. Checked to be >= 0 except
            under CUDA-graph capture or torch.compile, where the kernel writes NaN for a negative one.
        window: the number of keys attended, itself included; 1..256, must equal k_cache.shape[2].
        scale: softmax scale, default 1/sqrt(e). Finite, > 0.
        cache_indices: None (the caches' row b is sequence b), or (B,) int32 on the same device: the pool
            row of each sequence, read and written exactly as row b of contiguous caches. -1 marks a padding
            row: o is 0 there and nothing is read or written for it (its position is ignored). Checked on
            the host (each in [-1, P), no pool row named twice) except under CUDA-graph capture or
            torch.compile, where an out-of-range index gives a NaN row and writes nothing.

    Returns:
        o (B, H, e) in the input dtype: softmax(scale q.K^T) V over positions [max(0, p - window + 1), p].
    """
    check.tensor(OP, "q", q, 3, last=SWD_HEAD_DIMS)
    B, H, e = q.shape
    check.tensor(OP, "k_new", k_new, 3)
    check.tensor(OP, "v_new", v_new, 3)
    check.shape(OP, "k_new", k_new, q.shape)
    check.shape(OP, "v_new", v_new, q.shape)
    check.window(OP, window)
    check.tensor(OP, "k_cache", k_cache, 4)
    check.tensor(OP, "v_cache", v_cache, 4)
    rows = B if cache_indices is None else k_cache.shape[0]  # the pool's P: check.tensor refused P = 0
    check.shape(OP, "k_cache", k_cache, (rows, H, window, e))
    check.shape(OP, "v_cache", v_cache, (rows, H, window, e))
    check.same_device(OP, "q", q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache)
    check.input_dtype(OP, "q", q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{OP}: positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype != torch.int32:
        raise TypeError(f"{OP}: positions.dtype must be torch.int32, got {positions.dtype}")
    if tuple(positions.shape) != (B,):
        raise ValueError(f"{OP}: positions.shape must be ({B},), got {tuple(positions.shape)}")
    check.same_device(OP, "q", q, positions=positions)
    if cache_indices is not None:
        check.pool_indices(OP, "cache_indices", cache_indices, B, rows, q.device)
    if check.can_read_values(positions):
        # a padding row's position is ignored
        live = positions if cache_indices is None else positions[cache_indices != -1]
        smallest = int(live.min()) if live.numel() else 0
        if smallest < 0:
            raise ValueError(f"{OP}: positions must be >= 0, got {smallest}")
    scale = check.positive_float(OP, "scale", scale, default=reference.default_scale(e))
    return torch.ops.attn_kernels.sliding_window_decode(q, k_new, v_new, k_cache, v_cache, positions, scale,
                                                        cache_indices)
