"""sliding_window_prefill: the prompt of a sliding-window layer. Causal sliding-window softmax attention over
each sequence, and the fill of its k/v ring buffers, where sliding_window_decode continues (spec.md)."""
from __future__ import annotations

import torch

from . import _validate as check
from . import reference
from ._library import compute_dtype, define_op
from .limits import SWD_HEAD_DIMS

OP = "sliding_window_prefill"


def _reference_impl(q, k, v, k_cache, v_cache, scale, cu_seqlens, max_seqlen, cache_indices):
    """The PyTorch reference behind the op: the CPU kernel, in float32 (float64 stays)."""
    ct = compute_dtype(q.dtype)
    o, k_out, v_out = reference.sliding_window_prefill(
        q.to(ct), k.to(ct), v.to(ct), k_cache, v_cache, window=k_cache.shape[2], scale=scale,
        cu_seqlens=cu_seqlens, cache_indices=cache_indices)
    k_cache.copy_(k_out)
    v_cache.copy_(v_out)
    return torch.empty_like(q).copy_(o)


def _fake(q, k, v, k_cache, v_cache, scale, cu_seqlens, max_seqlen, cache_indices):
    return torch.empty_like(q)


define_op(OP, "(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, float scale, "
              "Tensor? cu_seqlens, int max_seqlen, Tensor? cache_indices) -> Tensor",
          cpu=_reference_impl, fake=_fake)


def sliding_window_prefill(q, k, v, k_cache, v_cache, *, window=64, scale=None, cu_seqlens=None, max_seqlen=None,
                           cache_indices=None):
    """Causal sliding-window attention over a prompt, and the fill of the k/v ring buffers.

    Args:
        q, k, v: (B, H, N, e), e in {64, 128}, N >= 0, float16/bfloat16 on CUDA (any float dtype on CPU); any
            strides but the last (a (B, N, H, e) tensor passed as ``.transpose(1, 2)`` is read in place).
            With cu_seqlens: (1, H, T, e), n sequences packed along T.
        k_cache, v_cache: (B or n, H, window, e) ring buffers in q's dtype, row i for sequence i; with
            cache_indices, pools (P, H, window, e). Only written: sequence i's last min(len_i, window) keys and
            values (positions p, counted from the sequence's start) go to slot p % window; every other slot
            keeps its content. sliding_window_decode then continues at position len_i.
        window: W, the keys each query attends, itself included: 1..256; must equal k_cache.shape[2].
        scale: softmax scale, default 1/sqrt(e). Finite, > 0.
        cu_seqlens: (n + 1,) int32 on q's device, FlashAttention's varlen convention: sequence i is tokens
            [cu_seqlens[i], cu_seqlens[i + 1]); starts at 0, non-decreasing, ends at T (empty sequences allowed).
        max_seqlen: optional host int >= the longest sequence (sizes the launch). Left out, it is read from
            cu_seqlens on the host, or taken as T under CUDA-graph capture / torch.compile.
        cache_indices: (B or n,) int32 on q's device: the pool row of each sequence; -1 = nothing written for
            it (its output is still computed). Entries in [-1, P), no row named twice (checked on the host
            except under capture / compile, where an entry outside [-1, P) writes nothing and gives NaN
            outputs for that sequence).

    Returns:
        o, q's shape and dtype: o_i = softmax(scale q_i.K_j^T) V_j over j in [max(start, i - window + 1), i].
    """
    check.tensor(OP, "q", q, 4, last=SWD_HEAD_DIMS, allow_empty=True)
    B, H, N, e = q.shape
    check.tensor(OP, "k", k, 4, allow_empty=True)
    check.tensor(OP, "v", v, 4, allow_empty=True)
    check.shape(OP, "k", k, q.shape)
    check.shape(OP, "v", v, q.shape)
    check.window(OP, window)
    check.same_device(OP, "q", q, k=k, v=v)
    check.input_dtype(OP, "q", q, k=k, v=v)

    nseq, longest, bound = check.varlen_batch(OP, q, cu_seqlens, max_seqlen)
    # a bound on the longest sequence (the launch grid's query blocks): read, given, or N
    max_len = longest if longest is not None else min(bound, N) if bound is not None else N

    if nseq > 65535 or H > 65535:  # the launch grid's y (heads) and z (sequences)
        raise ValueError(f"{OP}: at most 65535 sequences and 65535 heads, got {nseq} sequences and {H} heads")
    check.tensor(OP, "k_cache", k_cache, 4, allow_empty=True)  # n = 0 sequences: 0 rows
    check.tensor(OP, "v_cache", v_cache, 4, allow_empty=True)
    rows = k_cache.shape[0] if cache_indices is not None else nseq
    if cache_indices is None and k_cache.shape[0] != nseq:
        what = "n (one per packed sequence)" if cu_seqlens is not None else "B"
        raise ValueError(f"{OP}: k_cache.shape[0] must be {what} = {nseq} without cache_indices, "
                         f"got {k_cache.shape[0]}")
    check.shape(OP, "k_cache", k_cache, (rows, H, window, e))
    check.shape(OP, "v_cache", v_cache, (rows, H, window, e))
    check.same_device(OP, "q", q, k_cache=k_cache, v_cache=v_cache)
    check.input_dtype(OP, "q", q, k_cache=k_cache, v_cache=v_cache)
    if cache_indices is not None:
        check.pool_indices(OP, "cache_indices", cache_indices, nseq, rows, q.device)
    scale = check.positive_float(OP, "scale", scale, default=reference.default_scale(e))
    return torch.ops.attn_kernels.sliding_window_prefill(q, k, v, k_cache, v_cache, scale, cu_seqlens, max_len,
                                                         cache_indices)
