"""Reference routing (MOR_SPEC section 2.1): softmax in float32, top-k, renormalise, zero slots -> -1."""

from __future__ import annotations

import torch


def route(
    logits: torch.Tensor, top_k: int, num_zero: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routes each row of ``logits`` to ``top_k`` of its ``E + Z`` slots.

    Args:
        logits: ``(..., E + Z)``, any float dtype; slots ``0..E-1`` are routed ranks, ``E..E+Z-1``
            zero slots.
        top_k: slots selected per row, ``1 <= top_k <= E + Z``.
        num_zero: ``Z``, the number of zero slots at the end of the row.
        renormalize: divide the selected probabilities by their sum (zero slots included).

    Returns:
        ``idx`` int32 ``(..., k)`` in ``[-1, E)`` (``-1`` for a zero slot), in descending order of
        probability with ties to the lower slot; ``gate`` float32 ``(..., k)``, the weight of each
        selected slot (zero slots keep theirs, so a renormalised row sums to 1); ``probs`` float32
        ``(..., E + Z)``, the softmax. ``gate`` and ``probs`` are differentiable w.r.t. ``logits``.
    """
    num_real = logits.shape[-1] - num_zero
    probs = torch.softmax(logits.float(), dim=-1)
    # A stable descending sort keeps equal probabilities in index order: ties go to the lower slot.
    order = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k]
    gate = probs.gather(-1, order)
    if renormalize:
        gate = gate / gate.sum(dim=-1, keepdim=True)
    idx = torch.where(order < num_real, order, torch.full_like(order, -1)).to(torch.int32)
    return idx, gate, probs
