"""The correctness harness every op test reuses.

- ``randn``: fresh random inputs (never zeros), optionally laid out (B, N, H, D) and passed as the
  (B, H, N, D) transposed view, the layout models hold them in.
- ``prior_state``: a Based state summed over random earlier tokens, for initial-state cases.
- ``poison_allocator``: fills the CUDA caching allocator's next blocks with NaN, so an output element the
  kernel fails to write shows up as NaN (``assert_written``).
- ``assert_close_rule``: flash-attn's rule — the kernel's error against a float64 reference must be at most
  twice the error of a PyTorch reference run in the same low precision, plus one rounding step of the
  output dtype at the output's magnitude.
"""
from __future__ import annotations

import pytest
import torch

from attn_kernels import reference as ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def randn(*shape, dtype, device, transposed: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Standard normal (B, H, N, D) [or (B, H, D)]; with transposed=True stored as (B, N, H, D) and returned
    as the transposed view (strides not contiguous, last dim stride 1)."""
    if transposed:
        B, H, *rest = shape
        if len(rest) == 2:
            N, D = rest
            return (scale * torch.randn(B, N, H, D, device=device)).to(dtype).transpose(1, 2)
        # (B, H, D): heads-major storage (H, B, D), a strided view over B
        return (scale * torch.randn(H, B, *rest, device=device)).to(dtype).transpose(0, 1)
    return (scale * torch.randn(*shape, device=device)).to(dtype)


def prior_state(B: int, H: int, device, dtype=torch.float32, tokens: int = 24):
    """A realistic Based state (S, z): the sum over a few random earlier tokens (keeps phi(q).z > 0)."""
    k = torch.randn(B, H, tokens, 16, device=device, dtype=torch.float64)
    v = torch.randn(B, H, tokens, 64, device=device, dtype=torch.float64)
    phi = ref.feature_map_compact(k, 0.25)
    return (phi.transpose(-1, -2) @ v).to(dtype), phi.sum(-2).to(dtype)


def poison_allocator(*numels_bytes: int, copies: int = 4) -> None:
    """Leave NaN-filled blocks of each size (bytes) free in the caching allocator, so the op's next
    allocations of those sizes start as NaN (0xFF bytes are NaN in fp16, bf16 and fp32)."""
    blocks = [torch.full((n,), 0xFF, dtype=torch.uint8, device="cuda") for n in numels_bytes for _ in range(copies)]
    del blocks


def nbytes(*shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def assert_written(name: str, t: torch.Tensor) -> None:
    bad = (~torch.isfinite(t)).sum().item()
    assert bad == 0, f"{name}: {bad} of {t.numel()} elements are NaN/inf (unwritten or overflowed)"


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()


def assert_close_rule(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor,
                      dtype: torch.dtype | None = None) -> None:
    """max|out - ref64| <= 2 * max|ref_lowp - ref64| + eps(dtype) * max|ref64|."""
    dtype = out.dtype if dtype is None else dtype
    assert_written(name, out)
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = max_err(out, ref64)
    base = max_err(ref_lowp, ref64)
    floor = torch.finfo(dtype).eps * ref64.abs().max().item()
    bound = 2 * base + floor
    assert err <= bound, (
        f"{name}: max error {err:.3e} > bound {bound:.3e} "
        f"(2 x low-precision reference error {base:.3e} + rounding floor {floor:.3e})"
    )
