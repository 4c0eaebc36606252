"""attn_kernels: fused Hopper CUDA kernels for Based linear attention and sliding-window attention.

Ops (semantics: spec.md; each is a torch.library custom op in the ``attn_kernels`` namespace):
    based_prefill          causal Based linear attention over a sequence, optionally returning its state
                           (differentiable: based_prefill_backward is its gradient)
    based_decode           one generation step, state (or a state pool's slots) updated in place
    sliding_window_decode  softmax attention of a new token over its last `window` keys (ring-buffer cache)
    sliding_window_prefill causal sliding-window attention over a prompt, filling the ring-buffer caches
CPU tensors run the PyTorch reference (attn_kernels.reference); CUDA tensors run the kernels, never the
reference: without a kernel a CUDA call raises.
"""
from . import reference
from ._library import kernels_available, load_kernels
from .based_decode import based_decode, empty_state
from .based_prefill import based_prefill
from .based_prefill_backward import based_prefill_backward
from .reference import state_from_expanded, state_to_expanded
from .sliding_window_decode import sliding_window_decode
from .sliding_window_prefill import sliding_window_prefill

load_kernels()  # after the schemas above are defined

__all__ = [
    "based_prefill",
    "based_prefill_backward",
    "based_decode",
    "sliding_window_decode",
    "sliding_window_prefill",
    "empty_state",
    "state_to_expanded",
    "state_from_expanded",
    "kernels_available",
    "reference",
]
__version__ = "0.1.0"
