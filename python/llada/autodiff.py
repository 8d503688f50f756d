"""Whether a tensor asks for a derivative, which llada's kernels cannot give.

The compiled ops have no derivatives (they are for inference), so the model
and the linear layers run torch compositions where a derivative is wanted,
and the ops' wrappers refuse such inputs by name. Two modes of autograd ask:
reverse mode (``requires_grad`` with grad mode on: ``backward``,
``torch.func.grad``) and forward mode (a tangent under
``torch.autograd.forward_ad`` or ``torch.func.jvp``), which ``requires_grad``
does not show.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad


def wants_gradient(t: torch.Tensor) -> bool:
    """Reverse mode: t requires grad and grad mode is on."""
    return t.requires_grad and torch.is_grad_enabled()


def in_dual_level() -> bool:
    """Whether forward mode is on: only then can a tensor carry a tangent."""
    return forward_ad._current_level >= 0


def wants_tangent(t: torch.Tensor) -> bool:
    """Forward mode: t carries a tangent."""
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None


def needs_derivative(t: torch.Tensor) -> bool:
    """Whether either mode of autograd asks for t's derivative."""
    return wants_gradient(t) or wants_tangent(t)
