"""based_generation: one decode step of one mixer layer, Based vs softmax attention, as generation runs it.

* `based`: the Based mixer's step, `ak.based_decode` (fp32 state, the default) + `ak.sliding_window_decode`
  (W = 64, append included). Its cost does not depend on the context; it is timed at each context anyway, so
  each context's comparison comes from one run.
* `based_state_bf16`: the same with the bf16 decode state (half the state bytes; it drifts over long
  generations: README, "State precision").
* `softmax_sdpa_cudnn`, `softmax_sdpa_flash`: softmax attention of the new token over a full KV cache of
  `ctx` tokens, `F.scaled_dot_product_attention(q (B,H,1,e), K, V (B,H,ctx,e))` with the backend forced.
  Attention only: appending the new key/value to the cache is left out (it favours softmax, slightly).

All three run inside a CUDA graph of K steps over K rotating input sets (timing.bench_graph), like the
decode benchmarks. extra_info carries tokens_per_s = B / time per step (one layer); the ratio Based over the
faster softmax backend is computed by `python -m perf.report` and printed at the end of the session.
Ids: test_perf_based_generation[<impl>-B<B>-H<H>-ctx<ctx>-bf16].
"""
from __future__ import annotations

import math

import pytest
import torch

import timing

OP = "based_generation"
B, H = 128, 16
D, E = 16, 64  # Based feature dim of q, k; head dim of v (and of the softmax / sliding-window heads)
W = 64  # the Based mixer's sliding window
DTYPE = torch.bfloat16
EPS = 1e-6
CONTEXTS = [2048, 8192]
BASED_STATE = {"based": torch.float32, "based_state_bf16": torch.bfloat16}  # impl -> decode state dtype
IMPLS = [*BASED_STATE, "softmax_sdpa_cudnn", "softmax_sdpa_flash"]
CASES = [pytest.param(impl, ctx, id=f"{impl}-B{B}-H{H}-ctx{ctx}-bf16") for ctx in CONTEXTS for impl in IMPLS]

_TOKENS_PER_S: dict[int, dict[str, float]] = {}  # ctx -> impl -> tokens/s, for the session-end ratio line


def softmax_decode_cost(B: int, H: int, ctx: int, e: int, *, itemsize: int = 2) -> tuple[int, int]:
    """K and V of the whole context read once, q read, o written; FLOPs as timing.sliding_window_cost."""
    nbytes = B * H * ctx * e * 2 * itemsize + B * H * e * 2 * itemsize
    flops = B * H * ctx * (4 * e + 4)
    return nbytes, flops


def _impl(impl: str, ctx: int):
    """-> (step(*set), make_set(), bytes per set, (bytes, flops) per step, context factory or None,
    attn_kernels module for ours else None)."""
    r = lambda *s: timing.randn(*s, dtype=DTYPE)  # noqa: E731
    if impl in BASED_STATE:
        ak = timing.import_attn_kernels()
        F = timing.F_COMPACT
        state_dtype = BASED_STATE[impl]
        state_itemsize = torch.empty((), dtype=state_dtype).element_size()

        def make():
            S = timing.randn(B, H, F, E, dtype=state_dtype, std=0.1)
            z = timing.randn(B, H, F, dtype=state_dtype, std=0.1)
            z[..., 0] = 100.0  # the constant feature ~ tokens seen: a plausible denominator
            # every sequence at the same context; the new token is its last one
            pos = torch.full((B,), ctx - 1, dtype=torch.int32, device="cuda")
            return (r(B, H, D), r(B, H, D), r(B, H, E), S, z,
                    r(B, H, E), r(B, H, E), r(B, H, E), r(B, H, W, E), r(B, H, W, E), pos)

        def step(q, k, v, S, z, qw, kw, vw, kc, vc, pos):
            o = ak.based_decode(q, k, v, (S, z), eps=EPS)
            return o, ak.sliding_window_decode(qw, kw, vw, kc, vc, pos, window=W)

        dec_bytes, dec_flops = timing.decode_cost(B, H, state_itemsize=state_itemsize, d=D, e=E)
        win_bytes, win_flops = timing.sliding_window_cost(B, H, W, E)
        footprint = B * H * (F * E + F) * state_itemsize + B * H * W * E * 2 * 2  # state + window's K, V
        return step, make, footprint, (dec_bytes + win_bytes, dec_flops + win_flops), None, ak
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if impl == "softmax_sdpa_cudnn" else SDPBackend.FLASH_ATTENTION
    make = lambda: (r(B, H, 1, E), r(B, H, ctx, E), r(B, H, ctx, E))  # noqa: E731
    scale = 1.0 / math.sqrt(E)
    # no causal mask: the one query is the newest token and sees every cached key (is_causal=True would
    # align the mask top-left and let it see only the first key)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    step = lambda q, k, v: sdpa(q, k, v, scale=scale)  # noqa: E731
    footprint = B * H * ctx * E * 2 * 2  # K and V of the context
    return step, make, footprint, softmax_decode_cost(B, H, ctx, E), (lambda: sdpa_kernel([backend])), None


class _RatioSummary:
    """pytest plugin (registered by the fixture below): each Based variant's tokens/s over the faster
    softmax backend, per context, once both ran."""

    def pytest_terminal_summary(self, terminalreporter):
        lines = []
        for ctx, tps in sorted(_TOKENS_PER_S.items()):
            softmax = {i: t for i, t in tps.items() if i not in BASED_STATE}
            if not softmax:
                continue
            best = max(softmax, key=softmax.get)
            for based in (i for i in BASED_STATE if i in tps):
                lines.append(f"ctx {ctx}: {based} {tps[based]:,.0f} tok/s, {best} {softmax[best]:,.0f} "
                             f"tok/s: {tps[based] / softmax[best]:.2f}x")
        if lines:
            terminalreporter.section(f"{OP}: Based vs the faster softmax (B={B}, H={H}, one layer)")
            for line in lines:
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _ratio_summary(request):
    # test modules cannot implement hooks; a plugin object registered at run time can
    pm = request.config.pluginmanager
    if not pm.has_plugin("based_generation_ratio"):
        pm.register(_RatioSummary(), "based_generation_ratio")


@pytest.mark.parametrize("impl,ctx", CASES)
def test_perf_based_generation(benchmark, perf_rounds, impl, ctx):
    rounds, warmup = perf_rounds
    step, make, footprint, (nbytes, flops), context, ak = _impl(impl, ctx)
    info = timing.extra_info(OP, impl, {"B": B, "H": H, "ctx": ctx, "e": E}, nbytes, flops)
    info["tokens_per_s"] = None  # filled from the median below
    benchmark.group = f"{OP} B{B} H{H} ctx{ctx}"
    # a softmax set (>= 1 GB of K, V) is far past the L2 already: 2 sets keep ctx 8192 under 9 GB
    K = timing.rotation_count(footprint, min_sets=4 if ak else 2, max_sets=1024)
    sets = [make() for _ in range(K)]
    with torch.no_grad(), timing.peer_errors_skip(impl, ak):
        timing.bench_graph(benchmark, step, sets, info, rounds=rounds, warmup_rounds=warmup, context=context)
    if benchmark.stats is not None and not benchmark.disabled:
        tps = B / benchmark.stats.stats.median  # one token per sequence per step
        benchmark.extra_info["tokens_per_s"] = tps
        _TOKENS_PER_S.setdefault(ctx, {})[impl] = tps
