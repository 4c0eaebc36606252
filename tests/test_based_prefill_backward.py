"""based_prefill's gradients (issue 15, CPU part): the autograd formula registered on the op, checked against
finite differences of the forward in float64 (torch.autograd.gradcheck), through the returned state too;
torch.library's own checks (opcheck) and torch.compile of forward + backward; the backward op's argument
checks. The CUDA kernel's tests: test_based_prefill_backward_cuda.py."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import attn_kernels as ak
from attn_kernels import _library
from harness import bwd_split

F64 = dict(dtype=torch.float64)


def inputs(B, H, N, init, requires=(True, True, True, True, True)):
    """q, k, v, S0, z0 in float64 (S0/z0 None without init), a realistic state (z0 >= 1 keeps den > 0)."""
    q, k = (torch.randn(B, H, N, 16, **F64) for _ in range(2))
    v = torch.randn(B, H, N, 64, **F64)
    S0 = torch.randn(B, H, 153, 64, **F64) if init else None
    z0 = torch.rand(B, H, 153, **F64) + 1 if init else None
    return [None if t is None else t.requires_grad_(r) for t, r in zip((q, k, v, S0, z0), requires)]


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("init", [False, True], ids=["s0", "init"])
@pytest.mark.parametrize("B,H,N", [(1, 1, 1), (2, 1, 5), (1, 2, 65), (1, 1, 130)],
                         ids=["B1-H1-N1", "B2-H1-N5", "B1-H2-N65", "B1-H1-N130"])
def test_gradcheck_through_output_and_state(B, H, N, init, normalize):
    """Every gradient (q, k, v, S0, z0), from o and from the returned state (S, z), against finite
    differences of the forward: chunk boundaries (N = 65, 130), one token, with and without an initial state."""
    args = [t for t in inputs(B, H, N, init) if t is not None]

    def f(q, k, v, *state):
        o, (S, z) = ak.based_prefill(q, k, v, normalize=normalize, initial_state=tuple(state) or None,
                                     return_state=True)
        return o, S, z

    # Tolerance: central differences in float64 with step 1e-6 err by ~u |f| / 1e-6 ~ 1e-10 (rounding) plus
    # ~(1e-6)^2 |f'''| (truncation), for outputs and derivatives of size ~1-100: atol 1e-6 / rtol 1e-5 sit four
    # orders above that and five below a wrong or missing gradient term (an O(1) relative error).
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_gradcheck_of_the_output_alone_full_jacobian():
    """The whole Jacobian (not fast mode) on a tiny case with the default return (o only); S0's 9792 entries
    held fixed (fast mode covers them above), z0's included."""
    q, k, v, S0, z0 = inputs(1, 1, 3, True, requires=(True, True, True, False, True))
    assert torch.autograd.gradcheck(lambda q, k, v, z0: ak.based_prefill(q, k, v, initial_state=(S0, z0)),
                                    (q, k, v, z0), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_inputs_without_requires_grad_get_no_gradient():
    q, k, v, S0, z0 = inputs(1, 2, 70, True, requires=(False, False, True, False, True))
    ak.based_prefill(q, k, v, initial_state=(S0, z0)).square().sum().backward()
    assert q.grad is None and k.grad is None and S0.grad is None
    assert v.grad is not None and z0.grad is not None and v.grad.abs().sum() > 0
    out = ak.based_prefill_backward(q, k, v, torch.randn(1, 2, 70, 64, **F64), initial_state=(S0, z0),
                                    needs=(False, False, True, False, True))
    assert [t.numel() for t in out[:2]] == [0, 0] and out[3].numel() == 0
    assert out[2].shape == v.shape and out[4].shape == z0.shape


def test_opcheck_with_gradients():
    """torch.library.opcheck on the forward with inputs that need gradients (autograd registration, the
    fake through AOT dispatch, forward + backward) and on the backward op itself."""
    q, k, v, S0, z0 = inputs(1, 2, 70, True)
    torch.library.opcheck(torch.ops.attn_kernels.based_prefill.default,
                          (q, k, v, 0.25, True, 1e-6, S0, z0, True))
    grads = (torch.randn(1, 2, 70, 64, **F64), torch.randn(1, 2, 153, 64, **F64), torch.randn(1, 2, 153, **F64))
    torch.library.opcheck(torch.ops.attn_kernels.based_prefill_backward.default,
                          (q.detach(), k.detach(), v.detach(), S0.detach(), z0.detach(), *grads, 0.25, True, 1e-6,
                           [True, True, True, True, True]))


def test_torch_compile_traces_forward_and_backward():
    q, k, v, S0, z0 = inputs(2, 2, 70, True)

    def loss(q, k, v, S0, z0):
        o, (S, z) = ak.based_prefill(q, k, v, initial_state=(S0, z0), return_state=True)
        return o.square().sum() + S.sum() + z.square().sum()

    eager = torch.autograd.grad(loss(q, k, v, S0, z0), (q, k, v, S0, z0))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v, S0, z0), (q, k, v, S0, z0))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_varlen_has_no_backward_yet():
    q, k, v = (torch.randn(1, 1, 7, d, **F64, requires_grad=True) for d in (16, 16, 64))
    o = ak.based_prefill(q, k, v, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="no backward for varlen"):
        o.sum().backward()


def _good():
    q, k, v, _, _ = inputs(1, 2, 5, False, requires=(False,) * 5)
    return dict(q=q, k=k, v=v, grad_o=torch.randn(1, 2, 5, 64, **F64))


@pytest.mark.parametrize("override,exc,words", [
    pytest.param(dict(grad_o=torch.randn(1, 2, 6, 64, **F64)), ValueError,
                 ["grad_o.shape must be (1, 2, 5, 64)", "(1, 2, 6, 64)"], id="grad_o-shape"),
    pytest.param(dict(grad_o=torch.randn(1, 2, 5, 64)), TypeError, ["grad_o.dtype must match q.dtype"],
                 id="grad_o-dtype"),
    pytest.param(dict(grad_o=[1.0]), TypeError, ["grad_o must be a torch.Tensor"], id="grad_o-list"),
    pytest.param(dict(needs=(True, True)), TypeError, ["needs must be 5 bools"], id="needs-short"),
    pytest.param(dict(grad_state=(torch.zeros(1, 2, 153, 64, **F64), torch.zeros(1, 2, 153, **F64))), None,
                 [], id="grad_state-float64-ok-on-cpu"),
    pytest.param(dict(grad_state=(torch.zeros(1, 2, 152, 64), torch.zeros(1, 2, 153))), ValueError,
                 ["grad_state[0] (S).shape must be (1, 2, 153, 64)"], id="grad_state-shape"),
])
def test_backward_op_rejects_bad_arguments(override, exc, words):
    args = {**_good(), **override}
    call = lambda: ak.based_prefill_backward(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("grad_o"),  # noqa: E731
                                             **args)
    if exc is None:
        call()
        return
    with pytest.raises(exc) as info:
        call()
    assert str(info.value).startswith("based_prefill_backward:")
    for w in words:
        assert w in str(info.value), str(info.value)


def test_a_pending_cuda_kernel_raises_its_reason(monkeypatch):
    """The mechanism for an op declared without a CUDA kernel yet (define_op(cuda_pending=...)): its CUDA call
    raises the reason given. based_prefill_backward has its kernel now, so it is not pending."""
    assert "based_prefill_backward" not in _library.CUDA_PENDING
    monkeypatch.setitem(_library.CUDA_PENDING, "some_op", "issue 99: not written yet")
    with pytest.raises(RuntimeError, match="no CUDA kernel yet \\(issue 99"):
        _library._no_kernel("some_op")()


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "num"])
@pytest.mark.parametrize("init", [False, True], ids=["s0", "init"])
def test_reference_vjp_equals_autograd_through_the_quadratic_form(init, normalize):
    """reference_backward.based_vjp (written out) against autograd through reference.based_quadratic (a
    different forward), float64, every output's gradient at once."""
    from attn_kernels import reference as ref
    from attn_kernels.reference_backward import based_vjp

    q, k, v, S0, z0 = inputs(2, 2, 70, init)
    o, (S, z) = ref.based_quadratic(q, k, v, normalize=normalize, initial_state=(S0, z0) if init else None)
    G, gS, gz = torch.randn_like(o), torch.randn_like(S), torch.randn_like(z)
    leaves = [t for t in (q, k, v, S0, z0) if t is not None]
    want = torch.autograd.grad([o, S, z], leaves, [G, gS, gz])
    got = based_vjp(*(t.detach() for t in (q, k, v)), G, gS, gz, normalize=normalize,
                    initial_state=(S0.detach(), z0.detach()) if init else None)
    # Two float64 computations of the same gradients in different orders: ~1e-15 relative apart (measured
    # 2e-16 - 8e-16); 1e-12 leaves room for longer sums and catches any missing term.
    for a, b in zip([g for g in got if g is not None], want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


SPLIT_PROGRAM = r"""
#include <cstdio>
#include "based_prefill_backward/split.h"
using namespace attn_kernels;
int main() {
  const int sms[] = {1, 78, 114, 132, 144};
  const int bhs[][2] = {{1, 1}, {1, 2}, {2, 3}, {1, 16}, {4, 16}, {2, 66}, {16, 16}, {1, 263}, {1, 264}, {3, 100}};
  const int ns[] = {1, 63, 64, 65, 511, 512, 513, 1000, 1600, 4097, 20000, 32768, 65536, 1 << 20};
  for (int s : sms)
    for (auto& bh : bhs)
      for (int n : ns) {
        const BwdSplit sp = bwd_choose_split(bh[0], bh[1], n, s);
        std::printf("%d %d %d %d %d %d %zu\n", bh[0], bh[1], n, s, sp.nseg, sp.seg_chunks,
                    bwd_sums_floats(bh[0], bh[1], sp));
      }
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_split_rule_python_mirror_equals_the_kernels(tmp_path):
    """harness.bwd_split (what the GPU tests use to pick split shapes and segment bounds) is the launcher's
    rule (csrc/based_prefill_backward/split.h, compiled here without CUDA); every segment is non-empty, at
    least 8 chunks unless the sequence is shorter, and the B*H*segments CTAs stay within about two waves."""
    root = Path(__file__).resolve().parents[1]
    src, exe = tmp_path / "split.cpp", tmp_path / "split"
    src.write_text(SPLIT_PROGRAM)
    subprocess.run([shutil.which("g++"), "-std=c++17", "-Wall", "-Werror", f"-I{root / 'csrc'}", str(src), "-o",
                    str(exe)], check=True, capture_output=True, text=True)
    rows = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    assert len(rows) == 5 * 10 * 14
    for row in rows:
        B, H, N, sms, nseg, seg_chunks, floats = map(int, row.split())
        assert (nseg, seg_chunks) == bwd_split(B, H, N, sms), row
        nchunks = -(-N // 64)
        assert (nseg - 1) * seg_chunks < nchunks <= nseg * seg_chunks, row  # no empty segment
        assert nseg == 1 or (seg_chunks >= 8 and B * H * nseg <= 2 * sms), row
        assert floats == (B * H * (nseg - 1) * (153 * 64 + 160) if nseg > 1 else 0), row
