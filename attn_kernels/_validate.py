"""Argument checks shared by the public ops. Each failure names the op, the argument, what was expected
and what was given: TypeError for a wrong kind or dtype, ValueError for a wrong shape or value."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .limits import COMPACT_FEATURES, FEAT_DIM, VALUE_DIM

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def tensor(op: str, name: str, t, ndim: int, last: Sequence[int] | None = None) -> torch.Tensor:
    """t is a floating tensor of rank ndim, no empty dimension, last dim in `last` (if given), stride 1."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got {t.dim()} (shape {tuple(t.shape)})")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name}.dtype must be a floating dtype, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(t.shape)}")
    if last is not None and t.shape[-1] not in last:
        want = last[0] if len(last) == 1 else f"one of {tuple(last)}"
        raise ValueError(f"{op}: {name}.shape[-1] must be {want}, got {t.shape[-1]}")
    if t.stride(-1) != 1:
        raise ValueError(f"{op}: {name}.stride(-1) must be 1 (last dimension contiguous), got {t.stride(-1)}")
    return t


def based_qkv(op: str, q, k, v, ndim: int) -> None:
    """Based inputs: q, k (..., 16) of one shape, v (..., 64) with q's leading dims; one device and dtype."""
    tensor(op, "q", q, ndim, last=(FEAT_DIM,))
    tensor(op, "k", k, ndim, last=(FEAT_DIM,))
    tensor(op, "v", v, ndim, last=(VALUE_DIM,))
    shape(op, "k", k, q.shape)
    shape(op, "v", v, (*q.shape[:-1], VALUE_DIM))
    same_device(op, "q", q, k=k, v=v)
    input_dtype(op, "q", q, k=k, v=v)


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name}.shape must be {tuple(expected)}, got {tuple(t.shape)}")


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def input_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """All inputs share ref's dtype; on CUDA it must be one the kernels serve."""
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name}.dtype must match {ref_name}.dtype {ref.dtype}, got {t.dtype}")
    if ref.is_cuda and ref.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: {ref_name}.dtype must be torch.float16 or torch.bfloat16 on CUDA, got {ref.dtype}")


def flag(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def positive_float(op: str, name: str, value, default: float | None = None, allow_zero: bool = False) -> float:
    """A finite real number > 0 (>= 0 with allow_zero); None means `default` where one is given."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{op}: {name} must be finite and {bound}, got {value}")
    return value


def state_pair(op: str, name: str, state, B: int, H: int, e: int, device: torch.device,
               cuda_dtypes: Sequence[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """A (S (B, H, 153, e), z (B, H, 153)) pair of one dtype on `device`."""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{op}: {name} must be a tuple (S, z), got {type(state).__name__}"
                        + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else ""))
    S = tensor(op, f"{name}[0] (S)", state[0], 4)
    z = tensor(op, f"{name}[1] (z)", state[1], 3)
    shape(op, f"{name}[0] (S)", S, (B, H, COMPACT_FEATURES, e))
    shape(op, f"{name}[1] (z)", z, (B, H, COMPACT_FEATURES))
    if z.dtype != S.dtype:
        raise TypeError(f"{op}: {name}[1] (z).dtype must match {name}[0] (S).dtype {S.dtype}, got {z.dtype}")
    if S.device != device or z.device != device:
        raise ValueError(f"{op}: {name} must be on the inputs' device {device}, got {S.device} and {z.device}")
    if S.is_cuda and S.dtype not in cuda_dtypes:
        names = " or ".join(str(d) for d in cuda_dtypes)
        raise TypeError(f"{op}: {name} dtype must be {names} on CUDA, got {S.dtype}")
    return S, z


def can_read_values(t: torch.Tensor) -> bool:
    """Values can be checked on the host unless tracing (torch.compile) or capturing a CUDA graph (where
    reading them would synchronize). There the kernels refuse bad values themselves (spec.md)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def index_tensor(op: str, name: str, idx, n_rows: int, pool_size: int, device: torch.device) -> torch.Tensor:
    """Per-row indices into a pool of pool_size rows (spec.md, "Serving variants"): an int32 tensor (n_rows,)
    on `device`. Where values can be read (can_read_values) they are checked too (index_values)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype != torch.int32:
        raise TypeError(f"{op}: {name}.dtype must be torch.int32, got {idx.dtype}")
    if idx.device != device:
        raise TypeError(f"{op}: {name} must be on the inputs' device {device}, got {idx.device}")
    if tuple(idx.shape) != (n_rows,):
        raise ValueError(f"{op}: {name}.shape must be ({n_rows},), got {tuple(idx.shape)}")
    if can_read_values(idx):
        index_values(op, name, idx, pool_size)
    return idx


def index_values(op: str, name: str, idx: torch.Tensor, pool_size: int) -> None:
    """Each index in [-1, pool_size) (-1 = a padding row), and no pool row named by two rows (-1 may
    repeat). Reads the values on the host (one copy)."""
    values = idx.tolist()
    for row, v in enumerate(values):
        if not -1 <= v < pool_size:
            raise ValueError(f"{op}: {name}[{row}] must be in [-1, {pool_size}) (a row of the pool of "
                             f"{pool_size}, or -1 for padding), got {v}")
    first: dict[int, int] = {}
    for row, v in enumerate(values):
        if v >= 0 and first.setdefault(v, row) != row:
            raise ValueError(f"{op}: {name} names pool row {v} twice (rows {first[v]} and {row}); only -1 "
                             "(padding) may repeat")
