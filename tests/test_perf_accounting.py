"""The perf suite's byte/FLOP accounting and floors (perf/timing.py), checked on the CPU against the floors
the issues publish, so a wrong count cannot silently skew every % of floor."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "perf"))
import timing  # noqa: E402


@pytest.mark.parametrize("B,H,N,floor_ms", [(16, 16, 4096, 0.112), (16, 16, 16384, 0.447)])
def test_prefill_floor_matches_issue(B, H, N, floor_ms):
    nbytes, flops = timing.prefill_cost(B, H, N)
    assert nbytes == B * H * N * 320  # q, k, v read and o written, bf16
    assert flops == B * H * N * (2 * 273 + 4 * 273 * 64)
    assert timing.floor_us(nbytes, flops) / 1e3 == pytest.approx(floor_ms, rel=5e-3)


# The issues' decode floors count the state (issue 4) or the window's K and V (issue 5) alone; the suite also
# counts q, k, v read and o written (and the appended k/v), every byte the op must move: up to ~5% more.
@pytest.mark.parametrize("B,H,floor_us", [(16, 16, 6.7), (64, 16, 26.7), (1024, 16, 428)])
def test_decode_floor_matches_issue(B, H, floor_us):
    """Issue 4's 'floor fp32·153' column: the state's bytes read + written at 3.0 TB/s."""
    nbytes, flops = timing.decode_cost(B, H, state_itemsize=4)
    state = 2 * B * H * (153 * 64 + 153) * 4
    assert nbytes == state + B * H * (16 + 16 + 64 + 64) * 2
    assert floor_us * 0.99 <= timing.floor_us(nbytes, flops) <= floor_us * 1.06


@pytest.mark.parametrize("B,H,floor_us", [(16, 16, 1.4), (64, 16, 5.6), (256, 16, 22.4), (256, 32, 44.7)])
def test_sliding_window_floor_matches_issue(B, H, floor_us):
    nbytes, flops = timing.sliding_window_cost(B, H, 64, 64)
    assert nbytes == B * H * 64 * 64 * 2 * 2 + B * H * 64 * 6 * 2
    assert floor_us * 0.99 <= timing.floor_us(nbytes, flops) <= floor_us * 1.06


def test_extra_info_has_exactly_the_issue_keys():
    info = timing.extra_info("based_decode", "attn_kernels-state_fp32", {"B": 2, "H": 3, "e": 64}, 1000, 10)
    assert set(info) == {"op", "impl", "shape", "bytes", "flops", "floor_us", "pct_of_floor"}
    assert info["floor_us"] == pytest.approx(1000 / 3.0e12 * 1e6)


def test_device_clock_advances_only_by_measured_time():
    clock = timing.DeviceClock()
    t0 = clock()
    clock.advance(2e-6)
    clock.advance(3e-6)
    assert clock() - t0 == pytest.approx(5e-6) and clock.reads == 2 and clock.recorded == [2e-6, 3e-6]
