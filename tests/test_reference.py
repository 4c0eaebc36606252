"""The PyTorch references agree with each other and with the spec, in float64 on the CPU."""
import math

import pytest
import torch

import attn_kernels as ak
from attn_kernels import reference as ref

F64 = dict(dtype=torch.float64)
TIGHT = 1e-10


def qkv(B, H, N, e=64):
    return torch.randn(B, H, N, 16, **F64), torch.randn(B, H, N, 16, **F64), torch.randn(B, H, N, e, **F64)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("scale", [0.25, 0.1, 1.0])
def test_feature_maps_give_the_taylor_weight(scale):
    q, k = torch.randn(5, 16, **F64), torch.randn(5, 16, **F64)
    s = scale * (q * k).sum(-1)
    w = 1 + s + s * s / 2
    compact = (ref.feature_map_compact(q, scale) * ref.feature_map_compact(k, scale)).sum(-1)
    expanded = (ref.feature_map_expanded(q, scale) * ref.feature_map_expanded(k, scale)).sum(-1)
    assert ref.feature_map_compact(q, scale).shape[-1] == 153
    assert ref.feature_map_expanded(q, scale).shape[-1] == 273
    assert rel(compact, w) < TIGHT and rel(expanded, w) < TIGHT


@pytest.mark.parametrize("scale", [0.25, 0.1, 1.0])
def test_z_is_a_linear_map_of_the_key_moments(scale):
    """The prefill kernel keeps z = sum_s phi(k_s) as count, ks = sum k and G = sum k k^T (its comment at
    for_each_g): z[0] = n, z[1+i] = sqrt(c) ks_i, z[17+i] = c G_ii / sqrt(2), z[quad(i,j)] = c G_ij for i < j,
    with quad(i,j) = 33 + 15i - i(i-1)/2 + (j-i-1), and phi(q).z = n + c q.ks + (c^2/2) q^T G q."""
    k, q = torch.randn(37, 16, **F64), torch.randn(4, 16, **F64)
    z = ref.feature_map_compact(k, scale).sum(0)
    n, ks, G = k.shape[0], k.sum(0), k.T @ k
    from_moments = torch.zeros(153, **F64)
    from_moments[0] = n
    from_moments[1:17] = math.sqrt(scale) * ks
    from_moments[17:33] = scale * G.diagonal() / math.sqrt(2)
    for i in range(16):
        for j in range(i + 1, 16):
            from_moments[33 + 15 * i - i * (i - 1) // 2 + (j - i - 1)] = scale * G[i, j]
    assert rel(from_moments, z) < TIGHT
    den = ref.feature_map_compact(q, scale) @ z
    den_moments = n + scale * q @ ks + scale**2 / 2 * ((q @ G) * q).sum(-1)
    assert rel(den_moments, den) < TIGHT


def test_expanded_map_is_the_based_taylor_exp():
    """With c = 1/sqrt(d): [1, x / d^(1/4), x (x) x / (sqrt(2) sqrt(d))], the Based model's TaylorExp."""
    x = torch.randn(3, 16, **F64)
    taylor = torch.cat([torch.ones(3, 1, **F64), x / 16**0.25,
                        (x[:, :, None] * x[:, None, :]).flatten(-2) / (math.sqrt(2) * 4)], -1)
    assert rel(ref.feature_map_expanded(x, 0.25), taylor) < TIGHT


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("B,H,N", [(1, 1, 1), (2, 3, 63), (1, 2, 65), (2, 1, 200)])
def test_quadratic_recurrent_chunked_agree(B, H, N, normalize):
    q, k, v = qkv(B, H, N)
    S0 = torch.randn(B, H, 153, 64, **F64).abs()
    z0 = torch.rand(B, H, 153, **F64) + 1
    for init in (None, (S0, z0)):
        o_q, (S_q, z_q) = ref.based_quadratic(q, k, v, normalize=normalize, initial_state=init)
        o_r, (S_r, z_r) = ref.based_recurrent(q, k, v, normalize=normalize, initial_state=init)
        for chunk in (16, 64):
            o_c, (S_c, z_c) = ref.based_chunked(q, k, v, normalize=normalize, initial_state=init, chunk=chunk)
            assert rel(o_c, o_q) < TIGHT and rel(S_c, S_q) < TIGHT and rel(z_c, z_q) < TIGHT
        assert rel(o_r, o_q) < TIGHT and rel(S_r, S_q) < TIGHT and rel(z_r, z_q) < TIGHT


def test_quadratic_matches_the_spec_formula_directly():
    q, k, v = qkv(1, 1, 9)
    o, _ = ref.based_quadratic(q, k, v, scale=0.3, eps=1e-3)
    for i in range(9):
        num, den = torch.zeros(64, **F64), 0.0
        for j in range(i + 1):
            s = 0.3 * float(q[0, 0, i] @ k[0, 0, j])
            w = 1 + s + s * s / 2
            num, den = num + w * v[0, 0, j], den + w
        assert rel(o[0, 0, i], num / (den + 1e-3)) < TIGHT


def test_state_is_sum_of_outer_products_and_export_round_trips():
    q, k, v = qkv(2, 2, 30)
    _, (S, z) = ref.based_quadratic(q, k, v)
    phi = ref.feature_map_compact(k, 0.25)
    assert rel(S, torch.einsum("bhnf,bhne->bhfe", phi, v)) < TIGHT
    assert rel(z, phi.sum(-2)) < TIGHT
    kv_state, k_state = ak.state_to_expanded(S, z)
    assert kv_state.shape == (2, 2, 1, 64, 273) and k_state.shape == (2, 2, 1, 1, 273)
    # The exported state is exactly what the expanded map accumulates, so expanded-map code reads it as is.
    phi_exp = ref.feature_map_expanded(k, 0.25)
    assert rel(kv_state, torch.einsum("bhnf,bhne->bhef", phi_exp, v)[:, :, None]) < TIGHT
    assert rel(k_state, phi_exp.sum(-2)[:, :, None, None]) < TIGHT
    S_back, z_back = ak.state_from_expanded(kv_state, k_state)
    assert rel(S_back, S) < TIGHT and rel(z_back, z) < TIGHT


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
def test_prefill_then_decode_equals_longer_prefill(normalize):
    """spec: prefill(N, return_state) then decode T steps == prefill(N + T) at those positions (public ops)."""
    N, T = 37, 9
    q, k, v = qkv(2, 3, N + T)
    full = ak.based_prefill(q, k, v, normalize=normalize)
    o, state = ak.based_prefill(q[:, :, :N], k[:, :, :N], v[:, :, :N], normalize=normalize, return_state=True)
    assert rel(o, full[:, :, :N]) < TIGHT
    for t in range(N, N + T):
        o_t = ak.based_decode(q[:, :, t], k[:, :, t], v[:, :, t], state, normalize=normalize)
        assert rel(o_t, full[:, :, t]) < TIGHT


def test_chunked_prefill_with_initial_state_equals_one_prefill():
    q, k, v = qkv(1, 2, 150)
    full, (S, z) = ak.based_prefill(q, k, v, return_state=True)
    a, state = ak.based_prefill(q[:, :, :70], k[:, :, :70], v[:, :, :70], return_state=True)
    b, (S2, z2) = ak.based_prefill(q[:, :, 70:], k[:, :, 70:], v[:, :, 70:], initial_state=state,
                                   return_state=True)
    assert rel(torch.cat([a, b], 2), full) < TIGHT and rel(S2, S) < TIGHT and rel(z2, z) < TIGHT


@pytest.mark.parametrize("window", [1, 4, 16])
@pytest.mark.parametrize("e", [64, 128])
def test_sliding_window_decode_step_by_step_equals_full_attention(window, e):
    """spec: step-by-step decode over 3W tokens == full-sequence sliding-window attention (FA's (W-1, 0))."""
    B, H, N = 2, 3, 3 * window + 2
    q, k, v = (torch.randn(B, H, N, e, **F64) for _ in range(3))
    full = ref.sliding_window_attention(q, k, v, window=window)
    k_cache = torch.randn(B, H, window, e, **F64)  # garbage in slots not yet written must never be read
    v_cache = torch.randn(B, H, window, e, **F64)
    for t in range(N):
        pos = torch.full((B,), t, dtype=torch.int32)
        o = ak.sliding_window_decode(q[:, :, t], k[:, :, t], v[:, :, t], k_cache, v_cache, pos, window=window)
        assert rel(o, full[:, :, t]) < TIGHT, f"step {t}"


def test_sliding_window_full_attention_window_semantics():
    """Token i attends to [i - W + 1, i]: a brute-force softmax over exactly those keys."""
    q, k, v = (torch.randn(1, 1, 12, 64, **F64) for _ in range(3))
    o = ref.sliding_window_attention(q, k, v, window=5)
    for i in range(12):
        lo = max(0, i - 4)
        p = torch.softmax((k[0, 0, lo : i + 1] @ q[0, 0, i]) / 8.0, 0)
        assert rel(o[0, 0, i], p @ v[0, 0, lo : i + 1]) < TIGHT


def test_sliding_window_decode_mixed_positions_and_cache_contents():
    B, H, W, e = 4, 2, 8, 64
    pos = torch.tensor([0, 5, 8, 43], dtype=torch.int32)
    q, kn, vn = (torch.randn(B, H, e, **F64) for _ in range(3))
    k_cache, v_cache = torch.randn(B, H, W, e, **F64), torch.randn(B, H, W, e, **F64)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    o = ak.sliding_window_decode(q, kn, vn, k_cache, v_cache, pos, window=W)
    for b in range(B):
        p = int(pos[b])
        slot = p % W
        keep = [s for s in range(W) if s != slot]
        assert torch.equal(k_cache[b, :, slot], kn[b]) and torch.equal(v_cache[b, :, slot], vn[b])
        assert torch.equal(k_cache[b, :, keep], k_before[b, :, keep])
        assert torch.equal(v_cache[b, :, keep], v_before[b, :, keep])
        slots = [j % W for j in range(max(0, p - W + 1), p + 1)]
        for h in range(H):
            pr = torch.softmax(k_cache[b, h, slots] @ q[b, h] / 8.0, 0)
            assert rel(o[b, h], pr @ v_cache[b, h, slots]) < TIGHT
