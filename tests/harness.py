"""The correctness harness every op test reuses: inputs, poisoning and the output rule. The derivation of every
bound is in tests/README.md; the models the outputs are compared with are in tests/prefill_model.py (based_prefill:
the kernel-faithful comparator and the state's promise) and tests/state_model.py (the state check, based_decode).

- ``randn``: fresh random inputs (never zeros), optionally laid out (B, N, H, D) and passed as the
  (B, H, N, D) transposed view, the layout models hold them in.
- ``prior_state``: a Based state summed over random earlier tokens, for initial-state cases.
- ``bwd_split``: where based_prefill_backward's kernels cut a sequence into segments (split.h's mirror).
- ``poison_allocator``: fills the CUDA caching allocator's next blocks with NaN, so an output element the
  kernel fails to write shows up as NaN (``assert_written``).
- ``assert_close_rule``: flash-attn's rule, row by row — for every output row (token, head), the error against
  a float64 reference must be at most twice the error of a low-precision comparator, plus one rounding step
  of the output dtype at that row's magnitude.
- ``fp32_scale``: the feature-map scale as every kernel holds it (float32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from attn_kernels import reference as ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


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


def bwd_split(B: int, H: int, N: int, num_sms: int) -> tuple[int, int]:
    """(segments, chunks per segment) of based_prefill_backward's sequence-parallel path: a mirror of
    csrc/based_prefill_backward/split.h's bwd_choose_split (tests/test_based_prefill_backward.py checks the two
    agree), so that a GPU test knows which of its shapes split and where the segments begin."""
    bh, nchunks, target = B * H, -(-N // 64), 2 * max(num_sms, 1)
    nseg = max(1, min(1 if bh >= target else target // bh, nchunks // 8))
    seg_chunks = -(-nchunks // nseg)
    return -(-nchunks // seg_chunks), seg_chunks


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


# ---- the output rule ---------------------------------------------------------------------------------------

@dataclass
class RuleCheck:
    """The rule evaluated row by row; ``ratio`` = max over rows of error / bound (<= 1 passes)."""
    ratio: float
    row: tuple
    err: float
    base: float
    floor: float
    failing_rows: int
    rows: int

    @property
    def bound(self) -> float:
        return 2 * self.base + self.floor

    def describe(self, name: str) -> str:
        return (f"{name}: worst row {self.row}: max error {self.err:.3e} vs bound {self.bound:.3e} "
                f"(2 x comparator error {self.base:.3e} + rounding floor {self.floor:.3e}); "
                f"error/bound {self.ratio:.3g}, {self.failing_rows} of {self.rows} rows over")


def rule_check(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype) -> RuleCheck:
    """Per row r (every index but the last dim): max|out - ref64|_r <= 2 max|ref_lowp - ref64|_r
    + eps(dtype) max|ref64|_r. Row by row, so that the late tokens of a long sequence (outputs ~1/sqrt(t) of
    the first ones) are held to their own magnitude, not to the sequence's largest output."""
    r64 = ref64.double()
    err = (out.double() - r64).abs().amax(-1)
    base = (ref_lowp.double() - r64).abs().amax(-1)
    floor = torch.finfo(dtype).eps * r64.abs().amax(-1)
    bound = 2 * base + floor
    over = err - bound
    ratio = torch.where(bound > 0, err / bound, torch.where(err > 0, math.inf, 0.0))
    worst = int(ratio.flatten().argmax())
    row = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape))
    return RuleCheck(ratio=float(ratio.flatten()[worst]), row=row, err=float(err.flatten()[worst]),
                     base=float(base.flatten()[worst]), floor=float(floor.flatten()[worst]),
                     failing_rows=int((over > 0).sum()), rows=over.numel())


def assert_close_rule(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor,
                      dtype: torch.dtype | None = None) -> RuleCheck:
    """Row by row: max|out - ref64| <= 2 * max|ref_lowp - ref64| + eps(dtype) * max|ref64|."""
    dtype = out.dtype if dtype is None else dtype
    assert_written(name, out)
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    check = rule_check(out, ref64, ref_lowp, dtype)
    assert check.ratio <= 1, check.describe(name)
    return check


# ---- the feature-map scale as the kernels hold it --------------------------------------------------------

def fp32_scale(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, sqrt(c)) as the kernels hold them: c = float(scale) (binding.cpp), sqrt_c = sqrtf(c); 0-d float32."""
    c = torch.tensor(scale, dtype=torch.float32)
    return c, c.sqrt()
