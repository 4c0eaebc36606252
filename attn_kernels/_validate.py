"""Argument checks shared by the public ops. Each failure names the op, the argument, what was expected
and what was given: TypeError for a wrong kind or dtype, ValueError for a wrong shape or value."""
from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .limits import COMPACT_FEATURES, FEAT_DIM, SWD_MAX_WINDOW, VALUE_DIM

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def tensor(op: str, name: str, t, ndim: int, last: Sequence[int] | None = None,
           allow_empty: bool = False) -> torch.Tensor:
    """t is a floating tensor of rank ndim, no empty dimension (unless allow_empty), last dim in `last` (if
    given), stride 1."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got {t.dim()} (shape {tuple(t.shape)})")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name}.dtype must be a floating dtype, got {t.dtype}")
    if t.numel() == 0 and not allow_empty:
        raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(t.shape)}")
    if last is not None and t.shape[-1] not in last:
        want = last[0] if len(last) == 1 else f"one of {tuple(last)}"
        raise ValueError(f"{op}: {name}.shape[-1] must be {want}, got {t.shape[-1]}")
    if t.stride(-1) != 1 and t.numel() > 0:
        raise ValueError(f"{op}: {name}.stride(-1) must be 1 (last dimension contiguous), got {t.stride(-1)}")
    return t


def based_qkv(op: str, q, k, v, ndim: int, allow_empty: bool = False) -> None:
    """Based inputs: q, k (..., 16) of one shape, v (..., 64) with q's leading dims; one device and dtype.
    allow_empty: zero tokens are fine (varlen batches of empty sequences)."""
    tensor(op, "q", q, ndim, last=(FEAT_DIM,), allow_empty=allow_empty)
    tensor(op, "k", k, ndim, last=(FEAT_DIM,), allow_empty=allow_empty)
    tensor(op, "v", v, ndim, last=(VALUE_DIM,), allow_empty=allow_empty)
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


def window(op: str, w) -> int:
    """A sliding window: an int in [1, SWD_MAX_WINDOW]."""
    if isinstance(w, bool) or not isinstance(w, int):
        raise TypeError(f"{op}: window must be an int, got {type(w).__name__}")
    if not 1 <= w <= SWD_MAX_WINDOW:
        raise ValueError(f"{op}: window must be in [1, {SWD_MAX_WINDOW}], got {w}")
    return w


def state_pair(op: str, name: str, state, B: int | None, H: int, e: int, device: torch.device,
               cuda_dtypes: Sequence[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """A (S (B, H, 153, e), z (B, H, 153)) pair of one dtype on `device`; B=None: a pool, any number of
    rows (S's), the same in z."""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{op}: {name} must be a tuple (S, z), got {type(state).__name__}"
                        + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else ""))
    S = tensor(op, f"{name}[0] (S)", state[0], 4)
    z = tensor(op, f"{name}[1] (z)", state[1], 3)
    B = S.shape[0] if B is None else B
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


def writable_state(op: str, name: str, state, B: int | None, H: int, e: int, device: torch.device,
                   cuda_dtypes: Sequence[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """state_pair (B=None: a pool) that the op updates in place, so it must be contiguous (never copied)."""
    S, z = state_pair(op, name, state, B, H, e, device, cuda_dtypes)
    for part, t in ((f"{name}[0] (S)", S), (f"{name}[1] (z)", z)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {part} must be contiguous to be updated in place, got strides {t.stride()}")
    return S, z


# ---- index tensors (cu_seqlens, state_indices, cache_indices): device data; values checked on the host ----

# Reading an index tensor's values on the host is a sync, and a model calls its ops with the same index tensors
# in every layer: a tensor whose values passed a check is not read again until PyTorch changes it in place (its
# version counter moves). Writes PyTorch does not see (another library's kernel, a CUDA-graph replay) and
# inference tensors (no version counter: always read) are why the kernels keep their own device-side rules.
_CHECKED: dict[int, tuple] = {}  # id(t) -> (weakref to t, t._version, key, result)
_CHECKED_MAX = 64


def checked_once(t: torch.Tensor, key: tuple, check: Callable[[], Any]) -> Any:
    """check() (which reads t's values) unless t passed a check with the same key since its last in-place
    change; returns check()'s result (a cached one on a hit)."""
    if t.is_inference():
        return check()
    hit = _CHECKED.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2] == key:
        return hit[3]
    result = check()
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[id(t)] = (weakref.ref(t), t._version, key, result)
    return result


def can_read_values(t: torch.Tensor) -> bool:
    """Values can be checked on the host unless tracing or capturing a CUDA graph (where a read would sync)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def index_tensor(op: str, name: str, t, length: int | None, device: torch.device) -> torch.Tensor:
    """A 1-D int32 tensor on `device` (of `length` entries, if given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{op}: {name}.dtype must be torch.int32, got {t.dtype}")
    if t.device != device:
        raise TypeError(f"{op}: {name} must be on the inputs' device {device}, got {t.device}")
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        want = f"({length},)" if length is not None else "1-D"
        raise ValueError(f"{op}: {name}.shape must be {want}, got {tuple(t.shape)}")
    return t


def cu_seqlens_values(op: str, cu: torch.Tensor, total: int) -> int:
    """cu_seqlens starts at 0, is non-decreasing and ends at `total`; returns the longest sequence."""
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{op}: cu_seqlens[0] must be 0, got {vals[0]}")
    lengths = [b - a for a, b in zip(vals, vals[1:])]
    if any(n < 0 for n in lengths):
        i = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {vals[i]} > "
                         f"cu_seqlens[{i + 1}] = {vals[i + 1]}")
    if vals[-1] != total:
        raise ValueError(f"{op}: cu_seqlens[-1] must equal the packed length T = {total}, got {vals[-1]}")
    return max(lengths, default=0)


def pool_indices_values(op: str, name: str, idx: torch.Tensor, pool_rows: int) -> None:
    """Entries -1 (padding) or a slot in [0, pool_rows), no slot named twice (-1 may repeat). Reads the values
    on the host (a sync): call where can_read_values(idx)."""
    vals = idx.tolist()
    row = next((i for i, x in enumerate(vals) if not -1 <= x < pool_rows), None)
    if row is not None:
        raise ValueError(f"{op}: {name} must be -1 (padding) or a slot in [0, {pool_rows}) (the pool's size), "
                         f"got {vals[row]} at row {row}")
    seen: set[int] = set()
    for x in vals:
        if x >= 0 and x in seen:
            rows = [j for j, y in enumerate(vals) if y == x]
            raise ValueError(f"{op}: {name} must not repeat a slot (only -1 may repeat), got slot {x} at rows {rows}")
        seen.add(x)


def cu_seqlens(op: str, cu, T: int, device: torch.device) -> tuple[int, int | None]:
    """cu_seqlens (n + 1,) int32 on `device` (n >= 0), values checked on the host where can_read_values.
    Returns n and the longest sequence (None where the values were not read)."""
    index_tensor(op, "cu_seqlens", cu, None, device)
    if cu.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens.shape must be (n + 1,) with n >= 0, got {tuple(cu.shape)}")
    if not can_read_values(cu):
        return cu.numel() - 1, None
    return cu.numel() - 1, checked_once(cu, ("cu_seqlens", T), lambda: cu_seqlens_values(op, cu, T))


def varlen_batch(op: str, q: torch.Tensor, cu, max_seqlen) -> tuple[int, int | None, int | None]:
    """The varlen arguments of a prefill op, q (B, H, N, .): without cu_seqlens B sequences (max_seqlen refused);
    with cu_seqlens (cu) q must be packed (B = 1) and cu is checked (cu_seqlens()). Returns the number of
    sequences, the longest one (None where not read) and the checked max_seqlen (None if not given)."""
    if cu is None:
        if max_seqlen is not None:
            raise ValueError(f"{op}: max_seqlen is for varlen batches: pass it with cu_seqlens, got {max_seqlen!r}")
        return q.shape[0], None, None
    if q.shape[0] != 1:
        raise ValueError(f"{op}: with cu_seqlens, the inputs must be packed as (1, H, T, .), got B = {q.shape[0]}")
    n, longest = cu_seqlens(op, cu, q.shape[2], q.device)
    return n, longest, None if max_seqlen is None else seqlen_bound(op, max_seqlen, longest)


def seqlen_bound(op: str, max_seqlen, longest: int | None) -> int:
    """max_seqlen: an int >= 1 and >= the longest sequence (when its length is known on the host)."""
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral):
        raise TypeError(f"{op}: max_seqlen must be an int, got {type(max_seqlen).__name__}")
    if max_seqlen < 1 or (longest is not None and max_seqlen < longest):
        floor = max(1, longest or 0)
        raise ValueError(f"{op}: max_seqlen must be >= the longest sequence ({floor}), got {max_seqlen}")
    return int(max_seqlen)


def pool_indices(op: str, name: str, idx, n_rows: int, pool_rows: int, device: torch.device) -> torch.Tensor:
    """Per-row pool indices (n_rows,) int32 on `device`; their values (pool_indices_values) are checked on the host
    where can_read_values, once per version of the tensor (checked_once)."""
    index_tensor(op, name, idx, n_rows, device)
    if can_read_values(idx):
        checked_once(idx, ("pool", pool_rows), lambda: pool_indices_values(op, name, idx, pool_rows))
    return idx
