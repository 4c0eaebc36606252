"""The three ops are proper torch.library custom ops: schemas with declared mutation, fake (meta)
implementations that torch.compile traces, and opcheck's consistency tests. On the CPU here; the same
checks run on the GPU against the kernels."""
import pytest
import torch

import attn_kernels as ak
from attn_kernels import _library
from harness import requires_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def prefill_args(device, init=True, return_state=True):
    dt = _dtype(device)
    q, k = (torch.randn(2, 3, 70, 16, device=device, dtype=dt) for _ in range(2))
    v = torch.randn(2, 3, 70, 64, device=device, dtype=dt)
    S0 = torch.rand(2, 3, 153, 64, device=device) if init else None
    z0 = torch.rand(2, 3, 153, device=device) + 1 if init else None
    return (q, k, v, 0.25, True, 1e-6, S0, z0, return_state)


def decode_args(device):
    dt = _dtype(device)
    return (torch.randn(2, 3, 16, device=device, dtype=dt), torch.randn(2, 3, 16, device=device, dtype=dt),
            torch.randn(2, 3, 64, device=device, dtype=dt), torch.rand(2, 3, 153, 64, device=device),
            torch.rand(2, 3, 153, device=device) + 1, 0.25, True, 1e-6)


def swd_args(device):
    dt = _dtype(device)
    return (*(torch.randn(2, 3, 64, device=device, dtype=dt) for _ in range(3)),
            torch.randn(2, 3, 16, 64, device=device, dtype=dt), torch.randn(2, 3, 16, 64, device=device, dtype=dt),
            torch.tensor([3, 40], dtype=torch.int32, device=device), 0.125)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,make", [
    pytest.param("based_prefill", prefill_args, id="based_prefill"),
    pytest.param("based_prefill", lambda d: prefill_args(d, init=False, return_state=False), id="based_prefill-plain"),
    pytest.param("based_decode", decode_args, id="based_decode"),
    pytest.param("sliding_window_decode", swd_args, id="sliding_window_decode"),
])
def test_opcheck(op, make, device):
    torch.library.opcheck(getattr(torch.ops.attn_kernels, op).default, make(device))


def test_schemas_declare_in_place_mutation():
    decode = torch.ops.attn_kernels.based_decode.default._schema
    swd = torch.ops.attn_kernels.sliding_window_decode.default._schema
    prefill = torch.ops.attn_kernels.based_prefill.default._schema
    assert [a.name for a in decode.arguments if a.is_write] == ["S", "z"]
    assert [a.name for a in swd.arguments if a.is_write] == ["k_cache", "v_cache"]
    assert not any(a.is_write for a in prefill.arguments)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_traces_all_ops(device):
    """One compiled graph with all three ops (fake impls used for tracing, mutations functionalized) gives
    the eager results, and mutates the state and caches like eager does."""
    dt = _dtype(device)
    q, k = (torch.randn(2, 3, 40, 16, device=device, dtype=dt) for _ in range(2))
    v = torch.randn(2, 3, 40, 64, device=device, dtype=dt)
    swd = swd_args(device)

    def step(q, k, v, k_cache, v_cache, positions):
        o, state = ak.based_prefill(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], return_state=True)
        o_dec = ak.based_decode(q[:, :, -1], k[:, :, -1], v[:, :, -1], state)
        o_swd = ak.sliding_window_decode(swd[0], swd[1], swd[2], k_cache, v_cache, positions, window=16)
        return o, o_dec, o_swd, state

    caches_eager = (swd[3].clone(), swd[4].clone())
    eager = step(q, k, v, *caches_eager, swd[5])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, swd[3], swd[4], swd[5])
    for a, b in zip(eager[:3] + eager[3], compiled[:3] + compiled[3]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(swd[3], caches_eager[0])
    torch.testing.assert_close(swd[4], caches_eager[1])


def test_cuda_call_without_kernels_says_so(monkeypatch):
    """Where _C was not built, a CUDA call raises a clear error (the fallback registered for that case)."""
    monkeypatch.setattr(_library, "_C_ERROR", "ImportError: No module named 'attn_kernels._C'")
    with pytest.raises(RuntimeError, match="based_decode: the CUDA kernels were not built"):
        _library._not_built("based_decode")(torch.zeros(1))


def test_cuda_dispatch_has_an_implementation_for_every_op():
    for name in _library.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"attn_kernels::{name}", "CUDA"), name


@requires_cuda
def test_kernels_are_built_on_gpu_machines():
    """On a GPU box the package must have been built with its kernels; the reference fallback would
    silently make every GPU test and benchmark measure PyTorch."""
    assert ak.kernels_available(), _library._C_ERROR
