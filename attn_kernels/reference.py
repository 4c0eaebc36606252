"""Pure-PyTorch references for the ops (semantics: spec.md), planned serving variants included. Any device,
any float dtype.

Every function computes in the dtype of its inputs, so the same code gives the float64 ground truth
(upcast the inputs) and the "PyTorch in the same low precision" error that the tests' tolerance rule
compares kernels against. None of them mutate their arguments.

The compact feature map's layout (F = 153, shared with the CUDA kernels, csrc/common/feature_order.h):
    [1, sqrt(c) x_i (16), c x_i^2 / sqrt(2) (16), c x_i x_j for i < j (120, row-major)]
"""
from __future__ import annotations

import math

import torch

from .limits import COMPACT_FEATURES, EXPANDED_FEATURES, FEAT_DIM, VALUE_DIM  # noqa: F401  (re-exported)

_PAIR_I, _PAIR_J = torch.triu_indices(FEAT_DIM, FEAT_DIM, offset=1)  # row-major i < j

State = tuple[torch.Tensor, torch.Tensor]


def default_scale(dim: int) -> float:
    return 1.0 / math.sqrt(dim)


def feature_map_compact(x: torch.Tensor, scale: float) -> torch.Tensor:
    """(..., 16) -> (..., 153): phi with phi(q).phi(k) = 1 + s + s^2/2, s = scale * q.k."""
    i, j, _, _ = _indices_on(x.device)
    return torch.cat(
        [
            torch.ones_like(x[..., :1]),
            math.sqrt(scale) * x,
            (scale / math.sqrt(2.0)) * x * x,
            scale * x[..., i] * x[..., j],
        ],
        dim=-1,
    )


def feature_map_expanded(x: torch.Tensor, scale: float) -> torch.Tensor:
    """(..., 16) -> (..., 273): [1, sqrt(c) x, c vec(x x^T) / sqrt(2)], the Based model's TaylorExp."""
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), math.sqrt(scale) * x, (scale / math.sqrt(2.0)) * outer], -1)


def _compact_to_expanded_index() -> tuple[torch.Tensor, torch.Tensor]:
    """For each expanded feature: the compact feature it comes from, and the factor on it."""
    d = FEAT_DIM
    src = torch.empty(EXPANDED_FEATURES, dtype=torch.long)
    factor = torch.ones(EXPANDED_FEATURES, dtype=torch.float64)
    src[: 1 + d] = torch.arange(1 + d)
    pair_index = {(int(i), int(j)): 1 + 2 * d + n for n, (i, j) in enumerate(zip(_PAIR_I, _PAIR_J))}
    for i in range(d):
        for j in range(d):
            dst = 1 + d + d * i + j
            if i == j:
                src[dst] = 1 + d + i
            else:
                src[dst] = pair_index[(min(i, j), max(i, j))]
                factor[dst] = 1.0 / math.sqrt(2.0)  # x_i x_j is split over (i, j) and (j, i)
    return src, factor


_EXP_SRC, _EXP_FACTOR = _compact_to_expanded_index()
_INDICES: dict[torch.device, tuple[torch.Tensor, ...]] = {}


def _indices_on(device: torch.device) -> tuple[torch.Tensor, ...]:
    """(pair i, pair j, expanded source, expanded factor) on `device`, copied once: a host-to-device copy
    per call would sync and break CUDA-graph capture. A plain dict, so torch.compile traces the lookup."""
    if device not in _INDICES:
        _INDICES[device] = tuple(t.to(device) for t in (_PAIR_I, _PAIR_J, _EXP_SRC, _EXP_FACTOR))
    return _INDICES[device]


def state_to_expanded(S: torch.Tensor, z: torch.Tensor) -> State:
    """Compact state (B, H, 153, e), (B, H, 153) -> the Based model's expanded layout:
    kv_state (B, H, 1, e, 273) and k_state (B, H, 1, 1, 273), with identical inner products."""
    _, _, src, factor = _indices_on(S.device)
    factor = factor.to(S.dtype)
    S_exp = S[..., src, :] * factor[:, None]
    z_exp = z[..., src] * factor
    return S_exp.transpose(-1, -2).unsqueeze(-3), z_exp[..., None, None, :]


def state_from_expanded(kv_state: torch.Tensor, k_state: torch.Tensor) -> State:
    """Inverse of state_to_expanded for any expanded state (symmetrises the quadratic block)."""
    S_exp = kv_state.squeeze(-3).transpose(-1, -2)  # (B, H, 273, e)
    z_exp = k_state.squeeze(-2).squeeze(-2)  # (B, H, 273)
    _, _, src, factor = _indices_on(S_exp.device)
    factor = factor.to(S_exp.dtype)
    S = torch.zeros(*S_exp.shape[:-2], COMPACT_FEATURES, S_exp.shape[-1], dtype=S_exp.dtype, device=S_exp.device)
    z = torch.zeros(*z_exp.shape[:-1], COMPACT_FEATURES, dtype=z_exp.dtype, device=z_exp.device)
    S.index_add_(-2, src, S_exp * factor[:, None])
    z.index_add_(-1, src, z_exp * factor)
    return S, z


def _finish(num: torch.Tensor, den: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    return num / (den[..., None] + eps) if normalize else num


def _taylor(s: torch.Tensor) -> torch.Tensor:
    return 1 + s + 0.5 * s * s


def based_quadratic(q, k, v, *, scale=None, normalize=True, eps=1e-6, initial_state: State | None = None):
    """O(N^2) form. q, k (B, H, N, 16), v (B, H, N, e) -> (o (B, H, N, e), (S, z))."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    n = q.shape[-2]
    w = _taylor(scale * (q @ k.transpose(-1, -2)))
    w = w.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), 0)
    num, den = w @ v, w.sum(-1)
    phi_k = feature_map_compact(k, scale)
    S, z = phi_k.transpose(-1, -2) @ v, phi_k.sum(-2)
    if initial_state is not None:
        S0, z0 = initial_state
        phi_q = feature_map_compact(q, scale)
        num, den = num + phi_q @ S0.to(q.dtype), den + (phi_q @ z0.to(q.dtype)[..., None]).squeeze(-1)
        S, z = S + S0.to(q.dtype), z + z0.to(q.dtype)
    return _finish(num, den, normalize, eps), (S, z)


def based_decode_step(q, k, v, state: State, *, scale=None, normalize=True, eps=1e-6):
    """One recurrent step: q, k (B, H, 16), v (B, H, e), state (S (B, H, 153, e), z (B, H, 153)).
    Update first, then read. Returns (o (B, H, e), (S_new, z_new)); computes in q's dtype."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    S, z = state[0].to(q.dtype), state[1].to(q.dtype)
    phi_q, phi_k = feature_map_compact(q, scale), feature_map_compact(k, scale)
    S = S + phi_k[..., :, None] * v[..., None, :]
    z = z + phi_k
    num = (phi_q[..., None, :] @ S).squeeze(-2)
    den = (phi_q * z).sum(-1)
    return _finish(num, den, normalize, eps), (S, z)


def zero_state(B: int, H: int, *, e: int = VALUE_DIM, dtype=torch.float32, device=None) -> State:
    """A zero state (S (B, H, 153, e), z (B, H, 153))."""
    return (torch.zeros(B, H, COMPACT_FEATURES, e, dtype=dtype, device=device),
            torch.zeros(B, H, COMPACT_FEATURES, dtype=dtype, device=device))


def based_recurrent(q, k, v, *, scale=None, normalize=True, eps=1e-6, initial_state: State | None = None):
    """Token-by-token form (O(N) Python loop: small N only). Same signature and result as based_quadratic."""
    state = (zero_state(*q.shape[:2], e=v.shape[-1], dtype=q.dtype, device=q.device) if initial_state is None
             else initial_state)
    outs = []
    for t in range(q.shape[-2]):
        o, state = based_decode_step(q[..., t, :], k[..., t, :], v[..., t, :], state, scale=scale,
                                     normalize=normalize, eps=eps)
        outs.append(o)
    return torch.stack(outs, dim=-2), state


def based_chunked(q, k, v, *, scale=None, normalize=True, eps=1e-6, initial_state: State | None = None,
                  chunk: int = 64):
    """Chunked form, the kernels' algorithm: quadratic inside a chunk, the compact state across chunks.
    O(N * chunk) memory. Same signature and result as based_quadratic."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    S, z = (zero_state(*q.shape[:2], e=v.shape[-1], dtype=q.dtype, device=q.device) if initial_state is None
            else initial_state)
    S, z = S.to(q.dtype), z.to(q.dtype)
    n = q.shape[-2]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    outs = []
    for start in range(0, n, chunk):
        qc, kc, vc = (t[..., start : start + chunk, :] for t in (q, k, v))
        c = qc.shape[-2]
        w = _taylor(scale * (qc @ kc.transpose(-1, -2))).masked_fill(~causal[:c, :c], 0)
        phi_q, phi_k = feature_map_compact(qc, scale), feature_map_compact(kc, scale)
        num = w @ vc + phi_q @ S
        den = w.sum(-1) + (phi_q @ z[..., None]).squeeze(-1)
        outs.append(_finish(num, den, normalize, eps))
        S = S + phi_k.transpose(-1, -2) @ vc
        z = z + phi_k.sum(-2)
    return torch.cat(outs, dim=-2), (S, z)


def sliding_window_decode(q, k_new, v_new, k_cache, v_cache, positions, *, window: int, scale=None,
                          cache_indices=None):
    """q, k_new, v_new (B, H, e); caches (B, H, window, e); positions (B,) int.
    Returns (o (B, H, e), k_cache_new, v_cache_new): the caches with the new token written into slot
    p % window (copies: the arguments are left untouched), o = softmax attention over the last `window`
    positions [max(0, p - window + 1), p]. Computes in q's dtype.

    With cache_indices ((B,) int, spec.md "sliding_window_decode with cache pools") the caches
    are pools (P, H, window, e) and row b uses pool row cache_indices[b]: -1 is a padding row (output zeros,
    nothing written, its position ignored); an index >= P or < -1 writes nothing and gives a NaN output."""
    if cache_indices is not None:
        rows = _PoolRows(cache_indices, k_cache.shape[0], "cache_indices")
        o, k_rows, v_rows = sliding_window_decode(q, k_new, v_new, k_cache[rows.safe], v_cache[rows.safe],
                                                  positions, window=window, scale=scale)
        return rows.output(o), rows.scatter(k_cache, k_rows), rows.scatter(v_cache, v_rows)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    B = q.shape[0]
    pos = positions.to(device=q.device, dtype=torch.long)
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    batch = torch.arange(B, device=q.device)
    slot = pos % window
    k_cache[batch, :, slot] = k_new.to(k_cache.dtype)
    v_cache[batch, :, slot] = v_new.to(v_cache.dtype)
    # Slot s holds position p - ((p - s) mod window); it is valid when that position is >= 0.
    s = torch.arange(window, device=q.device)
    held = pos[:, None] - (pos[:, None] - s[None, :]) % window  # (B, window)
    valid = (held >= 0)[:, None, :, None]  # (B, 1, window, 1)
    # A slot not yet written (p < window - 1) holds whatever the caller allocated (torch.empty: NaN, inf, old
    # data). Nothing may depend on it: its score is replaced by -inf (masked_fill replaces a NaN score too),
    # and its value by 0, since a zero weight times a NaN or inf value is NaN.
    v_read = torch.where(valid, v_cache.to(q.dtype), 0)
    scores = scale * (k_cache.to(q.dtype) @ q[..., :, None]).squeeze(-1)  # (B, H, window)
    scores = scores.masked_fill(~valid[..., 0], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    o = (p[..., None, :] @ v_read).squeeze(-2)
    return o, k_cache, v_cache


def sliding_window_attention(q, k, v, *, window: int, scale=None):
    """Full-sequence causal sliding-window attention, q, k, v (B, H, N, e) -> (B, H, N, e): token i attends
    to j in [i - window + 1, i], i.e. FlashAttention's window_size=(window - 1, 0)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    scores = (scale * (q @ k.transpose(-1, -2))).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# ---------------------------------------------------------------------------------------------------------
# Planned serving variants (spec.md, "planned: reference only"): varlen prefill with cu_seqlens, state and
# cache pools addressed by per-row indices, and the sliding-window prefill that fills the ring buffer.
# No kernel or public API yet; these define the semantics the kernels will be tested against.


def seq_bounds(cu_seqlens: torch.Tensor, total: int) -> list[tuple[int, int]]:
    """cu_seqlens (n+1,) int -> [(start, end)] per sequence, checked: 1-D, starts at 0, non-decreasing,
    last == total (the packed length T). Empty sequences (start == end) are allowed."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens: expected a 1-D integer tensor (n+1,), got {tuple(cu_seqlens.shape)} "
                         f"{cu_seqlens.dtype}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing from 0 to {total}, got {cu}")
    return list(zip(cu, cu[1:]))


class _PoolRows:
    """Per-row pool indices (n,): -1 = padding (nothing read or written), 0 <= i < P = a pool row, anything
    else = out of range (what a kernel under graph capture does with it: writes nothing, NaN output).
    Duplicates among the pool rows are an error (the result would depend on the order of the writes)."""

    def __init__(self, indices: torch.Tensor, P: int, name: str):
        if indices.dim() != 1 or indices.is_floating_point():
            raise ValueError(f"{name}: expected a 1-D integer tensor, got {tuple(indices.shape)} "
                             f"{indices.dtype}")
        idx = indices.to(torch.long)
        self.pad = idx == -1
        self.valid = (idx >= 0) & (idx < P)
        self.bad = ~self.valid & ~self.pad
        used = idx[self.valid]
        if used.unique().numel() != used.numel():
            raise ValueError(f"{name}: duplicate pool rows among the non-padding rows: {indices.tolist()}")
        self.idx = idx
        self.safe = torch.where(self.valid, idx, 0)  # a readable row for every row; only valid ones are used

    def scatter(self, pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A copy of pool with rows[b] written into pool row idx[b] for the valid rows b."""
        pool = pool.clone()
        pool[self.idx[self.valid]] = rows[self.valid].to(pool.dtype)
        return pool

    def _mask(self, which: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return which.to(o.device).view(-1, *([1] * (o.dim() - 1)))

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """Row-major outputs (n, ...): padding rows zero, out-of-range rows NaN."""
        o = torch.where(self._mask(self.pad, o), 0, o)
        return torch.where(self._mask(self.bad, o), float("nan"), o)


def based_varlen(q, k, v, cu_seqlens, *, scale=None, normalize=True, eps=1e-6,
                 initial_state: State | None = None):
    """Varlen prefill: q, k (1, H, T, 16), v (1, H, T, e) hold n sequences packed along T, sequence i at
    [cu_seqlens[i], cu_seqlens[i+1]). initial_state, if given, is per sequence (S (n, H, 153, e),
    z (n, H, 153)). Returns (o (1, H, T, e), (S (n, H, 153, e), z (n, H, 153))): each sequence computed
    alone (based_chunked); an empty sequence has no output rows and returns its initial state (zeros without
    one). Computes in q's dtype."""
    if q.shape[0] != 1:
        raise ValueError(f"q: varlen inputs are packed with B = 1, got B = {q.shape[0]}")
    H, T, e = q.shape[1], q.shape[2], v.shape[-1]
    bounds = seq_bounds(cu_seqlens, T)
    n = len(bounds)
    o = torch.zeros(1, H, T, e, dtype=q.dtype, device=q.device)
    S, z = zero_state(n, H, e=e, dtype=q.dtype, device=q.device)
    for i, (a, b) in enumerate(bounds):
        init = None if initial_state is None else (initial_state[0][i : i + 1], initial_state[1][i : i + 1])
        if a == b:
            if init is not None:
                S[i], z[i] = init[0][0].to(q.dtype), init[1][0].to(q.dtype)
            continue
        o_i, (S_i, z_i) = based_chunked(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=scale,
                                        normalize=normalize, eps=eps, initial_state=init)
        o[:, :, a:b] = o_i
        S[i], z[i] = S_i[0], z_i[0]
    return o, (S, z)


def based_decode_pooled(q, k, v, pool: State, state_indices, *, scale=None, normalize=True, eps=1e-6):
    """Decode with a state pool: q, k (B, H, 16), v (B, H, e); pool = (S (P, H, 153, e), z (P, H, 153));
    state_indices (B,) int. Row b updates and reads pool row state_indices[b] (update, then read, as
    based_decode_step); -1 = padding row: output zeros, its pool row untouched; an index >= P or < -1 writes
    nothing and gives a NaN output. Returns (o (B, H, e), (S_pool_new, z_pool_new)), copies in the pool's
    dtype (the arguments are left untouched). Computes in q's dtype."""
    S_pool, z_pool = pool
    rows = _PoolRows(state_indices, S_pool.shape[0], "state_indices")
    o, (S, z) = based_decode_step(q, k, v, (S_pool[rows.safe], z_pool[rows.safe]), scale=scale,
                                  normalize=normalize, eps=eps)
    return rows.output(o), (rows.scatter(S_pool, S), rows.scatter(z_pool, z))


def based_prefill_to_pool(q, k, v, pool: State, state_indices, *, cu_seqlens=None, scale=None, normalize=True,
                          eps=1e-6, initial_state: State | None = None):
    """based_prefill (dense (B, H, N, .), or varlen with cu_seqlens) whose final states go into pool rows:
    sequence i's state is written to pool row state_indices[i] ((B,) or (n,) int); -1 = not written (its
    output is still computed); an index >= P or < -1 writes nothing and gives NaN outputs for that sequence.
    initial_state stays per sequence ((B or n, H, 153, e), (B or n, H, 153)), the pool is only written.
    Returns (o, (S_pool_new, z_pool_new)) (copies)."""
    S_pool, z_pool = pool
    rows = _PoolRows(state_indices, S_pool.shape[0], "state_indices")
    if cu_seqlens is None:
        o, (S, z) = based_chunked(q, k, v, scale=scale, normalize=normalize, eps=eps,
                                  initial_state=initial_state)
        o = torch.where(rows.bad.to(o.device)[:, None, None, None], float("nan"), o)
    else:
        o, (S, z) = based_varlen(q, k, v, cu_seqlens, scale=scale, normalize=normalize, eps=eps,
                                 initial_state=initial_state)
        for i, (a, b) in enumerate(seq_bounds(cu_seqlens, q.shape[2])):
            if bool(rows.bad[i]):
                o[:, :, a:b] = float("nan")
    return o, (rows.scatter(S_pool, S), rows.scatter(z_pool, z))


def _ring_fill(k_row, v_row, k, v, window: int):
    """Write the last min(N, window) of k, v (H, N, e) into ring rows (H, window, e) at slot p % window."""
    n = k.shape[-2]
    p = torch.arange(max(0, n - window), n, device=k.device)
    k_row[:, p % window] = k[:, p].to(k_row.dtype)
    v_row[:, p % window] = v[:, p].to(v_row.dtype)


def sliding_window_prefill(q, k, v, k_cache, v_cache, *, window: int, scale=None, cu_seqlens=None,
                           cache_indices=None):
    """Prompt of a sliding-window layer. q, k, v (B, H, N, e), or (1, H, T, e) packed with cu_seqlens (n+1,).
    o = causal sliding-window attention of each sequence (query i attends [i - window + 1, i], the
    sequence starting at position 0; sliding_window_attention), and each sequence's last min(N, window) keys
    and values are written into its ring buffer at slot p % window, where sliding_window_decode continues at
    position N; the other slots keep their content, and nothing in the caches is read. Caches: (B or n, H,
    window, e), row i for sequence i; with cache_indices ((B or n,) int) pools (P, H, window, e), sequence i
    using pool row cache_indices[i]: -1 = nothing written (output still computed), an index >= P or < -1
    writes nothing and gives NaN outputs for that sequence.
    Returns (o, k_cache_new, v_cache_new) (copies: the arguments are left untouched). Computes in q's
    dtype."""
    if cu_seqlens is None:
        bounds = [(0, q.shape[2])] * q.shape[0]
        seq = lambda t, i, a, b: t[i]  # noqa: E731
    else:
        if q.shape[0] != 1:
            raise ValueError(f"q: varlen inputs are packed with B = 1, got B = {q.shape[0]}")
        bounds = seq_bounds(cu_seqlens, q.shape[2])
        seq = lambda t, i, a, b: t[0, :, a:b]  # noqa: E731
    n = len(bounds)
    if cache_indices is None:
        if k_cache.shape[0] != n or v_cache.shape[0] != n:
            raise ValueError(f"k_cache, v_cache: expected {n} rows (one per sequence), got "
                             f"{k_cache.shape[0]}, {v_cache.shape[0]}")
        rows = _PoolRows(torch.arange(n), n, "cache_indices")
    else:
        rows = _PoolRows(cache_indices, k_cache.shape[0], "cache_indices")
        if rows.idx.numel() != n:
            raise ValueError(f"cache_indices: expected {n} entries (one per sequence), "
                             f"got {rows.idx.numel()}")
    o = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    k_rows, v_rows = k_cache[rows.safe].clone(), v_cache[rows.safe].clone()
    for i, (a, b) in enumerate(bounds):
        if a == b:
            continue
        qi, ki, vi = seq(q, i, a, b), seq(k, i, a, b), seq(v, i, a, b)
        oi = sliding_window_attention(qi, ki, vi, window=window, scale=scale)
        if bool(rows.bad[i]):
            oi = torch.full_like(oi, float("nan"))
        if cu_seqlens is None:
            o[i] = oi
        else:
            o[0, :, a:b] = oi
        _ring_fill(k_rows[i], v_rows[i], ki, vi, window)
    return o, rows.scatter(k_cache, k_rows), rows.scatter(v_cache, v_rows)
