"""The cost model every benchmark is charged with: bytes moved, FLOPs, and the floor they imply.

floor_us = max(bytes / 3.0 TB/s, FLOPs / 700 TFLOP/s) in microseconds (issue 2's ceilings); pct_of_floor =
floor / median * 100. Pure Python (no torch): perf.report reads the ceilings from here too.
"""
from __future__ import annotations

HBM_BYTES_PER_S = 3.0e12
PEAK_FLOPS = 700e12

F_COMPACT = 153  # Based's feature count as stored (1 + 16 + the 136 pairs i <= j)
F_EXPANDED = 273  # the nominal 1 + 16 + 256 wide map that published kernels report FLOPs for


def floor_us(nbytes: float, flops: float) -> float:
    return max(nbytes / HBM_BYTES_PER_S, flops / PEAK_FLOPS) * 1e6


def prefill_cost(B: int, H: int, N: int, *, d: int = 16, e: int = 64, itemsize: int = 2,
                 return_state: bool = False) -> tuple[int, int]:
    """q, k (d), v, o (e) once each; FLOPs of the nominal 273-wide form: B*H*N*(2*273 + 4*273*e)."""
    nbytes = B * H * N * (d + d + e + e) * itemsize
    if return_state:
        nbytes += B * H * (F_COMPACT * e + F_COMPACT) * 4
    flops = B * H * N * (2 * F_EXPANDED + 4 * F_EXPANDED * e)
    return nbytes, flops


def prefill_backward_cost(B: int, H: int, N: int, *, d: int = 16, e: int = 64,
                          itemsize: int = 2) -> tuple[int, int]:
    """The backward alone, from what the forward saved (q, k, v) and grad_o, without state gradients (the
    training forward returns o alone). Bytes: q, k, v and grad_o read, dq, dk, dv written, once each:
    B*H*N*(2d + 2e + 2d + e)*itemsize, 512 bytes a token in bf16 (o is not read: only q, k, v are saved).

    FLOPs: 3x the forward's nominal count, B*H*N*(6*273 + 12*273*e). Per token, with prefill_cost's
    conventions (F = 273; the forward's products: phi(q)^T S and phi(k) v^T into S, 2*F*e each, phi(q).z,
    2*F): the gradient of a product C = A B is two products of its size (dA = dC B^T, dB = A^T dC):
    2*F*(2 + 4e); and with only q, k, v saved the forward's products run once more (the states S, z before
    each token for dq; num and den for the denominator's gradient): F*(2 + 4e). Both normalize modes are
    charged the same, as for the forward."""
    nbytes = B * H * N * (d + d + e + e + d + d + e) * itemsize
    _, forward_flops = prefill_cost(B, H, N, d=d, e=e, itemsize=itemsize)
    return nbytes, 3 * forward_flops


def prefill_train_cost(B: int, H: int, N: int, *, d: int = 16, e: int = 64,
                       itemsize: int = 2) -> tuple[int, int]:
    """One training step of the op, forward (prefill_cost) then backward (prefill_backward_cost): B*H*N*832
    bytes in bf16 and B*H*N*(8*273 + 16*273*e) FLOPs, 4x the forward's."""
    fwd_bytes, fwd_flops = prefill_cost(B, H, N, d=d, e=e, itemsize=itemsize)
    bwd_bytes, bwd_flops = prefill_backward_cost(B, H, N, d=d, e=e, itemsize=itemsize)
    return fwd_bytes + bwd_bytes, fwd_flops + bwd_flops


def decode_cost(B: int, H: int, *, state_itemsize: int, d: int = 16, e: int = 64, itemsize: int = 2,
                F: int = F_COMPACT, pooled: bool = False) -> tuple[int, int]:
    """State (S and z) read + written once in the state dtype, plus q, k, v read and o written; pooled:
    plus the (B,) int32 state_indices read (the state bytes are those of the B slots used, as contiguous).
    FLOPs: feature maps of q and k, S += phi(k) v^T, phi(q)^T S, phi(q).z."""
    state = B * H * (F * e + F) * state_itemsize
    nbytes = 2 * state + B * H * (d + d + e + e) * itemsize + (B * 4 if pooled else 0)
    flops = B * H * (2 * 2 * F * e + 2 * F + 2 * F)
    return nbytes, flops


def sliding_window_cost(B: int, H: int, W: int, e: int, *, itemsize: int = 2) -> tuple[int, int]:
    """The window's K and V read once; q, k_new, v_new read, o written, k_new/v_new written to the cache."""
    nbytes = B * H * W * e * 2 * itemsize + B * H * e * (3 + 1 + 2) * itemsize
    flops = B * H * W * (4 * e + 4)
    return nbytes, flops


def sliding_window_prefill_cost(B: int, H: int, N: int, W: int, e: int, *, itemsize: int = 2) -> tuple[int, int]:
    """q, k, v read once, o written once, and the ring fill: the last min(N, W) keys and values written to the
    caches (their reads are L2 hits of the same kernel). FLOPs: 4 * N * min(W, N) * e per head (q.k and p.v
    over a full window for every query; the first W - 1 queries see fewer keys, so this is an upper bound)."""
    nbytes = B * H * N * e * 4 * itemsize + B * H * min(N, W) * e * 2 * itemsize
    flops = 4 * B * H * N * min(W, N) * e
    return nbytes, flops


def softmax_decode_cost(B: int, H: int, ctx: int, e: int, *, itemsize: int = 2) -> tuple[int, int]:
    """K and V of the whole context read once, q read, o written; FLOPs as sliding_window_cost."""
    nbytes = B * H * ctx * e * 2 * itemsize + B * H * e * 2 * itemsize
    flops = B * H * ctx * (4 * e + 4)
    return nbytes, flops


def extra_info(op: str, impl: str, shape: dict, nbytes: int, flops: int) -> dict:
    """The exact keys issue 2 asks for; pct_of_floor is filled after timing (``pct_of_floor``)."""
    return {
        "op": op,
        "impl": impl,
        "shape": dict(shape),
        "bytes": int(nbytes),
        "flops": int(flops),
        "floor_us": floor_us(nbytes, flops),
        "pct_of_floor": None,
    }


def pct_of_floor(info: dict, median_s: float) -> float | None:
    """floor / median * 100 of one benchmark (None for a zero median)."""
    median_us = median_s * 1e6
    return info["floor_us"] / median_us * 100.0 if median_us > 0 else None
