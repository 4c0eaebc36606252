"""based_prefill_backward: the gradients of based_prefill (spec.md, "Backward"), and based_prefill's autograd
formula (torch.library.register_autograd), so training through based_prefill works and torch.compile traces
forward and backward.

The CPU op is the written-out reference backward (reference_backward.based_vjp, float32; float64 stays); the CUDA
op is the kernel csrc/based_prefill_backward/ (registered from csrc/binding.cpp)."""
from __future__ import annotations

import torch

from . import _validate as check
from . import reference
from ._library import compute_dtype, define_op
from .limits import FEAT_DIM, VALUE_DIM
from .reference_backward import based_vjp

OP = "based_prefill_backward"
GRAD_NAMES = ("q", "k", "v", "S0", "z0")  # the order of the op's outputs and of its `needs` mask


def _reference_backward(q, k, v, S0, z0, grad_o, grad_S, grad_z, scale, normalize, eps, needs):
    """reference_backward.based_vjp in float32 (float64 stays): (dq, dk, dv, dS0, dz0), each in its input's
    dtype; an empty tensor where `needs` is False (no gradient work for it) or the input is absent."""
    ct = compute_dtype(q.dtype)
    cast = lambda t: None if t is None or t.numel() == 0 else t.to(ct)  # noqa: E731  (empty = no gradient)
    init = None if S0 is None else (S0.to(ct), z0.to(ct))
    grads = based_vjp(q.to(ct), k.to(ct), v.to(ct), cast(grad_o), cast(grad_S), cast(grad_z), scale=scale,
                      normalize=normalize, eps=eps, initial_state=init, needs=tuple(needs))
    return tuple(q.new_empty(0) if g is None else g.to(t.dtype) for g, t in zip(grads, (q, k, v, S0, z0)))


def _fake(q, k, v, S0, z0, grad_o, grad_S, grad_z, scale, normalize, eps, needs):
    return tuple(torch.empty_like(t) if n and t is not None else q.new_empty(0)
                 for t, n in zip((q, k, v, S0, z0), needs))


define_op(OP, "(Tensor q, Tensor k, Tensor v, Tensor? S0, Tensor? z0, Tensor? grad_o, Tensor? grad_S, "
              "Tensor? grad_z, float scale, bool normalize, float eps, bool[] needs) "
              "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
          cpu=_reference_backward, fake=_fake)


# ---- based_prefill's autograd formula ----------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    q, k, v, scale, normalize, eps, S0, z0, _return_state, cu_seqlens, _max_seqlen = inputs
    ctx.save_for_backward(q, k, v, S0, z0)
    ctx.scale, ctx.normalize, ctx.eps = scale, normalize, eps
    ctx.varlen = cu_seqlens is not None


def _backward(ctx, grad_o, grad_S, grad_z):
    q, k, v, S0, z0 = ctx.saved_tensors
    if ctx.varlen:
        raise NotImplementedError("based_prefill: no backward for varlen batches (cu_seqlens) yet: train on "
                                  "dense (B, H, N, .) batches")
    # the op's inputs: q k v scale normalize eps S0 z0 return_state cu_seqlens max_seqlen
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 6, 7)]
    dq, dk, dv, dS0, dz0 = torch.ops.attn_kernels.based_prefill_backward(
        q, k, v, S0, z0, grad_o, grad_S, grad_z, ctx.scale, ctx.normalize, ctx.eps, needs)
    g = [t if n else None for t, n in zip((dq, dk, dv, dS0, dz0), needs)]
    return g[0], g[1], g[2], None, None, None, g[3], g[4], None, None, None


torch.library.register_autograd("attn_kernels::based_prefill", _backward, setup_context=_setup_context)


def based_prefill_backward(q, k, v, grad_o, *, grad_state=None, initial_state=None, scale=None, normalize=True,
                           eps=1e-6, needs=(True, True, True, True, True)):
    """The gradients of based_prefill, from what its forward saved (q, k, v and the initial state).

    Autograd calls this for you (``o.backward()``); call it directly to run the backward alone.

    Args:
        q, k (B, H, N, 16), v (B, H, N, 64): the forward's inputs (float16/bfloat16 on CUDA; any float on CPU).
        grad_o: (B, H, N, 64), the gradient of the loss w.r.t. o, same dtype and device as q.
        grad_state: optional (grad_S (B, H, 153, 64), grad_z (B, H, 153)) float32: gradients flowing into the
            returned state (return_state=True); None: the state was not used.
        initial_state, scale, normalize, eps: as given to the forward.
        needs: which of (dq, dk, dv, dS0, dz0) to compute (the others come back empty).

    Returns:
        (dq, dk, dv, dS0, dz0): each in its input's dtype and shape; an empty tensor where not needed or where
        there is no initial state.
    """
    check.based_qkv(OP, q, k, v, ndim=4)
    B, H, N, _ = q.shape
    check.tensor(OP, "grad_o", grad_o, 4)
    check.shape(OP, "grad_o", grad_o, (B, H, N, VALUE_DIM))
    check.same_device(OP, "q", q, grad_o=grad_o)
    check.input_dtype(OP, "q", q, grad_o=grad_o)
    scale = check.positive_float(OP, "scale", scale, default=reference.default_scale(FEAT_DIM))
    check.flag(OP, "normalize", normalize)
    eps = check.positive_float(OP, "eps", eps, allow_zero=True)
    if not isinstance(needs, (tuple, list)) or len(needs) != 5 or not all(isinstance(n, bool) for n in needs):
        raise TypeError(f"{OP}: needs must be 5 bools (dq, dk, dv, dS0, dz0), got {needs!r}")
    S0 = z0 = grad_S = grad_z = None
    if initial_state is not None:
        S0, z0 = check.state_pair(OP, "initial_state", initial_state, B, H, VALUE_DIM, q.device,
                                  (torch.float32, torch.bfloat16))
    if grad_state is not None:
        grad_S, grad_z = check.state_pair(OP, "grad_state", grad_state, B, H, VALUE_DIM, q.device,
                                          (torch.float32,))
    return torch.ops.attn_kernels.based_prefill_backward(q, k, v, S0, z0, grad_o, grad_S, grad_z, scale, normalize,
                                                         eps, list(needs))
