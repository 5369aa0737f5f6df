"""The routing backward shared by the Triton and the compiled backends (MOR_SPEC 2.1).

Both forwards return the selected slot numbers (zero slots included); from them and the saved
``probs``/``gate`` the gradient w.r.t. the logits is a few small torch ops, the same for every backend.
"""

from __future__ import annotations

import torch


def route_backward(
    probs: torch.Tensor, slots: torch.Tensor, gate: torch.Tensor, grad_gate, grad_probs, renormalize: bool
) -> torch.Tensor:
    """float32 ``d logits`` from the upstream gradients of ``gate (..., k)`` and ``probs (..., E + Z)``
    (either may be None); ``slots (..., k)`` are the selected slot numbers."""
    grad_p = torch.zeros_like(probs) if grad_probs is None else grad_probs.float().clone()
    if grad_gate is not None:
        grad_gate = grad_gate.float()
        slots = slots.long()
        if renormalize:
            # w = p_sel / sum(p_sel): d p_sel_i = (g_i - sum_j g_j w_j) / sum(p_sel)
            total = probs.gather(-1, slots).sum(-1, keepdim=True)
            grad_sel = (grad_gate - (grad_gate * gate).sum(-1, keepdim=True)) / total
        else:
            grad_sel = grad_gate
        grad_p = grad_p.scatter_add(-1, slots, grad_sel)
    return probs * (grad_p - (grad_p * probs).sum(-1, keepdim=True))  # softmax Jacobian
