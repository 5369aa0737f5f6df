"""Expansion of compact ``(idx, gate)`` pairs into the dense per-rank gate ``g`` (MOR_SPEC 2.1)."""

from __future__ import annotations

import torch


def dense_gate(idx: torch.Tensor, gate: torch.Tensor, num_shared: int, ranks: int, dtype: torch.dtype) -> torch.Tensor:
    """``g (..., R)``: 1 for the shared ranks, the summed gate of every slot that picked a routed rank.

    ``idx``/``gate`` are ``(..., k)``; ``idx == -1`` (a zero slot) contributes nothing, nor does an index
    outside ``[0, E)`` (reachable only with ``check_indices=False``), nor a slot whose gate is exactly 0 (it
    gets no gradient: the unit does not use that rank, MOR_SPEC 2.2). A rank picked by
    two slots (only possible with hand-made ``idx``) gets the sum of both gates, which is what every
    backend computes when it adds the slots' contributions one by one. Differentiable w.r.t. ``gate``.
    """
    lead = idx.shape[:-1]
    # Zero slots (and, as in every kernel, any index outside [0, E) or a gate of exactly 0) are scattered into
    # a spare column R that is dropped afterwards.
    real = (idx >= 0) & (idx < ranks - num_shared) & (gate != 0)
    target = torch.where(real, idx.long() + num_shared, torch.full_like(idx, ranks, dtype=torch.long))
    routed = torch.zeros(*lead, ranks + 1, dtype=dtype, device=gate.device)
    routed = routed.scatter_add(-1, target, gate.to(dtype))[..., :ranks]
    shared = torch.zeros(ranks, dtype=dtype, device=gate.device)
    shared[:num_shared] = 1
    return routed + shared
