"""based_generation: one decode step of one mixer layer, Based vs softmax attention, as generation runs it.

* `based`: the Based mixer's step, `ak.based_decode` (fp32 state, the default) + `ak.sliding_window_decode`
  (W = 64, append included). Its cost does not depend on the context; it is timed at each context anyway, so
  each context's comparison comes from one run.
* `based_state_bf16`: the same with the bf16 decode state (half the state bytes; it drifts over long
  generations: README, "State precision").
* `softmax_sdpa_cudnn`, `softmax_sdpa_flash`: softmax attention of the new token over a full KV cache of
  `ctx` tokens, `F.scaled_dot_product_attention(q (B,H,1,e), K, V (B,H,ctx,e))` with the backend forced.
  Attention only: appending the new key/value to the cache is left out (it favours softmax, slightly).

All three run inside a CUDA graph of K steps over K rotating input sets (perf.measure.bench_graph), like
the decode benchmarks; the implementations are the ``IMPLS`` records (perf.impls.Impl). extra_info carries
tokens_per_s = B / time per step (one layer); the ratio Based over the faster softmax backend is computed by
`python -m perf.report` and printed at the end of the session.
Ids: test_perf_based_generation[<impl>-B<B>-H<H>-ctx<ctx>-bf16].
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from perf.cost import F_COMPACT, decode_cost, sliding_window_cost, softmax_decode_cost
from perf.impls import GRAPH, OURS, TORCH, Impl, bench, randn, sdpa_backend

OP = "based_generation"
B, H = 128, 16
D, E = 16, 64  # Based feature dim of q, k; head dim of v (and of the softmax / sliding-window heads)
W = 64  # the Based mixer's sliding window
DTYPE = torch.bfloat16
EPS = 1e-6
CONTEXTS = [2048, 8192]
BASED_STATE = {"based": torch.float32, "based_state_bf16": torch.bfloat16}  # impl -> decode state dtype


class Shape(NamedTuple):
    ctx: int

    def info(self) -> dict:  # extra_info["shape"]
        return {"B": B, "H": H, "ctx": self.ctx, "e": E}


_TOKENS_PER_S: dict[int, dict[str, float]] = {}  # ctx -> impl -> tokens/s, for the session-end ratio line


def _r(*shape):
    return randn(*shape, dtype=DTYPE)


# ---- Based: based_decode + sliding_window_decode ------------------------------------------------------
def _based_inputs(state_dtype: torch.dtype):
    def make(s: Shape):
        S = randn(B, H, F_COMPACT, E, dtype=state_dtype, std=0.1)
        z = randn(B, H, F_COMPACT, dtype=state_dtype, std=0.1)
        z[..., 0] = 100.0  # the constant feature ~ tokens seen: a plausible denominator
        # every sequence at the same context; the new token is its last one
        pos = torch.full((B,), s.ctx - 1, dtype=torch.int32, device="cuda")
        return (_r(B, H, D), _r(B, H, D), _r(B, H, E), S, z,
                _r(B, H, E), _r(B, H, E), _r(B, H, E), _r(B, H, W, E), _r(B, H, W, E), pos)

    return make


def _based_step(ak, s: Shape):
    def step(q, k, v, S, z, qw, kw, vw, kc, vc, pos):
        o = ak.based_decode(q, k, v, (S, z), eps=EPS)
        return o, ak.sliding_window_decode(qw, kw, vw, kc, vc, pos, window=W)

    return step


def _based(name: str, state_dtype: torch.dtype) -> Impl:
    """The Based mixer's step: charged decode_cost + sliding_window_cost, rotated over 4 to 1024 sets sized
    by the state and the window's K and V."""
    itemsize = torch.empty((), dtype=state_dtype).element_size()

    def cost(s: Shape) -> tuple[int, int]:
        dec_bytes, dec_flops = decode_cost(B, H, state_itemsize=itemsize, d=D, e=E)
        win_bytes, win_flops = sliding_window_cost(B, H, W, E)
        return dec_bytes + win_bytes, dec_flops + win_flops

    return Impl(name, (name,), OURS, _based_step, inputs=_based_inputs(state_dtype), cost=cost,
                footprint=lambda s: B * H * (F_COMPACT * E + F_COMPACT) * itemsize + B * H * W * E * 2 * 2,
                timing=GRAPH, min_sets=4, max_sets=1024)


# ---- softmax: SDPA over the full KV cache ---------------------------------------------------------------
def _softmax_step(_, s: Shape):
    # no causal mask: the one query is the newest token and sees every cached key (is_causal=True would
    # align the mask top-left and let it see only the first key)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    scale = 1.0 / math.sqrt(E)
    return lambda q, k, v: sdpa(q, k, v, scale=scale)


def _softmax(name: str, backend: str) -> Impl:
    """A softmax peer: attention only (no append), charged softmax_decode_cost; a set (>= 1 GB of K, V at
    these shapes) is far past the L2 already, so 2 sets (ctx 8192 stays under 9 GB)."""
    return Impl(name, (name,), TORCH, _softmax_step,
                inputs=lambda s: (_r(B, H, 1, E), _r(B, H, s.ctx, E), _r(B, H, s.ctx, E)),
                cost=lambda s: softmax_decode_cost(B, H, s.ctx, E),
                footprint=lambda s: B * H * s.ctx * E * 2 * 2, timing=GRAPH, min_sets=2, max_sets=1024,
                context=sdpa_backend(backend))


IMPLS = [*(_based(name, dtype) for name, dtype in BASED_STATE.items()),
         _softmax("softmax_sdpa_cudnn", "CUDNN_ATTENTION"), _softmax("softmax_sdpa_flash", "FLASH_ATTENTION")]
BY_NAME = {impl.name: impl for impl in IMPLS}
CASES = [pytest.param(impl.name, ctx, id=f"{impl.name}-B{B}-H{H}-ctx{ctx}-bf16")
         for ctx in CONTEXTS for impl in IMPLS]


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
    benchmark.group = f"{OP} B{B} H{H} ctx{ctx}"
    bench(benchmark, BY_NAME[impl], Shape(ctx), op=OP, rounds=rounds, warmup_rounds=warmup,
          extra={"tokens_per_s": None})  # filled from the median below
    if benchmark.stats is not None and not benchmark.disabled:
        tps = B / benchmark.stats.stats.median  # one token per sequence per step
        benchmark.extra_info["tokens_per_s"] = tps
        _TOKENS_PER_S.setdefault(ctx, {})[impl] = tps
