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


def lora_delta(x, lora_a, lora_b, idx, gate, num_shared, scaling, dtype) -> torch.Tensor:
    """``scaling * B (g * (A x))`` computed in ``dtype``, for ``x (B, *tokens, d_in)``."""
    h = F.linear(x.to(dtype), lora_a.to(dtype))
    h = h * routing_gate(idx, gate, num_shared, lora_a.shape[0], scaling, x.dim(), dtype)
    return F.linear(h, lora_b.to(dtype))


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
