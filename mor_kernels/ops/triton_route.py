"""``route`` on the Triton kernel: custom op ``mor::triton_route`` + autograd (MOR_SPEC 2.1).

``gate`` and ``probs`` are differentiable w.r.t. ``logits`` (as in the reference); the backward is a
few element-wise torch ops on ``(rows, E + Z)`` tensors, so it has no kernel of its own.
"""

from __future__ import annotations

import torch

from ..kernels.route import route_forward
from .route_grad import route_backward


@torch.library.custom_op("mor::triton_route", mutates_args=())
def triton_route(
    logits: torch.Tensor, top_k: int, num_zero: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits ``(N, E + Z)`` -> ``idx`` int32 ``(N, k)``, ``gate`` f32 ``(N, k)``, ``probs`` f32
    ``(N, E + Z)``, ``slot`` int32 ``(N, k)`` (the selected slots, zero slots included)."""
    return route_forward(logits, top_k, num_zero, renormalize)


@triton_route.register_fake
def _(logits, top_k, num_zero, renormalize):
    n, s = logits.shape
    idx = logits.new_empty((n, top_k), dtype=torch.int32)
    return (
        idx,
        logits.new_empty((n, top_k), dtype=torch.float32),
        logits.new_empty((n, s), dtype=torch.float32),
        (torch.empty_like(idx)),
    )


class _RouteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, top_k, num_zero, renormalize):
        idx, gate, probs, slot = triton_route(logits, top_k, num_zero, renormalize)
        ctx.renormalize = renormalize
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(probs, slot, gate)
        ctx.mark_non_differentiable(idx)
        return idx, gate, probs

    @staticmethod
    def backward(ctx, _didx, dgate, dprobs):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        probs, slot, gate = ctx.saved_tensors
        dlogits = route_backward(probs, slot, gate, dgate, dprobs, ctx.renormalize)
        return dlogits.to(ctx.logits_dtype), None, None, None


def route(logits: torch.Tensor, top_k: int, num_zero: int, renormalize: bool = True):
    """Canonical backend ``route``: logits ``(..., E + Z)`` -> ``(idx, gate, probs)``, see ``mor_kernels.route``."""
    lead, n_slots = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, n_slots)
    idx, gate, probs = _RouteFn.apply(flat, int(top_k), int(num_zero), bool(renormalize))
    return idx.reshape(*lead, top_k), gate.reshape(*lead, top_k), probs.reshape(*lead, n_slots)
