"""Reference MoR low-rank path (MOR_SPEC section 2.2): ``base + scaling * B (g * (A x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dense_gate import dense_gate


def compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    """float32 accumulation (float64 stays float64); ``upcast=False`` computes in the input dtype."""
    if not upcast or dtype == torch.float64:
        return dtype
    return torch.float32


def routing_gate(idx, gate, num_shared, ranks, scaling, ndim, dtype) -> torch.Tensor:
    """Dense gate times ``scaling``, shaped to broadcast against ``(B, *tokens, R)`` rank activations.

    Sample routing (``idx`` is ``(B, k)``) gives ``(B, 1, ..., 1, R)``; token routing gives
    ``(B, *tokens, R)``.
    """
    g = dense_gate(idx, gate, num_shared, ranks, dtype) * scaling
    if idx.dim() == 2 and ndim > 2:
        g = g.view(g.shape[0], *([1] * (ndim - 2)), ranks)
    return g


def finite_ranks(lora_a: torch.Tensor, lora_b: torch.Tensor):
    """``(a, b, bad)``: the weights with every rank that holds a non-finite value zeroed (``lora_a`` rows,
    ``lora_b`` columns) and ``bad (R,)`` marking those ranks. Any layout of ``lora_a`` ``(R, ...)``."""
    bad = ~(torch.isfinite(lora_a).flatten(1).all(1) & torch.isfinite(lora_b).all(0))
    a = torch.where(bad.view(-1, *([1] * (lora_a.dim() - 1))), 0, lora_a)
    return a, torch.where(bad, 0, lora_b), bad


def gate_ranks(h: torch.Tensor, g: torch.Tensor, g_rank: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``h * g`` over the rank dimension (last of ``h``, ``g`` and ``g_rank``), with NaN where a unit picks a
    rank in ``bad`` (``g_rank``: the dense gate before scaling, 0 where the unit does not pick the rank).

    MOR_SPEC 2.2: a rank with ``g = 0`` contributes exactly zero whatever its weights hold. ``h`` comes from
    the sanitised weights of :func:`finite_ranks`, so ``0 * h`` is a true zero; the units that do pick a
    non-finite rank get NaN (a diverged rank is not hidden), through ``torch.where``, which passes no
    gradient to the masked entries: the other ranks' and units' gradients are those without the bad rank."""
    return torch.where((g_rank != 0) & bad, torch.nan, h * g)


def lora_delta(x, lora_a, lora_b, idx, gate, num_shared, scaling, dtype) -> torch.Tensor:
    """``scaling * B (g * (A x))`` computed in ``dtype``, for ``x (B, *tokens, d_in)``."""
    a, b, bad = finite_ranks(lora_a.to(dtype), lora_b.to(dtype))
    ranks = lora_a.shape[0]
    h = F.linear(x.to(dtype), a)
    g = routing_gate(idx, gate, num_shared, ranks, 1.0, x.dim(), dtype)
    h = gate_ranks(h, g * scaling, g, bad)
    return F.linear(h, b)


def mor_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    num_shared: int,
    scaling: float,
    *,
    base: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """MoR delta (plus ``base`` when given), pure PyTorch, differentiable.

    Shapes: ``x (B, *tokens, d_in)``, ``lora_a (R, d_in)``, ``lora_b (d_out, R)``, ``idx``/``gate``
    ``(B, k)`` (sample routing) or ``(B, *tokens, k)`` (token routing), ``base (B, *tokens, d_out)``.
    Returns ``(B, *tokens, d_out)`` in ``x.dtype``. Inputs are assumed valid: the public
    ``mor_kernels.mor_lora`` checks them first.
    """
    ct = compute_dtype(x.dtype, upcast)
    out = lora_delta(x, lora_a, lora_b, idx, gate, num_shared, scaling, ct)
    if base is not None:
        out = base.to(ct) + out
    return out.to(x.dtype)
