"""The gradients of Based linear attention (spec.md, "Backward"), written out in PyTorch: the reference the
backward kernels are tested against, and the CPU op's backward. No nested autograd (so it runs under
torch.library's checks and inside compiled graphs); tests/test_reference.py checks it against autograd
through reference.based_quadratic.

Per (b, h), with c = scale, s = c q k^T, the causal mask M, phi the compact feature map:
    A = M * (1 + s + s^2 / 2),  num = A v + phi(q) S0,  den = A 1 + phi(q) z0,
    o = num / (den + eps) (normalize) or num,  S = S0 + phi(k)^T v,  z = z0 + phi(k)^T 1.
Given grad_o = G, grad_S, grad_z:
    dnum = G / (den + eps), dden = -sum_e(G * o) / (den + eps)   (numerator only: dnum = G, dden = 0)
    ds = M * (dnum v^T + dden 1^T) * (1 + s)
    dq = c ds k + phi'(q)^T (dnum S0^T + dden z0^T),   dk = c ds^T q + phi'(k)^T (v grad_S^T + 1 grad_z^T)
    dv = A^T dnum + phi(k) grad_S,  dS0 = phi(q)^T dnum + grad_S,  dz0 = phi(q)^T dden + grad_z.
O(N^2) memory per head: a reference for tests and the CPU op, not for long sequences."""
from __future__ import annotations

import math

import torch

from .reference import default_scale, feature_map_compact
from .limits import FEAT_DIM

_PAIR_I, _PAIR_J = torch.triu_indices(FEAT_DIM, FEAT_DIM, offset=1)  # feature_map_compact's pair order


def feature_map_vjp(x: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """g (..., 153), a gradient w.r.t. feature_map_compact(x, scale) -> the gradient w.r.t. x (..., 16)."""
    d = FEAT_DIM
    g_lin, g_sq, g_pair = g[..., 1:1 + d], g[..., 1 + d:1 + 2 * d], g[..., 1 + 2 * d:]
    pairs = torch.zeros(*g.shape[:-1], d, d, dtype=g.dtype, device=g.device)
    pairs[..., _PAIR_I.to(g.device), _PAIR_J.to(g.device)] = g_pair
    sym = pairs + pairs.transpose(-1, -2)  # x_i x_j feeds x_i's and x_j's gradient
    return (math.sqrt(scale) * g_lin + (2 * scale / math.sqrt(2.0)) * x * g_sq
            + scale * (sym @ x[..., None]).squeeze(-1))


def based_vjp(q, k, v, grad_o=None, grad_S=None, grad_z=None, *, scale=None, normalize=True, eps=1e-6,
              initial_state=None, needs=(True, True, True, True, True)):
    """Gradients of (o, S, z) = based_quadratic(q, k, v, initial_state) w.r.t. (q, k, v, S0, z0), each None where
    `needs` says so or (S0, z0) where there is no initial state. q, k (B, H, N, 16), v (B, H, N, e); grad_o like
    v, grad_S (B, H, 153, e), grad_z (B, H, 153), any of them None (= zero). Computes in q's dtype."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    s = scale * (q @ k.transpose(-1, -2))
    A = (1 + s + 0.5 * s * s).masked_fill(~mask, 0)
    phi_q, phi_k = feature_map_compact(q, scale), feature_map_compact(k, scale)
    S0, z0 = (None, None) if initial_state is None else initial_state
    G = torch.zeros_like(v) if grad_o is None else grad_o
    num, den = A @ v, A.sum(-1)
    if S0 is not None:
        num, den = num + phi_q @ S0, den + (phi_q @ z0[..., None]).squeeze(-1)
    if normalize:
        dnum = G / (den[..., None] + eps)
        dden = -(dnum * num).sum(-1) / (den + eps)
    else:
        dnum, dden = G, torch.zeros_like(den)
    need_q, need_k, need_v, need_S0, need_z0 = needs
    dq = dk = dv = dS0 = dz0 = None
    if need_q or need_k:
        ds = ((dnum @ v.transpose(-1, -2) + dden[..., None]) * (1 + s)).masked_fill(~mask, 0)
    if need_q:
        dq = scale * ds @ k
        if S0 is not None:
            dq = dq + feature_map_vjp(q, dnum @ S0.transpose(-1, -2) + dden[..., None] * z0[..., None, :], scale)
    if need_k:
        dk = scale * ds.transpose(-1, -2) @ q
        g_phi_k = torch.zeros_like(phi_k)
        if grad_S is not None:
            g_phi_k = g_phi_k + v @ grad_S.transpose(-1, -2)
        if grad_z is not None:
            g_phi_k = g_phi_k + grad_z[..., None, :]
        dk = dk + feature_map_vjp(k, g_phi_k, scale)
    if need_v:
        dv = A.transpose(-1, -2) @ dnum
        if grad_S is not None:
            dv = dv + phi_k @ grad_S
    if S0 is not None and need_S0:
        dS0 = phi_q.transpose(-1, -2) @ dnum + (0 if grad_S is None else grad_S)
    if z0 is not None and need_z0:
        dz0 = (phi_q * dden[..., None]).sum(-2) + (0 if grad_z is None else grad_z)
    return dq, dk, dv, dS0, dz0
