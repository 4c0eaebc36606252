"""The `attn_kernels` torch library: schemas are defined here in Python (so the package works without the
compiled extension); the CUDA kernels register themselves from attn_kernels._C (csrc/binding.cpp)."""
from __future__ import annotations

import torch

LIB = torch.library.Library("attn_kernels", "DEF")
OPS = ("based_prefill", "based_decode", "sliding_window_decode")

_C_ERROR: str | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """CPU reference precision: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _load_extension() -> None:
    global _C_ERROR
    try:
        from . import _C  # noqa: F401  (registers the CUDA kernels)
    except ImportError as exc:
        _C_ERROR = f"{type(exc).__name__}: {exc}"


def kernels_available() -> bool:
    """True when the compiled CUDA kernels (attn_kernels._C) are loaded."""
    return _C_ERROR is None


def _not_built(name: str):
    def raise_not_built(*args, **kwargs):
        raise RuntimeError(
            f"attn_kernels.{name}: the CUDA kernels were not built ({_C_ERROR}). Reinstall where nvcc and a "
            "CUDA build of torch are present: pip install --no-build-isolation -e ."
        )

    return raise_not_built


def register_cuda_fallbacks(reference_impls: dict) -> None:
    """Load _C; an op with no compiled CUDA kernel then gets one: an error that says the kernels were not
    built, or — when _C loaded but lacks that op — the PyTorch reference running on the GPU."""
    _load_extension()
    for name in OPS:
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"attn_kernels::{name}", "CUDA"):
            continue
        impl = _not_built(name) if _C_ERROR is not None else reference_impls[name]
        LIB.impl(name, impl, "CUDA")
