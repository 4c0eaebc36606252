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


# Planned serving variants (spec.md, "planned: reference only"): varlen, pools, sliding-window prefill.

def packed(lengths, H=2, d=16, e=64):
    """Packed (1, H, T, .) q, k, v for the given sequence lengths, and cu_seqlens (int32)."""
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = torch.randn(1, H, T, d, **F64), torch.randn(1, H, T, d, **F64), torch.randn(1, H, T, e, **F64)
    return (q, k, v), cu


def random_state(n, H, e=64):
    return torch.randn(n, H, 153, e, **F64).abs(), torch.rand(n, H, 153, **F64) + 1


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("with_init", [False, True], ids=["zero", "init"])
def test_based_varlen_equals_each_sequence_alone(normalize, with_init):
    lengths = [5, 0, 1, 70, 0, 33]
    (q, k, v), cu = packed(lengths)
    init = random_state(len(lengths), 2) if with_init else None
    o, (S, z) = ref.based_varlen(q, k, v, cu, normalize=normalize, initial_state=init)
    assert o.shape == v.shape and S.shape == (6, 2, 153, 64) and z.shape == (6, 2, 153)
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        init_i = None if init is None else (init[0][i : i + 1], init[1][i : i + 1])
        if a == b:  # an empty sequence returns its initial state (zeros without one)
            S_i, z_i = init_i if init_i is not None else ref.zero_state(1, 2, dtype=torch.float64)
            assert torch.equal(S[i], S_i[0]) and torch.equal(z[i], z_i[0])
            continue
        o_i, (S_i, z_i) = ref.based_quadratic(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], normalize=normalize,
                                              initial_state=init_i)
        assert rel(o[:, :, a:b], o_i) < TIGHT and rel(S[i], S_i[0]) < TIGHT and rel(z[i], z_i[0]) < TIGHT


def test_based_varlen_no_sequences_and_bad_cu_seqlens():
    (q, k, v), _ = packed([0])
    o, (S, z) = ref.based_varlen(q, k, v, torch.tensor([0], dtype=torch.int32))
    assert o.shape == (1, 2, 0, 64) and S.shape == (0, 2, 153, 64) and z.shape == (0, 2, 153)
    (q, k, v), _ = packed([3, 4])
    for cu in ([1, 3, 7], [0, 4, 3, 7], [0, 3, 6], [0, 3, 8]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            ref.based_varlen(q, k, v, torch.tensor(cu, dtype=torch.int32))
    with pytest.raises(ValueError, match="B = 1"):
        ref.based_varlen(q.expand(2, -1, -1, -1), k, v, torch.tensor([0, 3, 7], dtype=torch.int32))


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
def test_based_decode_pooled_equals_contiguous_decode(normalize):
    B, H, P = 5, 2, 8
    S_pool, z_pool = random_state(P, H)
    idx = torch.tensor([6, -1, 0, 3, -1], dtype=torch.int32)
    q, k, v = torch.randn(B, H, 16, **F64), torch.randn(B, H, 16, **F64), torch.randn(B, H, 64, **F64)
    S_before, z_before = S_pool.clone(), z_pool.clone()
    o, (S_new, z_new) = ref.based_decode_pooled(q, k, v, (S_pool, z_pool), idx, normalize=normalize)
    assert torch.equal(S_pool, S_before) and torch.equal(z_pool, z_before)  # no mutation
    real = idx >= 0
    rows = idx[real].long()
    o_c, (S_c, z_c) = ref.based_decode_step(q[real], k[real], v[real], (S_pool[rows], z_pool[rows]),
                                            normalize=normalize)
    assert rel(o[real], o_c) < TIGHT
    assert torch.equal(o[~real], torch.zeros_like(o[~real]))  # padding rows: zeros
    assert rel(S_new[rows], S_c) < TIGHT and rel(z_new[rows], z_c) < TIGHT
    untouched = [p for p in range(P) if p not in rows.tolist()]  # padding rows' and unused slots
    assert torch.equal(S_new[untouched], S_pool[untouched])
    assert torch.equal(z_new[untouched], z_pool[untouched])


def test_based_decode_pooled_steps_equal_longer_prefill_and_bad_indices():
    """Pooled decode continues a pooled prefill like contiguous decode does; an out-of-range index (what a
    kernel does under graph capture) writes nothing and gives NaN; duplicates are refused."""
    N, T, P = 20, 4, 6
    q, k, v = qkv(3, 2, N + T)
    full = ref.based_quadratic(q, k, v)[0]
    pool = ref.zero_state(P, 2, dtype=torch.float64)
    idx = torch.tensor([4, 1, 2], dtype=torch.int32)
    o, pool = ref.based_prefill_to_pool(q[:, :, :N], k[:, :, :N], v[:, :, :N], pool, idx)
    assert rel(o, full[:, :, :N]) < TIGHT
    for t in range(N, N + T):
        o_t, pool = ref.based_decode_pooled(q[:, :, t], k[:, :, t], v[:, :, t], pool, idx)
        assert rel(o_t, full[:, :, t]) < TIGHT
    bad = torch.tensor([P, -2, 1], dtype=torch.int32)
    o_b, new = ref.based_decode_pooled(q[:, :, 0], k[:, :, 0], v[:, :, 0], pool, bad)
    assert o_b[:2].isnan().all() and not o_b[2].isnan().any()
    keep = [0, 2, 3, 4, 5]
    assert torch.equal(new[0][keep], pool[0][keep]) and torch.equal(new[1][keep], pool[1][keep])
    with pytest.raises(ValueError, match="duplicate"):
        ref.based_decode_pooled(q[:, :, 0], k[:, :, 0], v[:, :, 0], pool, torch.tensor([1, -1, 1]))
    # -1 may repeat
    ref.based_decode_pooled(q[:, :, 0], k[:, :, 0], v[:, :, 0], pool, torch.tensor([-1, 2, -1]))


def test_based_prefill_to_pool_varlen_equals_scattered_states():
    lengths = [7, 0, 12]
    (q, k, v), cu = packed(lengths)
    init = random_state(3, 2)
    S_pool, z_pool = random_state(5, 2)
    idx = torch.tensor([3, 0, -1], dtype=torch.int32)
    o, (S_new, z_new) = ref.based_prefill_to_pool(q, k, v, (S_pool, z_pool), idx, cu_seqlens=cu,
                                                  initial_state=init)
    o_v, (S_v, z_v) = ref.based_varlen(q, k, v, cu, initial_state=init)
    assert torch.equal(o, o_v)  # the -1 sequence's output is still computed
    assert torch.equal(S_new[[3, 0]], S_v[[0, 1]]) and torch.equal(z_new[[3, 0]], z_v[[0, 1]])
    unused = [1, 2, 4]
    assert torch.equal(S_new[unused], S_pool[unused]) and torch.equal(z_new[unused], z_pool[unused])


def swp_inputs(B, H, N, W, e):
    q, k, v = (torch.randn(B, H, N, e, **F64) for _ in range(3))
    return q, k, v, torch.randn(B, H, W, e, **F64), torch.randn(B, H, W, e, **F64)


@pytest.mark.parametrize("N", [1, 3, 8, 9, 29])
@pytest.mark.parametrize("W", [1, 8])
def test_sliding_window_prefill_output_and_caches(N, W):
    """o == sliding_window_attention; the caches == what N decode steps from the same caches leave (slots
    never written keep their old content); no argument is modified."""
    B, H, e = 2, 3, 64
    q, k, v, k_cache, v_cache = swp_inputs(B, H, N, W, e)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    o, k_new, v_new = ref.sliding_window_prefill(q, k, v, k_cache, v_cache, window=W)
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)
    assert rel(o, ref.sliding_window_attention(q, k, v, window=W)) < TIGHT
    k_steps, v_steps = k_cache, v_cache
    for t in range(N):
        pos = torch.full((B,), t, dtype=torch.int32)
        _, k_steps, v_steps = ref.sliding_window_decode(q[:, :, t], k[:, :, t], v[:, :, t], k_steps, v_steps,
                                                        pos, window=W)
    assert torch.equal(k_new, k_steps) and torch.equal(v_new, v_steps)
    for s in range(N, W):
        assert torch.equal(k_new[:, :, s], k_cache[:, :, s]) and torch.equal(v_new[:, :, s], v_cache[:, :, s])


@pytest.mark.parametrize("N,T,W", [(1, 6, 4), (5, 7, 8), (20, 5, 8), (16, 3, 16)])
@pytest.mark.parametrize("e", [64, 128])
def test_sliding_window_prefill_then_decode_equals_longer_attention(N, T, W, e):
    B, H = 2, 2
    q, k, v, k_cache, v_cache = swp_inputs(B, H, N + T, W, e)
    full = ref.sliding_window_attention(q, k, v, window=W)
    o, k_cache, v_cache = ref.sliding_window_prefill(q[:, :, :N], k[:, :, :N], v[:, :, :N], k_cache, v_cache,
                                                     window=W)
    assert rel(o, full[:, :, :N]) < TIGHT
    for t in range(N, N + T):
        pos = torch.full((B,), t, dtype=torch.int32)
        o_t, k_cache, v_cache = ref.sliding_window_decode(q[:, :, t], k[:, :, t], v[:, :, t], k_cache,
                                                          v_cache, pos, window=W)
        assert rel(o_t, full[:, :, t]) < TIGHT, f"step {t}"


def test_sliding_window_prefill_varlen_and_pool_equal_each_sequence_alone():
    lengths, W, H, e, P = [3, 0, 1, 17, 8], 8, 2, 64, 7
    (q, k, v), cu = packed(lengths, H=H, d=e, e=e)
    k_pool, v_pool = torch.randn(P, H, W, e, **F64), torch.randn(P, H, W, e, **F64)
    idx = torch.tensor([5, 0, -1, 2, 6], dtype=torch.int32)
    o, k_new, v_new = ref.sliding_window_prefill(q, k, v, k_pool, v_pool, window=W, cu_seqlens=cu,
                                                 cache_indices=idx)
    # contiguous varlen (caches (n, H, W, e)) gives the same rows
    o_c, k_c, v_c = ref.sliding_window_prefill(q, k, v, k_pool[idx.long().clamp(min=0)],
                                               v_pool[idx.long().clamp(min=0)], window=W, cu_seqlens=cu)
    assert torch.equal(o, o_c)
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        slot = int(idx[i])
        row = max(slot, 0)
        alone = ref.sliding_window_prefill(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], k_pool[row][None],
                                           v_pool[row][None], window=W)
        if b > a:
            assert rel(o[:, :, a:b], alone[0]) < TIGHT
        if slot >= 0:
            assert torch.equal(k_new[slot], alone[1][0]) and torch.equal(v_new[slot], alone[2][0])
            assert torch.equal(k_c[i], alone[1][0]) and torch.equal(v_c[i], alone[2][0])
    for p in (1, 3, 4):  # not used by any sequence (the -1 sequence writes nothing)
        assert torch.equal(k_new[p], k_pool[p]) and torch.equal(v_new[p], v_pool[p])
    bad = torch.tensor([5, 0, -1, P, 6], dtype=torch.int32)
    o_b, k_b, _ = ref.sliding_window_prefill(q, k, v, k_pool, v_pool, window=W, cu_seqlens=cu,
                                             cache_indices=bad)
    assert o_b[:, :, 4:21].isnan().all() and not o_b[:, :, :4].isnan().any()
    assert torch.equal(k_b[2], k_pool[2])


def test_sliding_window_decode_pooled_equals_contiguous():
    B, H, W, e, P = 4, 2, 8, 64, 6
    pos = torch.tensor([0, 5, -7, 43], dtype=torch.int32)  # the padding row's position is ignored
    idx = torch.tensor([4, 1, -1, 0], dtype=torch.int32)
    q, kn, vn = (torch.randn(B, H, e, **F64) for _ in range(3))
    k_pool, v_pool = torch.randn(P, H, W, e, **F64), torch.randn(P, H, W, e, **F64)
    k_before = k_pool.clone()
    o, k_new, v_new = ref.sliding_window_decode(q, kn, vn, k_pool, v_pool, pos, window=W, cache_indices=idx)
    assert torch.equal(k_pool, k_before)
    real = [0, 1, 3]
    rows = idx[real].long()
    o_c, k_c, v_c = ref.sliding_window_decode(q[real], kn[real], vn[real], k_pool[rows], v_pool[rows],
                                              pos[real], window=W)
    assert torch.equal(o[real], o_c) and torch.equal(o[2], torch.zeros_like(o[2]))
    assert torch.equal(k_new[rows], k_c) and torch.equal(v_new[rows], v_c)
    for p in (2, 3, 5):
        assert torch.equal(k_new[p], k_pool[p]) and torch.equal(v_new[p], v_pool[p])
    o_b, k_b, _ = ref.sliding_window_decode(q, kn, vn, k_pool, v_pool, pos, window=W,
                                            cache_indices=torch.tensor([4, 1, -1, P], dtype=torch.int32))
    assert o_b[3].isnan().all() and torch.equal(k_b[0], k_pool[0]) and not o_b[:2].isnan().any()
