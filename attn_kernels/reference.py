"""Pure-PyTorch references for the three ops (semantics: spec.md). Any device, any float dtype.

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


def sliding_window_decode(q, k_new, v_new, k_cache, v_cache, positions, *, window: int, scale=None):
    """q, k_new, v_new (B, H, e); caches (B, H, window, e); positions (B,) int.
    Returns (o (B, H, e), k_cache_new, v_cache_new): the caches with the new token written into slot
    p % window (copies: the arguments are left untouched), o = softmax attention over the last `window`
    positions [max(0, p - window + 1), p]. Computes in q's dtype."""
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
    # data). Nothing may depend on it: its key AND its value are replaced before use, since a zero weight
    # times a NaN or inf value is NaN (masking the score alone is not enough).
    k_read = torch.where(valid, k_cache.to(q.dtype), 0)
    v_read = torch.where(valid, v_cache.to(q.dtype), 0)
    scores = scale * (k_read @ q[..., :, None]).squeeze(-1)  # (B, H, window)
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
