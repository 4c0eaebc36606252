"""The ops are proper torch.library custom ops: schemas with declared mutation, fake (meta)
implementations that torch.compile traces, and opcheck's consistency tests. On the CPU here; the same
checks run on the GPU against the kernels."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attn_kernels as ak
from attn_kernels import _library
from harness import requires_cuda

ROOT = Path(__file__).resolve().parents[1]
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


def prefill_varlen_args(device):
    """Three packed sequences (30, 0, 40 tokens) with per-sequence initial states and a length bound."""
    dt = _dtype(device)
    q, k = (torch.randn(1, 3, 70, 16, device=device, dtype=dt) for _ in range(2))
    v = torch.randn(1, 3, 70, 64, device=device, dtype=dt)
    cu = torch.tensor([0, 30, 30, 70], dtype=torch.int32, device=device)
    S0, z0 = torch.rand(3, 3, 153, 64, device=device), torch.rand(3, 3, 153, device=device) + 1
    return (q, k, v, 0.25, True, 1e-6, S0, z0, True, cu, 40)


def prefill_pool_args(device):
    """Two sequences' final states into slots 3 and (padding) nowhere of a 5-slot pool."""
    dt = _dtype(device)
    q, k = (torch.randn(2, 3, 70, 16, device=device, dtype=dt) for _ in range(2))
    v = torch.randn(2, 3, 70, 64, device=device, dtype=dt)
    pool = (torch.rand(5, 3, 153, 64, device=device), torch.rand(5, 3, 153, device=device))
    idx = torch.tensor([3, -1], dtype=torch.int32, device=device)
    return (q, k, v, 0.25, True, 1e-6, None, None, None, 0, *pool, idx)


def decode_args(device):
    dt = _dtype(device)
    return (torch.randn(2, 3, 16, device=device, dtype=dt), torch.randn(2, 3, 16, device=device, dtype=dt),
            torch.randn(2, 3, 64, device=device, dtype=dt), torch.rand(2, 3, 153, 64, device=device),
            torch.rand(2, 3, 153, device=device) + 1, 0.25, True, 1e-6)


def pooled_decode_args(device):
    """based_decode on a pool of 5 slots: rows 0, 1 use slots 4 and 1, row 2 is padding (-1)."""
    dt = _dtype(device)
    return (torch.randn(3, 2, 16, device=device, dtype=dt), torch.randn(3, 2, 16, device=device, dtype=dt),
            torch.randn(3, 2, 64, device=device, dtype=dt), torch.rand(5, 2, 153, 64, device=device),
            torch.rand(5, 2, 153, device=device) + 1, 0.25, True, 1e-6,
            torch.tensor([4, 1, -1], dtype=torch.int32, device=device))


def swd_args(device):
    dt = _dtype(device)
    return (*(torch.randn(2, 3, 64, device=device, dtype=dt) for _ in range(3)),
            torch.randn(2, 3, 16, 64, device=device, dtype=dt), torch.randn(2, 3, 16, 64, device=device, dtype=dt),
            torch.tensor([3, 40], dtype=torch.int32, device=device), 0.125)


def swp_args(device, varlen=False):
    dt = _dtype(device)
    q, k, v = (torch.randn(1 if varlen else 2, 3, 70, 64, device=device, dtype=dt) for _ in range(3))
    rows = 3 if varlen else 2
    kc, vc = (torch.randn(rows, 3, 16, 64, device=device, dtype=dt) for _ in range(2))
    cu = torch.tensor([0, 20, 20, 70], dtype=torch.int32, device=device) if varlen else None
    idx = torch.tensor([2, -1, 0], dtype=torch.int32, device=device) if varlen else None
    return (q, k, v, kc, vc, 0.125, cu, 70, idx)


def swd_pooled_args(device):
    """Pools of 5 rows for 2 sequences: row 3, and a padding row (-1)."""
    dt = _dtype(device)
    q, kn, vn, _, _, positions, scale = swd_args(device)
    pools = (torch.randn(5, 3, 16, 64, device=device, dtype=dt) for _ in range(2))
    return (q, kn, vn, *pools, positions, scale, torch.tensor([3, -1], dtype=torch.int32, device=device))


# Each op with sample arguments (a callable of the device): opcheck runs them all, on the CPU and the GPU,
# and the GPU checks that each runs the op's own kernel.
OP_CASES = [
    pytest.param("based_prefill", prefill_args, id="based_prefill"),
    pytest.param("based_prefill", lambda d: prefill_args(d, init=False, return_state=False), id="based_prefill-plain"),
    pytest.param("based_prefill", prefill_varlen_args, id="based_prefill-varlen"),
    pytest.param("based_prefill_to_pool", prefill_pool_args, id="based_prefill_to_pool"),
    pytest.param("based_decode", decode_args, id="based_decode"),
    pytest.param("based_decode", pooled_decode_args, id="based_decode-pooled"),
    pytest.param("sliding_window_decode", swd_args, id="sliding_window_decode"),
    pytest.param("sliding_window_prefill", swp_args, id="sliding_window_prefill"),
    pytest.param("sliding_window_prefill", lambda d: swp_args(d, varlen=True), id="sliding_window_prefill-varlen"),
    pytest.param("sliding_window_decode", swd_pooled_args, id="sliding_window_decode-pooled"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,make", OP_CASES)
def test_opcheck(op, make, device):
    torch.library.opcheck(getattr(torch.ops.attn_kernels, op).default, make(device))


def test_schemas_declare_in_place_mutation():
    decode = torch.ops.attn_kernels.based_decode.default._schema
    swd = torch.ops.attn_kernels.sliding_window_decode.default._schema
    prefill = torch.ops.attn_kernels.based_prefill.default._schema
    assert [a.name for a in decode.arguments if a.is_write] == ["S", "z"]
    assert decode.arguments[-1].name == "state_indices" and str(decode.arguments[-1].type) == "Optional[Tensor]"
    assert [a.name for a in swd.arguments if a.is_write] == ["k_cache", "v_cache"]
    swp = torch.ops.attn_kernels.sliding_window_prefill.default._schema
    assert [a.name for a in swp.arguments if a.is_write] == ["k_cache", "v_cache"]
    assert not any(a.is_write for a in prefill.arguments)  # functional: autograd can be registered on it
    to_pool = torch.ops.attn_kernels.based_prefill_to_pool.default._schema
    assert [a.name for a in to_pool.arguments if a.is_write] == ["pool_S", "pool_z"]


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


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_traces_the_pooled_call(device):
    """sliding_window_decode with cache_indices compiled (no host check of the indices while tracing): the
    eager output, and the pools mutated like eager does."""
    q, kn, vn, k_pool, v_pool, positions, _, idx = swd_pooled_args(device)

    def step(k_pool, v_pool, idx):
        return ak.sliding_window_decode(q, kn, vn, k_pool, v_pool, positions, window=16, cache_indices=idx)

    k_initial = k_pool.clone()
    pools_eager = (k_pool.clone(), v_pool.clone())
    eager = step(*pools_eager, idx)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(k_pool, v_pool, idx)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(k_pool, pools_eager[0])
    torch.testing.assert_close(v_pool, pools_eager[1])
    assert not torch.equal(k_pool[3], k_initial[3]) and torch.equal(k_pool[:3], k_initial[:3])  # row 3 only


def test_cuda_dispatch_is_the_compiled_kernel():
    """With _C built (CI builds it), every op's CUDA dispatch comes from _C: no Python implementation is
    registered for CUDA, so nothing can stand in for a kernel."""
    if not ak.kernels_available():
        pytest.skip(f"the extension was not built here: {_library._C_ERROR}")
    for name in _library.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"attn_kernels::{name}", "CUDA"), name
        python_impl = f"attn_kernels/{name}/CUDA" in _library.LIB._op_impls
        # only an op declared without a kernel yet has one: the impl that raises its reason
        assert python_impl == (name in _library.CUDA_PENDING), f"{name}: a Python CUDA impl"


def test_missing_extension_makes_cuda_calls_raise():
    """Without _C, each op's CUDA dispatch is an error that says why (never the PyTorch reference)."""
    code = (
        "import sys; sys.modules['attn_kernels._C'] = None\n"  # import of _C fails
        "import torch, attn_kernels as ak\n"
        "from attn_kernels import _library\n"
        "assert not ak.kernels_available()\n"
        "for name in _library.OPS:\n"
        "    assert f'attn_kernels/{name}/CUDA' in _library.LIB._op_impls, name\n"
        "try:\n"
        "    _library._no_kernel('based_decode')(torch.zeros(1))\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "attn_kernels.based_decode: no CUDA kernel (the extension attn_kernels._C was not built" in out.stdout


@requires_cuda
def test_kernels_are_built_on_gpu_machines():
    """On a GPU box the package must have been built with its kernels."""
    assert ak.kernels_available(), _library._C_ERROR


KERNEL_NAMES = {  # a substring of the CUDA kernel each op launches, as the profiler records it
    "based_prefill": "based_prefill_kernel",
    "based_prefill_to_pool": "based_prefill_kernel",
    "based_decode": "based_decode_kernel",
    "sliding_window_decode": "sliding_window_decode_kernel",
    "sliding_window_prefill": "sliding_window_prefill_kernel",
}


@requires_cuda
@pytest.mark.parametrize("op,make", OP_CASES)
def test_each_op_runs_its_kernel(op, make):
    """The profiler sees the op's own kernel run: fails if anything else (e.g. PyTorch ops) served it."""
    args = make("cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        getattr(torch.ops.attn_kernels, op)(*args)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [n for n in names if KERNEL_NAMES[op] in n]
    assert ours, f"{op}: kernel {KERNEL_NAMES[op]} not among the CUDA kernels that ran: {sorted(set(names))}"


def test_python_limits_equal_the_kernels_limits():
    """attn_kernels/limits.py and csrc/common/limits.h state the same sizes (each language has one copy)."""
    from attn_kernels import limits

    header = (ROOT / "csrc" / "common" / "limits.h").read_text()

    def const(name):  # the header's constant expression, evaluated with the names it uses
        expr = re.search(rf"constexpr int {name} = ([^;]+);", header).group(1)
        return eval(expr, {"__builtins__": {}}, {"kFeatDim": limits.FEAT_DIM})  # noqa: S307

    assert const("kFeatDim") == limits.FEAT_DIM and const("kValueDim") == limits.VALUE_DIM
    assert const("kCompactFeatures") == limits.COMPACT_FEATURES == 153
    assert const("kSwdMaxWindow") == limits.SWD_MAX_WINDOW
    heads = re.search(r"swd_head_size_ok\(int e\) \{ return ([^;]+); \}", header).group(1)
    assert tuple(int(x) for x in re.findall(r"e == (\d+)", heads)) == limits.SWD_HEAD_DIMS


def test_every_op_is_declared_once_with_schema_cpu_and_fake():
    assert sorted(_library.OPS) == ["based_decode", "based_prefill", "based_prefill_backward", "based_prefill_to_pool",
                                   "sliding_window_decode", "sliding_window_prefill"]
    for name in _library.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"attn_kernels::{name}", "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"attn_kernels::{name}", "Meta"), name
