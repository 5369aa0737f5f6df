"""Degradation-aware load-balancing loss (MOR_SPEC section 4)."""

from __future__ import annotations

import torch
from torch import nn

from .layers import mor_layers


def top_k_slots(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """The selected slots ``(U, k)`` (int64) under the routing tie rule: descending, ties to the lower slot."""
    return torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k]


def degradation_aware_balance_loss(
    probs: torch.Tensor, severity: torch.Tensor, num_real: int, top_k: int, alpha: float = 0.01
) -> torch.Tensor:
    """``L = N * sum_i f_i * P_i`` for one layer (MOR_SPEC section 4).

    Args:
        probs: ``(U, E + Z)`` router probabilities of the routing units (samples or tokens).
        severity: ``(U,)`` severity of each unit's sample (1 everywhere gives the standard
            Switch/DeepSeek balance loss).
        num_real: ``E``, the routed (non-zero) slots; slots ``E..E+Z-1`` are zero slots.
        top_k: ``k``; the selections are the top-k of ``probs`` (ties to the lower slot).
        alpha: ``alpha_bal``.

    Returns:
        A float32 scalar, differentiable w.r.t. ``probs`` (``f`` is not differentiated).
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or probs.shape[0] < 1:
        raise ValueError(f"probs must be a tensor of shape (U, E+Z) with U >= 1, got {getattr(probs, 'shape', probs)}")
    units, slots = probs.shape
    if not isinstance(severity, torch.Tensor) or tuple(severity.shape) != (units,):
        raise ValueError(f"severity must be a tensor of shape ({units},), got {getattr(severity, 'shape', severity)}")
    if not 1 <= int(num_real) <= slots:
        raise ValueError(f"num_real must be in [1, {slots}] (E of E+Z={slots} slots), got {num_real}")
    if not 1 <= int(top_k) <= slots:
        raise ValueError(f"top_k must be in [1, {slots}], got {top_k}")
    probs = probs.float()
    chosen = top_k_slots(probs, top_k).reshape(-1)
    counts = torch.zeros(slots, device=probs.device).index_add_(0, chosen, torch.ones_like(chosen, dtype=torch.float32))
    f = counts / (units * top_k)
    sev = severity.detach().to(device=probs.device, dtype=torch.float32)
    weighted = torch.cat([probs[:, :num_real], probs[:, num_real:] * sev[:, None]], dim=1)
    p = alpha * weighted.mean(dim=0)
    return slots * (f * p).sum()


def layer_balance_loss(layer: nn.Module, alpha: float | None = None) -> torch.Tensor:
    """Section 4 for one MoR layer, from its last forward (token routing: tokens with their sample's severity)."""
    router = layer.router
    if router.last_probs is None:
        raise RuntimeError("this MoR layer has no routing from a forward pass yet: run a forward first")
    cfg = layer.config
    return degradation_aware_balance_loss(
        router.last_probs,
        router.last_severity,
        cfg.num_routed,
        cfg.top_k,
        cfg.balance_alpha if alpha is None else alpha,
    )


def balance_loss(module: nn.Module, alpha: float | None = None) -> torch.Tensor:
    """The mean over every MoR layer under ``module`` of the section 4 loss of its last forward.

    ``alpha`` overrides each layer's ``config.balance_alpha``. Layers that have not run since
    :func:`~mor_model.control.clear_routing` are left out; at least one must have run.
    """
    layers = [m for m in mor_layers(module).values() if m.router.last_probs is not None]
    if not layers:
        raise RuntimeError("no MoR layer under this module has routed anything yet: run a forward pass first")
    return torch.stack([layer_balance_loss(m, alpha) for m in layers]).mean()
