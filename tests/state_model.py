"""The returned state against its promise: ``StateModel`` (a float64 model of the promised S, z and the elementwise
bound on |returned - model|), ``state_check`` / ``assert_state_close``, and based_decode's model
(``decode_state_model``, ``decode_state_advance``). based_prefill's model is in tests/prefill_model.py; every bound
is derived in tests/README.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from harness import fp32_scale

from attn_kernels import reference as ref

U32 = 2.0**-24  # unit roundoff of float32
TINY32 = 2.0**-126  # smallest normal float32: what a flushed subnormal can lose
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: U32, torch.float64: 2.0**-53}


@dataclass
class StateModel:
    """A float64 model of the promised state and the elementwise bound on |returned - model|."""
    S: torch.Tensor
    z: torch.Tensor
    bound_S: torch.Tensor
    bound_z: torch.Tensor



def decode_state_model(state_in, k, v, *, scale=None, state_dtype=torch.float32, carried=None) -> StateModel:
    """The state based_decode promises: S_in + phi(k) v^T and z_in + phi(k) from the state as given, with
    float32 features (<= 4 roundings, 4u relative), one float32 fma / add per element and, for a bf16
    state, one rounding to bf16 of the float32 result:
        bound_S = (u_state + 2u) (|S_new| + E_S) + 7u |phi(k)| |v|,   bound_z = (u_state + 2u) (|z_new| + E_z)
        + 7u |phi(k)|
    (u_state = 0 for a float32 state, 2^-8 for bf16; 2u covers the float32 rounding of the fma and, for bf16,
    the double rounding; 7u rather than 6u absorbs the feature error's second-order share of the bf16
    rounding), plus 2^-126 (|v| + 1) for a flushed subnormal. `carried` = (E_S, E_z): the bound on the error
    already in state_in when it is itself a model (decode_state_advance); the rounding of this step applies
    to a value up to that far from the model's."""
    scale = ref.default_scale(k.shape[-1]) if scale is None else scale
    phi = ref.feature_map_compact(k.double(), float(fp32_scale(scale)[0]))
    S_in, z_in = (t.double() for t in state_in)
    v64 = v.double()
    S_new = S_in + phi[..., :, None] * v64[..., None, :]
    z_new = z_in + phi
    E_S, E_z = (0.0, 0.0) if carried is None else carried
    unit = (UNIT_ROUNDOFF[state_dtype] if state_dtype != torch.float32 else 0.0) + 2 * U32
    term = phi.abs()[..., :, None] * v64.abs()[..., None, :]
    bound_S = unit * (S_new.abs() + E_S) + 7 * U32 * term + TINY32 * (v64.abs()[..., None, :] + 1)
    bound_z = unit * (z_new.abs() + E_z) + 7 * U32 * phi.abs() + TINY32
    return StateModel(S_new, z_new, bound_S, bound_z)


def decode_state_advance(model: StateModel, k, v, *, scale=None, state_dtype=torch.float32) -> StateModel:
    """The model after one more decode step from the previous MODEL: the errors of earlier steps carry over
    unchanged (the update is a sum), so the bounds add."""
    step = decode_state_model((model.S, model.z), k, v, scale=scale, state_dtype=state_dtype,
                              carried=(model.bound_S, model.bound_z))
    return StateModel(step.S, step.z, model.bound_S + step.bound_S, model.bound_z + step.bound_z)


@dataclass
class StateCheck:
    name: str
    ratio: float  # max over elements of |returned - model| / bound
    index: tuple
    err: float
    bound: float
    failing: int
    total: int

    def describe(self) -> str:
        return (f"{self.name}: element {self.index}: |returned - promised| {self.err:.3e} > bound {self.bound:.3e} "
                f"(error/bound {self.ratio:.3g}; {self.failing} of {self.total} elements over)")


def state_check(name: str, got: torch.Tensor, model: torch.Tensor, bound: torch.Tensor) -> StateCheck:
    err = (got.double() - model).abs()
    err = torch.where(torch.isfinite(err), err, math.inf)
    ratio = torch.where(bound > 0, err / bound, torch.where(err > 0, math.inf, 0.0))
    worst = int(ratio.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape))
    return StateCheck(name, float(ratio.flatten()[worst]), index, float(err.flatten()[worst]),
                      float(bound.flatten()[worst]), int((err > bound).sum()), err.numel())


def assert_state_close(S: torch.Tensor, z: torch.Tensor, model: StateModel) -> tuple[StateCheck, StateCheck]:
    """The returned state against the float64 model of its promise, elementwise within the derived bound."""
    assert S.shape == model.S.shape and z.shape == model.z.shape, "state shapes"
    checks = (state_check("S", S, model.S, model.bound_S), state_check("z", z, model.z, model.bound_z))
    for check in checks:
        assert check.ratio <= 1, check.describe()
    return checks
