"""The `attn_kernels` torch library: schemas are defined here in Python (so the package imports without the
compiled extension); the CUDA kernels register themselves from attn_kernels._C (csrc/binding.cpp).

There is no fallback on CUDA: an op's CUDA dispatch is its kernel, or an error saying why there is none (the
extension was not built, or it was built without that op). A CUDA call never runs the PyTorch reference."""
from __future__ import annotations

import torch

LIB = torch.library.Library("attn_kernels", "DEF")
OPS: list[str] = []  # the ops declared with define_op, in import order

_C_ERROR: str | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """CPU reference precision: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Ops declared without a CUDA kernel yet (name -> why): a CUDA call raises that reason, and the compiled
# extension is not blamed for it (kernels_available() stays True).
CUDA_PENDING: dict[str, str] = {}


def define_op(name: str, schema: str, *, cpu, fake, cuda_pending: str | None = None) -> None:
    """Declare the op attn_kernels::<name> in one place: its schema (the arguments after the name), its CPU
    implementation (the PyTorch reference) and its fake implementation (shapes only, for torch.compile). Its
    CUDA implementation is the kernel that csrc/binding.cpp registers under the same name; load_kernels()
    makes a CUDA call raise where there is none (cuda_pending: the reason there is none yet)."""
    LIB.define(f"{name}{schema}")
    LIB.impl(name, cpu, "CPU")
    torch.library.register_fake(f"attn_kernels::{name}", fake, lib=LIB)
    OPS.append(name)
    if cuda_pending:
        CUDA_PENDING[name] = cuda_pending


def kernels_available() -> bool:
    """True when the compiled CUDA kernels (attn_kernels._C) are loaded with a kernel for every op."""
    return _C_ERROR is None


def _no_kernel(name: str):
    def raise_no_kernel(*args, **kwargs):
        if name in CUDA_PENDING:
            raise RuntimeError(f"attn_kernels.{name}: no CUDA kernel yet ({CUDA_PENDING[name]})")
        raise RuntimeError(
            f"attn_kernels.{name}: no CUDA kernel ({_C_ERROR}). Reinstall where nvcc and a CUDA build of "
            "torch are present: pip install --no-build-isolation -e ."
        )

    return raise_no_kernel


def load_kernels() -> None:
    """Import _C (which registers the CUDA kernels). Every op it left without a CUDA kernel — all of them
    when _C is missing — gets one that raises, so a CUDA call fails loudly instead of running elsewhere."""
    global _C_ERROR
    try:
        from . import _C  # noqa: F401  (registers the CUDA kernels)
    except ImportError as exc:
        _C_ERROR = f"the extension attn_kernels._C was not built or does not load: {type(exc).__name__}: {exc}"
    missing = [name for name in OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"attn_kernels::{name}", "CUDA")]
    built_without = [name for name in missing if name not in CUDA_PENDING]
    if built_without and _C_ERROR is None:
        _C_ERROR = f"attn_kernels._C was built without a CUDA kernel for {', '.join(built_without)}"
    for name in missing:
        LIB.impl(name, _no_kernel(name), "CUDA")
